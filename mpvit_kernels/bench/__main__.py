"""Speed report of what exists so far: the affine + Hardswish op (eval BatchNorm + Hardswish)
at MPViT-S shapes, eager PyTorch vs torch.compile vs ours, forward and forward+backward,
on the available device (CUDA if there is one, else CPU).

    python -m mpvit_kernels.bench [--batch B] [--dtype bf16|fp16|fp32] [--no-compile] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels.bench.timing import device_name, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (name, channels, resolution) of the eval BatchNorm + Hardswish sites of MPViT-S at 224x224
SITES = [("stem.0", 32, 112), ("stem.1", 64, 56), ("InvRes stage 1", 128, 28), ("InvRes stage 3", 288, 7)]


def eager(x, w, b, mean, var):
    return F.hardswish(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5))


def ours(x, w, b, mean, var):
    scale, shift = mpvit_kernels.reference.fold_bn(w, b, mean, var, 1e-5)
    return mpvit_kernels.ops.affine_hswish(x, scale, shift, True)


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    impls = {"eager": eager, "ours": ours}
    if not args.no_compile:
        impls["torch.compile"] = torch.compile(eager, fullgraph=True)
    rows = []
    for name, C, R in SITES:
        x = torch.randn(args.batch, C, R, R, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        params = [torch.randn(C, device=device).requires_grad_(), torch.randn(C, device=device).requires_grad_(),
                  torch.randn(C, device=device), torch.rand(C, device=device) + 0.5]
        elem = x.element_size() * x.numel()
        for mode in ("forward", "forward+backward"):
            xg = x.detach().requires_grad_(mode != "forward")
            grad = torch.randn_like(x)
            # fwd reads x, writes y; bwd reads grad and x, writes grad_x (parameters are tiny)
            nbytes = 2 * elem if mode == "forward" else 5 * elem
            for impl, fn in impls.items():
                if mode == "forward":
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(xg, *params)
                else:
                    def step(fn=fn):
                        fn(xg, *params).backward(grad)
                t = measure(step, device, warmup=args.warmup, reps=args.reps)
                rows.append({"op": "affine_hswish", "site": name, "shape": [args.batch, C, R, R],
                             "dtype": args.dtype, "mode": mode, "impl": impl, **t,
                             "bytes": nbytes, "GB/s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| site | shape (NHWC) | mode | impl | median ms | p25-p75 ms | GB/s | speedup vs eager |",
           "|---|---|---|---|---|---|---|---|"]
    base = {(r["site"], r["mode"]): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        out.append(f"| {r['site']} | {'x'.join(map(str, r['shape']))} | {r['mode']} | {r['impl']} | "
                   f"{r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['GB/s']:.1f} | "
                   f"{base[(r['site'], r['mode'])] / r['median_ms']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpvit_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 on CUDA, 2 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.batch = args.batch or (16 if cuda else 2)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    device = torch.device("cuda" if cuda else "cpu")
    print(f"# mpvit-kernels speed report\n\ndevice: {device_name(device)}; torch {torch.__version__}; "
          f"python {platform.python_version()}; extension built: {mpvit_kernels.extension_available()}; "
          f"backend: {mpvit_kernels.get_backend()}\n")
    if not cuda:
        print("No GPU here: these are CPU timings of the C++ CPU kernels, not GPU figures.\n")
    rows = run(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
