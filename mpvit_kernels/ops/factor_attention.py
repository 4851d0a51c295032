"""factor_attention: ``scale * q softmax_N(k)^T v + q * crpe(v)`` per head, qkv -> (B, N, C).

On CUDA tensors: the Triton kernels of mpvit_kernels/triton/factor_attention.py behind two
torch.library ops, ``mpvit_kernels::factor_attention_fwd`` (returns the output and, when
``need_stats`` says a backward will follow, the per-head softmax stats, context S and packed
CRPE weights the backward needs, never the N x Ch softmax) and ``factor_attention_bwd``, with
fakes and registered autograd, so torch.compile(fullgraph=True) goes through them.
``factor_attention`` sets ``need_stats`` from grad mode and requires_grad. The forward is one
launch (``whole_map_kernel``) on maps of at most _WHOLE_MAP_MAX_N tokens, three (context
partials, combine, output) on larger ones; the backward is three launches (grad partials,
combine, grad qkv), then two sums and a gather for the CRPE grads. Where one chunk covers a
head's N (_chunking: B*heads >= _TARGET_PROGRAMS, or N <= 128), the context and grad passes
finish what the combines would do, and neither combine is launched. Calls that share a CRPE
(an MPViT encoder's layers) may share its packing too (``crpe_packing``, passed as
``crpe_packed``): in training it is then made once a forward, and its grad is summed over the
calls and taken apart once.

On CPU tensors: the extension's C++ twin ``mpvit_kernels::factor_attention`` (csrc/cpu), a
forward kernel for inference. Its backward, ``factor_attention_backward``, is written with eager
ops (it recomputes softmax_N(k) and S), so where a backward follows ``auto`` runs the eager
reference instead (its autograd keeps what it needs); ``cuda`` runs the twin either way.
"""
from __future__ import annotations

import contextvars
import functools
import math
from typing import Sequence

import torch

from mpvit_kernels import backend, reference
from mpvit_kernels.ops.affine_hswish import check_item_span, check_strided
from mpvit_kernels.ops.depthwise import depthwise

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Programs the reduction passes aim for (B*heads*chunks): about two per SM of a 132-SM GPU (4 or
# 8 warps each, as their pinned tiles say), so that B=1 with 8 heads still spreads over the GPU
# at large N. Each program costs a (Ch x Ch + 2 Ch) partial in the accumulation type, written
# and read back by the combine: at 1024 programs (and BLOCK_D-wide partials), MPViT-S stage 3 at
# 512, batch 16, moved 28% more bytes than q, k, v and O (bench/traffic.py). The change from
# 1024 bites at batch >= 4 (batch 16: 1024 -> 256 programs; batch 1 keeps its count up to
# N = 4096): whether 256 keep HBM busy there is for the speed report's factor_attention rows on
# a GPU to confirm. A constant, not the SM count, so that the chunking (and the bits) do not
# depend on the GPU.
_TARGET_PROGRAMS = 256
_CHUNK_ALIGN = 128  # chunks are whole tiles for every BLOCK_N a reduction pass may pin
# Maps of at most this many tokens take the whole-map forward: one program per (batch, head)
# (whole_map_kernel) instead of the three passes. Registers do not bound it (the program walks
# the map in the passes' own tiles, compiled without spills at every head dim they take); parallelism
# does: B*heads programs of 8 warps, each walking N tokens twice. 256 takes MPViT's stage 4 at
# inputs up to 512 (N = 49..256) and stage 3 at 224 (N = 196), where the three passes' per-head
# partials and S cost more bytes than q, k, v and O; larger maps keep the three passes, whose
# chunked context pass fills the GPU at small batch.
_WHOLE_MAP_MAX_N = 256


# The Triton kernels hold a head's Ch x Ch context and their token tiles at the head dim's next
# power of two. The static report compiles them up to 64 (MPViT's head dims are 8 to 60); at
# 128 they spill, and past 128 whole_map_kernel alone would ask for 0.5 MB of shared memory in
# bf16 (an H100 has 227 KB a block), so wider heads never reach them.
MAX_TRITON_HEAD_DIM = 64


def _triton_takes_head_dim(Ch: int) -> bool:
    """Whether the Triton kernels run heads of Ch dims: an error where the ``triton`` backend
    forces them, else False (the eager reference runs them) with one warning per head dim."""
    if Ch <= MAX_TRITON_HEAD_DIM:
        return True
    if backend.get_backend("factor_attention") == "triton":
        raise ValueError(_too_wide(Ch))
    backend.warn_once(("head dim", Ch), f"{_too_wide(Ch)}: such heads run on the eager reference", stacklevel=3)
    return False


def _too_wide(Ch: int) -> str:
    return (f"factor_attention: the Triton kernels take head dims (C / num_heads) of at most {MAX_TRITON_HEAD_DIM}, "
            f"got {Ch}")


def _triton_kernels():
    from mpvit_kernels.triton import factor_attention as kernels

    return kernels


def _check(qkv, size, num_heads, scale, crpe_weights, crpe_biases) -> tuple[int, int, int, int, int]:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"factor_attention: qkv must be a Tensor, got {type(qkv).__name__}")
    check_strided("factor_attention", "qkv", qkv)
    if qkv.dtype not in _FLOATS:
        raise TypeError(f"factor_attention: qkv must be float16/bfloat16/float32/float64, got {qkv.dtype}")
    if qkv.dim() != 3 or qkv.shape[2] % 3 != 0:
        raise ValueError(f"factor_attention: qkv must be (B, N, 3*C), got shape {tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    C = C3 // 3
    if not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads != 0:
        raise ValueError(f"factor_attention: num_heads must be a positive divisor of C={C}, got {num_heads!r}")
    if len(size) != 2 or any(not isinstance(s, (int, torch.SymInt)) or s <= 0 for s in size) or size[0] * size[1] != N:
        raise ValueError(f"factor_attention: size must be (H, W) with H*W = N = {N}, got {tuple(size)}")
    if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == math.inf:  # traceable when symbolic
        raise TypeError(f"factor_attention: scale must be a finite float, got {scale!r}")
    Ch = C // num_heads
    if len(crpe_weights) == 0 or len(crpe_weights) != len(crpe_biases):
        raise ValueError("factor_attention: crpe_weights and crpe_biases must be non-empty lists of one length")
    total, device = 0, qkv.device
    for i, (w, b) in enumerate(zip(crpe_weights, crpe_biases)):
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise TypeError(f"factor_attention: crpe_weights[{i}] and crpe_biases[{i}] must be Tensors")
        check_strided("factor_attention", "crpe_weights", w, i)
        check_strided("factor_attention", "crpe_biases", b, i)
        if w.dim() != 4 or w.shape[1] != 1 or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
            raise ValueError(f"factor_attention: crpe_weights[{i}] must be (c, 1, k, k) with odd k, "
                             f"got {tuple(w.shape)}")
        if w.shape[0] % Ch != 0 or w.shape[0] == 0:
            raise ValueError(f"factor_attention: crpe_weights[{i}] has {w.shape[0]} channels, "
                             f"not a whole number of heads of {Ch}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"factor_attention: crpe_biases[{i}] must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        for name, t in (("crpe_weights", w), ("crpe_biases", b)):  # the names formatted on errors alone
            if t.device != device:
                raise ValueError(f"factor_attention: {name}[{i}] is on {t.device} but qkv is on {device}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"factor_attention: {name}[{i}] must be floating point, got {t.dtype}")
        total += w.shape[0]
    if total != C:
        raise ValueError(f"factor_attention: the CRPE windows cover {total} channels, expected C = {C}")
    check_item_span("factor_attention", "qkv", qkv)  # token offsets are 32-bit, batch offsets 64-bit
    return B, N, C, Ch, num_heads


def factor_attention(qkv: torch.Tensor, size: Sequence[int], num_heads: int, scale: float,
                     crpe_weights: Sequence[torch.Tensor], crpe_biases: Sequence[torch.Tensor],
                     crpe_packed: torch.Tensor | None = None) -> torch.Tensor:
    """Factorized attention with convolutional relative position encoding.

    qkv: the qkv Linear's output (B, N, 3C), read in place as (B, N, 3, heads, Ch); size: (H, W)
    with H*W = N (row-major tokens); crpe_weights[i] (ci, 1, k, k) and crpe_biases[i] (ci,)
    are the depthwise convs over the next ci channels of v (the ci sum to C, whole heads each).
    Returns (B, N, C), head-major channels, ready for ``proj``. fp16/bf16/fp32 inputs run with
    fp32 math, fp64 with fp64; under autocast qkv is cast to the autocast dtype. The CRPE
    parameters may have any floating dtype (fp32 ones next to a bf16 qkv under autocast): they
    are read in the accumulation type. The Triton kernels take head dims up to
    MAX_TRITON_HEAD_DIM (64); wider heads run on the eager reference under ``auto``.

    ``crpe_packed``: :func:`crpe_packing` of these weights and biases, made once for several
    calls that share them (an MPViT encoder's layers): the Triton kernels read it instead of
    packing the weights at every call, and the weights' grads flow through it (autograd sums the
    calls' grads on it, then takes them apart once). Ignored where the kernels do not run.
    """
    size = tuple(size)
    qkv = backend.autocast(qkv)  # as autocast casts a matmul's input (the qkv Linear's output already is)
    _check(qkv, size, num_heads, scale, crpe_weights, crpe_biases)
    crpe = (*crpe_weights, *crpe_biases)
    backward_follows = torch.is_grad_enabled() and (qkv.requires_grad or any(t.requires_grad for t in crpe) or (
        isinstance(crpe_packed, torch.Tensor) and crpe_packed.requires_grad))
    # On CPU the C++ twin runs inference; where a backward follows, auto takes the eager reference,
    # whose autograd is faster than the twin's backward (which recomputes the softmax and S), with
    # its CRPE convs on the depthwise twin: oneDNN's depthwise backward is 2-5x slower at these
    # windows and channel counts (MPViT-T batch 8: 174 -> 54 ms a training step for the CRPE).
    if backend.use_cpu_kernel("factor_attention", qkv.device):
        if not backward_follows or backend.get_backend("factor_attention") == "cuda":
            return backend.call_op(torch.ops.mpvit_kernels.factor_attention.default, qkv, size[0], size[1], num_heads,
                                   float(scale), list(crpe_weights), list(crpe_biases))
        if backend.use_extension("depthwise", qkv.device) and all(w.shape[-1] in (3, 5, 7) for w in crpe_weights):
            return reference.factor_attention(qkv, size, num_heads, scale, crpe_weights, crpe_biases,
                                              crpe_conv=depthwise)
    if (backend.use_triton("factor_attention", qkv.device) and qkv.shape[0] > 0  # B = 0: nothing to launch
            and _triton_takes_head_dim(qkv.shape[2] // 3 // num_heads)):
        # Reuse a cached CRPE packing only where no graph through the weights is built: inside
        # the op no autograd graph is recorded whatever grad mode says, so the decision is made
        # here (under torch.compile this wrapper is traced away and the op packs every call, as
        # conservative as it gets).
        # S and lse are kept for the backward only where autograd will ask for it.
        need_stats = backward_follows
        if crpe_packed is not None:  # the weights reach the grads through it alone (the op checks it)
            return backend.call_op(factor_attention_fwd, qkv, size[0], size[1], num_heads, float(scale),
                                   [w.detach() for w in crpe_weights], [b.detach() for b in crpe_biases],
                                   need_stats, crpe_packed)[0]
        args = (qkv, size[0], size[1], num_heads, float(scale), list(crpe_weights), list(crpe_biases), need_stats)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in crpe)):
            return backend.call_op(factor_attention_fwd, *args)[0]
        token = _REUSE_PACKING.set(True)
        try:
            return backend.call_op(factor_attention_fwd, *args)[0]
        finally:
            _REUSE_PACKING.reset(token)
    return reference.factor_attention(qkv, size, num_heads, scale, crpe_weights, crpe_biases)


def crpe_packing(crpe_weights: Sequence[torch.Tensor], crpe_biases: Sequence[torch.Tensor], num_heads: int,
                 tokens: torch.Tensor) -> torch.Tensor | None:
    """The CRPE packing that :func:`factor_attention` calls sharing these weights and biases
    would each make, made once, to pass as their ``crpe_packed``; ``tokens``: what their qkv is
    computed from (its device, and its dtype as autocast makes it, choose the packing's). Made
    where each call would pack afresh: the Triton kernels with an autograd graph through the
    weights (training; in inference every call reads one cached packing). Else None, and under
    torch.compile, whose trace of this Python would rebuild the packing's index tables in every
    graph (each call packs inside its op there). A cat and a gather, whose backward (one gather)
    takes the packing's grad apart into the weights' and biases' (_SharedPacking)."""
    if torch.compiler.is_compiling() or not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (*crpe_weights, *crpe_biases))):
        return None
    Ch = sum(w.shape[0] for w in crpe_weights) // num_heads
    if (tokens.shape[0] == 0 or Ch > MAX_TRITON_HEAD_DIM or not backend.use_triton("factor_attention", tokens.device)
            or tokens.device != crpe_weights[0].device):
        return None
    return _SharedPacking.apply(Ch, _acc_dtype(backend.autocast_dtype(tokens)), len(crpe_weights), *crpe_weights,
                                *crpe_biases)


class _SharedPacking(torch.autograd.Function):
    """crpe_packing's packing (_pack_crpe), whose backward takes the packing's grad apart into the
    weights' and biases' as the attention's own backward does (one gather, the grads views of its
    output in the parameters' strides and dtypes: _grads_of), not through the gather's autograd
    (a zero fill and a scatter, and contiguous grads where a channels-last weight's strides are
    what DDP's buckets expect)."""

    @staticmethod
    def forward(ctx, Ch, acc, n, *crpe):
        weights = crpe[:n]
        ctx.n, ctx.unpack_index = n, _layout_of(weights, Ch)[6]
        # (what the grads need of them: saving the parameters would put them through saved-tensor
        # hooks, such as save_on_cpu's copies, at every forward)
        ctx.params = _layouts(crpe)
        return _pack_crpe(weights, crpe[n:], Ch, acc)[0]

    @staticmethod
    def backward(ctx, dpacked):
        weights, biases = ctx.params[:ctx.n], ctx.params[ctx.n:]
        flat = dpacked.index_select(0, ctx.unpack_index)
        nw = sum(math.prod(shape) for shape, *_ in weights)
        return None, None, None, *_grads_of(flat[:nw], weights), *_grads_of(flat[nw:], biases)


def _check_packed(packed: torch.Tensor, weights: Sequence[torch.Tensor], qkv: torch.Tensor) -> None:
    """``packed`` must be a packing of these weights for this qkv, as crpe_packing makes it."""
    acc, size = _acc_dtype(qkv.dtype), packed_size(weights)
    if not isinstance(packed, torch.Tensor) or tuple(packed.shape) != (size,) or packed.dtype != acc \
            or not packed.is_contiguous() or packed.device != qkv.device:
        got = f"{packed.dtype} {tuple(packed.shape)} on {packed.device}" if isinstance(packed, torch.Tensor) \
            else type(packed).__name__
        raise ValueError(f"factor_attention: crpe_packed must be crpe_packing's packing of crpe_weights and "
                         f"crpe_biases, a contiguous {acc} tensor of shape ({size},) on qkv's device, got {got}")


# ---- launch helpers -----------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_d(Ch: int) -> int:
    return max(16, _next_pow2(Ch))


def _next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _whole_map(N: int) -> bool:
    """Whether the forward of an N-token map runs as one whole_map_kernel launch."""
    return N <= _WHOLE_MAP_MAX_N


def _chunking(BH: int, N: int) -> tuple[int, int]:
    """Tokens per chunk of the reduction passes and the number of chunks."""
    tiles = -(-N // _CHUNK_ALIGN)
    splits = max(1, min(tiles, -(-_TARGET_PROGRAMS // BH)))
    chunk = -(-tiles // splits) * _CHUNK_ALIGN
    return chunk, -(-N // chunk)


@functools.cache  # never evicted: a freed table could still be read by a queued kernel or a CUDA graph
def _crpe_layout(windows: tuple[tuple[int, int], ...], Ch: int, device: torch.device, dtype: torch.dtype):
    """For CRPE weights of these (k, channels) windows, in ``dtype``: the gather index that lays
    out cat(flat weights, biases, 0) as the packed (C, KMAX*KMAX) weights, each window centred in
    KMAX x KMAX with zeros around it, then the (C,) bias (from an offset of a multiple of 16
    elements, aligned as a tensor of its own would start); the zero the padding reads; the
    (heads,) int32 window of each head; KMAX and the bias's offset; the backward's gather
    index from the (heads, KMAX*KMAX, Ch) sum of its weight grads to the weights' own layouts,
    each window's (c, 1, k, k) in turn; and the gather index from a grad of the packing to the
    weights' layouts, then the biases (crpe_packing's backward). A function of the layout alone
    (a model has one or two), so built once: each table is a synchronous copy from the host,
    complete on the device before any stream reads it, so the streams share them, and a CUDA
    graph capture, which runs on a stream of its own and could not copy from the host, finds
    them made."""
    kmax = max(k for k, _ in windows)
    C = sum(c for _, c in windows)
    weights = sum(c * k * k for k, c in windows)
    zero_at = weights + C
    index = torch.full((C, kmax, kmax), zero_at, dtype=torch.int32)  # (index_select takes int32)
    start, row = 0, 0
    for k, c in windows:
        p = (kmax - k) // 2
        index[row:row + c, p:p + k, p:p + k] = torch.arange(start, start + c * k * k, dtype=torch.int32).view(c, k, k)
        start, row = start + c * k * k, row + c
    bias_at = -(-C * kmax * kmax // 16) * 16
    gap = torch.full((bias_at - C * kmax * kmax,), zero_at, dtype=torch.int32)
    index = torch.cat([index.view(-1), gap, torch.arange(weights, weights + C, dtype=torch.int32)])
    ksize = torch.tensor([k for k, c in windows for _ in range(c // Ch)], dtype=torch.int32)
    grad_index, row = [], 0
    for k, c in windows:
        p = (kmax - k) // 2
        chan = torch.arange(row, row + c, dtype=torch.int32).view(c, 1, 1)
        tap = ((torch.arange(k, dtype=torch.int32) + p) * kmax).view(1, k, 1) + \
            (torch.arange(k, dtype=torch.int32) + p).view(1, 1, k)
        grad_index.append(((chan // Ch) * (kmax * kmax) + tap) * Ch + chan % Ch)
        row += c
    grad_index = torch.cat([g.reshape(-1) for g in grad_index])
    real = index != zero_at
    unpack_index = torch.empty(weights + C, dtype=torch.int32)
    unpack_index[index[real].long()] = torch.arange(index.numel(), dtype=torch.int32)[real]
    return (index.to(device), torch.zeros(1, dtype=dtype).to(device), ksize.to(device), kmax, bias_at,
            grad_index.to(device), unpack_index.to(device))


def pack_launches(weights: Sequence[torch.Tensor], acc: torch.dtype) -> int:
    """Small launches _pack_crpe makes: a cat, a gather and, when the weights are not in the
    accumulation dtype, a cast."""
    return 2 + (weights[0].dtype != acc)


def _layout_of(weights: Sequence[torch.Tensor], Ch: int):
    """_crpe_layout for these weights."""
    return _crpe_layout(tuple((w.shape[-1], w.shape[0]) for w in weights), Ch, weights[0].device, weights[0].dtype)


def packed_size(weights: Sequence[torch.Tensor]) -> int:
    """Elements of the packed CRPE weights and bias (_crpe_layout's bias offset, then C)."""
    C, kmax = sum(w.shape[0] for w in weights), max(w.shape[-1] for w in weights)
    return -(-C * kmax * kmax // 16) * 16 + C


def _pack_crpe(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], Ch: int, acc: torch.dtype):
    """The CRPE weights and biases packed in ``acc`` as the kernels read them, one flat tensor
    (_crpe_layout), with _crpe_views' four: one cat and one gather whatever the windows (a pad
    per window, two cats and two casts before), as training packs at every forward."""
    layout = _layout_of(weights, Ch)
    parts = [*[w.reshape(-1) for w in weights], *biases, layout[1]]
    if any(t.dtype != weights[0].dtype for t in biases):  # (a model's own weights and biases share a dtype)
        parts = [t.to(acc) for t in parts]
    packed = torch.cat(parts).index_select(0, layout[0]).to(acc)
    return (packed, *_views(packed, layout))


def _views(packed: torch.Tensor, layout):
    _, _, ksize, kmax, bias_at, _, _ = layout
    C = packed.numel() - bias_at
    return packed[:C * kmax * kmax].view(C, kmax * kmax), packed[bias_at:], ksize, kmax


def _crpe_views(packed: torch.Tensor, weights: Sequence[torch.Tensor], Ch: int):
    """(C, KMAX*KMAX) weights with each window centred in KMAX x KMAX, (C,) bias, (heads,) int32
    window of each head, KMAX: views of a packed tensor, and the layout's window table."""
    return _views(packed, _layout_of(weights, Ch))


_REUSE_PACKING = contextvars.ContextVar("mpvit_kernels_reuse_crpe_packing", default=False)


def _pack_crpe_cached(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], Ch: int, acc: torch.dtype):
    """_pack_crpe (the packing and its views: an inference call takes them as they are) once per
    version of the weights (backend.cached_by_version) where no autograd graph is built
    (inference: every forward after the first reuses one packing; factor_attention decides);
    packed afresh where the weights take grads."""
    if not _REUSE_PACKING.get():
        return _pack_crpe(weights, biases, Ch, acc)
    return backend.cached_by_version((*weights, *biases), ("crpe", Ch, acc),
                                     lambda: _pack_crpe(weights, biases, Ch, acc))


class _Launch:
    """What both passes derive from the inputs: sizes, accumulation type, packed CRPE, chunking.
    The CRPE packing is ``packed`` where given (the forward's, for its backward), else packed here:
    afresh where ``fresh`` (it is returned), else through the cache where factor_attention allows."""

    def __init__(self, qkv: torch.Tensor, num_heads: int, weights, biases, packed=None, fresh=False):
        self.B, self.N, C3 = qkv.shape
        self.C = C3 // 3
        self.Ch = self.C // num_heads
        if self.Ch > MAX_TRITON_HEAD_DIM:  # the registered ops called directly
            raise ValueError(_too_wide(self.Ch))
        self.BD = _block_d(self.Ch)
        self.BH = self.B * num_heads
        self.acc = _acc_dtype(qkv.dtype)
        self.kernels = _triton_kernels()
        self.tl_acc = self.kernels.tl.float64 if self.acc == torch.float64 else self.kernels.tl.float32
        self.precision = self.kernels.dot_precision(_TRITON_NAMES[qkv.dtype])
        self.n_bucket = self.kernels.n_bucket(self.N)
        if packed is None:
            crpe = (_pack_crpe if fresh else _pack_crpe_cached)(weights, biases, self.Ch, self.acc)
        else:
            crpe = (packed, *_crpe_views(packed, weights, self.Ch))
        self.packed, self.w_packed, self.bias, self.ksize, self.kmax = crpe
        self.chunk, self.splits = _chunking(self.BH, self.N)
        self.device = qkv.device

    def empty(self, *shape):
        return torch.empty(*shape, device=self.device, dtype=self.acc)



def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along channels; rows may have any stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- the registered ops -------------------------------------------------------------------

@torch.library.custom_op("mpvit_kernels::factor_attention_fwd", mutates_args=())
def factor_attention_fwd(qkv: torch.Tensor, H: int, W: int, num_heads: int, scale: float,
                         crpe_weights: list[torch.Tensor], crpe_biases: list[torch.Tensor], need_stats: bool,
                         crpe_packed: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B, N, C), context S (B*heads, Ch, Ch), column log-sum-exp of k (B*heads, Ch),
    the packed CRPE weights and bias (packed_size(crpe_weights),)): S, lse and the packing are what
    the backward reads, so that it packs nothing. With ``need_stats`` False (no backward expected)
    they come back empty, (0, Ch, Ch), (0, Ch) and (0,), a map of at most _WHOLE_MAP_MAX_N tokens
    writes nothing but out, and a backward, should one run after all, recomputes them. Given
    ``crpe_packed`` (crpe_packing's), the kernels read it and the packing comes back empty (the
    backward reads the input); its grad is then the CRPE weights' and biases'."""
    qkv = _rows(qkv)
    if crpe_packed is not None:
        _check_packed(crpe_packed, crpe_weights, qkv)
    # a packing that is returned is made here (a cached one would be an output shared by calls)
    L = _Launch(qkv, num_heads, crpe_weights, crpe_biases, packed=crpe_packed, fresh=need_stats)
    packed = L.packed if need_stats and crpe_packed is None else L.empty(0)
    k = L.kernels
    out = torch.empty(L.B, L.N, L.C, device=qkv.device, dtype=qkv.dtype)
    ctx, lse = (L.empty(L.BH, L.Ch, L.Ch), L.empty(L.BH, L.Ch)) if need_stats else _no_stats(L)
    if _whole_map(L.N):
        with backend.triton_device(qkv):
            k.whole_map_kernel[(L.BH,)](
                qkv, L.w_packed, L.bias, L.ksize, out, ctx, lse, L.N, H, W, L.C, L.Ch, num_heads, qkv.stride(0),
                qkv.stride(1), out.stride(0), out.stride(1), scale,
                ACC=L.tl_acc, DOT_PRECISION=L.precision, KMAX=L.kmax, WRITE_STATS=need_stats, BLOCK_D=L.BD)
        return out, ctx, lse, packed
    # the output pass reads S: computed whether or not it is returned
    ctx_all, lse_all = (ctx, lse) if need_stats else (L.empty(L.BH, L.Ch, L.Ch), L.empty(L.BH, L.Ch))
    final = L.splits == 1  # one chunk: the context pass writes S and lse, no partials or combine
    m, l, s = (ctx_all,) * 3 if final else (L.empty(L.BH, L.splits, L.Ch), L.empty(L.BH, L.splits, L.Ch),
                                              L.empty(L.BH, L.splits, L.Ch, L.Ch))
    with backend.triton_device(qkv):
        k.context_partial_kernel[(L.BH, L.splits)](
            qkv, m, l, s, ctx_all, lse_all, L.N, L.C, L.Ch, num_heads, qkv.stride(0), qkv.stride(1), L.chunk,
            ACC=L.tl_acc, DOT_PRECISION=L.precision, BLOCK_D=L.BD, FINAL=final)
        if not final:
            k.context_combine_kernel[(L.BH,)](m, l, s, ctx_all, lse_all, L.splits, L.Ch, ACC=L.tl_acc, BLOCK_D=L.BD)
        k.output_kernel[lambda meta: (L.BH * -(-L.N // meta["BLOCK_N"]),)](
            qkv, ctx_all, L.w_packed, L.bias, L.ksize, out, L.N, H, W, L.C, L.Ch, num_heads, qkv.stride(0),
            qkv.stride(1), out.stride(0), out.stride(1), scale, L.n_bucket,
            ACC=L.tl_acc, DOT_PRECISION=L.precision, KMAX=L.kmax, BLOCK_D=L.BD)
    return out, ctx, lse, packed


def _no_stats(L: _Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """The (0, Ch, Ch) and (0, Ch) placeholders returned for S and lse when they are not needed."""
    return L.empty(0, L.Ch, L.Ch), L.empty(0, L.Ch)


@factor_attention_fwd.register_fake
def _(qkv, H, W, num_heads, scale, crpe_weights, crpe_biases, need_stats, crpe_packed=None):
    B, N, C3 = qkv.shape
    Ch = C3 // 3 // num_heads
    acc = _acc_dtype(qkv.dtype)
    rows = B * num_heads if need_stats else 0
    return (qkv.new_empty(B, N, C3 // 3), qkv.new_empty(rows, Ch, Ch, dtype=acc), qkv.new_empty(rows, Ch, dtype=acc),
            qkv.new_empty(packed_size(crpe_weights) if need_stats and crpe_packed is None else 0, dtype=acc))


@torch.library.custom_op("mpvit_kernels::factor_attention_bwd", mutates_args=())
def factor_attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, ctx: torch.Tensor, lse: torch.Tensor,
                         crpe_packed: torch.Tensor, H: int, W: int, num_heads: int, scale: float,
                         crpe_weights: list[torch.Tensor], crpe_biases: list[torch.Tensor], packed_grad: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d qkv (B, N, 3C), d CRPE weights (each window's (c, 1, k, k) flat in turn), d CRPE
    biases (C,)), in fp32/fp64 for the two CRPE grads. ``crpe_packed`` is the forward's packing of
    the CRPE weights and biases, or an empty tensor to pack them here. With ``packed_grad``, the
    CRPE grads come back as the grad of the packing instead: (d qkv, d crpe_packed
    (packed_size(crpe_weights),), an empty tensor), what a forward given crpe_packed needs (the
    taps a head's window lacks get their grads too, which the packing's own backward drops)."""
    qkv = _rows(qkv)
    dout = _rows(backend.cast(dout, qkv.dtype))
    acc, size = _acc_dtype(qkv.dtype), packed_size(crpe_weights)
    if crpe_packed.numel() and (tuple(crpe_packed.shape) != (size,) or crpe_packed.dtype != acc
                                or not crpe_packed.is_contiguous() or crpe_packed.device != qkv.device):
        raise ValueError(f"factor_attention_bwd: crpe_packed must be empty or the forward's packing, a contiguous "
                         f"{acc} tensor of shape ({size},) on qkv's device, got {crpe_packed.dtype} "
                         f"{tuple(crpe_packed.shape)} on {crpe_packed.device}")
    L = _Launch(qkv, num_heads, crpe_weights, crpe_biases, packed=crpe_packed if crpe_packed.numel() else None)
    # the kernels read S and lse as dense (B*heads, Ch, Ch) and (B*heads, Ch), as the forward wrote them
    for name, t, shape in (("ctx", ctx, (L.BH, L.Ch, L.Ch)), ("lse", lse, (L.BH, L.Ch))):
        if tuple(t.shape) != shape or t.dtype != L.acc or not t.is_contiguous():
            raise ValueError(f"factor_attention_bwd: {name} must be a contiguous {L.acc} tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)} with strides {t.stride()}")
    k = L.kernels
    kk = _next_pow2(L.kmax * L.kmax)
    dw_part, db_part = L.empty(L.BH, L.splits, kk, L.BD), L.empty(L.BH, L.splits, L.BD)
    ds, c = L.empty(L.BH, L.BD, L.BD), L.empty(L.BH, L.BD)  # zero-padded for grad_qkv
    final = L.splits == 1  # one chunk: the grad pass writes dS and c, no partials or combine
    ds_part = ds if final else L.empty(L.BH, L.splits, L.Ch, L.Ch)
    dqkv = torch.empty(L.B, L.N, 3 * L.C, device=qkv.device, dtype=qkv.dtype)
    with backend.triton_device(qkv):
        k.grad_partial_kernel[(L.BH, L.splits)](
            qkv, dout, ds_part, dw_part, db_part, L.ksize, ctx, ds, c, L.N, H, W, L.C, L.Ch, num_heads,
            qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), L.chunk, scale, ACC=L.tl_acc,
            DOT_PRECISION=L.precision, KMAX=L.kmax, KK=kk, BLOCK_D=L.BD, FINAL=final)
        if not final:
            k.grad_combine_kernel[(L.BH,)](ds_part, ctx, ds, c, L.splits, L.Ch, scale, ACC=L.tl_acc, BLOCK_D=L.BD)
        k.grad_qkv_kernel[lambda meta: (L.BH * -(-L.N // meta["BLOCK_N"]),)](
            qkv, dout, ctx, lse, ds, c, L.w_packed, L.bias, L.ksize, dqkv, L.N, H, W, L.C, L.Ch, num_heads,
            qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), scale, L.n_bucket,
            ACC=L.tl_acc, DOT_PRECISION=L.precision, KMAX=L.kmax, BLOCK_D=L.BD)
    # CRPE weights are shared by the batch: sum the (b, chunk) partials in a fixed order.
    # (the sums read only the taps and head dims that exist: (heads, KMAX*KMAX, Ch) and (heads, Ch) out)
    taps = L.kmax * L.kmax
    dw_parts = dw_part.view(L.B, num_heads, L.splits, kk, L.BD)[:, :, :, :taps, :L.Ch]
    db_parts = db_part.view(L.B, num_heads, L.splits, L.BD)[..., :L.Ch]
    if packed_grad:  # the sums written straight into the packing's layout: (C, KMAX*KMAX) weights, gap, bias
        dpacked = L.empty(packed_size(crpe_weights))
        torch.sum(dw_parts, dim=(0, 2), out=dpacked[:L.C * taps].view(num_heads, L.Ch, taps).transpose(1, 2))
        torch.sum(db_parts, dim=(0, 2), out=dpacked[-L.C:].view(num_heads, L.Ch))
        if dpacked.numel() > L.C * (taps + 1):  # the alignment gap (none where C is a multiple of 16)
            dpacked[L.C * taps:-L.C].zero_()
        return dqkv, dpacked, L.empty(0)
    dw, db = dw_parts.sum(dim=(0, 2)), db_parts.sum(dim=(0, 2))
    return dqkv, dw.view(-1).index_select(0, _layout_of(crpe_weights, L.Ch)[5]), db.view(L.C)


@factor_attention_bwd.register_fake
def _(dout, qkv, ctx, lse, crpe_packed, H, W, num_heads, scale, crpe_weights, crpe_biases, packed_grad=False):
    B, N, C3 = qkv.shape
    C = C3 // 3
    acc = _acc_dtype(qkv.dtype)
    if packed_grad:
        return qkv.new_empty(B, N, C3), qkv.new_empty(packed_size(crpe_weights), dtype=acc), qkv.new_empty(0, dtype=acc)
    return (qkv.new_empty(B, N, C3), qkv.new_empty(sum(w.numel() for w in crpe_weights), dtype=acc),
            qkv.new_empty(C, dtype=acc))


def _setup_context(ctx, inputs, output):
    qkv, H, W, num_heads, scale, weights, biases, need_stats, given = inputs
    _, context, lse, packed = output
    ctx.mark_non_differentiable(context, lse, packed)
    ctx.set_materialize_grads(False)  # no zero-filled grads for them (a launch each)
    ctx.save_for_backward(qkv, context, lse, packed if given is None else given, *weights, *biases)
    ctx.shape = (H, W, num_heads, scale, len(weights), need_stats, given is not None)


def _backward(ctx, dout, _dcontext, _dlse, _dpacked):
    # a grad for each input passed: torch 2.11's registered autograd refuses one for crpe_packed
    # where the caller left it to its default
    return _grads(ctx, dout)[:len(ctx.needs_input_grad)]


def _grads(ctx, dout):
    H, W, num_heads, scale, n, need_stats, given = ctx.shape
    if dout is None:  # an undefined grad (grads are not materialised): zero, so none for the inputs
        return None, None, None, None, None, [None] * n, [None] * n, None, None
    qkv, context, lse, packed, *crpe = ctx.saved_tensors
    weights, biases = crpe[:n], crpe[n:]
    if not need_stats:  # a forward told that no backward would come kept nothing: one more forward
        _, context, lse, fresh = backend.call_op(factor_attention_fwd, qkv, H, W, num_heads, scale, weights, biases,
                                                 True, packed if given else None)
        packed = packed if given else fresh
    dqkv, dw, db = backend.call_op(factor_attention_bwd, dout, qkv, context, lse, packed, H, W, num_heads, scale,
                                   weights, biases, given)
    if given:  # the packing's grad: its own backward (_SharedPacking's) reaches the weights
        return dqkv, None, None, None, None, [None] * n, [None] * n, None, dw
    return (dqkv, None, None, None, None, _grads_of(dw, _layouts(weights)), _grads_of(db, _layouts(biases)), None,
            None)


def _layouts(params: Sequence[torch.Tensor]) -> list[tuple]:
    """(shape, strides, dtype, contiguous) of each parameter: what _grads_of needs of them."""
    return [(p.shape, p.stride(), p.dtype, p.is_contiguous()) for p in params]


def _grads_of(flat: torch.Tensor, params: Sequence[tuple]) -> list[torch.Tensor]:
    """Each parameter's grad as a view of ``flat`` (their grads in turn), in its shape, dtype and
    strides (params: their _layouts): one cast, where they share a dtype that is not flat's
    (16-bit parameters). A channels-last (c, 1, k, k) weight is laid out as a contiguous one (its
    size-1 dim aside), so its grad takes its strides too, as DDP's buckets expect (they warn at
    every other stride)."""
    dtype = params[0][2]
    shared = all(p[2] == dtype for p in params)
    parts = (backend.cast(flat, dtype) if shared else flat).split([math.prod(shape) for shape, *_ in params])
    grads = []
    for g, (shape, stride, dtype, contiguous) in zip(parts, params):
        g = backend.cast(g.view(shape), dtype)
        if g.stride() != stride and contiguous:
            g = g.as_strided(shape, stride, g.storage_offset())
        grads.append(g)
    return grads


backend.register_autograd(factor_attention_fwd, _backward, setup_context=_setup_context)
backend.refuse_double_backward("mpvit_kernels::factor_attention_bwd")


# ---- the C++ CPU twin (csrc/cpu/factor_attention.cpp) ---------------------------------------

@torch.library.custom_op("mpvit_kernels::factor_attention_backward", mutates_args=())
def factor_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, H: int, W: int, num_heads: int, scale: float,
                              crpe_weights: list[torch.Tensor], crpe_biases: list[torch.Tensor]
                              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Grads of the CPU twin's inputs (qkv, each CRPE weight and bias) from dout, as eager ops in
    the accumulation type (A = softmax_N(k), S = A^T v, dS = scale q^T dO, c_d = sum_e S_de dS_de):
    dq = scale dO S^T + dO * crpe(v), dk = A * (v dS^T - c), dv = A dS + crpe^T(q * dO), and the
    CRPE weight and bias grads from q * dO against v."""
    acc = _acc_dtype(qkv.dtype)
    B, N, C3 = qkv.shape
    C, Ch = C3 // 3, C3 // 3 // num_heads
    q, k, v = qkv.to(acc).reshape(B, N, 3, num_heads, Ch).permute(2, 0, 3, 1, 4)  # each (B, heads, N, Ch)
    g = dout.to(acc).reshape(B, N, num_heads, Ch).transpose(1, 2)
    a = k.softmax(dim=2)
    s = a.transpose(-1, -2) @ v
    ds = scale * (q.transpose(-1, -2) @ g)
    image = lambda t: t.transpose(-1, -2).reshape(B, C, H, W)  # noqa: E731  (B, heads, N, Ch) -> (B, C, H, W)
    tokens = lambda t: t.reshape(B, num_heads, Ch, N).transpose(-1, -2)  # noqa: E731  and back
    sizes = [w.shape[0] for w in crpe_weights]
    v_parts, qg_parts = image(v).split(sizes, dim=1), image(q * g).split(sizes, dim=1)
    conv, conv_t, dweights, dbiases = [], [], [], []
    for w, b, vp, gp in zip(crpe_weights, crpe_biases, v_parts, qg_parts):
        wa, pad = w.to(acc), w.shape[-1] // 2
        conv.append(torch.nn.functional.conv2d(vp, wa, b.to(acc), padding=pad, groups=w.shape[0]))
        conv_t.append(torch.nn.grad.conv2d_input(vp.shape, wa, gp, padding=pad, groups=w.shape[0]))
        dweights.append(torch.nn.grad.conv2d_weight(vp, w.shape, gp, padding=pad, groups=w.shape[0]).to(w.dtype))
        dbiases.append(gp.sum(dim=(0, 2, 3)).to(b.dtype))
    dq = scale * (g @ s.transpose(-1, -2)) + g * tokens(torch.cat(conv, dim=1))
    dk = a * (v @ ds.transpose(-1, -2) - (s * ds).sum(-1).unsqueeze(-2))
    dv = a @ ds + tokens(torch.cat(conv_t, dim=1))
    dqkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(B, N, C3)
    return dqkv.to(qkv.dtype), dweights, dbiases


@factor_attention_backward.register_fake
def _(dout, qkv, H, W, num_heads, scale, crpe_weights, crpe_biases):
    return torch.empty_like(qkv), [torch.empty_like(w) for w in crpe_weights], [torch.empty_like(b) for b in crpe_biases]


def _register_cpu_twin() -> None:
    @torch.library.register_fake("mpvit_kernels::factor_attention")
    def _(qkv, H, W, num_heads, scale, crpe_weights, crpe_biases):
        B, N, C3 = qkv.shape
        return qkv.new_empty(B, N, C3 // 3)

    def setup_context(ctx, inputs, output):
        qkv, H, W, num_heads, scale, weights, biases = inputs
        ctx.save_for_backward(qkv, *weights, *biases)
        ctx.args = (H, W, num_heads, scale, len(weights))

    def backward(ctx, dout):
        H, W, num_heads, scale, n = ctx.args
        qkv, *crpe = ctx.saved_tensors
        dqkv, dweights, dbiases = backend.call_op(factor_attention_backward, dout, qkv, H, W, num_heads, scale,
                                                  crpe[:n], crpe[n:])
        return dqkv, None, None, None, None, dweights, dbiases

    backend.register_autograd("mpvit_kernels::factor_attention", backward, setup_context=setup_context)
    backend.refuse_double_backward("mpvit_kernels::factor_attention_backward")


if backend.extension_available():
    _register_cpu_twin()
