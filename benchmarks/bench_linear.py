"""pytest-benchmark: the block's token Linears with norm1 (qkv) or GELU (fc1) fused, at the
MPViT-S stage-1 shape, eager vs torch.compile vs ours (ops.linear), forward and
forward+backward; the block after its attention (ops.linear_proj_mlp), forward (the model runs
it in inference); and the MLP onto the residual (ops.linear_mlp), forward and forward+backward
(the model runs it in training); on CUDA when there is one (else the eager composition ours runs
on a CPU). `pytest benchmarks/`."""
import pytest
import torch

from mpvit_kernels.bench.linear import IMPLS, MLP, ROWS_OUT, SITES, site_inputs
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 2
C, N = 64, 56 * 56


@pytest.mark.parametrize("site, backward", [(site, backward) for site in SITES
                                             for backward in ((False,) if site == MLP else (False, True))],
                         ids=lambda v: {False: "forward", True: "forward+backward"}.get(v, v))
@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
def test_linear(benchmark, site, impl, backward):
    eager, ours = IMPLS[site]
    fn = {"eager": eager, "torch.compile": torch.compile(eager), "ours": ours}[impl]
    x, params = site_inputs(site, BATCH, N, C, torch.float32, DEVICE)
    leaves = [t.requires_grad_(backward) for t in (x, *params)]
    grad = torch.randn(BATCH, N, C if site in ROWS_OUT else SITES[site] * C, device=DEVICE)

    def step():
        if backward:
            fn(*leaves).backward(grad)
        else:
            with torch.no_grad():
                fn(*leaves)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"linear {site} {'forward+backward' if backward else 'forward'} {DEVICE} {(BATCH, N, C)}"
    benchmark(step)
