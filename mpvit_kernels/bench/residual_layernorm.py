"""Speed report section: the middle of an MPViT block, from the attention output to the block's
output, at the MPViT-S stages, eager vs torch.compile vs ours, tokens (B, N, C).

Both sides take the block input x, the attention output a and the MLP's hidden h (its fc1 + GELU
between is the same in both) and return (u, out). Eager, as the public block runs it:
``s = x + linear(a, proj); u = norm2(s); out = s + linear(h, fc2)``. Ours, as our block runs it:
``y = a @ proj.weight^T; r, u = residual_layernorm(x, y, ...); out = r.addmm_(h, fc2.weight^T)``
on rows (B*N, C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpvit_kernels import ops
from mpvit_kernels.bench.factor_attention import STAGES  # (stage, channels, stride) of MPViT-S
from mpvit_kernels.bench.timing import compiled, keep, measure
from mpvit_kernels.models.mpvit import CONFIGS

MLP_RATIO = CONFIGS["small"][2]


def eager(x, a, h, wp, bp, w2, b2, gamma, beta):
    s = x + F.linear(a, wp, bp)
    return F.layer_norm(s, (s.shape[-1],), gamma, beta, 1e-6), s + F.linear(h, w2, b2)


def ours(x, a, h, wp, bp, w2, b2, gamma, beta):
    B, N, C = x.shape
    r, u = ops.residual_layernorm(x.reshape(B * N, C), F.linear(a.reshape(B * N, C), wp), bp, b2, gamma, beta, 1e-6)
    return u.view(B, N, C), r.addmm_(h.reshape(B * N, h.shape[-1]), w2.to(r.dtype).t()).view(B, N, C)


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    impls = {"eager": eager, "ours": ours, **compiled(args, eager, ours)}
    rows = []
    for res in args.resolutions:
        for stage, C, stride in STAGES:
            N = (res // stride) ** 2
            x, a = (torch.randn(args.batch, N, C, device=device, dtype=dtype) for _ in range(2))
            h = torch.randn(args.batch, N, MLP_RATIO * C, device=device, dtype=dtype)
            params = [torch.randn(C, C, device=device, dtype=dtype) * C ** -0.5, torch.randn(C, device=device, dtype=dtype),
                      torch.randn(C, MLP_RATIO * C, device=device, dtype=dtype) * C ** -0.5,
                      torch.randn(C, device=device, dtype=dtype), torch.rand(C, device=device, dtype=dtype) + 0.5,
                      torch.randn(C, device=device, dtype=dtype)]
            # the least any implementation moves: x, a and h read once, u and out written once
            nbytes = args.batch * N * C * x.element_size() * (4 + MLP_RATIO)
            for mode in ("forward", "forward+backward"):
                backward = mode != "forward"
                leaves = [t.detach().requires_grad_(backward) for t in (x, a, h)]
                grads = [torch.randn_like(x), torch.randn_like(x)]
                for impl, fn in impls.items():
                    if backward:
                        def step(fn=fn):
                            torch.autograd.backward(fn(*leaves, *params), grads)
                    else:
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(*leaves, *params)
                    t = measure(step, device, warmup=args.warmup, reps=args.reps, flush_l2_between=args.flush_l2,
                                time_first_call="compile" in impl)
                    rows.append({"op": "residual_layernorm", "input": res, "stage": stage,
                                 "shape": [args.batch, N, C], "dtype": dtype_name, "mode": mode, "impl": impl, **t,
                                 "bytes": nbytes, "GB/s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
                    keep(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| input | stage | B x N x C | dtype | mode | impl | median ms | p25-p75 ms | GB/s (minimum bytes) | "
           "speedup vs eager |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["input"], r["stage"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        out.append(f"| {r['input']} | {r['stage']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['mode']} | "
                   f"{r['impl']} | {r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['GB/s']:.1f} | "
                   f"{base[key(r)] / r['median_ms']:.2f}x |")
    return "\n".join(out)
