"""Speed report section: factorized attention at MPViT-S shapes, eager vs torch.compile vs ours.

Two scopes: the attention core (qkv Linear output -> attention output, CRPE included) and the
whole FactorAttention module (x -> proj). Eager and torch.compile run the public module's op
sequence (mpvit_kernels.bench.public_mpvit). Bytes are what our kernels move (each kernel's loads
and stores, halos assumed cached), so GB/s compares directly with the device's peak.
"""
from __future__ import annotations

import torch

from mpvit_kernels import FactorAttention, extension_available, ops
from mpvit_kernels.bench.public_mpvit import ConvRelPosEnc, FactorAtt_ConvRelPosEnc
from mpvit_kernels.bench.timing import compiled, keep, measure

# MPViT-S: (stage, C) with 8 heads; N = (input / stride)^2 at strides 4, 8, 16, 32.
STAGES = [(1, 64, 4), (2, 128, 8), (3, 216, 16), (4, 288, 32)]


def kernel_bytes(B: int, N: int, C: int, elem: int, backward: bool) -> int:
    """HBM bytes our kernels move: forward reads k, v (context pass) then q, v and writes O
    (output pass): 5NC; backward reads q, dO, v (reduction pass) then q, k, v, dO and writes
    dq, dk, dv (elementwise pass): 10NC. Per-head stats and partials are O(C^2), left out."""
    return B * N * C * elem * (5 + (10 if backward else 0))


def core_inputs(B, N, C, dtype, device, requires_grad):
    heads, Ch = 8, C // 8
    window = {3: 2, 5: 3, 7: 3}
    qkv = torch.randn(B, N, 3 * C, device=device, dtype=dtype, requires_grad=requires_grad)
    weights = [(0.1 * torch.randn(h * Ch, 1, k, k, device=device, dtype=dtype)).requires_grad_(requires_grad)
               for k, h in window.items()]
    biases = [torch.zeros(h * Ch, device=device, dtype=dtype, requires_grad=requires_grad) for h in window.values()]
    return qkv, heads, Ch ** -0.5, weights, biases


def public_attention(C, weights, biases, device, dtype) -> FactorAtt_ConvRelPosEnc:
    """The public module (its op sequence is the eager baseline), with these CRPE weights."""
    m = FactorAtt_ConvRelPosEnc(C, 8, ConvRelPosEnc(C // 8)).to(device=device, dtype=dtype)
    if weights is not None:
        with torch.no_grad():
            for conv, w, b in zip(m.crpe.conv_list, weights, biases):
                conv.weight.copy_(w)
                conv.bias.copy_(b)
    return m


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    # ours: the Triton kernels on a GPU, the extension's C++ twin (forward; eager backward) on a CPU
    use_ours = device.type == "cuda" or extension_available()
    for res in args.resolutions:
        for stage, C, stride in STAGES:
            side = res // stride
            N = side * side
            for scope in ("core", "module"):
                for mode in ("forward", "forward+backward"):
                    backward = mode != "forward"
                    if scope == "core":
                        qkv, heads, scale, w, b = core_inputs(args.batch, N, C, dtype, device, backward)
                        grad = torch.randn(args.batch, N, C, device=device, dtype=dtype)

                        public = public_attention(C, w, b, device, dtype)

                        def eager_core(qkv=qkv, public=public):
                            return public.attend(qkv, (side, side))

                        def ours_core(qkv=qkv, w=w, b=b):
                            return ops.factor_attention(qkv, (side, side), heads, scale, w, b)

                        impls = {"eager": eager_core, "ours": ours_core,
                                 **compiled(args, eager_core, ours_core, fullgraph=False)}
                    else:
                        m = FactorAttention(C).to(device=device, dtype=dtype)
                        public = public_attention(C, None, None, device, dtype)
                        public.load_state_dict(m.state_dict())  # the same weights, the public op sequence
                        x = torch.randn(args.batch, N, C, device=device, dtype=dtype, requires_grad=backward)
                        grad = torch.randn_like(x)

                        def eager_mod(public=public, x=x):
                            return public(x, (side, side))

                        def ours_mod(m=m, x=x):
                            return m(x, (side, side))

                        impls = {"eager": eager_mod, "ours": ours_mod,
                                 **compiled(args, eager_mod, ours_mod, fullgraph=False)}
                    if not use_ours:  # neither a GPU nor the extension
                        impls.pop("ours")
                        impls.pop("ours + compile", None)
                    nbytes = kernel_bytes(args.batch, N, C, torch.finfo(dtype).bits // 8, backward)
                    for impl, fn in impls.items():
                        if backward:
                            def step(fn=fn, grad=grad):
                                fn().backward(grad)
                        else:
                            def step(fn=fn):
                                with torch.no_grad():
                                    fn()
                        t = measure(step, device, warmup=args.warmup, reps=args.reps, flush_l2_between=args.flush_l2,
                                    time_first_call="compile" in impl)
                        row = {"op": "factor_attention", "scope": scope, "input": res, "stage": stage,
                               "shape": [args.batch, N, C], "dtype": dtype_name, "mode": mode, "impl": impl, **t,
                               "bytes": nbytes}
                        # the bytes are our kernels' (the module adds the GEMMs' own); the CPU
                        # twin's backward is eager ops, whose bytes the model does not count
                        if impl == "ours" and (device.type == "cuda" or not backward):
                            row["GB/s"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
                            if args.peak_gbs:
                                row["% of copy peak"] = 100 * row["GB/s"] / args.peak_gbs
                        rows.append(row)
                        keep(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| input | stage | scope | B x N x C | dtype | mode | impl | median ms | p25-p75 ms | speedup vs eager | "
           "kernel MB | kernel GB/s | % of copy peak |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["input"], r["stage"], r["scope"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        core_ours = r["impl"] == "ours" and r["scope"] == "core" and "GB/s" in r
        gbs = f"{r['GB/s']:.0f}" if core_ours else "-"
        peak = f"{r['% of copy peak']:.0f}%" if core_ours and "% of copy peak" in r else "-"
        out.append(f"| {r['input']} | {r['stage']} | {r['scope']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
                   f"{r['mode']} | {r['impl']} | {r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | "
                   f"{base[key(r)] / r['median_ms']:.2f}x | {r['bytes'] / 1e6:.1f} | {gbs} | {peak} |")
    return "\n".join(out)
