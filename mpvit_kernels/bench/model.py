"""Speed report section: the whole model, end to end, inference (eval, no grad).

Eager is the public MPViT as its users run it (mpvit_kernels.bench.public_mpvit: NCHW, the public
op sequence); ours is the same model after :func:`mpvit_kernels.fuse` (the fused stages,
channels-last from the input on, the very same weights); each also under torch.compile ("ours +
compile" compiles the fused model, our ops staying whole in its graph). A 16-bit dtype runs
under autocast with fp32 weights, as mixed-precision users run it. On a CPU, "ours" is the C++
twins of depthwise and affine_hswish plus the reference of the Triton families. Not in the
default report (torch.compile of a whole model takes minutes): ``--ops model``.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from mpvit_kernels import fuse
from mpvit_kernels.bench.public_mpvit import PublicStyleMPViT
from mpvit_kernels.bench.timing import compiled, measure

SIZES = {"cuda": ("small", "base"), "cpu": ("tiny",)}
BATCH = {"cuda": 64, "cpu": 8}


def models(size: str, device: torch.device):
    """(eager, ours): a public-layout model with non-trivial BatchNorm statistics, and a fused copy."""
    torch.manual_seed(0)
    public = PublicStyleMPViT(size).to(device).eval()
    with torch.no_grad():
        for m in public.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return public, fuse(copy.deepcopy(public)).to(memory_format=torch.channels_last)


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    batch = args.model_batch or BATCH[device.type]
    for size in SIZES[device.type]:
        public, ours = models(size, device)
        impls = {"eager": public, "ours": ours, **compiled(args, public, ours, fullgraph=False)}
        for res in args.resolutions:
            x = torch.randn(batch, 3, res, res, device=device)
            for impl, model in impls.items():
                def step(model=model, x=x):
                    with torch.no_grad(), (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                                           else contextlib.nullcontext()):
                        model(x)

                t = measure(step, device, warmup=args.warmup, reps=args.reps, time_first_call="compile" in impl)
                rows.append({"op": "MPViT", "model": size[0].upper(), "input": res, "shape": [batch, 3, res, res],
                             "dtype": dtype_name, "mode": "inference", "impl": impl, **t,
                             "img/s": batch / (t["median_ms"] * 1e-3)})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | input | batch | dtype | impl | median ms | p25-p75 ms | img/s | speedup vs eager | "
           "vs torch.compile | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["model"], r["input"], r["dtype"])  # noqa: E731
    base = {(key(r), r["impl"]): r["median_ms"] for r in rows}
    for r in rows:
        compile_ms = base.get((key(r), "torch.compile"))
        vs_compile = f"{compile_ms / r['median_ms']:.2f}x" if compile_ms else "-"
        first = f"{r['first_call_ms'] / 1e3:.0f}" if r.get("first_call_ms") is not None else "-"
        out.append(f"| MPViT-{r['model']} | {r['input']} | {r['shape'][0]} | {r['dtype']} | {r['impl']} | "
                   f"{r['median_ms']:.1f} | {r['p25_ms']:.1f}-{r['p75_ms']:.1f} | {r['img/s']:.1f} | "
                   f"{base[(key(r), 'eager')] / r['median_ms']:.2f}x | {vs_compile} | {first} |")
    return "\n".join(out)
