"""Speed report section: affine_hswish (eval BatchNorm + Hardswish) at the MPViT-S sites,
eager vs torch.compile vs ours, channels-last; and the training form, BatchNorm with batch
statistics + Hardswish (``affine_hswish_batch`` on a GPU: the stem's and InvRes's), forward and
backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels.bench.timing import compiled, keep, measure

# (name, channels, resolution) of eval BatchNorm + Hardswish sites of MPViT-S at 224x224
SITES = [("stem.0", 32, 112), ("stem.1", 64, 56), ("InvRes stage 1", 128, 28), ("InvRes stage 3", 288, 7)]


def eager(x, w, b, mean, var):
    return F.hardswish(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5))


def ours(x, w, b, mean, var):
    scale, shift = mpvit_kernels.reference.fold_bn(w, b, mean, var, 1e-5)
    return mpvit_kernels.ops.affine_hswish(x, scale, shift, True)


def eager_train(x, w, b, mean, var):
    return F.hardswish(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))


def ours_train(x, w, b, mean, var):
    from mpvit_kernels.ops.affine_hswish import batch_norm_hswish

    return batch_norm_hswish(x, w, b, 1e-5, True)[0]


# (mode, bytes the op must move in units of the map's bytes): forward reads x and writes y, its
# backward reads grad and x and writes grad_x; with batch statistics the forward also reads x
# for them first, and the backward reads grad and x for its sums before the elementwise pass
MODES = (("forward", 2), ("forward+backward", 5), ("train forward+backward", 8))


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    impls = {"eager": eager, "ours": ours, **compiled(args, eager, ours)}
    train_impls = {"eager": eager_train, "ours": ours_train, **compiled(args, eager_train, ours_train)}
    rows = []
    for name, C, R in SITES:
        x = torch.randn(args.batch, C, R, R, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        params = [torch.randn(C, device=device).requires_grad_(), torch.randn(C, device=device).requires_grad_(),
                  torch.randn(C, device=device), torch.rand(C, device=device) + 0.5]
        elem = x.element_size() * x.numel()
        for mode, passes in MODES:
            xg = x.detach().requires_grad_(mode != "forward")
            grad = torch.randn_like(x)
            nbytes = passes * elem  # (the parameters are tiny)
            for impl, fn in (train_impls if mode.startswith("train") else impls).items():
                if mode == "forward":
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(xg, *params)
                else:
                    def step(fn=fn):
                        fn(xg, *params).backward(grad)
                t = measure(step, device, warmup=args.warmup, reps=args.reps, flush_l2_between=args.flush_l2,
                            time_first_call="compile" in impl)
                rows.append({"op": "affine_hswish", "site": name, "shape": [args.batch, C, R, R],
                             "dtype": dtype_name, "mode": mode, "impl": impl, **t,
                             "bytes": nbytes, "GB/s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
                keep(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| site | shape (NHWC) | dtype | mode | impl | median ms | p25-p75 ms | GB/s | speedup vs eager |",
           "|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["site"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        out.append(f"| {r['site']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                   f"{r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | {r['GB/s']:.1f} | "
                   f"{base[key(r)] / r['median_ms']:.2f}x |")
    return "\n".join(out)
