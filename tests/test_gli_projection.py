"""gli_projection: the fused GLI projection (Triton, interpreted on CPU here, real on a GPU)
against the nn chain hardswish(bn(conv1x1(cat(inputs)))), eval and train, every gradient."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import GLIProjection, ops
from tests.conftest import BF16, KERNEL_DEVICE, MODEL_SHAPES
from tests.utils import (LaunchSpy, RecordLaunches, RecordOps, assert_close, away_from_the_kinks, gpu_tiles,
                         normwise_error, output_and_grad_errors,
                         read_as_a_gpu_process)

# (B, C, Cout, H, W, inputs): odd sizes, Cout != C, channels not multiples of the tiles
CASES = [
    (2, 8, 12, 5, 7, 2),
    (1, 22, 27, 3, 9, 3),
    (2, 27, 22, 7, 5, 4),
    (1, 8, 8, 9, 3, 5),
]


def case_id(c):
    B, C, Cout, H, W, n = c
    return f"B{B}-{n}x{C}to{Cout}-{H}x{W}"


def chain(m, xs):
    """The eager composition the fused op replaces, on maps."""
    return F.hardswish(m.bn(m.conv(torch.cat(xs, dim=1))))


def make_module(C, Cout, n, dtype, training):
    m = GLIProjection(C, Cout, n).to(device=KERNEL_DEVICE, dtype=dtype)
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.train(training)


def make_inputs(B, C, H, W, n, dtype, layout):
    """n leaf inputs in ``layout`` ("nchw", "channels_last", or "tokens": (B, N, C) slices of a
    wider token tensor, so not dense), and the same values as NCHW maps for the chain."""
    leaves = []
    for _ in range(n):
        if layout == "tokens":
            wide = torch.randn(B, H * W, C + 3, dtype=dtype, device=KERNEL_DEVICE)
            leaves.append(wide[..., 1:C + 1].requires_grad_())  # strided: not a dense tensor
        else:
            x = torch.randn(B, C, H, W, dtype=dtype, device=KERNEL_DEVICE)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            leaves.append(x.requires_grad_())
    maps = [x.transpose(1, 2).reshape(B, C, H, W) if layout == "tokens" else x for x in leaves]
    return leaves, maps


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_module_matches_the_eager_chain(case, training, dtype, layout):
    B, C, Cout, H, W, n = case
    m = make_module(C, Cout, n, dtype, training)
    ref = copy.deepcopy(m)
    leaves, maps = make_inputs(B, C, H, W, n, dtype, layout)
    with RecordOps() as rec:
        y = m(leaves, size=(H, W))
    assert ("mpvit_kernels.gli_projection_train" if training else "mpvit_kernels.gli_projection") in rec.names
    assert "aten.cat" not in rec.names  # the concat is never built
    assert_matches_the_chain(y, m, ref, leaves, maps, training)


def assert_matches_the_chain(y, m, ref, leaves, maps, training):
    """y = m(leaves) against the eager chain of m's copy ``ref`` over the same inputs as NCHW
    ``maps``: values, the grads of the inputs and of the parameters, the running statistics."""
    y_ref = chain(ref, maps)
    assert y.shape == y_ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, y_ref, scale=10)
    grad = torch.randn_like(y_ref)
    params = ["conv.weight", "bn.weight", "bn.bias"]
    got = torch.autograd.grad(y, leaves + [m.get_parameter(p) for p in params], grad)
    want = torch.autograd.grad(y_ref, leaves + [ref.get_parameter(p) for p in params], grad)
    for g, r in zip(got, want):
        assert_close(g, r, scale=100)  # reductions over B*H*W in another order
    if training:  # running statistics exactly as nn.BatchNorm2d keeps them
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(m.bn, name), getattr(ref.bn, name))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_module_with_a_gpus_tiles(training):
    # the GEMM as a GPU tiles fp32 (64 rows, K 16 at a time: 2 row tiles, the last short; each
    # 27-channel input over two K steps), on strided token inputs
    with gpu_tiles():
        test_module_matches_the_eager_chain(CASES[2], training, torch.float32, "tokens")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("n", [1, 3])
def test_residual_in_the_epilogue_matches_the_eager_add(n, layout, backend):
    B, C, H, W = 2, 8, 5, 3
    leaves, maps = make_inputs(B, C, H, W, n, torch.float64, layout)
    w = torch.randn(C, n * C, 1, 1, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    scale = (torch.rand(C, dtype=torch.float64, device=KERNEL_DEVICE) + 0.5).requires_grad_()
    shift = torch.randn(C, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    res_leaf, res_map = make_inputs(B, C, H, W, 1, torch.float64, layout)
    size = (H, W) if layout == "tokens" else None
    with mpvit_kernels.use_backend(backend), RecordOps() as rec:
        y = ops.gli_projection(leaves, w, scale, shift, size=size, residual=res_leaf[0])
    assert ("aten.add" in rec.compute) == (backend == "reference")  # in the epilogue when fused
    y_ref = F.conv2d(torch.cat(maps, 1), w) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + res_map[0]
    assert_close(y, y_ref)
    grad = torch.randn_like(y_ref)
    inputs = [*leaves, w, scale, shift, res_leaf[0]]
    for g, r in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(y_ref, inputs, grad)):
        assert_close(g, r, scale=10)


def test_residual_of_another_dtype_keeps_eager_type_promotion():
    x = torch.randn(1, 4, 3, 3, device=KERNEL_DEVICE)
    w = torch.randn(4, 4, 1, 1, device=KERNEL_DEVICE)
    res = torch.randn(1, 4, 3, 3, dtype=torch.float64, device=KERNEL_DEVICE)
    y = ops.gli_projection([x], w, residual=res)
    assert y.dtype == torch.float64
    assert_close(y, F.conv2d(x, w).double() + res, dtype=torch.float32)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.gli_projection([x], w, residual=res[:, :3])


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_tensor_descriptor_loads_give_the_pointer_loads_bits(training, dtype, monkeypatch):
    # TMA (MPVIT_KERNELS_GLI_TMA=1): the inputs read through tensor descriptors (TMA on sm_90; the
    # interpreter runs them here), the K tail (C = 24 of a 32-wide tile) and the row tail zero-filled;
    # C = 24 so that bf16 rows are 16-byte aligned too, as descriptors need
    from tests.utils import RecordLaunches

    m = make_module(24, 16, 3, dtype, training)
    xs, maps = make_inputs(2, 24, 5, 7, 3, dtype, "channels_last")
    ref = chain(copy.deepcopy(m).double(), [x.detach().double() for x in maps])
    results = {}
    for tma in (False, True):
        monkeypatch.setattr(sys.modules["mpvit_kernels.ops.gli_projection"], "TMA", tma)
        with RecordLaunches() as rec:
            out = copy.deepcopy(m)(xs)
        launches = [meta["TMA"] for fn, meta in rec.launches if fn.__name__ == "gli_gemm_kernel"]
        assert launches and all(t == tma for t in launches)
        results[tma] = out
    torch.testing.assert_close(results[True], results[False], atol=0, rtol=0)
    assert_close(results[True], ref.to(dtype), scale=4)


def test_tensor_descriptors_only_where_every_input_is_a_dense_aligned_matrix(monkeypatch):
    from mpvit_kernels.ops.gli_projection import use_tma

    dense = [torch.randn(2, 35, 24) for _ in range(2)]
    assert not use_tma(dense)  # opt-in
    monkeypatch.setattr(sys.modules["mpvit_kernels.ops.gli_projection"], "TMA", True)
    assert use_tma(dense)
    assert not use_tma([dense[0], torch.randn(2, 35, 22)])  # rows of 88 bytes: not 16-byte aligned
    assert not use_tma([dense[0], torch.randn(2, 35, 26)[..., :24]])  # rows of 104 bytes
    assert use_tma([dense[0], torch.randn(2, 35, 32)[..., :24]])  # rows of 128 bytes, a dense batch
    assert not use_tma([dense[0], torch.randn(2, 40, 24)[:, :35]])  # batch stride is not 35 rows
    assert not use_tma([dense[0], torch.randn(2 * 35 * 24 + 1)[1:].view(2, 35, 24)])  # base 4 bytes off
    assert not use_tma([x.double() for x in dense])  # fp64 keeps the pointers
    assert not use_tma([dense[0], torch.randn(1, 1, 24).expand(2, 35, 24)])  # one row for all: stride 0
    assert not use_tma([dense[0], torch.randn(2 * 35 * 8 + 16).as_strided((2, 35, 24), (35 * 8, 8, 1))])  # overlap


def test_tensor_descriptor_launches_get_a_scratch_allocator():
    # a kernel with device-side descriptors needs triton.set_allocator (global scratch on sm_90);
    # Triton keeps it per thread context: set where the launching thread has none
    import contextvars

    from triton.runtime import _allocation

    gli = sys.modules["mpvit_kernels.ops.gli_projection"]  # the package exports the function of that name

    def fresh():
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        gli._ensure_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(fresh) is gli._scratch


def test_vector_width_is_what_every_width_and_row_stride_is_a_multiple_of():
    from mpvit_kernels.triton.launch import vector_width

    assert vector_width(2, 216, 216, 216 * 196) == 8  # MPViT-S stage 3: not a multiple of 16, so only VEC says it
    assert vector_width(4, 64, 128) == 8  # at most 8 (16 bytes of a 16-bit dtype)
    assert vector_width(2, 216, 220) == 4
    assert vector_width(4, 22, 24) == 2
    assert vector_width(2, 27, 64) == 1
    assert vector_width(8, 64, 128) == 1  # fp64 keeps the worst-case compile


@pytest.mark.parametrize("pad, vec", [(8, 8), (4, 4), (3, 1)])
def test_row_strides_narrow_the_vector_width(pad, vec):
    # tokens sliced out of rows C + pad wide: the kernel may assume 16-byte rows only where every
    # stride allows (a wrong VEC would round the strides and read the wrong rows)
    from tests.utils import RecordLaunches

    m = make_module(16, 24, 2, torch.float32, False)
    leaves = [torch.randn(2, 35, 16 + pad, device=KERNEL_DEVICE)[..., pad // 2:pad // 2 + 16] for _ in range(2)]
    maps = [x.transpose(1, 2).reshape(2, 16, 5, 7) for x in leaves]
    with RecordLaunches() as rec:
        out = m(leaves, size=(5, 7))
    # a set: on a GPU the tuner's benchmarking launches are recorded too
    assert {meta["VEC"] for fn, meta in rec.launches if fn.__name__ == "gli_gemm_kernel"} == {vec}
    assert_close(out, chain(m, maps), scale=4)


@pytest.mark.parametrize("case, tuned", [
    ("eval", True), ("train", False), ("eval, row stride 20", False), ("eval fp64", False), ("eval, TMA", False)])
def test_eval_gemm_takes_the_tuner_where_its_tiles_were_sized(case, tuned, monkeypatch):
    # the tuner's tiles fit the registers at aligned launches (VEC=8, 16-byte pointers); training
    # keeps the pinned tile (it sizes and orders the statistics), and so do fp64 and TMA launches
    gli = sys.modules["mpvit_kernels.ops.gli_projection"]
    from mpvit_kernels.triton import gli_projection as kernels

    taken = []
    monkeypatch.setattr(kernels, "gli_gemm_tuned", LaunchSpy("tuned", kernels.gli_gemm_tuned, taken))
    monkeypatch.setattr(kernels, "gli_gemm_kernel", LaunchSpy("pinned", kernels.gli_gemm_kernel, taken))
    monkeypatch.setattr(gli, "TMA", case.endswith("TMA"))
    dtype = torch.float64 if "fp64" in case else torch.float32
    width = 20 if "20" in case else 16
    m = make_module(16, 24, 2, dtype, case.startswith("train"))
    xs = [torch.randn(2, 35, width, dtype=dtype, device=KERNEL_DEVICE)[..., :16] for _ in range(2)]
    maps = [x.transpose(1, 2).reshape(2, 16, 5, 7) for x in xs]
    ref = chain(copy.deepcopy(m), maps)
    out = m(xs, size=(5, 7))
    assert taken == ["tuned" if tuned else "pinned"]
    assert_close(out, ref, scale=4)


def test_what_a_gpu_tunes():
    # The eval GEMM tunes per (bucket of M, widths, inputs, epilogue) over tiles of the pinned
    # BLOCK_K, the pinned tile among them; MPVIT_KERNELS_AUTOTUNE=0 pins it
    results = read_as_a_gpu_process("mpvit_kernels.triton.gli_projection", """
        def read(g):
            t = g.gli_gemm_tuned
            out = {"tuned": isinstance(t, triton.runtime.Autotuner), "pinned": type(g.gli_gemm_kernel).__name__}
            if out["tuned"]:
                out["key"] = t.keys
                out["fit"] = {f"{bn} {p}": [[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages]
                                             for c in t.early_config_prune(t.configs, {}, BLOCK_N=bn,
                                                                           ACC=triton.language.float32, DOT_PRECISION=p)]
                              for bn in (16, 64, 128) for p in ("tf32", "ieee")}
                out["tiles"] = {f"{bn} {d}": list(g.tile(bn, d)) for bn in (16, 64, 128) for d in ("16-bit", "fp32")}
            return out
    """)
    assert results["0"] == {"tuned": False, "pinned": "PinnedHeuristics"}
    on = results["1"]
    assert on["tuned"] and on["pinned"] == "PinnedHeuristics"
    assert on["key"] == ["m_bucket", "C", "Cout", "NUM_INPUTS", "AFFINE", "HSWISH", "RESIDUAL"]
    for bn in (16, 64, 128):
        for precision, dtype in (("tf32", "16-bit"), ("ieee", "fp32")):
            fit, pinned = on["fit"][f"{bn} {precision}"], on["tiles"][f"{bn} {dtype}"]
            assert len(fit) >= 3 and pinned in fit, (bn, dtype, fit, pinned)
            assert all(bk == pinned[1] and bm * bn <= 64 * 32 * w for bm, bk, w, _ in fit)


def test_every_tile_the_tuner_may_pick_matches_the_reference(monkeypatch):
    # a GPU's tuner launches one of TUNED_CONFIGS' tiles (the interpreter the pinned tile alone):
    # each forced in turn at an aligned fp16 launch over 70 pixels and 40 output channels (no
    # multiple of any tile), against fp64 within twice eager's error
    import triton

    from mpvit_kernels.triton import gli_projection as kernels
    from mpvit_kernels.triton.static_compile import jit_function

    m = make_module(24, 40, 3, torch.float16, False)
    xs = [torch.randn(2, 24, 5, 7, dtype=torch.float16, device=KERNEL_DEVICE).contiguous(
        memory_format=torch.channels_last) for _ in range(3)]
    want = chain(copy.deepcopy(m).double(), [x.double() for x in xs])
    eager = normwise_error(chain(m, xs), want)
    for config in kernels.TUNED_CONFIGS:
        monkeypatch.setattr(kernels, "gli_gemm_tuned",
                            triton.autotune([config], key=[])(jit_function(kernels.gli_gemm_kernel)))
        with RecordLaunches() as rec:
            out = m(xs)
        assert [(meta["BLOCK_M"], meta["BLOCK_K"]) for _, meta in rec.launches] == \
            [(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"])]
        assert normwise_error(out, want) <= 2 * eager + 1e-3, config


def test_gradcheck_float64():
    xs = [torch.randn(1, 5, 3, 4, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True) for _ in range(3)]
    w = torch.randn(6, 15, 1, 1, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    scale = (torch.rand(6, dtype=torch.float64, device=KERNEL_DEVICE) + 0.5).requires_grad_()
    shift = torch.randn(6, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.gli_projection(list(a[:3]), a[3], a[4], a[5], True),
                                    (*xs, w, scale, shift), fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: ops.gli_projection_train(list(a[:3]), a[3], a[4], a[5], 1e-5, True)[0],
                                    (*xs, w, scale, shift), fast_mode=True)


def test_opcheck():
    for layout in ("channels_last", "tokens"):
        leaves, _ = make_inputs(2, 8, 3, 5, 3, torch.float32, layout)
        rows = [x.permute(0, 2, 3, 1).reshape(2, 15, 8) if x.dim() == 4 else x for x in leaves]
        w = torch.randn(12, 24, device=KERNEL_DEVICE, requires_grad=True)
        scale = (torch.rand(12, device=KERNEL_DEVICE) + 0.5).requires_grad_()
        shift = torch.randn(12, device=KERNEL_DEVICE, requires_grad=True)
        residual = torch.randn(2, 15, 12, device=KERNEL_DEVICE, requires_grad=True)
        for args in ((scale, shift, True, None), (None, None, False, None), (None, None, True, None),
                     (scale, shift, False, residual)):
            torch.library.opcheck(torch.ops.mpvit_kernels.gli_projection.default, (rows, w, *args))
        for hswish in (True, False):
            torch.library.opcheck(torch.ops.mpvit_kernels.gli_projection_train.default,
                                  (rows, w, scale, shift, 1e-5, hswish))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_module_under_torch_compile_fullgraph(training):
    torch._dynamo.reset()
    m = make_module(8, 12, 3, torch.float32, training)
    ref = copy.deepcopy(m)
    leaves, maps = make_inputs(2, 8, 5, 3, 3, torch.float32, "channels_last")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y, y_ref = compiled(leaves), chain(ref, maps)
    assert_close(y, y_ref, scale=10)
    got = torch.autograd.grad(y.sum(), leaves)
    want = torch.autograd.grad(y_ref.sum(), leaves)
    for g, r in zip(got, want):
        assert_close(g, r, scale=100)


@pytest.mark.parametrize("H, W", [(5, 7), (46, 45)], ids=["70_rows", "4140_rows"])  # x 2 images
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cpu_unfused_path_matches_the_eager_chain(training, H, W, monkeypatch):
    """On CPU tensors without Triton: eval folds the BatchNorm into one GEMM per input, training
    runs the concat's 1x1 as MKL's GEMM below 4096 rows and oneDNN's conv from there, then the
    batch's BatchNorm; outputs, every grad and the running statistics as the eager chain's."""
    from mpvit_kernels import backend

    monkeypatch.setattr(backend, "use_triton", lambda op, device: False)
    m = make_module(6, 5, 2, torch.float32, training)
    ref = copy.deepcopy(m)
    leaves, maps = make_inputs(2, 6, H, W, 2, torch.float32, "channels_last")
    assert_matches_the_chain(m(leaves), m, ref, leaves, maps, training)


def test_reference_backend_runs_unfused():
    m = make_module(8, 8, 2, torch.float32, training=False)
    leaves, maps = make_inputs(1, 8, 4, 4, 2, torch.float32, "nchw")
    with mpvit_kernels.use_backend("reference"), RecordOps() as rec:
        y = m(leaves)
    assert not any(n.startswith("mpvit_kernels") for n in rec.names)
    assert_close(y, chain(m, maps))


def test_train_needs_more_than_one_value_per_channel():
    m = make_module(4, 6, 2, torch.float32, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m([torch.randn(1, 4, 1, 1, device=KERNEL_DEVICE) for _ in range(2)])


@pytest.mark.parametrize("change, exc, match", [
    (dict(inputs=[]), TypeError, "non-empty list"),
    (dict(inputs=[torch.randn(1, 4, 3, 3)] * 6, weight=torch.randn(6, 24, 1, 1)), ValueError, "at most 5"),
    (dict(inputs=[torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 2)]), ValueError, r"inputs\[1\] has shape"),
    (dict(inputs=[torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3, dtype=torch.float64)]), ValueError, "inputs"),
    (dict(inputs=[torch.randn(1, 9, 4)] * 2), ValueError, "need size"),
    (dict(inputs=[torch.randn(1, 9, 4)] * 2, size=(2, 4)), ValueError, "N=9"),
    (dict(inputs=[torch.randn(4, 3)] * 2), ValueError, "maps"),
    (dict(inputs=[torch.randn(1, 4, 3, 3), "x"]), TypeError, r"inputs\[1\] must be a Tensor"),
    (dict(weight=torch.randn(6, 7, 1, 1)), ValueError, "weight must be"),
    (dict(scale=torch.rand(6)), ValueError, "scale and shift"),
    (dict(scale=torch.rand(5), shift=torch.randn(5)), ValueError, "scale"),
])
def test_bad_inputs_raise_before_any_kernel(change, exc, match):
    args = dict(inputs=[torch.randn(1, 4, 3, 3)] * 2, weight=torch.randn(6, 8, 1, 1))
    with pytest.raises(exc, match=match):
        ops.gli_projection(**{**args, **change})


def test_module_rejects_a_wrong_number_of_inputs():
    with pytest.raises(ValueError, match="num_inputs"):
        GLIProjection(4, 4, 6)
    with pytest.raises(ValueError, match="list of 3 inputs"):
        GLIProjection(4, 4, 3)([torch.randn(1, 4, 3, 3)] * 2)


# ---- CUDA (run with a GPU: pytest -m cuda) --------------------------------------------------

# MPViT-S and -B aggregates at a 224 input: (C in per path, C out, side, inputs = num_path + 1)
AGGREGATES = [(C, Cout, side, 4) for dims in ((64, 128, 216, 288), (128, 224, 368, 480))
              for C, Cout, side in zip(dims, dims[1:] + dims[-1:], (56, 28, 14, 7))]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
@pytest.mark.parametrize("agg", [(22, 27, 5, 3), (16, 24, 5, 2)]
                         + [pytest.param(a, marks=MODEL_SHAPES) for a in AGGREGATES],
                         ids=lambda a: f"{a[0]}to{a[1]}-{a[2]}px")
def test_low_precision_within_twice_eager(agg, dtype, training):
    """fp16/bf16 forward and every grad against fp64, within twice eager's error in the same dtype.
    The first cases are small enough for the interpreter (bf16 there as a GPU computes it:
    tests/interpreter_numerics.py), one with channels a multiple of 8 (the 16-byte vector loads the
    model's widths take); the others run at the model's shapes on a GPU."""
    C, Cout, side, n = agg
    batch = 8 if KERNEL_DEVICE == "cuda" else 2
    exact = make_module(C, Cout, n, torch.float64, training)
    xs64 = [torch.randn(batch, C, side, side, dtype=torch.float64, device=KERNEL_DEVICE).contiguous(
        memory_format=torch.channels_last).requires_grad_() for _ in range(n)]
    low = copy.deepcopy(exact).to(dtype)
    params = ["conv.weight", "bn.weight", "bn.bias"] if training else ["conv.weight"]
    z = exact.bn(exact.conv(torch.cat(xs64, dim=1)))  # the exact pre-activation
    want = F.hardswish(z)
    grad = away_from_the_kinks(torch.randn_like(want), z, dtype)
    want_grads = torch.autograd.grad(want, xs64 + [exact.get_parameter(p) for p in params], grad)
    xsl = [x.detach().to(dtype).requires_grad_() for x in xs64]
    leaves, wants = xsl + [low.get_parameter(p) for p in params], [want, *want_grads]
    ours = output_and_grad_errors(lambda: low(xsl), leaves, grad.to(dtype), wants)
    eager = output_and_grad_errors(lambda: chain(low, xsl), leaves, grad.to(dtype), wants)
    assert all(o <= 2 * e + 1e-3 for o, e in zip(ours, eager)), (ours, eager)


@pytest.mark.cuda
@pytest.mark.model_shapes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("agg", AGGREGATES[1::2], ids=lambda a: f"{a[0]}to{a[1]}-{a[2]}px")
def test_cuda_tuned_tile_does_not_change_the_bits(agg, dtype, monkeypatch):
    # The eval GEMM's tile is picked by timing: the bits must not depend on the pick (BLOCK_K,
    # hence each output's order of K products, is the pinned one). Each tile the tuner may pick,
    # forced in turn (with MPVIT_KERNELS_AUTOTUNE=0 too), against the pinned launch.
    import triton

    from mpvit_kernels.triton import gli_projection as kernels
    from mpvit_kernels.triton.static_compile import jit_function

    C, Cout, side, n = agg
    m = make_module(C, Cout, n, dtype, False)
    xs = [torch.randn(8, C, side, side, dtype=dtype, device="cuda").contiguous(memory_format=torch.channels_last)
          for _ in range(n)]
    meta = {"BLOCK_N": kernels.block_n(Cout), "ACC": kernels.tl.float32,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
    fit = kernels._fitting(kernels.TUNED_CONFIGS, {}, **meta)
    assert len(fit) >= 3
    monkeypatch.setattr(kernels, "gli_gemm_tuned", kernels.gli_gemm_kernel)  # the pinned tile
    want = m(xs)
    for config in fit:
        forced = triton.autotune([config], key=[])(jit_function(kernels.gli_gemm_kernel))
        monkeypatch.setattr(kernels, "gli_gemm_tuned", forced)
        assert torch.equal(m(xs), want), config


@pytest.mark.cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("agg", AGGREGATES[:4], ids=lambda a: f"{a[0]}to{a[1]}-{a[2]}px")
def test_cuda_fp32_at_model_shapes(agg, training):
    C, Cout, side, n = agg
    m = make_module(C, Cout, n, torch.float32, training)
    ref = copy.deepcopy(m)
    xs = [torch.randn(4, C, side, side, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
          for _ in range(n)]
    z = ref.bn(ref.conv(torch.cat(xs, dim=1)))  # chain's pre-activation
    y, y_ref = m(xs), F.hardswish(z)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
    # no grad within 1e-4 of a Hardswish kink: the two GEMMs' fp32 sums may land either side
    g = away_from_the_kinks(torch.randn_like(y_ref), z, torch.float32, margin=1e-4)
    for a, b in zip(torch.autograd.grad(y, xs + [m.conv.weight], g), torch.autograd.grad(y_ref, xs + [ref.conv.weight], g)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.model_shapes
def test_cuda_training_is_deterministic():
    C, Cout, side, n = AGGREGATES[1]
    m = make_module(C, Cout, n, torch.bfloat16, training=True)
    xs = [torch.randn(16, C, side, side, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_() for _ in range(n)]
    runs = []
    for _ in range(2):
        y = m(xs)
        runs.append([y, *torch.autograd.grad(y, [*xs, *m.parameters()], torch.ones_like(y))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.model_shapes
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the tensor-descriptor (TMA) path runs on sm_90 only")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("agg", AGGREGATES[::2], ids=lambda a: f"{a[0]}to{a[1]}-{a[2]}px")
def test_cuda_tensor_descriptor_loads_match_the_pointer_loads(agg, dtype, training, monkeypatch):
    # the TMA loads launch (their global scratch from the allocator the op sets, also on autograd's
    # thread) and give what the pointer loads give, forward and every grad
    from tests.utils import RecordLaunches

    C, Cout, side, n = agg
    m = make_module(C, Cout, n, dtype, training)
    xs = [torch.randn(8, C, side, side, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_() for _ in range(n)]
    runs = {}
    for tma in (False, True):
        monkeypatch.setattr(sys.modules["mpvit_kernels.ops.gli_projection"], "TMA", tma)
        module = copy.deepcopy(m)
        with RecordLaunches() as rec:
            y = module(xs)
            grads = torch.autograd.grad(y, [*xs, module.conv.weight], torch.ones_like(y))
        assert {meta["TMA"] for fn, meta in rec.launches if fn.__name__ == "gli_gemm_kernel"} == {tma}
        runs[tma] = [y, *grads]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
