"""Traffic and launch model: kernels launched and HBM bytes moved, eager PyTorch vs ours.

Scopes: one eval forward of the whole model, and the memory of one training step of it (its peak,
``LiveBytes``, and what the forward leaves saved for the backward, ``saved_for_backward``); the
patch embeddings' DWConv2d_BN, the stages' GLI projection (eval forward), and the depthwise op at
the CPE and InvRes sites (forward); the middle of a block and its token Linears with norm1 or GELU
(forward and forward+backward); the attention core (qkv Linear output -> attention output) and the
whole FactorAttention module (x -> proj), whose two Linears run as eager's in both columns.

Eager is the public MPViT's op sequence (mpvit_kernels.bench.public_mpvit), counted, not
estimated: it runs on meta tensors under a TorchDispatchMode that records every op that moves
data (one kernel each; views and the aliasing _unsafe_view do not) and the bytes of its tensor
inputs and outputs, i.e. its traffic if nothing stayed in cache. Ours comes from each kernel's
own loads and stores (``ours_factor_attention`` and the like), halo re-reads assumed to hit
cache; the whole model is our MPViT run on meta tensors the same way, each fused op one launch
moving its inputs and outputs, attention from its kernels. The ratio eager/ours of bytes is the
speedup bound of a memory-bound op.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mpvit_kernels import models
from mpvit_kernels.bench import depthwise as depthwise_bench
from mpvit_kernels.bench import dwconv_bn as dwconv_bn_bench
from mpvit_kernels.bench import gli_projection as gli_bench
from mpvit_kernels.bench import linear as linear_bench
from mpvit_kernels.bench import residual_layernorm as residual_layernorm_bench
from mpvit_kernels.bench.factor_attention import STAGES
from mpvit_kernels.bench.public_mpvit import ConvRelPosEnc, FactorAtt_ConvRelPosEnc, PublicStyleMPViT
from mpvit_kernels.ops.factor_attention import _block_d, _chunking, _whole_map, pack_launches

MODEL_SIZES = ("small",)  # the whole-model rows: the budget is set on MPViT-S


# Not views by their schema, yet they move no data: an allocation, the reshape that aliases its
# input (matmul's outputs come back through it), and dtype arithmetic on the host.
_NO_DATA_MOVED = (torch.ops.aten.empty.memory_format, torch.ops.aten._unsafe_view.default,
                  torch.ops.aten.promote_types.default)


def _as_cudnn_lays_out(func, args, out):
    """A meta convolution's output laid out as cuDNN lays it out on a GPU: channels-last for a
    channels-last input (meta's kernel returns every output contiguous), so that the ops after
    it (our model's stem) take the path they take there."""
    if func is torch.ops.aten.convolution.default and out.device.type == "meta" and out.dim() == 4 and \
            args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous():
        return torch.empty_like(out, memory_format=torch.channels_last)
    return out


class CudnnLayouts(TorchDispatchMode):
    """Every op as it is, convolutions' outputs laid out as cuDNN's (``_as_cudnn_lays_out``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _as_cudnn_lays_out(func, args, func(*args, **(kwargs or {})))


class CountTraffic(TorchDispatchMode):
    """Counts the non-view ops dispatched inside the context and the bytes they touch."""

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.bytes = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _as_cudnn_lays_out(func, args, func(*args, **(kwargs or {})))
        if not func.is_view and func not in _NO_DATA_MOVED:
            self.launches += 1
            self.ops.append(str(func.overloadpacket))
            # each tensor read once and each written once: an in-place op's output (its input)
            # counts as both
            for tensors in ((args, kwargs), out):
                seen = set()
                for t in tree_leaves(tensors):
                    if isinstance(t, torch.Tensor) and id(t) not in seen:
                        seen.add(id(t))
                        self.bytes += t.numel() * t.element_size()
            # a BatchNorm with batch statistics is two kernels on a GPU, forward and backward:
            # a reduction pass over its input (input, grad) before the elementwise one counted above
            if func is torch.ops.aten.native_batch_norm.default and args[5]:
                self._launch("native_batch_norm statistics pass", args[0].numel() * args[0].element_size())
            elif func is torch.ops.aten.native_batch_norm_backward.default and args[7]:
                self._launch("native_batch_norm_backward reduction pass",
                             sum(t.numel() * t.element_size() for t in args[:2]))
        return out

    def _launch(self, name: str, nbytes: int) -> None:
        """One more launch, of ``nbytes``, beside those of the dispatched ops."""
        self.launches += 1
        self.ops.append(name)
        self.bytes += nbytes


def eager_factor_attention(B, N, C, dtype, backward: bool, scope: str = "core") -> CountTraffic:
    """The public FactorAtt_ConvRelPosEnc's op sequence on meta tensors: its core (qkv Linear
    output -> the input of proj) or the whole module."""
    side = int(round(N ** 0.5))
    m = FactorAtt_ConvRelPosEnc(C, 8, ConvRelPosEnc(C // 8)).to(device="meta", dtype=dtype)
    count = CountTraffic()
    if scope == "core":
        x = torch.empty(B, N, 3 * C, device="meta", dtype=dtype, requires_grad=backward)
        run = m.attend
    else:
        x = torch.empty(B, N, C, device="meta", dtype=dtype, requires_grad=backward)
        run = m
    with torch.set_grad_enabled(backward), count:
        out = run(x, (side, side))
        if backward:
            out.backward(torch.empty_like(out))
    return count


def ours_factor_attention(B, N, C, dtype, backward: bool) -> list[tuple[str, int]]:
    """(launch, bytes) of our core: the Triton kernels from their loads and stores, plus the small
    launches around them (the backward's sums over batch and chunks and its gather of the CRPE
    grads, and the CRPE weight packing: cached per version of the weights where no graph is
    built, so never in an inference forward after the first; in training the forward packs, and
    its backward reads that packing). The forward is the op's own choice for N: one whole_map
    launch on small maps (k, v, then q, v read, O written; S and lse written only in training,
    for the backward), else the three passes through memory."""
    heads = 8
    elem = torch.finfo(dtype).bits // 8
    BD, BH = _block_d(C // heads), B * heads
    _, splits = _chunking(BH, N)
    nc = B * N * C * elem
    w = C * 49 * 4  # packed CRPE weights (fp32), 7x7 each
    Ch = C // heads  # per-head buffers hold Ch, not BD, head dims
    stats = BH * (Ch * Ch + Ch) * 4  # S and lse per head
    partials = BH * splits * (Ch * Ch + 2 * Ch) * 4
    weights = [torch.empty(h * (C // heads), 1, k, k, device="meta", dtype=dtype)
               for k, h in {3: 2, 5: 3, 7: 3}.items()]
    pack = [("pack CRPE weights/bias (cat, gather, cast)", 2 * w)] * pack_launches(weights, torch.float32)
    launches = list(pack if backward else [])  # inference: the packing is cached
    if _whole_map(N):
        launches.append(("whole_map: read k, v, q, v, weights; write O" + (", S, lse" if backward else ""),
                         5 * nc + w + (stats if backward else 0)))
    else:
        if splits == 1:  # one chunk a head: the context pass writes S and lse, no combine
            launches.append(("context_partial (one chunk): read k, v; write S, lse", 2 * nc + stats))
        else:
            launches += [
                ("context_partial: read k, v; write chunk partials", 2 * nc + partials),
                ("context_combine: partials -> S, lse", partials + stats),
            ]
        launches.append(("output: read q, v, S, weights; write O", 3 * nc + stats + w))
    if backward:
        dw_partials = BH * splits * (64 * BD + BD) * 4
        padded = BH * (BD * BD + BD) * 4  # dS and c, BD-padded for grad_qkv
        if splits == 1:  # the grad pass writes dS and c, no combine
            launches.append(("grad_partial (one chunk): read q, dO, v, S; write dS, c, CRPE partials",
                             3 * nc + BH * Ch * Ch * 4 + padded + dw_partials))
        else:
            launches += [
                ("grad_partial: read q, dO, v; write chunk partials",
                 3 * nc + BH * splits * Ch * Ch * 4 + dw_partials),
                ("grad_combine: partials, S -> dS, c", BH * splits * Ch * Ch * 4 + stats + padded),
            ]
        launches += [  # (the forward's packing: none here)
            ("grad_qkv: read q, k, v, dO, S, dS, lse, c; write dq, dk, dv", 7 * nc + stats + padded + w),
            # the sums read only the existing taps and head dims of the partials
            ("sum CRPE weight grads over batch and chunks", BH * splits * 49 * Ch * 4 + w),
            ("sum CRPE bias grads", BH * splits * Ch * 4 + C * 4),
            ("gather CRPE weight grads into each window's layout", 2 * w),
        ] + ([("cast CRPE weight grads to the parameters' dtype", w + w // 2),
              ("cast CRPE bias grads", C * 6)] if dtype != torch.float32 else [])
    return launches


def _combine(name: str, P: int, C: int, acc: int) -> list[tuple[str, int]]:
    """(launch, bytes) of the combine of two (P, C) arrays of partials in ``acc``-byte values into
    four (C,) results: its first levels where P is long (stats_chunks_kernel, sums_chunks_kernel,
    each writing two (cdiv(P, COMBINE_CHUNK), C) arrays), then the last."""
    from mpvit_kernels.triton import affine_hswish as kernels

    passes = []
    while chunks := kernels.combine_chunks(P):
        passes.append((f"{name} (a first level)", 2 * P * C * acc + 2 * chunks * C * acc))
        P = chunks
    return passes + [(name, 2 * P * C * acc + 4 * C * acc)]


def _batch_norm_passes(func, args) -> list[tuple[str, int]]:
    """(launch, bytes) of a training BatchNorm op's passes beyond the one that CountOurs counts
    for the op (its inputs read, its outputs written): the statistics and their combine, or the
    backward's sums pass and the reduction of its partial sums. Empty for any other op."""
    from mpvit_kernels.triton import affine_hswish as kernels

    ops = torch.ops.mpvit_kernels
    if func in (ops.dwconv_bn_train.default, ops.gli_projection_train.default):
        # the GEMM writes z with its tiles' (mean, M2); counted: x (or the inputs) read, y and z
        # written. Not counted: the combine and the normalise pass's read of z
        if func is ops.dwconv_bn_train.default:
            from mpvit_kernels.ops.dwconv_bn import _out_shape
            from mpvit_kernels.triton import dwconv_bn as gemm

            B, C, Ho, Wo = _out_shape(args[0], args[2], args[6])
            M, z, rows = B * Ho * Wo, args[0], gemm.gpu_tile(gemm.block_n(C), args[0].dtype == torch.float64)[0]
        else:
            from mpvit_kernels.triton import gli_projection as gemm

            z, C = args[0][0], args[1].shape[0]
            M = z.shape[0] * z.shape[1]
            kind = {torch.float64: "fp64", torch.float32: "fp32"}.get(z.dtype, "16-bit")
            rows = gemm.gpu_tile(gemm.block_n(C), kind)[0]
        acc = 8 if z.dtype == torch.float64 else 4
        return _combine("batch statistics: combine the tiles'", -(-M // rows), C, acc) + \
            [("normalise: the read of z", M * C * z.element_size())]
    if func is ops.affine_hswish_batch.default:
        z = args[0]
        C, acc = z.shape[1], 8 if z.dtype == torch.float64 else 4
        M = z.numel() // max(C, 1)
        P = -(-M // (kernels.GRAD_ROWS * kernels.STATS_TILES))
        return [("batch statistics: read z, write the programs'", M * C * z.element_size() + 2 * P * C * acc)] + \
            _combine("batch statistics: combine the programs'", P, C, acc)
    if func is ops.affine_hswish_batch_backward.default:
        # counted: the elementwise pass (grad and z read, grad_z written)
        (M, C), elt = args[1].shape, args[1].element_size()
        acc = 8 if args[1].dtype == torch.float64 else 4
        P = -(-M // (kernels.GRAD_ROWS * kernels.GRAD_TILES))
        return [("batch norm backward sums: read grad and z, write the programs'", 2 * M * C * elt + 2 * P * C * acc)] \
            + _combine("batch norm backward sums: add up the programs'", P, C, acc)
    return []


class CountOurs(CountTraffic):
    """CountTraffic for our model: a registered op of ours is one launch moving its inputs and
    outputs (what our fused kernels read and write), except the attention forward, whose
    launches and bytes come from its kernels (``ours_factor_attention``); the residual_layernorm
    backward, fc1's GELU grad (``linear_gelu_grad``, ``linear_mlp_grad``) and norm1 -> qkv's
    backward (``linear_norm_grad``), whose kernels also write per-program partial sums that one
    small sum then reduces; and the training BatchNorms (``affine_hswish_batch``, the fused GEMMs'
    ``*_train`` ops and their backward), whose statistics and sums passes are counted too
    (``_batch_norm_passes``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for name, nbytes in _batch_norm_passes(func, args):
            self._launch(name, nbytes)
        if func is torch.ops.mpvit_kernels.residual_layernorm_bwd.default:
            from mpvit_kernels.triton import residual_layernorm as kernels

            C = args[2].shape[-1]
            programs = -(-args[2].numel() // C // (kernels.gpu_tile(kernels.block_c(C))[0] * kernels.GRAD_TILES))
            partials = programs * 4 * C * 4  # written by the kernel, then summed over programs
            self.bytes += partials + partials + 4 * C * 4
            self.launches += 1
            self.ops.append("residual_layernorm_bwd partial sums")
        if func is torch.ops.mpvit_kernels.linear_mlp.default:
            # three launches: fc1 + GELU (reads x, writes h), then fc2 onto r: cuBLAS's addmm copies r
            # into the output and its GEMM reads that back (beta = 1) as it reads h; under autocast
            # over a wider stream fc2's GEMM writes its output and an add reads it with r. The op's
            # inputs and outputs are counted below; here h read again and fc2's C-wide output twice
            (M, N), K = (args[0].shape[0], args[2].shape[0]), args[1].shape[1]
            elem = args[2].element_size() if args[1].dtype != args[2].dtype else args[1].element_size()
            self.bytes += M * N * args[2].element_size() + 2 * M * K * elem
            self.launches += 2
            self.ops += ["linear_mlp fc2 GEMM", "linear_mlp residual (addmm's copy, or the add)"]
        gelu_grad = func is torch.ops.mpvit_kernels.linear_gelu_grad.default
        if (gelu_grad or func is torch.ops.mpvit_kernels.linear_mlp_grad.default) and args[3] is not None:
            from mpvit_kernels.ops.linear import gelu_grad_tiles, mlp_grad_tiles

            (N, _), M = args[2].shape, args[1].shape[0]
            dtype, acc = args[2].dtype, 8 if args[2].dtype == torch.float64 else 4
            # the bias grad: the kernel's partial sums (MPViT's launches are aligned), written, then
            # summed (into the op's output, counted with the op), then cast unless the bias is in
            # the accumulation dtype
            tiles = gelu_grad_tiles(N, dtype, aligned=True, on_gpu=True) if gelu_grad else \
                mlp_grad_tiles(N, dtype, on_gpu=True)
            partials = -(-M // tiles[1]) * N * acc
            name = "linear_gelu_grad" if gelu_grad else "linear_mlp_grad"
            self.bytes += partials + partials
            self.launches += 1
            self.ops.append(f"{name} bias partial sums")
            if args[3].element_size() != acc:
                self.bytes += N * acc
                self.launches += 1
                self.ops.append(f"{name} bias grad cast")
        if func is torch.ops.mpvit_kernels.linear_norm_grad.default:
            from mpvit_kernels.ops.linear import norm_grad_tiles

            (M, N), K = args[0].shape, args[1].shape[1]
            width, acc = 2 * K + (N if args[6] else 0), 8 if args[2].dtype == torch.float64 else 4
            # the parameters' grads: the kernel's partial sums, written, then summed into the op's
            # output (counted with the op); their casts are ATen ops, counted as such
            partials = -(-M // norm_grad_tiles(K, args[2].dtype, vec=8, on_gpu=True)[1]) * width * acc
            self.bytes += partials + partials
            self.launches += 1
            self.ops.append("linear_norm_grad partial sums")
        if func is not torch.ops.mpvit_kernels.factor_attention_fwd.default:
            return super().__torch_dispatch__(func, types, args, kwargs)
        qkv = args[0]
        for name, nbytes in ours_factor_attention(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3, qkv.dtype,
                                                  backward=False):
            self.launches += 1
            self.ops.append(f"factor_attention {name.split(':')[0]}")
            self.bytes += nbytes
        return func(*args, **(kwargs or {}))


def eager_model(size: str, B: int, res: int, dtype) -> CountTraffic:
    """One eval forward of the public MPViT (NCHW, as its code runs), counted on meta tensors."""
    model = PublicStyleMPViT(size).to(device="meta", dtype=dtype).eval()
    count = CountTraffic()
    with torch.no_grad(), count:
        model(torch.empty(B, 3, res, res, device="meta", dtype=dtype))
    return count


def ours_model(size: str, B: int, res: int, dtype) -> CountTraffic:
    """One eval forward of our MPViT (channels-last, kernels on), counted on meta tensors after a
    first forward has cached the BatchNorm folds and CRPE packings, as any later forward finds."""
    model = getattr(models, f"mpvit_{size}")().to(device="meta", dtype=dtype).eval()
    x = torch.empty(B, 3, res, res, device="meta", dtype=dtype)
    count = CountOurs()
    with torch.no_grad():
        model(x)
        with count:
            model(x)
    return count


def _resident(model: torch.nn.Module) -> set[int]:
    """The storages of a model's parameters and buffers, resident whatever a step does."""
    return {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes, count) of the distinct storages autograd holds for the backward at the end of one
    training forward of ``model`` on ``x``: the activations a training step keeps alive, most of
    its peak memory above the weights. A view saved keeps its whole storage, and two tensors
    sharing one count once. Parameters and buffers are left out (resident either way)."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage._cdata] = (storage.nbytes(), t)  # t kept alive: no address is reused meanwhile
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), CudnnLayouts():
        model(x)
    resident = _resident(model)
    held = [nbytes for key, (nbytes, _) in saved.items() if key not in resident]
    return sum(held), len(held)


class LiveBytes(TorchDispatchMode):
    """The peak, over the ops dispatched inside, of the bytes of the live storages those ops made
    (a storage counts from the op that returned it until nothing, autograd's saved tensors
    included, references it): a caching allocator's peak without its rounding, fragmentation and
    the kernels' own scratch."""

    def __init__(self, resident=()):
        super().__init__()
        self.resident = set(resident)  # storages left out (parameters, buffers)
        self.live: set[int] = set()
        self.now = self.peak = 0

    def _released(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _as_cudnn_lays_out(func, args, func(*args, **(kwargs or {})))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.resident:
                    self.live.add(key)
                    self.now += storage.nbytes()
                    # torch keeps a storage's Python object while the storage lives: this runs
                    # when the storage itself is freed
                    weakref.finalize(storage, self._released, key, storage.nbytes())
        self.peak = max(self.peak, self.now)
        return out


def training_model(impl: str, size: str, B: int, res: int, dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model in training mode, input batch) on meta tensors: the public MPViT ("eager") or ours
    (channels-last, kernels on)."""
    if impl == "eager":
        model = PublicStyleMPViT(size).to(device="meta", dtype=dtype).train()
        return model, torch.empty(B, 3, res, res, device="meta", dtype=dtype)
    model = getattr(models, f"mpvit_{size}")().to(device="meta", dtype=dtype).train()
    x = torch.empty(B, 3, res, res, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
    model(x)  # the CRPE packing's index tables, built at a process's first step, as later steps find them
    return model, x


def train_activations(impl: str, size: str, B: int, res: int, dtype) -> dict:
    """One training step's memory on meta tensors, the public MPViT (eager) or ours (channels-last,
    kernels on), batch statistics: ``saved``/``tensors``, what the forward leaves autograd holding
    (saved_for_backward), and ``peak``, LiveBytes over forward, cross-entropy and backward (the
    grads included; parameters and buffers left out)."""
    model, x = training_model(impl, size, B, res, dtype)
    saved, tensors = saved_for_backward(model, x)
    live = LiveBytes(_resident(model))
    with live:
        torch.nn.functional.cross_entropy(model(x), torch.zeros(B, dtype=torch.long, device="meta")).backward()
    return {"saved": saved, "tensors": tensors, "peak": live.peak}


def block_middle(impl: str, B: int, N: int, C: int, dtype, backward: bool) -> CountTraffic:
    """The middle of a block, proj -> residual add -> norm2 ... fc2 -> residual add, as the public
    block runs it ("eager") or ours (``residual_layernorm``, fc2 accumulating onto its output;
    the functions timed by bench.residual_layernorm), forward or forward+backward with every
    parameter training, counted on meta tensors."""
    fn = residual_layernorm_bench.eager if impl == "eager" else residual_layernorm_bench.ours
    hidden = residual_layernorm_bench.MLP_RATIO * C
    meta = dict(device="meta", dtype=dtype, requires_grad=backward)
    tokens = [torch.empty(B, N, C, **meta), torch.empty(B, N, C, **meta), torch.empty(B, N, hidden, **meta)]
    params = [torch.empty(C, C, **meta), torch.empty(C, **meta), torch.empty(C, hidden, **meta), torch.empty(C, **meta),
              torch.empty(C, **meta), torch.empty(C, **meta)]
    count = CountTraffic() if impl == "eager" else CountOurs()
    with torch.set_grad_enabled(backward), count:
        out = fn(*tokens, *params)
        if backward:
            torch.autograd.backward(out, [torch.empty_like(t) for t in out])
    return count


def token_linear(impl: str, site: str, B: int, N: int, C: int, dtype, backward: bool) -> CountTraffic:
    """norm1 -> qkv, fc1 -> GELU, the MLP onto its residual or the block after its attention
    (bench.linear's sites) as the public block runs them ("eager") or as ``ops.linear`` /
    ``ops.linear_mlp`` / ``ops.linear_proj_mlp`` ("ours"),
    forward or forward+backward with every parameter training, counted on meta tensors."""
    eager, ours = linear_bench.IMPLS[site]
    x, params = linear_bench.site_inputs(site, B, N, C, dtype, "meta")
    x, params = x.requires_grad_(backward), [p.requires_grad_(backward) for p in params]
    count = CountTraffic() if impl == "eager" else CountOurs()
    with torch.set_grad_enabled(backward), count:
        out = (eager if impl == "eager" else ours)(x, *params)
        if backward:
            out.backward(torch.empty_like(out))
    return count


def eager_depthwise(site: str, B: int, C: int, side: int, dtype) -> CountTraffic:
    """The public module's op sequence at a CPE or InvRes site (forward), counted on meta tensors."""
    x, w, b, bn = depthwise_bench.site_inputs(B, C, side, dtype, "meta")
    count = CountTraffic()
    with torch.no_grad(), count:
        depthwise_bench.IMPLS[site][0](x, w, b, bn)
    return count


def ours_depthwise(site: str, B: int, C: int, side: int, dtype) -> list[tuple[str, int]]:
    """(launch, bytes) of the depthwise op forward: one kernel reading x and writing y (halo
    re-reads assumed cached) and its parameters in fp32; before it, a cast per parameter not
    in fp32 (the InvRes site's BatchNorm fold is cached by the module, nn.folded_bn: no launch)."""
    elem = torch.finfo(dtype).bits // 8
    params = [("weight", C * 9)] + ([("bias", C)] if site == "CPE" else [("scale", C), ("shift", C)])
    launches = [("depthwise: read x, write y", 2 * B * C * side * side * elem + sum(n for _, n in params) * 4)]
    if site == "CPE" and dtype != torch.float32:
        launches += [(f"cast {name} to fp32", n * (elem + 4)) for name, n in params]
    if site == "InvRes dw":
        if dtype != torch.float32:
            launches.append(("cast weight to fp32", C * 9 * (elem + 4)))
    return launches


def eager_dwconv_bn(B: int, C: int, side: int, stride: int, dtype) -> CountTraffic:
    """The public DWConv2d_BN's op sequence (eval forward), counted on meta tensors."""
    x, dw, pw, bn = dwconv_bn_bench.embed_inputs(B, C, side, dtype, "meta")
    count = CountTraffic()
    with torch.no_grad(), count:
        dwconv_bn_bench.eager(x, dw, pw, bn, stride)
    return count


def ours_dwconv_bn(B: int, C: int, side: int, stride: int, dtype) -> list[tuple[str, int]]:
    """(launch, bytes) of the fused op (eval forward): one kernel reading x (its halo from cache),
    the weights, and writing y; before it a cast of the depthwise weights to fp32 when they are
    not (counted on meta tensors; the BatchNorm fold is cached by the module, nn.folded_bn)."""
    elem = torch.finfo(dtype).bits // 8
    out = (side - 1) // stride + 1
    launches = [("dwconv_bn: read x, write y", B * C * (side * side + out * out) * elem + C * C * elem + C * 11 * 4)]
    x, dw, pw, _ = dwconv_bn_bench.embed_inputs(B, C, side, dtype, "meta")
    prep = CountTraffic()
    with torch.no_grad(), prep:
        dw.reshape(C, 9).to(torch.float32)
    launches += [(f"prepare weights: {op}", prep.bytes // prep.launches) for op in prep.ops]
    return launches


def eager_gli_projection(B: int, C: int, Cout: int, side: int, dtype) -> CountTraffic:
    """The public aggregate's op sequence (cat, 1x1 conv, eval BN, Hardswish), on meta tensors."""
    xs, w, bn = gli_bench.aggregate_inputs(B, C, Cout, side, dtype, "meta")
    count = CountTraffic()
    with torch.no_grad(), count:
        gli_bench.eager(xs, w, bn)
    return count


def ours_gli_projection(B: int, C: int, Cout: int, side: int, dtype) -> list[tuple[str, int]]:
    """(launch, bytes) of the fused op (eval forward): one GEMM reading every input once per
    BLOCK_N column block of the output (once up to 128 output channels) and the weight, writing
    y (the BatchNorm fold is cached by the module, nn.folded_bn: no launch)."""
    from mpvit_kernels.triton.gli_projection import block_n

    elem = torch.finfo(dtype).bits // 8
    n, M = gli_bench.INPUTS, B * side * side
    column_blocks = -(-Cout // block_n(Cout))
    launches = [("gli_projection: read the inputs, write y",
                 column_blocks * M * n * C * elem + M * Cout * elem + Cout * n * C * elem + 2 * Cout * 4)]
    return launches


def run(args, device, dtype, dtype_name) -> list[dict]:
    rows = []
    for res in args.traffic_resolutions:
        for size in MODEL_SIZES:
            eager, ours = eager_model(size, args.batch, res, dtype), ours_model(size, args.batch, res, dtype)
            rows.append({"op": f"MPViT-{size[0].upper()} model", "input": res, "stage": "all",
                         "shape": [args.batch, 3, res, res], "dtype": dtype_name, "mode": "eval forward",
                         "eager_launches": eager.launches, "eager_bytes": eager.bytes, "ours_launches": ours.launches,
                         "ours_bytes": ours.bytes, "bytes_ratio": eager.bytes / ours.bytes})
            eager, ours = (train_activations(impl, size, args.batch, res, dtype) for impl in ("eager", "ours"))
            rows.append({"op": f"MPViT-{size[0].upper()} model", "input": res, "stage": "all",
                         "shape": [args.batch, 3, res, res], "dtype": dtype_name, "mode": "train step",
                         **{f"{name}_{k}": v for name, m in (("eager", eager), ("ours", ours)) for k, v in m.items()},
                         "peak_ratio": ours["peak"] / eager["peak"], "saved_ratio": ours["saved"] / eager["saved"]})
    for res in args.traffic_resolutions:
        for model, stage, C, Cout, stride in gli_bench.AGGREGATES:
            side = res // stride
            eager = eager_gli_projection(args.batch, C, Cout, side, dtype)
            ours = ours_gli_projection(args.batch, C, Cout, side, dtype)
            mine = sum(b for _, b in ours)
            rows.append({"op": f"GLI projection MPViT-{model}", "input": res, "stage": stage,
                         "shape": [args.batch, side * side, gli_bench.INPUTS * C], "dtype": dtype_name,
                         "mode": "eval forward", "eager_launches": eager.launches, "eager_bytes": eager.bytes,
                         "ours_launches": len(ours), "ours_bytes": mine, "bytes_ratio": eager.bytes / mine})
    for res in args.traffic_resolutions:
        for stage, C, map_stride, stride in dwconv_bn_bench.EMBEDS:
            side = res // map_stride
            eager = eager_dwconv_bn(args.batch, C, side, stride, dtype)
            ours = ours_dwconv_bn(args.batch, C, side, stride, dtype)
            mine = sum(b for _, b in ours)
            rows.append({"op": f"DWConv2d_BN s{stride}", "input": res, "stage": stage,
                         "shape": [args.batch, side * side, C], "dtype": dtype_name, "mode": "eval forward",
                         "eager_launches": eager.launches, "eager_bytes": eager.bytes, "ours_launches": len(ours),
                         "ours_bytes": mine, "bytes_ratio": eager.bytes / mine})
    for res in args.traffic_resolutions:
        for stage, C, stride in depthwise_bench.STAGES:
            side = res // stride
            for site in depthwise_bench.SITES:
                eager = eager_depthwise(site, args.batch, C, side, dtype)
                ours = ours_depthwise(site, args.batch, C, side, dtype)
                mine = sum(b for _, b in ours)
                rows.append({"op": site, "input": res, "stage": stage, "shape": [args.batch, side * side, C],
                             "dtype": dtype_name, "mode": "forward", "eager_launches": eager.launches,
                             "eager_bytes": eager.bytes, "ours_launches": len(ours), "ours_bytes": mine,
                             "bytes_ratio": eager.bytes / mine})
    for res in args.traffic_resolutions:
        for stage, C, stride in STAGES:
            N = (res // stride) ** 2
            for mode in ("forward", "forward+backward"):
                eager, ours = (block_middle(impl, args.batch, N, C, dtype, mode != "forward") for impl in ("eager", "ours"))
                rows.append({"op": "block middle (proj, residual, norm2, fc2, residual)", "input": res, "stage": stage,
                             "shape": [args.batch, N, C], "dtype": dtype_name, "mode": mode,
                             "eager_launches": eager.launches, "eager_bytes": eager.bytes,
                             "ours_launches": ours.launches, "ours_bytes": ours.bytes,
                             "bytes_ratio": eager.bytes / ours.bytes})
    for res in args.traffic_resolutions:
        for stage, C, stride in STAGES:
            N = (res // stride) ** 2
            for site in linear_bench.SITES:
                mlp = site == linear_bench.MLP
                if mlp and C > linear_bench.MLP_MAX_C:  # (the model keeps fc1 and fc2 apart there)
                    continue
                for mode in ("forward",) if mlp else ("forward", "forward+backward"):
                    eager, ours = (token_linear(impl, site, args.batch, N, C, dtype, mode != "forward")
                                   for impl in ("eager", "ours"))
                    rows.append({"op": site, "input": res, "stage": stage, "shape": [args.batch, N, C],
                                 "dtype": dtype_name, "mode": mode, "eager_launches": eager.launches,
                                 "eager_bytes": eager.bytes, "ours_launches": ours.launches, "ours_bytes": ours.bytes,
                                 "bytes_ratio": eager.bytes / ours.bytes})
    for res in args.traffic_resolutions:
        for stage, C, stride in STAGES:
            N = (res // stride) ** 2
            for mode in ("forward", "forward+backward"):
                backward = mode != "forward"
                core = eager_factor_attention(args.batch, N, C, dtype, backward)
                module = eager_factor_attention(args.batch, N, C, dtype, backward, scope="module")
                ours = ours_factor_attention(args.batch, N, C, dtype, backward)
                ours_core = (len(ours), sum(b for _, b in ours))
                # the module is the two Linears around the core: ours keeps eager's Linears
                linears = (module.launches - core.launches, module.bytes - core.bytes)
                for scope, eager, mine in (
                        ("core", (core.launches, core.bytes), ours_core),
                        ("module", (module.launches, module.bytes),
                         (ours_core[0] + linears[0], ours_core[1] + linears[1]))):
                    rows.append({"op": f"FactorAttention {scope}", "input": res, "stage": stage,
                                 "shape": [args.batch, N, C], "dtype": dtype_name, "mode": mode,
                                 "eager_launches": eager[0], "eager_bytes": eager[1], "ours_launches": mine[0],
                                 "ours_bytes": mine[1], "bytes_ratio": eager[1] / mine[1]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| op | input | stage | B x N x C | dtype | mode | eager launches | eager MB | ours launches | ours MB | "
           "eager/ours bytes (speedup bound) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    held = [r for r in rows if "saved_ratio" in r]
    for r in rows:
        if r in held:
            continue
        out.append(f"| {r['op']} | {r['input']} | {r['stage']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
                   f"{r['mode']} | {r['eager_launches']} | {r['eager_bytes'] / 1e6:.1f} | {r['ours_launches']} | "
                   f"{r['ours_bytes'] / 1e6:.1f} | {r['bytes_ratio']:.1f}x |")
    if held:
        out += ["", "Memory of one training step (batch statistics), counted on meta tensors, parameters and "
                "buffers left out: the peak of the live storages over forward, loss and backward (a caching "
                "allocator's peak without rounding, fragmentation or kernel scratch; the GPU goal: ours <= 0.7x "
                "eager's), and what autograd holds for the backward at the end of the forward (distinct storages).",
                "", "| model | input | batch | dtype | eager peak MiB | ours peak MiB | ours / eager peak | "
                "eager saved MiB (tensors) | ours saved MiB (tensors) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in held:
            out.append(f"| {r['op'].removesuffix(' model')} | {r['input']} | {r['shape'][0]} | {r['dtype']} | "
                       f"{r['eager_peak'] / 2**20:.0f} | {r['ours_peak'] / 2**20:.0f} | {r['peak_ratio']:.2f}x | "
                       f"{r['eager_saved'] / 2**20:.0f} ({r['eager_tensors']}) | "
                       f"{r['ours_saved'] / 2**20:.0f} ({r['ours_tensors']}) |")
    return "\n".join(out)
