"""pytest-benchmark: the whole model, inference and a training step (forward, cross-entropy,
backward, AdamW), eager (the public MPViT) vs torch.compile vs ours (fused) vs ours + compile,
side by side: MPViT-S in bf16 autocast on CUDA, MPViT-T in fp32 on a
CPU (batch 2 at 224: the suite stays short; `python -m mpvit_kernels.bench --ops model` reports
the issue's batch sizes). `pytest benchmarks/`."""
import contextlib

import pytest
import torch

from mpvit_kernels.bench.model import models
from mpvit_kernels.bench.timing import SUITE_DEVICE as DEVICE, sync

SIZE = "small" if DEVICE == "cuda" else "tiny"
BATCH = 16 if DEVICE == "cuda" else 2


@pytest.fixture(scope="module")
def pair():
    return models(SIZE, torch.device(DEVICE))


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours", "ours + compile"])
def test_model_inference(benchmark, pair, impl):
    public, ours = pair
    model = public if impl in ("eager", "torch.compile") else ours
    if "compile" in impl:
        model = torch.compile(model)
    x = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()

    def step():
        with torch.no_grad(), autocast:
            model(x)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"MPViT-{SIZE[0].upper()} inference {DEVICE} B{BATCH} 224"
    benchmark(step)


@pytest.mark.parametrize("impl", ["eager", "torch.compile", "ours", "ours + compile"])
def test_model_train_step(benchmark, impl):
    public, ours = models(SIZE, torch.device(DEVICE))  # a copy of its own: a step changes the weights
    model = (public if impl in ("eager", "torch.compile") else ours).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run = torch.compile(model) if "compile" in impl else model
    x = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    labels = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(run(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    step()  # a compile happens here, outside the timing
    benchmark.group = f"MPViT-{SIZE[0].upper()} train step {DEVICE} B{BATCH} 224"
    benchmark(step)
