"""Speed report section: the block's token Linears with what surrounds them, at the MPViT-S
stages, eager vs torch.compile vs ours, tokens (B, N, C) -> (B, N, hidden).

Sites: "norm1 + qkv" (``qkv(norm1(x))``, hidden 3C) and "fc1 + GELU" (``gelu(fc1(u))``, hidden
4C). Eager runs them as the public block does (a LayerNorm pass, then cuBLAS's GEMM with its
bias; cuBLAS's GEMM, then a GELU pass); ours is ``ops.linear``, one Triton GEMM with the
LayerNorm on its A tiles or GELU in its epilogue (on a CPU: the same eager ops, oneDNN's GEMM);
forward+backward rows add fc1's backward, whose GELU grad and bias grad come from the epilogue
of a GEMM that recomputes the pre-activation (``linear_gelu_grad``), and norm1 -> qkv's, from
``NORM_GRAD_ROWS`` rows one GEMM with the LayerNorm's backward in its epilogue
(``linear_norm_grad``); those rows also time ours with that backward forced either way ("ours,
norm1 backward fused" / "... in ATen ops"): from which rows the fusion pays is for a GPU to say.
Site "MLP onto residual" (fc1, GELU, fc2 onto the residual r: what the model's blocks run in
training): eager as the public block (cuBLAS's GEMMs, a GELU pass, the add), ours
``ops.linear_mlp``, whose backward takes fc1's pre-activation grad from one kernel computing fc2's
input grad and the GELU grad together (``linear_mlp_grad``: the 4C-wide grad never stored).
Site "block after attention" (proj, residual add, norm2, MLP, residual add: inference, the
stages with C <= 128): eager as the public block runs it (cuBLAS's GEMMs with their biases, the
adds, LayerNorm and GELU passes); ours ``ops.linear_proj_mlp``, one kernel whose proj output,
norm2 output and hidden never reach memory, where the model takes it; and "ours unfused", what
the model runs elsewhere (proj's cuBLAS GEMM, ``ops.residual_layernorm``, ``ops.linear`` for fc1
+ GELU, cuBLAS's fc2 accumulating onto r): the fusion is worth it where ours beats ours unfused.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import torch
import torch.nn.functional as F

from mpvit_kernels import backend, ops, reference
from mpvit_kernels.bench.factor_attention import STAGES  # (stage, channels, stride) of MPViT-S
from mpvit_kernels.bench.timing import compiled, keep, measure
from mpvit_kernels.models.mpvit import CONFIGS
from mpvit_kernels.ops.linear import MLP_MAX_C

MLP_RATIO = CONFIGS["small"][2]
EPS = 1e-6  # MPViT's LayerNorms'
MLP = "block after attention"
TRAIN_MLP = "MLP onto residual"
SITES = {"norm1 + qkv": 3, "fc1 + GELU": MLP_RATIO, MLP: MLP_RATIO, TRAIN_MLP: MLP_RATIO}  # site: hidden width / C
ROWS_OUT = (MLP, TRAIN_MLP)  # the sites whose output is C wide (the others': their hidden)


def eager_norm_qkv(x, w, b, gamma, beta):
    return F.linear(F.layer_norm(x, (x.shape[-1],), gamma, beta, EPS), w, b)


def ours_norm_qkv(x, w, b, gamma, beta):
    return ops.linear(x, w, b, gamma, beta, EPS)


def eager_fc1_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def ours_fc1_gelu(x, w, b):
    return ops.linear(x, w, b, gelu=True)


def eager_mlp(a, wp, pb, lnw, lnb, w1, b1, w2, b2, x):
    x = x + F.linear(a, wp, pb)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), lnw, lnb, EPS), w1, b1)), w2, b2)


def ours_mlp(a, wp, pb, lnw, lnb, w1, b1, w2, b2, x):
    return ops.linear_proj_mlp(a, x, wp, pb, lnw, lnb, EPS, w1, b1, w2, b2)


def ours_unfused_mlp(a, wp, pb, lnw, lnb, w1, b1, w2, b2, x):
    C = a.shape[-1]
    y = F.linear(a.reshape(-1, C), wp)
    r, u = ops.residual_layernorm(x.reshape(-1, C), y, pb, b2, lnw, lnb, EPS)
    h = ops.linear(u, w1, b1, gelu=True)
    return torch.addmm(r, h, w2.t()).view(x.shape)


# norm1 + qkv's forward+backward also with its backward forced either way: impl -> NORM_GRAD_ROWS
NORM_GRAD_IMPLS = {"ours, norm1 backward fused": 0, "ours, norm1 backward in ATen ops": sys.maxsize}


@contextlib.contextmanager
def norm_grad_rows(rows: int):
    """ops.linear's backward fused (linear_norm_grad) from ``rows`` rows while inside."""
    module = importlib.import_module("mpvit_kernels.ops.linear")
    kept, module.NORM_GRAD_ROWS = module.NORM_GRAD_ROWS, rows
    try:
        yield
    finally:
        module.NORM_GRAD_ROWS = kept


def eager_mlp_onto(x, w1, b1, w2, r):
    return reference.linear_mlp(x, r, w1, b1, w2)


def ours_mlp_onto(x, w1, b1, w2, r):
    return ops.linear_mlp(x, r, w1, b1, w2)


IMPLS = {"norm1 + qkv": (eager_norm_qkv, ours_norm_qkv), "fc1 + GELU": (eager_fc1_gelu, ours_fc1_gelu),
         MLP: (eager_mlp, ours_mlp), TRAIN_MLP: (eager_mlp_onto, ours_mlp_onto)}


def site_inputs(site: str, B: int, N: int, C: int, dtype, device):
    """x (B, N, C) and the site's parameters: (weight, bias[, LayerNorm weight, bias]); for the
    block after attention x is the attention's output and the parameters (proj weight and bias,
    norm2 weight and bias, fc1 weight and bias, fc2 weight and bias, the block's input (B, N, C))."""
    hidden = SITES[site] * C
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    params = [torch.randn(hidden, C, device=device, dtype=dtype) * C ** -0.5, torch.randn(hidden, device=device, dtype=dtype)]
    if site == "norm1 + qkv":
        params += [torch.rand(C, device=device, dtype=dtype) + 0.5, torch.randn(C, device=device, dtype=dtype)]
    if site == TRAIN_MLP:  # fc1's weight and bias, fc2's weight, the residual (B, N, C)
        params += [torch.randn(C, hidden, device=device, dtype=dtype) * hidden ** -0.5,
                   torch.randn(B, N, C, device=device, dtype=dtype)]
    if site == MLP:
        params = [torch.randn(C, C, device=device, dtype=dtype) * C ** -0.5, torch.randn(C, device=device, dtype=dtype),
                  torch.rand(C, device=device, dtype=dtype) + 0.5, torch.randn(C, device=device, dtype=dtype),
                  *params, torch.randn(C, hidden, device=device, dtype=dtype) * hidden ** -0.5,
                  torch.randn(C, device=device, dtype=dtype), torch.randn(B, N, C, device=device, dtype=dtype)]
    return x, params


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    for site, (eager, ours) in IMPLS.items():
        impls = {"eager": eager, "ours": ours, **compiled(args, eager, ours)}
        if site == MLP:
            impls = {"eager": eager, "ours": ours, "ours unfused": ours_unfused_mlp, **compiled(args, eager, ours)}
        for res in args.resolutions:
            for stage, C, stride in STAGES:
                if site == MLP and C > MLP_MAX_C:
                    continue
                N = (res // stride) ** 2
                x, params = site_inputs(site, args.batch, N, C, dtype, device)
                # the least any implementation moves: x read once, the hidden written once (the
                # block after attention: its two inputs read, its output written)
                nbytes = args.batch * N * C * x.element_size() * (3 if site in ROWS_OUT else 1 + SITES[site])
                for mode in ("forward",) if site == MLP else ("forward", "forward+backward"):
                    backward = mode != "forward"
                    leaf = x.detach().requires_grad_(backward)
                    weights = [p.detach().requires_grad_(backward) for p in params]
                    grad = torch.randn(args.batch, N, C if site in ROWS_OUT else SITES[site] * C, device=device,
                                       dtype=dtype)
                    # (where ours runs its Triton kernels: elsewhere both are eager's ops)
                    forced = NORM_GRAD_IMPLS if backward and site == "norm1 + qkv" and \
                        backend.use_triton("linear", device) else {}
                    for impl, fn in {**impls, **{name: ours for name in forced}}.items():
                        if backward:
                            def step(fn=fn, rows=forced.get(impl)):
                                with contextlib.nullcontext() if rows is None else norm_grad_rows(rows):
                                    fn(leaf, *weights).backward(grad)
                        else:
                            def step(fn=fn):
                                with torch.no_grad():
                                    fn(leaf, *weights)
                        t = measure(step, device, warmup=args.warmup, reps=args.reps, flush_l2_between=args.flush_l2,
                                    time_first_call="compile" in impl)
                        rows.append({"op": f"linear {site}", "input": res, "stage": stage,
                                     "shape": [args.batch, N, C], "dtype": dtype_name, "mode": mode, "impl": impl,
                                     **t, "bytes": nbytes, "GB/s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
                        keep(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| site | input | stage | B x N x C | dtype | mode | impl | median ms | p25-p75 ms | GB/s (minimum bytes) | "
           "speedup vs eager |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["op"], r["input"], r["stage"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        out.append(f"| {r['op'][len('linear '):]} | {r['input']} | {r['stage']} | {'x'.join(map(str, r['shape']))} | "
                   f"{r['dtype']} | {r['mode']} | {r['impl']} | {r['median_ms']:.3f} | "
                   f"{r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['GB/s']:.1f} | {base[key(r)] / r['median_ms']:.2f}x |")
    return "\n".join(out)
