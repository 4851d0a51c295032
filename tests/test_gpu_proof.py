"""`make gpu-proof` on a machine without a GPU stops at once, saying why."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the proof would run")
def test_gpu_proof_stops_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    out = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_proof.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA GPU visible" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing was built or written
