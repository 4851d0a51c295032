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
    assert report.main(["--ops", "traffic,affine_hswish,depthwise,dwconv_bn,gli_projection", "--batch", "1", "--reps", "1",
                        "--warmup", "0", "--no-compile", "--resolutions", "64"]) == 0
    out = capsys.readouterr().out
    assert "## traffic" in out and "## affine_hswish" in out and "speedup bound" in out
    assert "## depthwise" in out and "| CPE | 64 | 1 | 1x16x16x64 |" in out
    assert "## gli_projection" in out and "| S | 64 | 1 | 1x16x16x(4x64 -> 128) | fp32 | eval forward | ours |" in out
    assert "## dwconv_bn" in out and "| 64 | 2 | 2 | 1x16x16x128 | fp32 | train forward+backward | ours |" in out


def test_traffic_model_of_the_depthwise_sites():
    from mpvit_kernels.bench.traffic import eager_depthwise, ours_depthwise

    for site, eager_ops in (("CPE", {"aten.convolution", "aten.add"}), ("InvRes dw", {"aten.convolution"})):
        eager = eager_depthwise(site, 2, 64, 56, torch.bfloat16)
        assert eager_ops <= set(eager.ops)
        ours = ours_depthwise(site, 2, 64, 56, torch.bfloat16)
        x_bytes = 2 * 64 * 56 * 56 * 2
        assert sum(b for _, b in ours) >= 2 * x_bytes  # x read once, y written once: never less
        assert eager.bytes > 2 * sum(b for _, b in ours)


def test_traffic_model_of_the_patch_embeddings():
    from mpvit_kernels.bench.traffic import eager_dwconv_bn, ours_dwconv_bn

    eager = eager_dwconv_bn(2, 64, 56, 1, torch.bfloat16)
    assert eager.ops.count("aten.convolution") == 2 and "aten.hardswish" in eager.ops
    ours = ours_dwconv_bn(2, 64, 56, 1, torch.bfloat16)
    x_bytes = 2 * 64 * 56 * 56 * 2
    assert 2 * x_bytes <= sum(b for _, b in ours) < eager.bytes / 3  # x read once, y written once


def test_traffic_model_of_the_gli_projection():
    from mpvit_kernels.bench.traffic import eager_gli_projection, ours_gli_projection

    eager = eager_gli_projection(2, 64, 128, 56, torch.bfloat16)
    assert {"aten.cat", "aten.convolution"} <= set(eager.ops)
    ours = ours_gli_projection(2, 64, 128, 56, torch.bfloat16)
    M = 2 * 56 * 56
    assert sum(b for _, b in ours) >= M * (4 * 64 + 128) * 2  # the inputs read once, y written once
    assert eager.bytes > 2 * sum(b for _, b in ours)
