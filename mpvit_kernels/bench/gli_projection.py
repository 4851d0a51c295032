"""Speed report section: the ``gli_projection`` GEMM at its MPViT-S and -B sites, channels-last:
every stage's ``aggregate`` (concat of num_path + 1 maps -> 1x1 conv -> BN -> Hardswish) and the
two 1x1 Conv2d_BN of its InvRes, which the model runs through the same GEMM (one input, C -> C:
conv1 with Hardswish, conv2 with the block's identity added in the epilogue). Eager vs
torch.compile vs ours, eval forward and training forward+backward, and in eval a bare
``torch.mm`` of the same M, N, K on a pre-concatenated input (the GEMM alone: ours should cost
about that) and "cuDNN + affine_hswish" (the 1x1 conv as cuDNN's, on a CPU oneDNN's, then the
folded BN and Hardswish as one ``affine_hswish`` pass, the residual added after): the
alternative the GEMM epilogue has to beat at each site. Ours in eval is the autotuned tile
(timed after its first call has tuned it). On sm_90 also "ours (TMA)": the op with its
tensor-descriptor loads (opt-in until this row measures them), on the pinned tile.

Eager is the public module's sequence: torch.cat (the aggregate's), the 1x1 conv, BatchNorm,
Hardswish, the identity add (InvRes conv2). Ours on a GPU is one Triton GEMM in eval (the concat
never built, BN, Hardswish and the residual in the epilogue); on a CPU the op runs unfused (a
concat and a GEMM, then the affine_hswish C++ twin). Bytes are the eval minimum traffic: every
input read once (the residual too), y written once.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from mpvit_kernels import ops, reference
from mpvit_kernels.bench.timing import compiled, keep, measure
from mpvit_kernels.ops.gli_projection import tma_device

# (model, stage, C per path, C out, input stride of the map): num_path + 1 = 4 inputs everywhere
AGGREGATES = [("S", 1, 64, 128, 4), ("S", 2, 128, 216, 8), ("S", 3, 216, 288, 16), ("S", 4, 288, 288, 32),
              ("B", 1, 128, 224, 4), ("B", 2, 224, 368, 8), ("B", 3, 368, 480, 16), ("B", 4, 480, 480, 32)]
INPUTS = 4
# site: (inputs, output channels are the stage's out (else its C), Hardswish, residual)
SITES = {"aggregate": (INPUTS, True, True, False), "InvRes conv1": (1, False, True, False),
         "InvRes conv2": (1, False, False, True)}


def aggregate_inputs(B, C, Cout, side, dtype, device, n=INPUTS):
    xs = [torch.randn(B, C, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
          for _ in range(n)]
    w = torch.randn(Cout, n * C, 1, 1, device=device, dtype=dtype) / (n * C) ** 0.5
    bn = (torch.randn(Cout, device=device), torch.rand(Cout, device=device) + 0.5,
          torch.rand(Cout, device=device) + 0.5, torch.randn(Cout, device=device))
    return xs, w, bn


def _concat(xs):
    return torch.cat(xs, 1) if len(xs) > 1 else xs[0]


def _bn_act(y, bn, training, hswish, residual):
    mean, var, gamma, beta = bn
    y = F.batch_norm(y, mean, var, gamma, beta, training, 0.1 if training else 0.0, 1e-5)
    y = F.hardswish(y) if hswish else y
    return y if residual is None else residual + y


def eager(xs, w, bn, hswish=True, residual=None):
    return _bn_act(F.conv2d(_concat(xs), w), bn, False, hswish, residual)


def _folded(bn):
    mean, var, gamma, beta = bn
    return reference.fold_bn(gamma, beta, mean, var, 1e-5)


def ours(xs, w, bn, hswish=True, residual=None):
    return ops.gli_projection(xs, w, *_folded(bn), hswish=hswish, residual=residual)


def cudnn_affine_hswish(xs, w, bn, hswish=True, residual=None):
    y = ops.affine_hswish(F.conv2d(_concat(xs), w), *_folded(bn), hswish)
    return y if residual is None else y.add_(residual)


def eager_train(xs, w, bn, hswish=True, residual=None):
    return _bn_act(F.conv2d(_concat(xs), w), bn, True, hswish, residual)


def ours_train(xs, w, bn, hswish=True, residual=None):
    """As the model trains them (nn.pointwise_bn_hswish): the GEMM writes the pre-BN output and
    its statistics, one normalise + Hardswish pass, the residual added after."""
    y = ops.gli_projection_train(xs, w, bn[2], bn[3], 1e-5, hswish=hswish)[0]
    return y if residual is None else y + residual


def train_step(fn, xs, w, bn, grad, hswish=True, residual=None):
    y = fn(xs, w, bn, hswish, residual)
    torch.autograd.grad(y, (*xs, w, bn[2], bn[3]), grad)


def with_tma(fn):
    """fn with the op's tensor-descriptor (TMA) loads on (ops.gli_projection.use_tma)."""
    module = sys.modules["mpvit_kernels.ops.gli_projection"]

    def run(*args):
        saved, module.TMA = module.TMA, True
        try:
            return fn(*args)
        finally:
            module.TMA = saved
    return run


def run(args, device: torch.device, dtype: torch.dtype, dtype_name: str) -> list[dict]:
    rows = []
    modes = {"eval forward": {"eager": eager, "ours": ours},
             "train forward+backward": {"eager": eager_train, "ours": ours_train}}
    tma = device.type == "cuda" and tma_device(device, dtype)
    for mode, impls in modes.items():
        if tma:  # the GPU run that decides whether the TMA loads become the default
            impls["ours (TMA)"] = with_tma(impls["ours"])
        if mode == "eval forward":
            impls["cuDNN + affine_hswish"] = cudnn_affine_hswish
        impls.update(compiled(args, impls["eager"], impls["ours"]))
    for res in args.resolutions:  # every aggregate first: a run cut short keeps those rows
        for site, (n, to_stage_out, hswish, has_residual) in SITES.items():
            for model, stage, C, stage_out, stride in AGGREGATES:
                side = res // stride
                Cout = stage_out if to_stage_out else C
                xs, w, bn = aggregate_inputs(args.batch, C, Cout, side, dtype, device, n)
                residual = torch.randn(args.batch, Cout, side, side, device=device, dtype=dtype).contiguous(
                    memory_format=torch.channels_last) if has_residual else None
                M, K = args.batch * side * side, n * C
                nbytes = xs[0].element_size() * M * (K + Cout * (2 if has_residual else 1))
                for mode, impls in modes.items():
                    train = mode != "eval forward"
                    impls = dict(impls)
                    flops = 2 * M * K * Cout * (3 if train else 1)  # training: the backward's two GEMMs
                    if train:
                        xs, w = [x.detach().requires_grad_() for x in xs], w.detach().requires_grad_()
                        bn = (*bn[:2], bn[2].detach().requires_grad_(), bn[3].detach().requires_grad_())
                        grad = torch.randn(args.batch, Cout, side, side, device=device, dtype=dtype).contiguous(
                            memory_format=torch.channels_last)
                    else:  # the GEMM alone, its A operand concatenated beforehand (not timed)
                        a, b = _concat(xs).permute(0, 2, 3, 1).reshape(M, K), w.reshape(Cout, K).t()
                        impls["torch.mm (pre-concatenated)"] = lambda *_, a=a, b=b: torch.mm(a, b)
                    for impl, fn in impls.items():
                        def step(fn=fn):
                            if train:
                                train_step(fn, xs, w, bn, grad, hswish, residual)
                            else:
                                with torch.no_grad():
                                    fn(xs, w, bn, hswish, residual)
                        try:
                            t = measure(step, device, warmup=args.warmup, reps=args.reps,
                                        flush_l2_between=args.flush_l2, time_first_call="compile" in impl)
                        except Exception as e:  # a first-time column (TMA, cuDNN's) costs only itself
                            if impl in ("eager", "ours"):
                                raise
                            print(f"gli_projection: column {impl!r} dropped at {model} stage {stage} {site} "
                                  f"{mode}: {type(e).__name__}: {e}", file=sys.stderr)
                            for other in modes.values():
                                other.pop(impl, None)
                            continue
                        seconds = t["median_ms"] * 1e-3
                        rows.append({"op": "gli_projection", "model": model, "input": res, "stage": stage,
                                     "site": site, "shape": [args.batch, side, side, n, C, Cout], "dtype": dtype_name,
                                     "mode": mode, "impl": impl, **t, "bytes": nbytes, "GB/s": nbytes / seconds / 1e9,
                                     "TFLOP/s": flops / seconds / 1e12})
                        keep(args, rows)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | input | stage | site | B x H x W x (n x C -> Cout) | dtype | mode | impl | median ms | "
           "p25-p75 ms | GB/s | TFLOP/s | speedup vs eager |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["model"], r["input"], r["stage"], r["site"], r["dtype"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        B, H, W, n, C, Cout = r["shape"]
        out.append(f"| {r['model']} | {r['input']} | {r['stage']} | {r['site']} | {B}x{H}x{W}x({n}x{C} -> {Cout}) | "
                   f"{r['dtype']} | {r['mode']} | {r['impl']} | {r['median_ms']:.3f} | {r['p25_ms']:.3f}-{r['p75_ms']:.3f} | "
                   f"{r['GB/s']:.1f} | {r['TFLOP/s']:.2f} | {base[key(r)] / r['median_ms']:.2f}x |")
    return "\n".join(out)
