"""Speed report section: the patch embeddings' DWConv2d_BN (depthwise 3x3 -> 1x1 -> BN ->
Hardswish) at MPViT-S shapes, eval, eager vs torch.compile vs ours, channels-last.

Eager is the public module's sequence: depthwise conv, 1x1 conv, BatchNorm (eval), Hardswish.
Ours on a GPU is one Triton kernel (the depthwise output never written); on a CPU the op runs
unfused (the depthwise and affine_hswish C++ twins around ATen's 1x1 conv). Bytes are the
minimum traffic: x read once and y written once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpvit_kernels import ops, reference
from mpvit_kernels.bench.timing import measure

# MPViT-S patch embeddings: (stage, C, input stride of the map, conv stride); path 0 of stages
# 2-4 halves the map, every other path keeps it.
EMBEDS = [(1, 64, 4, 1), (2, 128, 4, 2), (2, 128, 8, 1), (3, 216, 8, 2), (3, 216, 16, 1), (4, 288, 16, 2),
          (4, 288, 32, 1)]


def embed_inputs(B, C, side, dtype, device):
    x = torch.randn(B, C, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dw = 0.2 * torch.randn(C, 1, 3, 3, device=device, dtype=dtype)
    pw = torch.randn(C, C, 1, 1, device=device, dtype=dtype) / C ** 0.5
    bn = (torch.randn(C, device=device), torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.5,
          torch.randn(C, device=device))
    return x, dw, pw, bn


def eager(x, dw, pw, bn, stride):
    mean, var, gamma, beta = bn
    y = F.conv2d(F.conv2d(x, dw, None, stride, 1, groups=x.shape[1]), pw)
    return F.hardswish(F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-5))


def ours(x, dw, pw, bn, stride):
    mean, var, gamma, beta = bn
    scale, shift = reference.fold_bn(gamma, beta, mean, var, 1e-5)
    return ops.dwconv_bn(x, dw, pw, stride, scale, shift, hswish=True)


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    impls = {"eager": eager, "ours": ours}
    if not args.no_compile:
        impls["torch.compile"] = torch.compile(eager, fullgraph=True)
    for res in args.resolutions:
        for stage, C, map_stride, stride in EMBEDS:
            side = res // map_stride
            x, dw, pw, bn = embed_inputs(args.batch, C, side, dtype, device)
            out_side = (side - 1) // stride + 1
            nbytes = x.element_size() * args.batch * C * (side * side + out_side * out_side)
            flops = 2 * args.batch * out_side * out_side * C * (C + 9)
            for impl, fn in impls.items():
                def step(fn=fn):
                    with torch.no_grad():
                        fn(x, dw, pw, bn, stride)
                t = measure(step, device, warmup=args.warmup, reps=args.reps)
                seconds = t["median_ms"] * 1e-3
                rows.append({"op": "dwconv_bn", "input": res, "stage": stage, "stride": stride,
                             "shape": [args.batch, C, side, side], "dtype": dtype_name, "mode": "eval forward",
                             "impl": impl, **t, "bytes": nbytes, "GB/s": nbytes / seconds / 1e9,
                             "TFLOP/s": flops / seconds / 1e12})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| input | stage | stride | shape (NHWC) | dtype | impl | median ms | p25-p75 ms | GB/s | TFLOP/s | "
           "speedup vs eager |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["input"], r["stage"], r["stride"], r["dtype"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        B, C, H, W = r["shape"]
        out.append(f"| {r['input']} | {r['stage']} | {r['stride']} | {B}x{H}x{W}x{C} | {r['dtype']} | {r['impl']} | "
                   f"{r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['GB/s']:.1f} | "
                   f"{r['TFLOP/s']:.2f} | {base[key(r)] / r['median_ms']:.2f}x |")
    return "\n".join(out)
