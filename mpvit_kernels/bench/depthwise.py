"""Speed report section: the depthwise op at MPViT-S's CPE and InvRes sites, eager vs
torch.compile vs ours, channels-last.

Eager is what the public MPViT modules run: CPE views its tokens as an image (channels-last
memory), runs the depthwise conv with bias and adds the input; InvRes (eval) runs the depthwise
conv, BatchNorm and Hardswish. Bytes are the minimum traffic: x read once and y written once
forward; the backward reads grad (twice for CPE: the transposed conv and the residual) and x
and writes grad_x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpvit_kernels import ops, reference
from mpvit_kernels.bench.timing import compiled, keep, measure

# MPViT-S: (stage, C, stride of the map)
STAGES = [(1, 64, 4), (2, 128, 8), (3, 216, 16), (4, 288, 32)]
SITES = ("CPE", "InvRes dw")


def eager_cpe(x, w, b, bn):
    return F.conv2d(x, w, b, padding=1, groups=x.shape[1]) + x


def ours_cpe(x, w, b, bn):
    return ops.depthwise(x, w, b, residual=True)


def eager_invres(x, w, b, bn):
    mean, var, gamma, beta = bn
    return F.hardswish(F.batch_norm(F.conv2d(x, w, None, padding=1, groups=x.shape[1]), mean, var, gamma, beta,
                                    False, 0.0, 1e-5))


def ours_invres(x, w, b, bn):
    mean, var, gamma, beta = bn
    scale, shift = reference.fold_bn(gamma, beta, mean, var, 1e-5)
    return ops.depthwise(x, w, None, 1, scale, shift, hswish=True)


IMPLS = {"CPE": (eager_cpe, ours_cpe), "InvRes dw": (eager_invres, ours_invres)}


def site_inputs(B, C, side, dtype, device):
    x = torch.randn(B, C, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (0.2 * torch.randn(C, 1, 3, 3, device=device, dtype=dtype)).requires_grad_()
    b = torch.randn(C, device=device, dtype=dtype).requires_grad_()
    bn = (torch.randn(C, device=device), torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.5,
          torch.randn(C, device=device))
    return x, w, b, bn


def minimum_bytes(site: str, x: torch.Tensor, backward: bool) -> int:
    n = x.numel() * x.element_size()
    if not backward:
        return 2 * n
    return 2 * n + (6 if site == "CPE" else 5) * n


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    impls_of = {}
    for site, (eager, ours) in IMPLS.items():  # one compiled function per site: dynamo generalises over shapes
        impls_of[site] = {"eager": eager, "ours": ours, **compiled(args, eager, ours)}
    for res in args.resolutions:
        for stage, C, stride in STAGES:
            side = res // stride
            x, w, b, bn = site_inputs(args.batch, C, side, dtype, device)
            for site in SITES:
                impls = impls_of[site]
                # InvRes trains with batch statistics (the conv alone runs as this op): forward only
                for mode in ("forward", "forward+backward") if site == "CPE" else ("forward",):
                    backward = mode != "forward"
                    xg = x.detach().requires_grad_(backward)
                    grad = torch.randn_like(x)
                    nbytes = minimum_bytes(site, x, backward)
                    for impl, fn in impls.items():
                        if backward:
                            def step(fn=fn):
                                fn(xg, w, b, bn).backward(grad)
                        else:
                            def step(fn=fn):
                                with torch.no_grad():
                                    fn(xg, w, b, bn)
                        t = measure(step, device, warmup=args.warmup, reps=args.reps, flush_l2_between=args.flush_l2,
                                    time_first_call="compile" in impl)
                        rows.append({"op": "depthwise", "site": site, "input": res, "stage": stage,
                                     "shape": [args.batch, C, side, side], "dtype": dtype_name, "mode": mode,
                                     "impl": impl, **t, "bytes": nbytes,
                                     "GB/s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
                        keep(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| site | input | stage | shape (NHWC) | dtype | mode | impl | median ms | p25-p75 ms | GB/s | "
           "speedup vs eager |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["site"], r["input"], r["stage"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        B, C, H, W = r["shape"]
        out.append(f"| {r['site']} | {r['input']} | {r['stage']} | {B}x{H}x{W}x{C} | {r['dtype']} | {r['mode']} | "
                   f"{r['impl']} | {r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['GB/s']:.1f} | "
                   f"{base[key(r)] / r['median_ms']:.2f}x |")
    return "\n".join(out)
