"""The package builds as a user builds it: `pip wheel --no-build-isolation .` against this torch,
with the CUDA kernels compiled for the documented default architectures."""
import glob
import os
import runpy
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


@pytest.mark.slow
def test_pip_wheel_builds_installs_and_has_cuda_kernels_for_sm80_and_sm90(tmp_path):
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("needs a CUDA build of torch and nvcc")
    # Built from this tree, as a user runs it. The compile shares build/temp with `make build`
    # (setup.py): in a fresh clone those objects were compiled minutes ago by the same commands,
    # and ninja recompiles any whose command differs (another arch list, say), so this checks
    # the packaging, the default archs and the loading without paying the compile twice.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "MPVIT_KERNELS_NO_EXTENSION")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU to pick an arch from: the documented default applies
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w",
                          str(tmp_path / "dist"), ROOT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "building CUDA + CPU kernels" in out.stderr + out.stdout
    (wheel,) = glob.glob(str(tmp_path / "dist" / "mpvit_kernels-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        (so,) = [n for n in zf.namelist() if n.startswith("mpvit_kernels/_C") and n.endswith(".so")]
        zf.extract(so, tmp_path / "unpacked")
    # the wheel installs and its extension loads, away from the source tree
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), wheel],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import mpvit_kernels, mpvit_kernels._C, torch; "
            "assert mpvit_kernels.__file__.startswith(sys.argv[1]), mpvit_kernels.__file__; "
            "assert mpvit_kernels.extension_available(); "
            "assert torch._C._dispatch_has_kernel_for_dispatch_key('mpvit_kernels::affine_hswish', 'CUDA'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to read the cubins")
    listing = subprocess.run([tool, "--list-elf", str(tmp_path / "unpacked" / so)], capture_output=True, text=True)
    assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout + listing.stderr


def test_cuda_home_is_found_without_nvcc_on_path(tmp_path):
    # An image may have the toolkit at /usr/local/cuda with no nvcc on PATH: torch finds it there,
    # so must setup.py, or it builds the CPU kernels alone and every CUDA test fails later.
    find_cuda_home = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")["find_cuda_home"]
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    no_nvcc = {"PATH": str(tmp_path / "empty")}
    assert find_cuda_home(no_nvcc, fallback=str(toolkit)) == str(toolkit)
    assert find_cuda_home(no_nvcc, fallback=str(tmp_path / "nothing")) is None
    assert find_cuda_home({"PATH": str(toolkit / "bin")}, fallback=str(tmp_path / "nothing")) == str(toolkit)
    assert find_cuda_home({**no_nvcc, "CUDA_HOME": "/opt/cuda-x"}, fallback=str(toolkit)) == "/opt/cuda-x"
