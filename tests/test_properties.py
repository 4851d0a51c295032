"""Property tests (hypothesis): every op family on the ``auto`` backend (the Triton kernels,
interpreted on CPU here, and the C++ twins) against the reference, forward and every gradient,
over drawn shapes (empty batch, 1x1 maps, sizes that are no multiple of any tile), layouts,
dtypes and options. fp32 and fp64 against the reference in the same dtype; fp16 and bf16 against
fp64 within twice eager's normwise error plus one rounding, the Triton kernels with a GPU's tiles
(their 16-bit paths run on GPUs alone; affine_hswish and depthwise take their C++ twins on a CPU).
Derandomised and bounded, so a run draws the same examples every time and stays within CI's
budget; the fixed cases of each op's own test file cover model shapes."""
import contextlib
import sys

import pytest
import torch

import mpvit_kernels
from mpvit_kernels import ops
from mpvit_kernels.ops.affine_hswish import batch_norm_hswish
from tests.conftest import BF16, KERNEL_DEVICE
from tests.utils import assert_close, gpu_tiles, normwise_error

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(hypothesis.HealthCheck))
LOW_PRECISION = (torch.float16, torch.bfloat16)
# a pytest parameter, not a draw: every family's examples in every dtype
DTYPES = pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64"),
                                           pytest.param(torch.float16, id="fp16"), BF16])
LAYOUTS = st.sampled_from(["nchw", "channels_last", "strided"])
SIDE = st.integers(1, 9)
# channel counts: any small one, and multiples of 8, which the 16-byte vector loads of 16-bit rows take
CHANNELS = st.one_of(st.integers(1, 13), st.sampled_from([16, 24]))


def image(g, shape, dtype, layout):
    """A (B, C, H, W) tensor of random values in ``layout``; "strided" is every other column of a
    wider channels-last tensor (no dense layout)."""
    B, C, H, W = shape
    if layout == "strided":
        x = torch.randn(B, C, H, 2 * W, dtype=dtype, generator=g)
        return x.to(KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)[..., ::2]
    x = torch.randn(shape, dtype=dtype, generator=g).to(KERNEL_DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def rand(g, *shape, dtype, low=None):
    """Normal values, or uniform in [low, low + 1) (scales, BatchNorm weights)."""
    if low is None:
        return torch.randn(shape, dtype=dtype, generator=g).to(KERNEL_DEVICE)
    return (torch.rand(shape, dtype=dtype, generator=g) + low).to(KERNEL_DEVICE)


def token_pair(g, M, C, layout, dtype):
    """Two token tensors of one shape: (2, M, C) each ("tokens"), or (M, C) rows, the first sliced
    out of wider rows ("strided": a row stride of its own)."""
    if layout == "tokens":
        return rand(g, 2, M, C, dtype=dtype), rand(g, 2, M, C, dtype=dtype)
    return rand(g, M, C + (3 if layout == "strided" else 0), dtype=dtype)[:, :C], rand(g, M, C, dtype=dtype)


def against_reference(fn, leaves, g, grad_scale=10, out_scale=4):
    """fn(*leaves) on the auto backend and the reference one: the outputs (the first one, if fn
    returns several, gets the gradient) and the grads of every leaf that requires one agree.
    16-bit leaves: :func:`within_twice_eager` instead, with a GPU's tiles."""
    if leaves[0].dtype in LOW_PRECISION:
        with gpu_tiles():
            return within_twice_eager(fn, leaves, g)
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in leaves]
    results = []
    for backend in ("auto", "reference"):
        with mpvit_kernels.use_backend(backend):
            out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        results.append(outs)
    grad = torch.randn(results[0][0].shape, dtype=results[0][0].dtype, generator=g).to(KERNEL_DEVICE)
    ours, ref = results
    assert ours[0].shape == ref[0].shape and ours[0].dtype == ref[0].dtype
    for a, b in zip(ours, ref):
        assert_close(a, b, scale=out_scale)
    got = torch.autograd.grad(ours[0], leaves, grad, allow_unused=True)
    want = torch.autograd.grad(ref[0], leaves, grad, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any()), i
        else:
            assert_close(a, b, scale=grad_scale)


def within_twice_eager(fn, leaves, g):
    """fn's first output and its grads w.r.t. every leaf in the leaves' 16-bit dtype, on the auto
    backend (ours) and the reference one (eager), each against the reference on fp64 copies
    (the truth): ours' normwise error within twice eager's, plus a rounding of the dtype (a
    drawn output may be a few elements, where one rounding decides the ratio). No upstream grad
    where the truth lies within a few roundings of what a Hardswish makes of its kinks (3 at +3,
    0 at -3): there ours and eager may round to either side, where the slope jumps by 0.5."""
    dtype = leaves[0].dtype
    eps = torch.finfo(dtype).eps

    def run(backend, as_dtype):
        inputs = [t.detach().to(as_dtype).requires_grad_() for t in leaves]
        with mpvit_kernels.use_backend(backend):
            out = fn(*inputs)
        return inputs, (out[0] if isinstance(out, tuple) else out)

    inputs, truth = run("reference", torch.float64)
    grad = torch.randn(truth.shape, dtype=torch.float64, generator=g).to(KERNEL_DEVICE)
    grad = grad.masked_fill((truth.detach().abs() < 24 * eps) | ((truth.detach() - 3).abs() < 24 * eps), 0)
    grad = grad.to(dtype).to(torch.float64)  # the truth's too: ours and eager get it in their dtype
    want = [truth, *torch.autograd.grad(truth, inputs, grad, allow_unused=True)]
    errors = {}
    for name, backend in (("ours", "auto"), ("eager", "reference")):
        inputs, out = run(backend, dtype)
        assert out.dtype == dtype and out.shape == truth.shape, (name, out.dtype, out.shape)
        got = [out, *torch.autograd.grad(out, inputs, grad.to(dtype), allow_unused=True)]
        errors[name] = [None if w is None or a is None else normwise_error(a, w) for a, w in zip(got, want)]
        for i, (a, w) in enumerate(zip(got, want)):
            if a is None or w is None:  # no grad on one side: none on the other either
                assert (a is None or not a.any()) and (w is None or not w.any()), (name, i)
    for i, (o, e) in enumerate(zip(errors["ours"], errors["eager"])):
        assert o is None or o <= 2 * e + eps, (i, o, e)


@DTYPES
@hypothesis.settings(max_examples=8, **SETTINGS)
@hypothesis.given(B=st.integers(0, 2), C=CHANNELS, H=SIDE, W=SIDE, hswish=st.booleans(), layout=LAYOUTS,
                  seed=st.integers(0, 2 ** 16))
def test_affine_hswish(B, C, H, W, hswish, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3 * image(g, (B, C, H, W), dtype, layout)  # both sides of Hardswish's kinks at +-3
    scale, shift = rand(g, C, dtype=dtype, low=0.5), rand(g, C, dtype=dtype)
    against_reference(lambda x, s, t: ops.affine_hswish(x, s, t, hswish), [x, scale, shift], g)


@DTYPES
@hypothesis.settings(max_examples=8, **SETTINGS)
@hypothesis.given(B=st.integers(1, 3), C=CHANNELS, H=SIDE, W=SIDE, hswish=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_affine_hswish_batch(B, C, H, W, hswish, dtype, seed):
    # a training BatchNorm (batch statistics) + Hardswish on a channels-last map: the stem's and
    # InvRes's (ops.affine_hswish.batch_norm_hswish)
    hypothesis.assume(B * H * W > 1)  # batch statistics need two values
    g = torch.Generator().manual_seed(seed)
    z = 2 * image(g, (B, C, H, W), dtype, "channels_last") + 0.5
    gamma, beta = rand(g, C, dtype=dtype, low=0.5), rand(g, C, dtype=dtype)
    against_reference(lambda z, w, b: batch_norm_hswish(z, w, b, 1e-5, hswish)[0], [z, gamma, beta], g)


@DTYPES
@hypothesis.settings(max_examples=15, **SETTINGS)
@hypothesis.given(B=st.integers(0, 2), C=CHANNELS, H=SIDE, W=SIDE, k=st.sampled_from([3, 5, 7]),
                  stride=st.sampled_from([1, 2]), epilogue=st.sampled_from(["plain", "bias", "bn_hswish", "cpe"]),
                  layout=LAYOUTS, seed=st.integers(0, 2 ** 16))
def test_depthwise(B, C, H, W, k, stride, epilogue, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = image(g, (B, C, H, W), dtype, layout)
    w, b = 0.3 * rand(g, C, 1, k, k, dtype=dtype), rand(g, C, dtype=dtype)
    scale, shift = rand(g, C, dtype=dtype, low=0.5), rand(g, C, dtype=dtype)
    calls = {
        "plain": (lambda x, w: ops.depthwise(x, w, None, stride), [x, w]),
        "bias": (lambda x, w, b: ops.depthwise(x, w, b, stride), [x, w, b]),
        "bn_hswish": (lambda x, w, b, s, t: ops.depthwise(x, w, b, stride, s, t, hswish=True), [x, w, b, scale, shift]),
        "cpe": (lambda x, w, b: ops.depthwise(x, w, b, residual=True), [x, w, b]),  # stride 1 only
    }
    fn, leaves = calls[epilogue]
    against_reference(fn, leaves, g)


@DTYPES
@hypothesis.settings(max_examples=6, **SETTINGS)
@hypothesis.given(B=st.integers(0, 2), Cin=CHANNELS, Cout=st.integers(1, 20), H=SIDE, W=SIDE,
                  k=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]), training=st.booleans(),
                  layout=LAYOUTS, seed=st.integers(0, 2 ** 16))
def test_dwconv_bn(B, Cin, Cout, H, W, k, stride, training, layout, dtype, seed):
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    hypothesis.assume(not training or B * Ho * Wo > 1)  # batch statistics need two values
    # a training BatchNorm is blind to the scale of each output channel's row of the 1x1 weight: with
    # one input channel that row's exact grad is zero (but for eps), all rounding error (16 bits: 0.1-0.4 of
    # its norm, eager's too), no measure of either
    hypothesis.assume(not training or dtype not in LOW_PRECISION or Cin > 1)
    g = torch.Generator().manual_seed(seed)
    x = image(g, (B, Cin, H, W), dtype, layout)
    dw, pw = 0.3 * rand(g, Cin, 1, k, k, dtype=dtype), 0.3 * rand(g, Cout, Cin, 1, 1, dtype=dtype)
    gamma, beta = rand(g, Cout, dtype=dtype, low=0.5), rand(g, Cout, dtype=dtype)
    if training:
        against_reference(lambda x, dw, pw, gamma, beta: ops.dwconv_bn_train(x, dw, pw, stride, gamma, beta, 1e-5,
                                                                             hswish=True),
                          [x, dw, pw, gamma, beta], g, grad_scale=100)
    else:
        against_reference(lambda x, dw, pw, s, t: ops.dwconv_bn(x, dw, pw, stride, s, t, hswish=True),
                          [x, dw, pw, gamma, beta], g)


@DTYPES
@hypothesis.settings(max_examples=6, **SETTINGS)
@hypothesis.given(B=st.integers(0, 2), n=st.integers(1, 5), C=CHANNELS, Cout=st.integers(1, 20),
                  H=SIDE, W=SIDE, training=st.booleans(),
                  layout=st.sampled_from(["nchw", "channels_last", "strided", "tokens"]),
                  seed=st.integers(0, 2 ** 16))
def test_gli_projection(B, n, C, Cout, H, W, training, layout, dtype, seed):
    hypothesis.assume(not training or B * H * W > 1)
    hypothesis.assume(not training or dtype not in LOW_PRECISION or n * C > 1)  # (as dwconv_bn's)
    g = torch.Generator().manual_seed(seed)
    if layout == "tokens":  # (B, N, C) column slices of a wider token tensor
        xs = [rand(g, B, H * W, C + 2, dtype=dtype)[..., 1:C + 1] for _ in range(n)]
    else:
        xs = [image(g, (B, C, H, W), dtype, layout) for _ in range(n)]
    size = (H, W) if layout == "tokens" else None
    w = 0.3 * rand(g, Cout, n * C, dtype=dtype)
    gamma, beta = rand(g, Cout, dtype=dtype, low=0.5), rand(g, Cout, dtype=dtype)
    if training:
        fn = lambda w, gamma, beta, *xs: ops.gli_projection_train(list(xs), w, gamma, beta, 1e-5,  # noqa: E731
                                                                   hswish=True, size=size)
    else:
        fn = lambda w, s, t, *xs: ops.gli_projection(list(xs), w, s, t, hswish=True, size=size)  # noqa: E731
    against_reference(fn, [w, gamma, beta, *xs], g, grad_scale=100 if training else 10)


@contextlib.contextmanager
def whole_map_limit(n):
    module = sys.modules["mpvit_kernels.ops.factor_attention"]
    saved, module._WHOLE_MAP_MAX_N = module._WHOLE_MAP_MAX_N, n
    try:
        yield
    finally:
        module._WHOLE_MAP_MAX_N = saved


@pytest.mark.slow
@DTYPES
@hypothesis.settings(max_examples=3, **SETTINGS)
@hypothesis.given(B=st.integers(0, 2), H=SIDE, W=SIDE, Ch=st.integers(1, 13),
                  window=st.dictionaries(st.sampled_from([3, 5, 7]), st.integers(1, 2), min_size=1, max_size=3),
                  strided=st.booleans(), three_passes=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_factor_attention(B, H, W, Ch, window, strided, three_passes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    heads = sum(window.values())
    C = heads * Ch
    qkv = rand(g, B, H * W, 3 * C + (5 if strided else 0), dtype=dtype)[..., :3 * C]  # rows wider than 3C
    weights = [0.2 * rand(g, h * Ch, 1, k, k, dtype=dtype) for k, h in window.items()]
    biases = [rand(g, h * Ch, dtype=dtype) for h in window.values()]
    n = len(weights)
    with whole_map_limit(0 if three_passes else 256):
        against_reference(lambda qkv, *p: ops.factor_attention(qkv, (H, W), heads, Ch ** -0.5, list(p[:n]),
                                                               list(p[n:])),
                          [qkv, *weights, *biases], g)


@DTYPES
@hypothesis.settings(max_examples=8, **SETTINGS)
@hypothesis.given(B=st.integers(0, 2), N=st.integers(1, 20), C=st.integers(1, 40),
                  layout=st.sampled_from(["dense", "strided", "rows"]), seed=st.integers(0, 2 ** 16))
def test_residual_layernorm(B, N, C, layout, dtype, seed):
    # over one channel a LayerNorm's exact input grad is zero: eager's CPU backward leaves 1e-4 of
    # rounding where ours gives zero, out of an fp32 comparison's reach (16 bits: against fp64)
    hypothesis.assume(C > 1 or dtype in LOW_PRECISION)
    g = torch.Generator().manual_seed(seed)
    if layout == "rows":
        x, y = rand(g, B * N, C, dtype=dtype), rand(g, B * N, C + 2, dtype=dtype)[:, :C]
    else:
        x, y = rand(g, B, N, C, dtype=dtype), rand(g, B, N, C, dtype=dtype)
        if layout == "strided":  # a non-unit channel stride: copied once
            y = rand(g, B, C, N, dtype=dtype).transpose(1, 2)
    params = [rand(g, C, dtype=dtype), rand(g, C, dtype=dtype), rand(g, C, dtype=dtype, low=0.5), rand(g, C, dtype=dtype)]

    def both(*a):  # one output, so the gradient reaches r and u alike
        return torch.cat(ops.residual_layernorm(*a, 1e-5), dim=-1)

    against_reference(both, [x, y, *params], g)


@DTYPES
@hypothesis.settings(max_examples=8, **SETTINGS)
# a LayerNorm over two features: its normalised values are +-1 whatever x is, so the input's true grad is
# tiny and any inconsistency between the statistics and the grad's cancellation shows (ATen's CPU
# LayerNorm once handed the interpreted backward 16-bit statistics: a normwise error of 300 in fp16, eager's 0.035)
@hypothesis.example(M=1, K=2, N=1, layout="rows", norm=True, bias=False, gelu=False, seed=0)
@hypothesis.given(M=st.integers(0, 80), K=st.integers(1, 70), N=st.integers(1, 140),
                  layout=st.sampled_from(["rows", "strided", "tokens"]), norm=st.booleans(), bias=st.booleans(),
                  gelu=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_linear(M, K, N, layout, norm, bias, gelu, dtype, seed):
    hypothesis.assume(K > 1 or not norm or dtype in LOW_PRECISION)  # (as residual_layernorm's)
    g = torch.Generator().manual_seed(seed)
    if layout == "tokens":
        x = rand(g, 2, M, K, dtype=dtype)
    else:
        x = rand(g, M, K + (3 if layout == "strided" else 0), dtype=dtype)[:, :K]
    x.mul_(2).add_(1)  # in place: a strided x stays a view with a row stride of its own
    params = [rand(g, N, K, dtype=dtype)] + ([rand(g, N, dtype=dtype)] if bias else [])
    if norm:
        params += [rand(g, K, dtype=dtype, low=0.5), rand(g, K, dtype=dtype)]

    def fn(x, w, *rest):
        b = rest[0] if bias else None
        return ops.linear(x, w, b, *rest[int(bias):], eps=1e-5, gelu=gelu)

    against_reference(fn, [x, *params], g)


@DTYPES
@hypothesis.settings(max_examples=8, **SETTINGS)
@hypothesis.given(M=st.integers(0, 70), C=st.one_of(st.integers(2, 20), st.sampled_from([16, 24, 32])),
                  ratio=st.sampled_from([2, 4]), bias=st.booleans(), layout=st.sampled_from(["rows", "strided", "tokens"]),
                  seed=st.integers(0, 2 ** 16))
def test_linear_mlp(M, C, ratio, bias, layout, dtype, seed):
    # the MLP onto its residual, as the blocks train it; at least 2 channels and a hidden of 4 (a
    # narrower one's weight grads are a few sums whose 16-bit rounding decides any ratio)
    g = torch.Generator().manual_seed(seed)
    x, r = token_pair(g, M, C, layout, dtype)
    w1, w2 = 0.3 * rand(g, ratio * C, C, dtype=dtype), 0.3 * rand(g, C, ratio * C, dtype=dtype)
    against_reference(lambda x, r, w1, w2, *b: ops.linear_mlp(x, r, w1, b[0] if b else None, w2),
                      [x, r, w1, w2] + ([rand(g, ratio * C, dtype=dtype)] if bias else []), g)


@DTYPES
@hypothesis.settings(max_examples=6, **SETTINGS)
@hypothesis.given(M=st.integers(0, 70), C=st.one_of(st.integers(2, 20), st.sampled_from([16, 24, 64, 128])),
                  ratio=st.sampled_from([1, 4]), layout=st.sampled_from(["rows", "strided", "tokens"]),
                  seed=st.integers(0, 2 ** 16))
def test_linear_proj_mlp(M, C, ratio, layout, dtype, seed):
    # a block after its attention, as inference runs it at C <= 128
    g = torch.Generator().manual_seed(seed)
    a, x = token_pair(g, M, C, layout, dtype)
    hidden = ratio * C
    leaves = [a, x, 0.3 * rand(g, C, C, dtype=dtype), rand(g, C, dtype=dtype), rand(g, C, dtype=dtype, low=0.5),
              rand(g, C, dtype=dtype), 0.3 * rand(g, hidden, C, dtype=dtype), rand(g, hidden, dtype=dtype),
              0.3 * rand(g, C, hidden, dtype=dtype), rand(g, C, dtype=dtype)]
    against_reference(lambda a, x, wp, pb, lw, lb, w1, b1, w2, b2: ops.linear_proj_mlp(a, x, wp, pb, lw, lb, 1e-6, w1, b1,
                                                                                       w2, b2), leaves, g)
