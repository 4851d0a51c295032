"""pytest-benchmark: the factorized attention core (qkv -> attention output, CRPE included) at
MPViT-S stage 1 for a 224 input, eager (the public module's op sequence) vs torch.compile vs ours. `pytest benchmarks/`.
Ours needs a GPU (the Triton kernels); on CPU its rows are skipped."""
import pytest
import torch

from mpvit_kernels import ops
from mpvit_kernels.bench.factor_attention import core_inputs, public_attention
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

BATCH = 16 if DEVICE == "cuda" else 1
SIDE, C = 56, 64


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_factor_attention_core(benchmark, impl, mode):
    if impl == "ours" and DEVICE != "cuda":
        pytest.skip("the Triton kernels need a GPU")
    backward = mode == "forward+backward"
    qkv, heads, scale, w, b = core_inputs(BATCH, SIDE * SIDE, C, torch.float32, DEVICE, backward)
    grad = torch.randn(BATCH, SIDE * SIDE, C, device=DEVICE)
    public = public_attention(C, w, b, DEVICE, torch.float32)  # the eager baseline: the public op sequence
    fn = {"eager": public.attend, "torch.compile": torch.compile(public.attend),
          "ours": lambda qkv, size: ops.factor_attention(qkv, size, heads, scale, w, b)}[impl]

    def step():
        if backward:
            fn(qkv, (SIDE, SIDE)).backward(grad)
        else:
            with torch.no_grad():
                fn(qkv, (SIDE, SIDE))
        sync()

    step()  # a compile happens here, outside the timing

    benchmark.group = f"factor_attention core {mode} {DEVICE} B{BATCH}-N{SIDE * SIDE}-C{C}"
    benchmark(step)
