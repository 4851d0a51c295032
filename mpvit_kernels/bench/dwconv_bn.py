"""Speed report section: the patch embeddings' DWConv2d_BN (depthwise 3x3 -> 1x1 -> BN ->
Hardswish) at MPViT-S shapes, eager vs torch.compile vs ours, channels-last: eval forward, and
training forward+backward (batch statistics; grads of x and every weight).

Eager is the public module's sequence: depthwise conv, 1x1 conv, BatchNorm, Hardswish. Ours on a
GPU is one Triton kernel in eval (the depthwise output never written), and in training that
kernel with statistics, the normalise pass and the backward of mpvit_kernels.ops.dwconv_bn; on a
CPU the op runs unfused (the depthwise and affine_hswish C++ twins around ATen's 1x1 conv). Bytes
are the eval minimum traffic, x read once and y written once, for both modes (so training's
GB/s is a lower bound of what it moves).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpvit_kernels import ops, reference
from mpvit_kernels.bench.timing import compiled, keep, measure

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


def eager_train(x, dw, pw, bn, stride):
    """Training forward (batch statistics, running statistics updated) of the public sequence."""
    mean, var, gamma, beta = bn
    y = F.conv2d(F.conv2d(x, dw, None, stride, 1, groups=x.shape[1]), pw)
    return F.hardswish(F.batch_norm(y, mean, var, gamma, beta, True, 0.1, 1e-5))


def ours_train(x, dw, pw, bn, stride):
    return ops.dwconv_bn_train(x, dw, pw, stride, bn[2], bn[3], 1e-5, hswish=True)[0]


def train_step(fn, x, dw, pw, bn, stride, grad):
    """Forward and backward of every grad a training step needs (x, both conv weights, the
    BatchNorm's weight and bias)."""
    y = fn(x, dw, pw, bn, stride)
    torch.autograd.grad(y, (x, dw, pw, bn[2], bn[3]), grad)


def _leaf(t):
    return t.detach().requires_grad_()


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    modes = {"eval forward": {"eager": eager, "ours": ours}, "train forward+backward": {"eager": eager_train,
                                                                                         "ours": ours_train}}
    for impls in modes.values():
        impls.update(compiled(args, impls["eager"], impls["ours"]))
    for res in args.resolutions:
        for stage, C, map_stride, stride in EMBEDS:
            side = res // map_stride
            x, dw, pw, bn = embed_inputs(args.batch, C, side, dtype, device)
            out_side = (side - 1) // stride + 1
            nbytes = x.element_size() * args.batch * C * (side * side + out_side * out_side)
            flops = 2 * args.batch * out_side * out_side * C * (C + 9)
            for mode, impls in modes.items():
                train = mode != "eval forward"
                if train:  # the backward's two GEMMs and the depthwise backward's
                    flops *= 3
                    x, dw, pw = _leaf(x), _leaf(dw), _leaf(pw)
                    bn = (*bn[:2], _leaf(bn[2]), _leaf(bn[3]))
                    grad = torch.randn(args.batch, C, out_side, out_side, device=device, dtype=dtype).contiguous(
                        memory_format=torch.channels_last)
                for impl, fn in impls.items():
                    def step(fn=fn):
                        if train:
                            train_step(fn, x, dw, pw, bn, stride, grad)
                        else:
                            with torch.no_grad():
                                fn(x, dw, pw, bn, stride)
                    t = measure(step, device, warmup=args.warmup, reps=args.reps, flush_l2_between=args.flush_l2,
                                time_first_call="compile" in impl)
                    seconds = t["median_ms"] * 1e-3
                    rows.append({"op": "dwconv_bn", "input": res, "stage": stage, "stride": stride,
                                 "shape": [args.batch, C, side, side], "dtype": dtype_name, "mode": mode,
                                 "impl": impl, **t, "bytes": nbytes, "GB/s": nbytes / seconds / 1e9,
                                 "TFLOP/s": flops / seconds / 1e12})
                    keep(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| input | stage | stride | shape (NHWC) | dtype | mode | impl | median ms | p25-p75 ms | GB/s | TFLOP/s | "
           "speedup vs eager |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["input"], r["stage"], r["stride"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        B, C, H, W = r["shape"]
        out.append(f"| {r['input']} | {r['stage']} | {r['stride']} | {B}x{H}x{W}x{C} | {r['dtype']} | {r['mode']} | "
                   f"{r['impl']} | "
                   f"{r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['GB/s']:.1f} | "
                   f"{r['TFLOP/s']:.2f} | {base[key(r)] / r['median_ms']:.2f}x |")
    return "\n".join(out)
