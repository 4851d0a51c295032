"""The speed report runs, and its traffic model counts what eager PyTorch really dispatches."""
import torch

from mpvit_kernels.bench import __main__ as report
from mpvit_kernels.bench.traffic import eager_factor_attention, ours_factor_attention


def test_traffic_model_counts_eager_ops_and_beats_it_at_large_n():
    eager = eager_factor_attention(2, 64 * 64, 64, torch.bfloat16, backward=False)
    # softmax, two matmuls, the three CRPE convs, cat, mul, add, scale: every one is a kernel
    assert eager.launches >= 10 and "aten.convolution" in eager.ops and "aten._softmax" in eager.ops
    ours = ours_factor_attention(2, 64 * 64, 64, torch.bfloat16, backward=False)
    assert eager.bytes > 4 * sum(b for _, b in ours)
    nc_bytes = 2 * 64 * 64 * 64 * 2  # one (B, N, C) bf16 tensor
    assert sum(b for _, b in ours) >= 5 * nc_bytes  # never below the 5NC minimum


def test_speed_report_runs(capsys):
    assert report.main(["--ops", "traffic,affine_hswish", "--batch", "1", "--reps", "1", "--warmup", "0",
                        "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "## traffic" in out and "## affine_hswish" in out and "speedup bound" in out
