"""linear: the block's token Linears with norm1 fused before the qkv GEMM and GELU after fc1's
(Triton, interpreted on CPU here, real on a GPU), against the eager LayerNorm -> Linear -> GELU
chain, every gradient; and MPViT's block, which runs its qkv and fc1 through it."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import ops
from tests.conftest import BF16, BF16_KERNELS, KERNEL_DEVICE, MODEL_SHAPES, NO_BF16_KERNELS
from tests.test_residual_layernorm import make_block
from tests.utils import LaunchSpy, RecordLaunches, RecordOps, assert_close, gpu_tiles, normwise_error

# what the model runs (norm1 -> qkv; fc1 -> GELU), a plain Linear, and both fusions at once
SITES = {"norm": (True, False), "gelu": (False, True), "plain": (False, False), "norm+gelu": (True, True)}
linear_op = importlib.import_module("mpvit_kernels.ops.linear")


@pytest.fixture
def norm_grad_at_any_rows(monkeypatch):
    """norm1 -> qkv's backward through linear_norm_grad at the interpreter's few rows (on a GPU
    from NORM_GRAD_ROWS)."""
    monkeypatch.setattr(linear_op, "NORM_GRAD_ROWS", 0)


def chain(x, weight, bias, ln_weight, ln_bias, eps, gelu):
    """What eager runs."""
    if ln_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def tokens_in(layout, M, K, dtype, device=KERNEL_DEVICE):
    """Random tokens in ``layout``: "rows" (M, K) dense; "tokens" (2, M, K); "strided" rows sliced
    out of wider ones (a row stride of their own); "transposed" tokens with a non-unit channel
    stride (copied once)."""
    if layout == "rows":
        return torch.randn(M, K, dtype=dtype, device=device)
    if layout == "tokens":
        return torch.randn(2, M, K, dtype=dtype, device=device)
    if layout == "strided":
        return torch.randn(M, K + 7, dtype=dtype, device=device)[:, :K]
    return torch.randn(2, K, M, dtype=dtype, device=device).transpose(1, 2)


def make_inputs(M, K, N, dtype, layout, site, bias=True, device=KERNEL_DEVICE):
    """x (leaf) in ``layout`` (tokens_in), then (weight, bias, ln_weight, ln_bias) leaves, the
    LayerNorm's None where the site has none. Rows far from zero mean, as a residual stream's are."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    x = (tokens_in(layout, M, K, dtype, device) * 2 + 3).detach().requires_grad_()
    norm, _ = SITES[site]
    params = [randn(N, K) * K ** -0.5, randn(N) if bias else None,
              torch.rand(K, dtype=dtype, device=device) + 0.5 if norm else None, randn(K) if norm else None]
    return x, [None if p is None else p.requires_grad_() for p in params]


@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("layout", ["rows", "tokens", "strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(7, 8, 24), (15, 22, 50), (33, 70, 130)], ids=lambda s: "x".join(map(str, s)))
def test_matches_the_eager_chain_with_every_grad(shape, dtype, layout, site, norm_grad_at_any_rows):
    x, params = make_inputs(*shape, dtype, layout, site)
    gelu = SITES[site][1]
    with RecordOps() as rec:
        y = ops.linear(x, *params, eps=1e-6, gelu=gelu)
    assert rec.names.count("mpvit_kernels.linear") == 1 and "aten.native_layer_norm" not in rec.names
    want = chain(x, *params, 1e-6, gelu)
    assert y.shape == want.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want, scale=4)
    leaves = [x] + [p for p in params if p is not None]
    g = torch.randn_like(want)
    with RecordOps() as rec:
        got = torch.autograd.grad(y, leaves, g)
    # GELU's grad from the GEMM that recomputes the pre-activation, which never reaches memory
    assert rec.names.count("mpvit_kernels.linear_gelu_grad") == gelu
    assert not {"aten.gelu_backward", "aten.addmm", "aten.gelu"} & set(rec.names)
    # norm1 -> qkv: the LayerNorm's backward in the input grad's GEMM, its output recomputed there
    fused = SITES[site] == (True, False)
    assert rec.names.count("mpvit_kernels.linear_norm_grad") == fused
    if fused:
        assert not {"aten.native_layer_norm", "aten.native_layer_norm_backward", "aten.sum"} & set(rec.names)
    for a, b in zip(got, torch.autograd.grad(want, leaves, g)):
        assert a.dtype == b.dtype
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("site", list(SITES))
def test_matches_the_eager_chain_with_a_gpus_tiles(site, norm_grad_at_any_rows):
    # the GEMMs as a GPU tiles fp32 (32 rows at 128 outputs, K 16 at a time; the LayerNorm's
    # backward 16 rows), where the interpreter's take the fewest programs
    with gpu_tiles():
        test_matches_the_eager_chain_with_every_grad((33, 70, 130), torch.float32, "rows", site, None)


def test_mpvit_block_with_a_gpus_tiles(norm_grad_at_any_rows):
    # a block's inference (linear_proj_mlp, the whole-map attention) and training step (linear_mlp
    # and its grad, linear_norm_grad over two 64-channel tiles) with a GPU's tiles
    with gpu_tiles():
        test_mpvit_block_runs_norm1_and_gelu_inside_its_gemms(16)
        test_mpvit_block_training_step_takes_norm1_backward_in_one_gemm(136, None)


def test_cpu_composition_takes_gelu_in_place_only_where_no_graph_needs_the_pre_activation(monkeypatch):
    """Outside the interpreter a CPU runs the eager composition (oneDNN's GEMM); where no autograd
    graph keeps fc1's pre-activation its GELU runs in place, with the same bits."""
    from mpvit_kernels import backend

    monkeypatch.setattr(backend, "use_triton", lambda op, device: False)
    x, (weight, bias, _, _) = make_inputs(6, 8, 12, torch.float32, "tokens", "gelu", device="cpu")
    want = chain(x, weight, bias, None, None, 1e-5, True)
    with torch.no_grad(), RecordOps() as rec:
        y = ops.linear(x, weight, bias, gelu=True)
    assert "aten.gelu_" in rec.names and torch.equal(y, want)
    with RecordOps() as rec:
        y = ops.linear(x, weight, bias, gelu=True)
    assert "aten.gelu" in rec.names and "aten.gelu_" not in rec.names and torch.equal(y, want)
    grads = torch.autograd.grad(y.square().sum(), [x, weight, bias])
    for g, r in zip(grads, torch.autograd.grad(want.square().sum(), [x, weight, bias])):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("site", ["norm", "gelu", "plain"])
@pytest.mark.parametrize("rows", [4094, 4096])
def test_cpu_composition_runs_its_gemm_as_a_conv_from_4096_rows(monkeypatch, rows, site):
    """From 4096 fp32 rows the CPU composition's GEMM is oneDNN's 1x1 conv over the rows (the bias in
    its epilogue); values and every grad as the eager chain's on either side of the threshold. A
    compiled graph keeps the GEMM (Inductor's conv costs more there)."""
    from mpvit_kernels import backend

    monkeypatch.setattr(backend, "use_triton", lambda op, device: False)
    x, params = make_inputs(rows // 2, 8, 12, torch.float32, "transposed", site, bias=site != "plain", device="cpu")
    gelu = SITES[site][1]
    with RecordOps() as rec:
        y = ops.linear(x, *params, eps=1e-6, gelu=gelu)
    assert ("aten.convolution" in rec.names) == (rows >= 4096)
    want = chain(x, *params, 1e-6, gelu)
    assert y.shape == want.shape and y.is_contiguous()
    assert_close(y, want, scale=4)
    leaves = [x] + [p for p in params if p is not None]
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert_close(a, b, scale=10)
    if rows >= 4096:
        targets = []

        def record(gm, example_inputs):
            targets.extend(str(node.target) for node in gm.graph.nodes)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(lambda *a: ops.linear(*a, eps=1e-6, gelu=gelu), fullgraph=True, backend=record)(x, *params)
        assert targets and not any("conv" in t for t in targets)


def test_without_bias_and_with_an_empty_batch():
    x, (w, _, lw, lb) = make_inputs(9, 16, 20, torch.float32, "rows", "norm", bias=False)
    assert_close(ops.linear(x, w, None, lw, lb, 1e-5), chain(x, w, None, lw, lb, 1e-5, False), scale=4)
    empty = ops.linear(torch.randn(0, 5, 16, device=KERNEL_DEVICE), w, gelu=True)
    assert empty.shape == (0, 5, 20)
    x, (w, *_) = make_inputs(9, 16, 20, torch.float32, "rows", "gelu", bias=False)
    y, want = ops.linear(x, w, gelu=True), chain(x, w, None, None, None, 0, True)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, [x, w], g), torch.autograd.grad(want, [x, w], g)):
        assert_close(a, b, scale=10)
    x = torch.randn(0, 5, 16, device=KERNEL_DEVICE, requires_grad=True)
    b = torch.randn(20, device=KERNEL_DEVICE, requires_grad=True)
    grads = torch.autograd.grad(ops.linear(x, w, b, gelu=True).sum(), [x, w, b])
    assert [tuple(t.shape) for t in grads] == [(0, 5, 16), (20, 16), (20,)] and not grads[2].any()


@pytest.mark.parametrize("stride, n, vec", [(16, 24, 8), (20, 24, 4), (16, 20, 4), (19, 24, 1)])
def test_row_stride_and_widths_set_the_vector_width(stride, n, vec):
    # the kernel is told K, N and the row stride are multiples of VEC (16-byte loads at widths
    # such as 216); a wrong VEC would round them and read the wrong rows
    x = torch.randn(9, stride, device=KERNEL_DEVICE)[:, :16]
    _, (w, b, lw, lb) = make_inputs(9, 16, n, torch.float32, "rows", "norm")
    with RecordLaunches() as rec:
        y = ops.linear(x, w, b, lw, lb, 1e-5)
    # a set: on a GPU the tuner's benchmarking launches are recorded too
    assert {meta["VEC"] for fn, meta in rec.launches if fn.__name__ == "linear_kernel"} == {vec}
    assert_close(y, chain(x, w, b, lw, lb, 1e-5, False), scale=4)


@pytest.mark.parametrize("case, tuned", [("aligned", True), ("row stride 20", False), ("fp64", False),
                                         ("x 4 bytes off 16", False)])
def test_gemm_takes_the_tuner_where_its_tiles_were_sized(case, tuned, monkeypatch):
    # the tuner's tiles (gli_projection's) fit the registers at aligned launches (VEC=8, 16-byte
    # pointers); anything else keeps the pinned tile the worst-case compiles were sized for
    from mpvit_kernels.triton import linear as kernels

    taken = []
    monkeypatch.setattr(kernels, "linear_tuned", LaunchSpy("tuned", kernels.linear_tuned, taken))
    monkeypatch.setattr(kernels, "linear_kernel", LaunchSpy("pinned", kernels.linear_kernel, taken))
    dtype = torch.float64 if case == "fp64" else torch.float32
    wide = torch.randn(9 * 20 + 1, dtype=dtype, device=KERNEL_DEVICE)
    x = {"row stride 20": wide[:180].view(9, 20)[:, :16], "x 4 bytes off 16": wide[1:145].view(9, 16)}.get(
        case, wide[:144].view(9, 16))
    _, (w, b, lw, lb) = make_inputs(9, 16, 24, dtype, "rows", "norm")
    y = ops.linear(x, w, b, lw, lb, 1e-5)
    assert taken == ["tuned" if tuned else "pinned"]
    assert_close(y, chain(x, w, b, lw, lb, 1e-5, False), scale=4)


@pytest.mark.parametrize("case, width", [("aligned", 128), ("K 12", 64), ("fp64", 64), ("fp32 K 12", 128)])
def test_gelu_grad_runs_the_pinned_tile_at_the_widths_its_compiles_allow(case, width):
    # never the tuner (the bias grad's partial sums keep one order); 128-wide tiles only where the
    # static report compiles them without spills: 16-bit rows read 16 bytes at a time, and fp32
    dtype = {"fp64": torch.float64, "fp32 K 12": torch.float32}.get(case, torch.bfloat16)
    if dtype == torch.bfloat16 and not BF16_KERNELS:
        pytest.skip(NO_BF16_KERNELS)
    K = 12 if "K 12" in case else 16
    x, (w, b, _, _) = make_inputs(9, K, 136, dtype, "rows", "gelu")
    with RecordLaunches() as rec:
        torch.ops.mpvit_kernels.linear_gelu_grad(torch.randn(9, 136, dtype=dtype, device=KERNEL_DEVICE), x.detach(),
                                                  w.detach(), b.detach())
    assert [(meta["BLOCK_N"], meta["GELU_GRAD"]) for fn, meta in rec.launches] == [(width, True)]


def test_what_a_gpu_tunes():
    # Aligned launches tune per (bucket of M, widths, fusions) over gli_projection's tiles of the
    # pinned BLOCK_K; MPVIT_KERNELS_AUTOTUNE=0 pins them (gli_projection's module builds its tiles
    # from the switch at import: reloaded too)
    from tests.utils import read_as_a_gpu_process

    results = read_as_a_gpu_process("mpvit_kernels.triton.linear", """
        def read(m):
            importlib.reload(importlib.import_module("mpvit_kernels.triton.gli_projection"))
            m = importlib.reload(m)
            t = m.linear_tuned
            out = {"tuned": isinstance(t, triton.runtime.Autotuner), "pinned": type(m.linear_kernel).__name__}
            if out["tuned"]:
                g = importlib.import_module("mpvit_kernels.triton.gli_projection")
                out["key"] = t.keys
                out["configs"] = t.configs == g.TUNED_CONFIGS
                out["fit"] = {f"{bn} {p}": [[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps] for c in fit(t)]
                              for bn in (64, 128) for p in ("tf32", "ieee")
                              for fit in [lambda f, bn=bn, p=p: f.early_config_prune(
                                  f.configs, {}, BLOCK_N=bn, ACC=triton.language.float32, DOT_PRECISION=p)]}
            return out
    """)
    assert results["0"] == {"tuned": False, "pinned": "PinnedHeuristics"}
    on = results["1"]
    assert on["tuned"] and on["pinned"] == "PinnedHeuristics" and on["configs"]
    assert on["key"] == ["m_bucket", "K", "N", "NORM", "BIAS", "GELU"]
    # 16-bit: gli_projection's; fp32 (FMA dots): at most 32 accumulator values per thread
    assert on["fit"]["128 tf32"] == [[64, 32, 4], [64, 32, 8], [128, 32, 8]]
    assert on["fit"]["128 ieee"] == [[32, 16, 4], [32, 16, 8], [64, 16, 8]]
    assert on["fit"]["64 ieee"] == [[32, 16, 4], [32, 16, 8], [64, 16, 4], [64, 16, 8], [128, 16, 8]]


@pytest.mark.parametrize("site", ["norm", "gelu"])
def test_every_tile_the_tuner_may_pick_matches_the_reference(site, monkeypatch):
    # a GPU's tuner launches one of gli_projection's TUNED_CONFIGS tiles (the interpreter the
    # pinned tile alone): each forced in turn at an aligned fp16 launch of 70 rows, 24 -> 40
    # (no multiple of any tile), against fp64 within twice eager's error
    import triton

    from mpvit_kernels.triton import gli_projection, linear as kernels
    from mpvit_kernels.triton.static_compile import jit_function

    x, params = make_inputs(70, 24, 40, torch.float16, "rows", site)
    with torch.no_grad():
        want = chain(x.double(), *[None if p is None else p.double() for p in params], 1e-6, SITES[site][1])
        eager = normwise_error(chain(x, *params, 1e-6, SITES[site][1]), want)
        for config in gli_projection.TUNED_CONFIGS:
            monkeypatch.setattr(kernels, "linear_tuned",
                                triton.autotune([config], key=[])(jit_function(kernels.linear_kernel)))
            with RecordLaunches() as rec:
                out = ops.linear(x, *params, eps=1e-6, gelu=SITES[site][1])
            assert [(meta["BLOCK_M"], meta["BLOCK_K"]) for _, meta in rec.launches] == \
                [(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"])]
            assert normwise_error(out, want) <= 2 * eager + 1e-3, config


def test_fp64_gradcheck(norm_grad_at_any_rows):
    for site in ("norm", "gelu"):
        x, params = make_inputs(4, 6, 5, torch.float64, "strided", site)
        leaves = [p for p in params if p is not None]
        norm, gelu = SITES[site]

        def fn(x, w, b, *ln):
            return ops.linear(x, w, b, *ln, eps=1e-5, gelu=gelu)
        assert torch.autograd.gradcheck(fn, (x, *leaves))
        # the fused GELU grad has a second derivative, as eager's GELU backward has; norm1's
        # backward takes ATen's ops where it is differentiated itself
        assert torch.autograd.gradgradcheck(fn, (x, *leaves))


def test_opcheck():
    for site in SITES:
        for layout in ("rows", "strided"):
            x, (w, b, lw, lb) = make_inputs(10, 12, 20, torch.float32, layout, site)
            torch.library.opcheck(torch.ops.mpvit_kernels.linear.default, (x, w, b, lw, lb, 1e-6, SITES[site][1]))
    for layout in ("rows", "strided"):
        x, (w, b, _, _) = make_inputs(10, 12, 20, torch.float32, layout, "gelu")
        dy = torch.randn(10, 20, device=KERNEL_DEVICE)
        for bias in (b, None):
            torch.library.opcheck(torch.ops.mpvit_kernels.linear_gelu_grad.default, (dy, x.detach(), w.detach(), bias))
        x, (w, _, lw, lb) = make_inputs(10, 12, 20, torch.float32, layout, "norm")
        for bias_grad in (True, False):
            torch.library.opcheck(torch.ops.mpvit_kernels.linear_norm_grad.default,
                                  (dy, x.detach(), w.detach(), lw.detach(), lb.detach(), 1e-6, bias_grad))


def test_gelu_grad_is_the_pre_activation_grad_and_refuses_mismatched_inputs():
    # M = 70: more than one program's rows at every dtype's pinned tile, so the bias grad adds partial sums
    x, (w, b, _, _) = make_inputs(70, 12, 20, torch.float64, "strided", "gelu")
    dy = torch.randn(70, 20, dtype=torch.float64, device=KERNEL_DEVICE)
    h = torch.addmm(b, x, w.t()).detach().requires_grad_()
    want, = torch.autograd.grad(F.gelu(h), h, dy)
    got, dbias = torch.ops.mpvit_kernels.linear_gelu_grad(dy, x.detach(), w.detach(), b.detach())
    assert got.is_contiguous()
    assert_close(got, want, scale=4)
    assert_close(dbias, want.sum(0), scale=4)
    got_nb, none = torch.ops.mpvit_kernels.linear_gelu_grad(dy, x.detach(), w.detach(), None)
    assert none.shape == (0,)
    assert_close(got_nb, torch.autograd.grad(F.gelu(h - b.detach()), h, dy)[0], scale=4)
    empty = torch.ops.mpvit_kernels.linear_gelu_grad(dy[:0], x.detach()[:0], w.detach(), b.detach())
    assert empty[0].shape == (0, 20) and torch.equal(empty[1], torch.zeros_like(b))
    dy, x = dy[:9], x[:9]
    for args, match in (((dy.float(), x, w, b), "dy must be torch.float64 \\(9, 20\\)"),
                        ((dy[:, :19], x, w, b), "dy must be"), ((dy, x[:, :11], w, b), "x must be"),
                        ((dy, x, w, b[:19]), "bias must have shape \\(20,\\)")):
        with pytest.raises(ValueError, match=match):
            torch.ops.mpvit_kernels.linear_gelu_grad(*[a.detach() for a in args])


@pytest.mark.parametrize("dtype, K, N", [(torch.float32, 22, 66), (torch.float64, 22, 66), (torch.float32, 136, 408),
                                         (torch.float64, 70, 210)], ids=["fp32", "fp64", "fp32-wide", "fp64-wide"])
def test_norm_grad_is_the_layernorm_and_linear_backward_and_refuses_mismatched_inputs(dtype, K, N):
    # M = 70: several programs' rows at every pinned tile, so the parameters' grads add partial
    # sums; wide: the channels in tiles of 128 (64 in fp64), the GEMM computed twice
    x, (w, _, lw, lb) = make_inputs(70, K, N, dtype, "strided", "norm")
    x, w, lw, lb = (t.detach() for t in (x, w, lw, lb))
    dy = torch.randn(70, N, dtype=dtype, device=KERNEL_DEVICE)
    u, mean, rstd = torch.ops.aten.native_layer_norm(x, [K], lw, lb, 1e-6)
    want_dx, want_dlw, want_dlb = torch.ops.aten.native_layer_norm_backward(dy @ w, x, [K], mean, rstd, lw, lb,
                                                                            [True, True, True])
    dx, got_u, sums = torch.ops.mpvit_kernels.linear_norm_grad(dy, x, w, lw, lb, 1e-6, True)
    assert dx.is_contiguous() and got_u.is_contiguous() and sums.shape == (2 * K + N,)
    assert_close(dx, want_dx, scale=10)
    assert_close(got_u, u, scale=4)
    for got, want in zip(sums.split([K, K, N]), (want_dlw, want_dlb, dy.sum(0))):
        assert_close(got, want, scale=10)
    _, _, no_bias = torch.ops.mpvit_kernels.linear_norm_grad(dy, x, w, lw, lb, 1e-6, False)
    assert_close(no_bias, sums[:2 * K])  # (torch.sum's order over programs may differ with the width)
    empty = torch.ops.mpvit_kernels.linear_norm_grad(dy[:0], x[:0], w, lw, lb, 1e-6, True)
    assert empty[0].shape == empty[1].shape == (0, K) and torch.equal(empty[2], torch.zeros_like(sums))
    dy, x = dy[:9], x[:9]
    for args, error, match in (((dy.float() if dtype == torch.float64 else dy.double(), x, w, lw, lb), ValueError,
                                "dy must be"),
                               ((dy[:, :-1], x, w, lw, lb), ValueError, "dy must be"),
                               ((dy, x[:, :-1], w, lw, lb), ValueError, "x must be"),
                               ((dy, x.int(), w, lw, lb), ValueError, "x must be a float"),
                               ((dy, x, w, lw[:-1], lb), ValueError, "ln_weight must have shape"),
                               ((dy, x, w, lw, lb.half()), ValueError, "ln_weight and ln_bias must share")):
        with pytest.raises(error, match=match):
            torch.ops.mpvit_kernels.linear_norm_grad(*args, 1e-6, True)


def test_norm_grad_only_for_layernorm_parameters_of_one_dtype(norm_grad_at_any_rows):
    # ops.linear gives them one dtype; the registered op also takes a mix, whose backward keeps ATen's ops
    x, (w, b, lw, lb) = make_inputs(20, 8, 24, torch.float64, "rows", "norm")
    lb32 = lb.detach().float().requires_grad_()
    with RecordOps() as rec:
        got = torch.autograd.grad(torch.ops.mpvit_kernels.linear(x, w, b, lw, lb32, 1e-6, False).sum(), [x, lw, lb32])
    assert "mpvit_kernels.linear_norm_grad" not in rec.names
    want = torch.autograd.grad(chain(x, w, b, lw, lb32.double(), 1e-6, False).sum(), [x, lw, lb32])
    for a, b_ in zip(got, want):
        assert a.dtype == b_.dtype
        assert_close(a, b_, scale=10)


def test_norm_grad_from_its_row_count_and_not_where_the_backward_is_differentiated(monkeypatch):
    monkeypatch.setattr(linear_op, "NORM_GRAD_ROWS", 16)
    for rows, fused in ((15, False), (16, True)):
        x, params = make_inputs(rows, 8, 24, torch.float32, "rows", "norm")
        y = ops.linear(x, *params)
        with RecordOps() as rec:
            torch.autograd.grad(y.sum(), [x, *params])
        assert rec.names.count("mpvit_kernels.linear_norm_grad") == fused
        assert ("aten.native_layer_norm_backward" in rec.names) != fused
    with RecordOps() as rec:  # create_graph: ATen's ops, which autograd can differentiate again
        torch.autograd.grad(ops.linear(x, *params).sum(), [x, *params], create_graph=True)
    assert "mpvit_kernels.linear_norm_grad" not in rec.names


def test_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, params = make_inputs(10, 12, 20, torch.float32, "tokens", "norm+gelu")
    compiled = torch.compile(lambda *a: ops.linear(*a, eps=1e-6, gelu=True), fullgraph=True, backend="aot_eager")
    y = compiled(x, *params)
    want = chain(x, *params, 1e-6, True)
    assert_close(y, want, scale=4)
    for a, b in zip(torch.autograd.grad(y.sum(), [x, *params]), torch.autograd.grad(want.sum(), [x, *params])):
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_autocast_through_the_kernel_is_as_accurate_as_eager(dtype, norm_grad_at_any_rows):
    """fp16/bf16 autocast over an fp32 stream of tokens: the LayerNorm from the fp32 tokens, the
    GEMM in the autocast dtype, output in it, grads of fp32 leaves fp32; our error against fp64 at
    most twice eager's, grads too."""
    for site in ("norm", "gelu"):
        x, params = make_inputs(40, 24, 72, torch.float32, "tokens", site)
        gelu = SITES[site][1]
        x64 = x.detach().double().requires_grad_()
        p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
        want = chain(x64, *p64, 1e-6, gelu)
        g = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, [x64, *p64[:2]], g)  # x, weight, bias
        errs = {}
        for name, fn in (("ours", lambda *a: ops.linear(*a, eps=1e-6, gelu=gelu)),
                         ("eager", lambda *a: chain(*a, 1e-6, gelu))):
            with torch.autocast(x.device.type, dtype=dtype):
                y = fn(x, *params)
            assert y.dtype == dtype
            grads = torch.autograd.grad(y, [x, *params[:2]], g.to(y.dtype))
            assert [t.dtype for t in grads] == [torch.float32] * 3
            errs[name] = [normwise_error(a, b) for a, b in zip([y, *grads], [want, *want_grads])]
        assert all(o <= 2 * e + 1e-4 for o, e in zip(errs["ours"], errs["eager"])), errs


def test_dtypes_follow_autocast_and_fp64_is_left_alone():
    x, (w, b, lw, lb) = make_inputs(6, 8, 12, torch.float32, "rows", "norm")
    with torch.autocast("cpu", dtype=torch.bfloat16), mpvit_kernels.use_backend("reference", ops=["linear"]):
        assert ops.linear(x.cpu(), w.cpu(), b.cpu(), lw.cpu(), lb.cpu()).dtype == torch.bfloat16
        x64 = x.detach().cpu().double()
        assert ops.linear(x64, w.detach().cpu().double(), gelu=True).dtype == torch.float64
    # outside autocast the GEMM runs in x's dtype, the weight cast to it
    y = ops.linear(x.detach().double(), w.detach(), b.detach(), gelu=True)
    assert y.dtype == torch.float64
    assert_close(y, chain(x.detach().double(), w.detach().double(), b.detach().double(), None, None, 0, True))


@pytest.mark.parametrize("change, error, match", [
    (dict(x=[1.0]), TypeError, "x must be a Tensor"),
    (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must be float"),
    (dict(x=torch.randn(8)), ValueError, "x must be tokens"),
    (dict(weight=torch.randn(12, 9)), ValueError, "weight must be \\(N, 8\\)"),
    (dict(weight=torch.randn(12, 8, 1)), ValueError, "weight must be"),
    (dict(bias=torch.randn(11)), ValueError, "bias must have shape \\(12,\\)"),
    (dict(ln_weight=None), ValueError, "ln_weight and ln_bias"),
    (dict(ln_bias=torch.randn(9)), ValueError, "ln_bias must have shape \\(8,\\)"),
    (dict(eps=0.0), ValueError, "eps must be"),
    (dict(eps=float("nan")), ValueError, "eps must be"),
    (dict(gelu=1), TypeError, "gelu must be a bool"),
    (dict(weight=torch.randn(12, 8, device="meta")), ValueError, "weight is on meta"),
    (dict(x=torch.randn(4, 8, device="meta"), weight=torch.empty(65535 * 128 + 1, 8, device="meta")), ValueError,
     "at most 8388480 outputs"),
    (dict(x=torch.randn(4, 8, device="meta", dtype=torch.float64), gelu=True,  # fp64's GELU grad: 64-wide tiles
          weight=torch.empty(65535 * 64 + 1, 8, device="meta", dtype=torch.float64)), ValueError,
     "at most 4194240 outputs"),
    (dict(x=torch.randn(4, 8, device="meta", dtype=torch.bfloat16), gelu=True,  # unaligned 16-bit rows: 64-wide too
          weight=torch.empty(65535 * 64 + 1, 8, device="meta", dtype=torch.bfloat16)), ValueError,
     "at most 4194240 outputs"),
])
def test_bad_inputs_are_refused_before_any_kernel(change, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(12, 8), bias=torch.randn(12), ln_weight=torch.randn(8),
                ln_bias=torch.randn(8), eps=1e-5, gelu=False)
    args.update(change)
    with pytest.raises(error, match=match):
        ops.linear(**args)


@pytest.mark.parametrize("C", [16, 136])
def test_mpvit_block_runs_norm1_and_gelu_inside_its_gemms(C):
    """Inference: norm1 inside the qkv GEMM; the rest of the block after the attention in one op
    up to 128 channels (linear_proj_mlp), above that proj's GEMM, residual_layernorm, GELU inside
    fc1's GEMM and fc2 accumulating onto r."""
    block = make_block(C, torch.float32).eval()
    x = torch.randn(2, 15, C, device=KERNEL_DEVICE)
    with torch.no_grad():
        with RecordOps() as rec:
            out = block(x, (3, 5))
        with mpvit_kernels.use_backend("reference"):
            want = block(x, (3, 5))
    fused = C <= 128
    assert rec.names.count("mpvit_kernels.linear") == (1 if fused else 2)
    assert rec.names.count("mpvit_kernels.linear_proj_mlp") == (1 if fused else 0)
    assert rec.names.count("aten.addmm_") == rec.names.count("aten.mm") == (0 if fused else 1)
    assert not {"aten.gelu", "aten.native_layer_norm"} & set(rec.names)
    assert_close(out, want, scale=4)
    # where a graph is recorded (the parameters train), the separate ops with their backward
    # kernels: norm1 -> qkv, and the MLP onto its residual (fc1's GEMM inside it)
    with RecordOps() as rec:
        block(x, (3, 5))
    assert "mpvit_kernels.linear_proj_mlp" not in rec.names
    assert rec.names.count("mpvit_kernels.linear") == rec.names.count("mpvit_kernels.linear_mlp") == 1


@pytest.mark.parametrize("C", [16, 136])
def test_mpvit_block_training_step_takes_norm1_backward_in_one_gemm(C, norm_grad_at_any_rows):
    """A training step of the block through its GEMM ops: norm1 -> qkv's backward in
    linear_norm_grad (136 channels: over two tiles), the MLP in linear_mlp, whose backward takes
    fc1's pre-activation grad from linear_mlp_grad (the hidden's grad in registers); every grad
    equal to kernels off (fp64; the attention, whose interpreted backward is slow, on the
    reference)."""
    block = make_block(C, torch.float64).train()
    x = torch.randn(2, 15, C, device=KERNEL_DEVICE, dtype=torch.float64)
    g = torch.randn_like(x)
    grads = []
    for backend in ("auto", "reference"):
        inp = x.clone().requires_grad_()
        with mpvit_kernels.use_backend(backend), mpvit_kernels.use_backend("reference", ops=["factor_attention"]), \
                RecordOps() as rec:
            (block(inp, (3, 5)) * g).sum().backward()
        grads.append([inp.grad] + [p.grad for p in block.parameters()])
        block.zero_grad(set_to_none=True)
        if backend == "auto":
            assert rec.names.count("mpvit_kernels.linear_norm_grad") == 1
            assert rec.names.count("mpvit_kernels.linear_mlp") == rec.names.count("mpvit_kernels.linear_mlp_grad") == 1
            assert not {"aten.native_layer_norm_backward", "mpvit_kernels.linear_gelu_grad", "aten.gelu_backward",
                        "aten.addmm_"} & set(rec.names)
    for (name, _), a, b in zip([("x", None), *block.named_parameters()], *grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)


# ---- CUDA (run with a GPU: pytest -m cuda) --------------------------------------------------

# MPViT-S and -B at a 224 input: (tokens, channels, hidden) of their qkv (3C) and fc1 (4C)
SHAPES = [(side * side, C, n * C) for dims in ((64, 128, 216, 288), (128, 224, 368, 480))
          for C, side in zip(dims, (56, 28, 14, 7)) for n in (3, 4)]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
@pytest.mark.parametrize("shape", [(21, 22, 66), (21, 22, 88), (21, 16, 48), (21, 16, 64)]
                         + [pytest.param(s, marks=MODEL_SHAPES) for s in SHAPES],
                         ids=lambda s: f"N{s[0]}-K{s[1]}-N{s[2]}")
def test_low_precision_within_twice_eager(shape, dtype, norm_grad_at_any_rows):
    """Under fp16/bf16 autocast, forward and every grad against fp64, within twice eager's error in
    the same dtype. The first cases are small enough for the interpreter (bf16 there as a GPU
    computes it: tests/interpreter_numerics.py), one with channels a multiple of 8 (the 16-byte vector
    loads the model's widths take); the others run at the model's shapes on a GPU."""
    tokens, K, N = shape
    site = "norm" if N == 3 * K else "gelu"
    gelu = SITES[site][1]
    x, params = make_inputs((8 if KERNEL_DEVICE == "cuda" else 2) * tokens, K, N, torch.float32, "rows", site)
    x64 = x.detach().double().requires_grad_()
    p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
    want = chain(x64, *p64, 1e-6, gelu)
    g = torch.randn_like(want)
    leaves64 = [x64] + [p for p in p64 if p is not None]
    want_grads = torch.autograd.grad(want, leaves64, g)
    errs = {}
    for name, fn in (("ours", lambda *a: ops.linear(*a, eps=1e-6, gelu=gelu)), ("eager", lambda *a: chain(*a, 1e-6, gelu))):
        with torch.autocast(KERNEL_DEVICE, dtype=dtype):
            y = fn(x, *params)
        got = torch.autograd.grad(y, [x] + [p for p in params if p is not None], g.to(y.dtype))
        errs[name] = [normwise_error(a, b) for a, b in zip([y, *got], [want, *want_grads])]
    assert all(o <= 2 * e + 1e-3 for o, e in zip(errs["ours"], errs["eager"])), errs


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES[:8], ids=lambda s: f"N{s[0]}-K{s[1]}-N{s[2]}")
def test_cuda_fp32_at_model_shapes_is_deterministic(shape):
    tokens, K, N = shape
    site = "norm" if N == 3 * K else "gelu"
    x, params = make_inputs(4 * tokens, K, N, torch.float32, "rows", site)
    gelu = SITES[site][1]
    runs = [ops.linear(x, *params, eps=1e-6, gelu=gelu) for _ in range(2)]
    torch.testing.assert_close(runs[0], chain(x, *params, 1e-6, gelu), atol=1e-4, rtol=1e-4)
    assert torch.equal(runs[0], runs[1])
    # the backward too: fc1's bias grad sums per-program partials in a fixed order
    leaves = [x] + [p for p in params if p is not None]
    g = torch.randn_like(runs[0])
    grads = [torch.autograd.grad(y, leaves, g) for y in runs]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["rows", "strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES[0::2], ids=lambda s: f"N{s[0]}-K{s[1]}-N{s[2]}")
def test_cuda_norm_grad_at_model_shapes_is_deterministic_and_within_twice_eager(shape, dtype, layout,
                                                                               norm_grad_at_any_rows):
    # norm1 -> qkv's backward in linear_norm_grad (here at every row count; MPViT-B's 224 to 480
    # channels over several tiles; a last row block in part; rows of their own stride, read
    # element by element): every grad against fp64 within twice eager's error in the same
    # dtype, and the same bits twice (fixed-order partial sums)
    tokens, K, N = shape
    x, params = make_inputs(4 * tokens + 5, K, N, dtype, layout, "norm")
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    want = chain(x64, *p64, 1e-6, False)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x64, *p64], g)
    errs, grads = {}, []
    for name, fn in (("ours", lambda *a: ops.linear(*a, eps=1e-6)), ("ours", lambda *a: ops.linear(*a, eps=1e-6)),
                     ("eager", lambda *a: chain(*a, 1e-6, False))):
        with RecordOps() as rec:
            got = torch.autograd.grad(fn(x, *params), [x, *params], g.to(dtype))
        assert rec.names.count("mpvit_kernels.linear_norm_grad") == (name == "ours")
        grads.append(got)
        errs[name] = [normwise_error(a, b) for a, b in zip(got, want_grads)]
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    assert all(o <= 2 * e + 1e-6 for o, e in zip(errs["ours"], errs["eager"])), errs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES[1::2], ids=lambda s: f"N{s[0]}-K{s[1]}-N{s[2]}")
def test_cuda_mlp_at_model_shapes_is_deterministic_and_within_twice_eager(shape, dtype):
    # the MLP onto its residual in training (linear_mlp, its backward linear_mlp_grad): every
    # grad against fp64 within twice eager's error in the same dtype, the same bits twice; a
    # last row block in part, rows of their own stride
    tokens, C, hidden = shape
    leaves32 = mlp_inputs(4 * tokens + 5, C, hidden, torch.float32, "strided")
    leaves64 = [t.detach().double().requires_grad_() for t in leaves32]
    want = mlp_chain(*leaves64)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves64, g)
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves32]
    errs, grads = {}, []
    for name, fn in (("ours", ops.linear_mlp), ("ours", ops.linear_mlp), ("eager", mlp_chain)):
        with RecordOps() as rec:
            y = fn(*leaves)
            got = torch.autograd.grad(y, leaves, g.to(dtype))
        assert rec.names.count("mpvit_kernels.linear_mlp_grad") == (name == "ours")
        grads.append((y, *got))
        errs[name] = [normwise_error(a, b) for a, b in zip((y, *got), (want, *want_grads))]
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    assert all(o <= 2 * e + 1e-6 for o, e in zip(errs["ours"], errs["eager"])), errs


@pytest.mark.cuda
@pytest.mark.model_shapes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES[1::3], ids=lambda s: f"N{s[0]}-K{s[1]}-N{s[2]}")
def test_cuda_tuned_tile_does_not_change_the_bits(shape, dtype, monkeypatch):
    # The tile of an aligned launch is picked by timing: the bits must not depend on the pick
    # (BLOCK_K, hence the LayerNorm's sums and each output's order of K products, is the pinned
    # one). Each tile the tuner may pick, forced in turn, against the pinned launch.
    import triton

    from mpvit_kernels.triton import gli_projection, linear as kernels
    from mpvit_kernels.triton.static_compile import jit_function

    tokens, K, N = shape
    site = "norm" if N == 3 * K else "gelu"
    gelu = SITES[site][1]
    x, params = make_inputs(8 * tokens, K, N, dtype, "rows", site)
    meta = {"BLOCK_N": gli_projection.block_n(N), "ACC": kernels.tl.float32,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
    fit = kernels._fitting(gli_projection.TUNED_CONFIGS, {}, **meta)
    assert len(fit) >= 3
    monkeypatch.setattr(kernels, "linear_tuned", kernels.linear_kernel)  # the pinned tile
    with torch.no_grad():
        want = ops.linear(x, *params, eps=1e-6, gelu=gelu)
        for config in fit:
            monkeypatch.setattr(kernels, "linear_tuned", triton.autotune([config], key=[])(jit_function(kernels.linear_kernel)))
            assert torch.equal(ops.linear(x, *params, eps=1e-6, gelu=gelu), want), config


def test_layernorm_parameters_narrower_than_x_keep_x_precision_in_the_backward():
    x, (w, b, lw, lb) = make_inputs(12, 16, 20, torch.float64, "rows", "norm")
    lw16, lb16 = (p.detach().half().requires_grad_() for p in (lw, lb))
    got = torch.autograd.grad(ops.linear(x, w, b, lw16, lb16, 1e-5).sum(), [x, lw16, lb16])
    want = torch.autograd.grad(chain(x, w, b, lw16.double(), lb16.double(), 1e-5, False).sum(), [x])
    assert [g.dtype for g in got] == [torch.float64, torch.float16, torch.float16]
    assert_close(got[0], want[0], scale=10)


# ---- linear_mlp: the MLP onto its residual in training, fc1's grad through fc2 in one kernel --------

def mlp_inputs(M, C, hidden, dtype, layout="rows", bias=True):
    """x (leaf) in ``layout`` (tokens_in), r (leaf, (M, C) or the tokens' shape), fc1's weight and
    bias, fc2's weight (leaves)."""
    x = tokens_in(layout, M, C, dtype).detach().requires_grad_()
    r = torch.randn(x.shape, dtype=dtype, device=KERNEL_DEVICE).requires_grad_()
    w1 = (torch.randn(hidden, C, dtype=dtype, device=KERNEL_DEVICE) * C ** -0.5).requires_grad_()
    b1 = torch.randn(hidden, dtype=dtype, device=KERNEL_DEVICE).requires_grad_() if bias else None
    w2 = (torch.randn(C, hidden, dtype=dtype, device=KERNEL_DEVICE) * hidden ** -0.5).requires_grad_()
    return x, r, w1, b1, w2


def mlp_chain(x, r, w1, b1, w2):
    """What eager runs (reference.linear_mlp)."""
    return mpvit_kernels.reference.linear_mlp(x, r, w1, b1, w2)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("layout", ["rows", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(7, 8, 32), (37, 22, 88), (21, 24, 136)], ids=lambda s: "x".join(map(str, s)))
def test_mlp_matches_the_eager_chain_with_every_grad(shape, dtype, layout, bias):
    # 136 hidden channels: two column tiles of the grad kernel
    x, r, w1, b1, w2 = mlp_inputs(*shape, dtype, layout, bias)
    leaves = [t for t in (x, r, w1, b1, w2) if t is not None]
    with RecordOps() as rec:
        y = ops.linear_mlp(x, r, w1, b1, w2)
    assert rec.names.count("mpvit_kernels.linear_mlp") == 1
    want = mlp_chain(x, r, w1, b1, w2)
    assert y.shape == want.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want, scale=4)
    g = torch.randn_like(want)
    with RecordOps() as rec:
        got = torch.autograd.grad(y, leaves, g)
    # fc1's pre-activation grad through fc2 in one kernel: no 4C-wide grad of the hidden written
    assert rec.names.count("mpvit_kernels.linear_mlp_grad") == 1
    assert not {"mpvit_kernels.linear_gelu_grad", "aten.gelu_backward"} & set(rec.names)
    for a, b in zip(got, torch.autograd.grad(want, leaves, g)):
        assert a.dtype == b.dtype
        assert_close(a, b, scale=10)


def test_mlp_fp64_gradcheck_opcheck_and_second_derivative():
    x, r, w1, b1, w2 = mlp_inputs(6, 5, 12, torch.float64, "strided")
    fn = ops.linear_mlp
    assert torch.autograd.gradcheck(fn, (x, r, w1, b1, w2))
    # create_graph: fc1's grad through linear_gelu_grad, which autograd differentiates again
    assert torch.autograd.gradgradcheck(fn, (x, r, w1, b1, w2), fast_mode=True)
    x, r, w1, b1, w2 = mlp_inputs(10, 12, 40, torch.float32, "strided")
    for bias in (b1, None):
        torch.library.opcheck(torch.ops.mpvit_kernels.linear_mlp.default, (x.reshape(-1, 12), r, w1, bias, w2))
        torch.library.opcheck(torch.ops.mpvit_kernels.linear_mlp_grad.default,
                              (r.detach(), x.detach(), w1.detach(), None if bias is None else bias.detach(), w2.detach()))


def test_mlp_grad_is_the_pre_activation_grad_and_refuses_mismatched_inputs():
    # M = 70: several programs' rows, so the bias grad adds partial sums
    x, r, w1, b1, w2 = (t.detach() for t in mlp_inputs(70, 12, 40, torch.float64, "strided"))
    g = torch.randn(70, 12, dtype=torch.float64, device=KERNEL_DEVICE)
    h = torch.addmm(b1, x, w1.t()).requires_grad_()
    want, = torch.autograd.grad(F.gelu(h), h, g @ w2)
    dh, db = torch.ops.mpvit_kernels.linear_mlp_grad(g, x, w1, b1, w2)
    assert dh.is_contiguous()
    assert_close(dh, want, scale=4)
    assert_close(db, want.sum(0), scale=4)
    dh_nb, none = torch.ops.mpvit_kernels.linear_mlp_grad(g, x, w1, None, w2)
    assert none.shape == (0,)
    assert_close(dh_nb, torch.autograd.grad(F.gelu(h - b1), h, g @ w2)[0], scale=4)
    empty = torch.ops.mpvit_kernels.linear_mlp_grad(g[:0], x[:0], w1, b1, w2)
    assert empty[0].shape == (0, 40) and torch.equal(empty[1], torch.zeros_like(b1))
    g, x = g[:9], x[:9]
    for args, match in (((g.float(), x, w1, b1, w2), "g must be torch.float64 \\(9, 12\\)"),
                        ((g, x[:, :11], w1, b1, w2), "x must be"), ((g, x, w1, b1, w2[:, :39]), "weight2 must be"),
                        ((g, x, w1, b1[:39], w2), "bias must have shape \\(40,\\)")):
        with pytest.raises(ValueError, match=match):
            torch.ops.mpvit_kernels.linear_mlp_grad(*args)


def mlp_fp64_reference(leaves):
    """(output, a random grad of it, every input's grad) of eager's MLP in fp64 on ``leaves``' values."""
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = mlp_chain(*leaves64)
    g = torch.randn_like(want)
    return want, g, torch.autograd.grad(want, leaves64, g)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_mlp_under_autocast_over_an_fp32_stream_takes_the_op_as_accurately_as_eager(dtype):
    # AMP: fp32 tokens and parameters, the GEMMs in the autocast dtype, fc2's output added in fp32;
    # the backward casts x and the grad to the GEMMs' dtype, as autocast's saved casts are
    leaves = mlp_inputs(40, 16, 64, torch.float32)
    want, g, want_grads = mlp_fp64_reference(leaves)
    errs = {}
    for name, fn in (("ours", ops.linear_mlp), ("eager", mlp_chain)):
        with torch.autocast(KERNEL_DEVICE, dtype=dtype), RecordOps() as rec:
            y = fn(*leaves)
        assert y.dtype == torch.float32
        assert rec.names.count("mpvit_kernels.linear_mlp") == (name == "ours")
        got = torch.autograd.grad(y, leaves, g.float())
        assert [t.dtype for t in got] == [torch.float32] * 5
        errs[name] = [normwise_error(a, b) for a, b in zip([y, *got], [want, *want_grads])]
    assert all(o <= 2 * e + 1e-4 for o, e in zip(errs["ours"], errs["eager"])), errs


def test_mlp_other_widths_frozen_weights_mixed_bias_and_compile():
    # fc2 to another width than x's: the separate ops (the grad kernel's one K loop needs C_out = C)
    x, _, w1, b1, _ = mlp_inputs(9, 8, 32, torch.float64)
    r = torch.randn(9, 12, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    w2 = torch.randn(12, 32, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    with RecordOps() as rec:
        y = ops.linear_mlp(x, r, w1, b1, w2)
    assert "mpvit_kernels.linear_mlp" not in rec.names
    leaves = [x, r, w1, b1, w2]
    for a, b in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(mlp_chain(*leaves).sum(), leaves)):
        assert_close(a, b, scale=10)
    # only fc2's weight trains: neither the grad kernel nor fc1's GEMMs run
    x, r, w1, b1, w2 = mlp_inputs(9, 8, 32, torch.float64)
    for t in (x, r, w1, b1):
        t.requires_grad_(False)
    with RecordOps() as rec:
        got, = torch.autograd.grad(ops.linear_mlp(x, r, w1, b1, w2).sum(), [w2])
    assert "mpvit_kernels.linear_mlp_grad" not in rec.names and rec.names.count("aten.mm") == 1
    assert_close(got, torch.autograd.grad(mlp_chain(x, r, w1, b1, w2).sum(), [w2])[0], scale=10)
    # an fp32 bias under fp64 weights, differentiated twice (create_graph takes ATen's ops)
    x, r, w1, b1, w2 = mlp_inputs(9, 8, 32, torch.float64)
    b32 = b1.detach().float().requires_grad_()
    grads = []
    for fn, bias in ((ops.linear_mlp, b32), (mlp_chain, b32.double())):
        gx, = torch.autograd.grad(fn(x, r, w1, bias, w2).square().sum(), [x], create_graph=True)
        grads.append(torch.autograd.grad(gx.sum(), [w1, w2, b32]))
    for a, b in zip(*grads):
        assert_close(a, b, scale=10)
    torch._dynamo.reset()
    compiled = torch.compile(ops.linear_mlp, fullgraph=True, backend="aot_eager")
    x, r, w1, b1, w2 = leaves = mlp_inputs(10, 8, 32, torch.float32)
    y, want = compiled(*leaves), mlp_chain(*leaves)
    assert_close(y, want, scale=4)
    for a, b in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        assert_close(a, b, scale=10)


@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must be float"),
    (dict(r=torch.randn(5, 8)), ValueError, "x and r must be tokens"),
    (dict(fc1_weight=torch.randn(32, 9)), ValueError, "fc1_weight must be \\(hidden, 8\\)"),
    (dict(fc2_weight=torch.randn(8, 31)), ValueError, "fc2_weight must be \\(8, 32\\)"),
    (dict(fc1_bias=torch.randn(31)), ValueError, "fc1_bias must have shape \\(32,\\)"),
    (dict(r=torch.randn(4, 8, device="meta")), ValueError, "r is on meta"),
])
def test_mlp_bad_inputs_are_refused_before_any_kernel(change, error, match):
    args = dict(x=torch.randn(4, 8), r=torch.randn(4, 8), fc1_weight=torch.randn(32, 8), fc1_bias=torch.randn(32),
                fc2_weight=torch.randn(8, 32))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.linear_mlp(**args)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_mlp_low_precision_within_twice_eager(dtype):
    """A 16-bit model (x, r and the weights in it): every grad against fp64 within twice eager's
    error in the same dtype."""
    leaves32 = list(mlp_inputs(42, 16, 64, torch.float32))
    want, g, want_grads = mlp_fp64_reference(leaves32)
    errs = {}
    for name, fn in (("ours", ops.linear_mlp), ("eager", mlp_chain)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves32]
        y = fn(*leaves)
        got = torch.autograd.grad(y, leaves, g.to(dtype))
        errs[name] = [normwise_error(a, b) for a, b in zip([y, *got], [want, *want_grads])]
    assert all(o <= 2 * e + 1e-3 for o, e in zip(errs["ours"], errs["eager"])), errs


# ---- linear_proj_mlp: the block after its attention in one kernel (C <= 128) ---------------------

NAMES = ("a", "x", "proj_weight", "proj_bias", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight",
         "fc2_bias")


def proj_mlp_chain(a, x, wp, pb, lnw, lnb, eps, w1, b1, w2, b2):
    """What eager runs: proj, the residual add, norm2, the MLP, the residual add."""
    s = x + F.linear(a, wp, pb)
    return s + F.linear(F.gelu(F.linear(F.layer_norm(s, (s.shape[-1],), lnw, lnb, eps), w1, b1)), w2, b2)


def make_proj_mlp_inputs(M, C, hidden, dtype, layout, device=KERNEL_DEVICE):
    """(a, x, proj weight, proj bias, norm2 weight, norm2 bias, eps, fc1 weight, fc1 bias, fc2
    weight, fc2 bias), the tensors leaves; a and x in ``layout`` (tokens_in), x far from zero
    mean as a residual stream is."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    a, x = tokens_in(layout, M, C, dtype, device), tokens_in(layout, M, C, dtype, device) * 2 + 3
    params = [randn(C, C) * C ** -0.5, randn(C), torch.rand(C, dtype=dtype, device=device) + 0.5, randn(C)]
    tail = [randn(hidden, C) * C ** -0.5, randn(hidden), randn(C, hidden) * hidden ** -0.5, randn(C)]
    leaves = [t.requires_grad_() for t in (a, x, *params, *tail)]
    return (*leaves[:6], 1e-6, *leaves[6:])


def _tensors(args):
    return [t for t in args if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("layout", ["rows", "tokens", "strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(7, 8, 32), (37, 22, 88), (21, 96, 192), (9, 128, 512)],
                         ids=lambda s: "x".join(map(str, s)))
def test_proj_mlp_matches_the_eager_chain_with_every_grad(shape, dtype, layout):
    """Widths of every BLOCK_C (16 to 128), hidden widths 2C and 4C that are not multiples of the
    hidden tile, more rows than one program takes at fp32 and fp64 (32, 16 at C = 128)."""
    args = make_proj_mlp_inputs(*shape, dtype, layout)
    with RecordOps() as rec:
        y = ops.linear_proj_mlp(*args)
    assert rec.names.count("mpvit_kernels.linear_proj_mlp") == 1
    assert not {"aten.gelu", "aten.addmm", "aten.mm", "aten.native_layer_norm"} & set(rec.names)
    want = proj_mlp_chain(*args)
    assert y.shape == want.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want, scale=4)
    g = torch.randn_like(want)
    leaves = _tensors(args)
    for name, got, ref in zip(NAMES, torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert_close(got, ref, scale=10), name


def test_proj_mlp_fp64_gradcheck_and_opcheck():
    args = make_proj_mlp_inputs(3, 4, 8, torch.float64, "strided")
    leaves = _tensors(args)

    def fn(a, x, wp, pb, lnw, lnb, w1, b1, w2, b2):
        return ops.linear_proj_mlp(a, x, wp, pb, lnw, lnb, 1e-6, w1, b1, w2, b2)
    assert torch.autograd.gradcheck(fn, leaves)
    # its backward is ATen ops, differentiable again (fast_mode: random directions, not each of
    # the 140 columns, each an interpreted forward and backward: 2.4 of the test's 6 s)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)
    # one tensor in two slots (a is x, one bias for proj and fc2): the same grads whether or not
    # a second derivative is being built, and eager's
    a, x, wp, pb, lnw, lnb, w1, b1, w2, b2 = leaves
    y = ops.linear_proj_mlp(x, x, wp, pb, lnw, lnb, 1e-6, w1, b1, w2, pb)
    g = torch.randn_like(y)
    want = torch.autograd.grad(proj_mlp_chain(x, x, wp, pb, lnw, lnb, 1e-6, w1, b1, w2, pb), (x, pb), g)
    for create_graph in (False, True):
        got = torch.autograd.grad(y, (x, pb), g, retain_graph=True, create_graph=create_graph)
        for got_one, want_one in zip(got, want):
            assert_close(got_one, want_one, scale=4)
    for layout in ("strided", "transposed"):
        a, x, *rest = make_proj_mlp_inputs(10, 12, 24, torch.float32, layout)
        torch.library.opcheck(torch.ops.mpvit_kernels.linear_proj_mlp.default, (a.reshape(-1, 12), x.reshape(-1, 12),
                                                                               *rest))


def test_proj_mlp_empty_batch_and_mixed_dtypes():
    a, x, wp, pb, lnw, lnb, eps, w1, b1, w2, b2 = (t.detach() if isinstance(t, torch.Tensor) else t
                                                     for t in make_proj_mlp_inputs(6, 16, 32, torch.float32, "rows"))
    empty = ops.linear_proj_mlp(a[:0], x[:0], wp, pb, lnw, lnb, eps, w1, b1, w2, b2)
    assert empty.shape == (0, 16) and empty.dtype == torch.float32
    # an fp64 residual stream and fp64 vectors over fp32 GEMMs: the output in the stream's dtype
    y = ops.linear_proj_mlp(a, x.double(), wp, pb.double(), lnw, lnb, eps, w1, b1, w2, b2)
    assert y.dtype == torch.float64
    assert_close(y, proj_mlp_chain(a, x, wp, pb, lnw, lnb, eps, w1, b1, w2, b2).double(), dtype=torch.float32, scale=4)


def _good_proj_mlp_args():
    return dict(a=torch.randn(4, 8), x=torch.randn(4, 8), proj_weight=torch.randn(8, 8), proj_bias=torch.randn(8),
                norm_weight=torch.randn(8), norm_bias=torch.randn(8), eps=1e-6, fc1_weight=torch.randn(16, 8),
                fc1_bias=torch.randn(16), fc2_weight=torch.randn(8, 16), fc2_bias=torch.randn(8))


@pytest.mark.parametrize("change, error, match", [
    (dict(a=torch.randn(4, 136), x=torch.randn(4, 136)), ValueError, "at most 128 channels"),
    (dict(x=torch.randn(4, 9)), ValueError, "a and x must be tokens \\(..., C\\) of one shape"),
    (dict(a=torch.randn(8), x=torch.randn(8)), ValueError, "a and x must be tokens"),
    (dict(proj_weight=torch.randn(8, 9)), ValueError, "proj_weight must be \\(8, 8\\)"),
    (dict(fc1_weight=torch.randn(16, 9)), ValueError, "fc1_weight must be \\(hidden, 8\\)"),
    (dict(fc2_weight=torch.randn(16, 8)), ValueError, "fc2_weight must be \\(8, 16\\)"),
    (dict(fc1_bias=torch.randn(15)), ValueError, "fc1_bias must have shape \\(16,\\)"),
    (dict(norm_bias=torch.randn(7)), ValueError, "norm_bias must have shape \\(8,\\)"),
    (dict(eps=0.0), ValueError, "eps must be"),
    (dict(a=torch.ones(4, 8, dtype=torch.int32)), TypeError, "a must be float16/bfloat16/float32/float64"),
    (dict(x=torch.randn(4, 8, device="meta")), ValueError, "x is on meta"),
])
def test_proj_mlp_bad_inputs_are_refused_before_any_kernel(change, error, match):
    args = _good_proj_mlp_args()
    args.update(change)
    with pytest.raises(error, match=match):
        ops.linear_proj_mlp(**args)


def test_proj_mlp_op_refuses_what_its_kernel_would_overrun():
    from mpvit_kernels.ops.linear import _linear_proj_mlp

    good = list(_good_proj_mlp_args().values())
    op = torch.ops.mpvit_kernels.linear_proj_mlp
    for i, bad in ((2, torch.randn(8, 9)), (7, torch.randn(16, 4)), (9, torch.randn(8, 8)), (8, torch.randn(15)),
                   (1, torch.randn(4, 4))):
        with pytest.raises(ValueError, match="linear_proj_mlp: a, x \\(M, C <= 128\\)"):
            op(*good[:i], bad, *good[i + 1:])
    with pytest.raises(ValueError, match="must share a dtype"):
        op(*good[:9], good[9].double(), good[10])
    # (through the dispatcher a meta tensor would take the fake: the implementation itself, as
    # backend.call_op calls it)
    with pytest.raises(ValueError, match="every tensor must be on a's device"):
        _linear_proj_mlp._init_fn(good[0], good[1].to("meta"), *good[2:])


@pytest.mark.parametrize("offset, vec", [(0, 8), (1, 1)])
def test_proj_mlp_reads_16_bytes_at_a_time_only_from_aligned_tensors(offset, vec):
    # a view one element into its storage: widths and strides multiples of 8, the pointer not
    # 16-byte aligned, so Triton reads it element by element: the op launches VEC=1
    args = list(t.detach() if isinstance(t, torch.Tensor) else t
                for t in make_proj_mlp_inputs(8, 32, 64, torch.float32, "rows"))
    args[0] = torch.randn(8 * 32 + offset, device=KERNEL_DEVICE)[offset:].view(8, 32)
    with RecordLaunches() as rec:
        y = ops.linear_proj_mlp(*args)
    assert [meta["VEC"] for fn, meta in rec.launches if fn.__name__ == "proj_mlp_kernel"] == [vec]
    assert_close(y, proj_mlp_chain(*args), scale=4)


def test_proj_mlp_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    args = make_proj_mlp_inputs(10, 24, 48, torch.float32, "tokens")
    y = torch.compile(ops.linear_proj_mlp, fullgraph=True, backend="aot_eager")(*args)
    want = proj_mlp_chain(*args)
    assert_close(y, want, scale=4)
    leaves = _tensors(args)
    for got, ref in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        assert_close(got, ref, scale=10)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_proj_mlp_autocast_is_as_accurate_as_eager(dtype):
    """Under fp16/bf16 autocast over an fp32 stream and parameters (the speed goals'
    configuration), the output against fp64 within twice eager's error in the same dtype, in the
    stream's fp32."""
    args = make_proj_mlp_inputs(70, 64, 256, torch.float32, "rows")
    with torch.no_grad():
        want = proj_mlp_chain(*(t.double() if isinstance(t, torch.Tensor) else t for t in args))
        errs = {}
        for name, fn in (("ours", ops.linear_proj_mlp), ("eager", proj_mlp_chain)):
            with torch.autocast(KERNEL_DEVICE, dtype=dtype):
                y = fn(*args)
            assert y.dtype == torch.float32
            errs[name] = normwise_error(y, want)
    assert errs["ours"] <= 2 * errs["eager"] + 1e-6, errs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("C", [64, 96, 128])
def test_cuda_proj_mlp_at_model_shapes_is_deterministic_and_close(C, dtype):
    """MPViT's stage-1 and -2 blocks (hidden 4C) at batch 4 of a 224 input's stage 2 map: the same
    bits twice, and within twice eager's error against fp64."""
    args = make_proj_mlp_inputs(4 * 784, C, 4 * C, dtype, "rows")
    with torch.no_grad():
        runs = [ops.linear_proj_mlp(*args) for _ in range(2)]
        want = proj_mlp_chain(*(t.double() if isinstance(t, torch.Tensor) else t for t in args))
        eager = proj_mlp_chain(*args)
    assert torch.equal(runs[0], runs[1])
    assert normwise_error(runs[0], want) <= 2 * normwise_error(eager, want) + 1e-6
