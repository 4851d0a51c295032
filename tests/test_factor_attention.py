"""factor_attention: the Triton kernels (interpreted on CPU here, real on a GPU) against the
reference, forward and every gradient, through the op and through the public module."""
import contextlib
import itertools
import sys

import pytest
import torch

import mpvit_kernels
from mpvit_kernels import FactorAttention, backend, ops, reference
from tests.conftest import BF16, KERNEL_DEVICE, MODEL_SHAPES
from tests.utils import (RecordLaunches, RecordOps, assert_close, forget_pinned_tiles, gpu_tiles, normwise_error,
                         read_as_a_gpu_process, warnings_as_errors)

DEFAULT = {3: 2, 5: 3, 7: 3}

# (B, H, W, head dim, window): odd sizes, the head dims MPViT meets that are not powers of two,
# and custom windows. Maps of at most 256 tokens run the whole-map forward, 19x19 the three passes.
CASES = [
    (1, 1, 1, 3, DEFAULT),
    (2, 5, 7, 12, DEFAULT),
    (2, 7, 7, 20, {3: 1, 5: 1, 7: 1}),
    (1, 19, 19, 27, DEFAULT),
    (3, 2, 17, 22, {3: 1, 7: 1}),
    (1, 13, 11, 3, {5: 4}),
    (3, 9, 4, 27, {3: 1, 7: 1}),
    (1, 1, 16, 12, {5: 4}),
    (1, 16, 1, 22, {3: 1, 7: 1}),
]


def case_id(c):
    B, H, W, Ch, window = c
    return f"B{B}-{H}x{W}-Ch{Ch}-" + "_".join(f"{k}x{h}" for k, h in window.items())


def make_inputs(B, H, W, Ch, window, dtype, requires_grad=True, qkv_scale=1.0):
    heads = sum(window.values())
    C = heads * Ch
    qkv = (qkv_scale * torch.randn(B, H * W, 3 * C, dtype=dtype, device=KERNEL_DEVICE)).requires_grad_(requires_grad)
    weights = [(0.2 * torch.randn(h * Ch, 1, k, k, dtype=dtype, device=KERNEL_DEVICE)).requires_grad_(requires_grad)
               for k, h in window.items()]
    biases = [torch.randn(h * Ch, dtype=dtype, device=KERNEL_DEVICE).requires_grad_(requires_grad)
              for h in window.values()]
    return qkv, (H, W), heads, Ch ** -0.5, weights, biases


FORWARD_THREE_PASSES = ["context_partial_kernel", "context_combine_kernel", "output_kernel"]
BACKWARD = ["grad_partial_kernel", "grad_combine_kernel", "grad_qkv_kernel"]
# where one chunk covers a head's tokens, the context and grad passes do the combines' work
FORWARD_ONE_CHUNK = ["context_partial_kernel", "output_kernel"]
BACKWARD_ONE_CHUNK = ["grad_partial_kernel", "grad_qkv_kernel"]


def expected_launches(B, heads, N):
    """The kernels a forward and backward launch: the forward's path by N, the combines by
    whether one chunk covers N (_chunking)."""
    one_chunk = fa_ops()._chunking(B * heads, N)[1] == 1
    forward = ["whole_map_kernel"] if N <= fa_ops()._WHOLE_MAP_MAX_N else (
        FORWARD_ONE_CHUNK if one_chunk else FORWARD_THREE_PASSES)
    return forward + (BACKWARD_ONE_CHUNK if one_chunk else BACKWARD)


def fa_ops():
    """The ops module of the family (the package exports its function under the same name)."""
    return sys.modules["mpvit_kernels.ops.factor_attention"]


def launched(rec):
    """Names of the kernels a RecordLaunches saw, in order."""
    return [fn.__name__ for fn, _ in rec.launches]


def run_both(args, grad_seed=1):
    qkv, size, heads, scale, weights, biases = args
    inputs = [qkv, *weights, *biases]
    out = ops.factor_attention(*args)
    with mpvit_kernels.use_backend("reference"):
        ref = ops.factor_attention(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    return out, ref, grads, ref_grads


# Each case in one dtype, fp32 and fp64 in turn (test_properties.py draws both over random shapes).
@pytest.mark.parametrize("case, dtype", [(c, (torch.float32, torch.float64)[i % 2]) for i, c in enumerate(CASES)],
                         ids=[case_id(c) + ("-fp32", "-fp64")[i % 2] for i, c in enumerate(CASES)])
def test_kernels_match_reference(case, dtype):
    with RecordLaunches() as rec:
        out, ref, grads, ref_grads = run_both(make_inputs(*case, dtype))
    assert launched(rec) == expected_launches(case[0], sum(case[4].values()), case[1] * case[2])
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, scale=10)  # grads reduce over N (and B): summation order differs


@pytest.mark.parametrize("case", [(1, 17, 16, 12, {3: 1, 5: 1}), (2, 7, 7, 20, {3: 1, 5: 1, 7: 1})], ids=case_id)
def test_kernels_match_reference_with_a_gpus_tiles(case):
    # the passes as a GPU tiles them (tokens 32 or 64 a tile by head dim and register budget,
    # the last tile short), where the interpreter's take 128: the three passes (272 tokens) and
    # the whole-map forward
    with gpu_tiles():
        test_kernels_match_reference(case, torch.float32)


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="the interpreter's tile; on a GPU "
                    "test_cuda_token_tile_does_not_change_the_bits forces each tile")
def test_kernels_match_reference_with_the_smallest_token_tile(monkeypatch):
    # 16 tokens a tile, the smallest a GPU's tuner may pick for every pass (the interpreter's tile
    # is 128 and a GPU's pinned one 32 or 64 here, which the cases above take): a 7-wide window
    # over a 23-wide map reaches 3 rows, 69 tokens, so each tile's CRPE reads across several
    # tiles; the three passes, forward and backward, in fp64
    from mpvit_kernels.triton import factor_attention as fa

    forget_pinned_tiles()
    monkeypatch.setattr(fa, "_INTERPRETER_TILE", (16, 4))
    try:
        with forced_three_passes(), RecordLaunches() as rec:
            out, ref, grads, ref_grads = run_both(make_inputs(2, 3, 23, 8, {3: 1, 5: 1, 7: 1}, torch.float64))
    finally:
        forget_pinned_tiles()
    assert {bound["BLOCK_N"] for _, bound in rec.launches if "BLOCK_N" in bound} == {16}
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, scale=10)


def test_kernels_are_used():
    args = make_inputs(1, 3, 3, 4, {3: 1, 5: 1}, torch.float32)
    with RecordOps() as rec:
        ops.factor_attention(*args).sum().backward()
    assert "mpvit_kernels.factor_attention_fwd" in rec.names
    assert "mpvit_kernels.factor_attention_bwd" in rec.names
    with mpvit_kernels.use_backend("reference"), RecordOps() as rec:
        ops.factor_attention(*args)
    assert not any(n.startswith("mpvit_kernels") for n in rec.names)


# ---- the whole-map forward (maps of at most 256 tokens: one launch) -------------------------

@contextlib.contextmanager
def forced_three_passes():
    """Every map takes the three-pass forward inside the block."""
    module = fa_ops()
    saved = module._WHOLE_MAP_MAX_N
    module._WHOLE_MAP_MAX_N = 0
    try:
        yield
    finally:
        module._WHOLE_MAP_MAX_N = saved


@contextlib.contextmanager
def forced_whole_map_tiles(tiles):
    """whole_map_kernel runs with these (BLOCK_N, BLOCK_OUT) inside the block (None: its own)."""
    from mpvit_kernels.triton import factor_attention as fa

    saved = dict(fa.whole_map_kernel.values)
    if tiles:
        fa.whole_map_kernel.values.update(BLOCK_N=lambda meta: tiles[0], BLOCK_OUT=lambda meta: tiles[1])
    try:
        yield
    finally:
        fa.whole_map_kernel.values.clear()
        fa.whole_map_kernel.values.update(saved)


def test_forward_is_one_launch_on_small_maps_and_three_on_large():
    small = make_inputs(2, 7, 7, 6, {3: 1, 5: 1}, torch.float32)
    qkv, size, heads, scale, weights, biases = small
    frozen = (qkv.detach(), size, heads, scale, [w.detach() for w in weights], [b.detach() for b in biases])
    runs = {}
    for name, args, grad in (("no_grad", small, False), ("grads", small, True), ("frozen", frozen, True)):
        with torch.set_grad_enabled(grad), RecordLaunches() as rec:
            ops.factor_attention(*args)
        runs[name] = [(fn.__name__, bound["WRITE_STATS"]) for fn, bound in rec.launches]
    # S and lse are written only where a backward will read them
    assert runs == {"no_grad": [("whole_map_kernel", False)], "grads": [("whole_map_kernel", True)],
                    "frozen": [("whole_map_kernel", False)]}
    large = make_inputs(1, 17, 16, 4, {3: 1, 5: 1}, torch.float32, requires_grad=False)  # 272 tokens
    with RecordLaunches() as rec:
        ops.factor_attention(*large)
    assert launched(rec) == FORWARD_THREE_PASSES


@pytest.mark.parametrize("dtype, tiles", [(torch.float32, None), (torch.float64, None), (torch.float64, (16, 16))],
                         ids=["fp32", "fp64", "fp64-tiles16"])
def test_whole_map_matches_the_three_passes_and_the_reference(dtype, tiles):
    # 7x7 tokens, two heads of 12 (BLOCK_D 16); tiles16 walks the map in 4 tiles per pass
    # (the online max across tiles, a last tile of one token).
    qkv, size, heads, scale, weights, biases = make_inputs(2, 7, 7, 12, {3: 1, 7: 1}, dtype, requires_grad=False)
    args = (qkv, size[0], size[1], heads, scale, weights, biases)
    fwd = torch.ops.mpvit_kernels.factor_attention_fwd
    with forced_whole_map_tiles(tiles), RecordLaunches() as rec:
        whole = fwd(*args, True)
        bare = fwd(*args, False)
    assert launched(rec) == ["whole_map_kernel"] * 2
    if tiles:
        assert (rec.launches[0][1]["BLOCK_N"], rec.launches[0][1]["BLOCK_OUT"]) == tiles
    with forced_three_passes():
        three = fwd(*args, True)
    assert_close(whole[0], reference.factor_attention(qkv, size, heads, scale, weights, biases), scale=4)
    _, k, v = qkv.reshape(2, 49, 3, heads, 12).permute(2, 0, 3, 1, 4)  # each (B, heads, N, Ch)
    exact_ctx = (k.softmax(dim=2).transpose(-1, -2) @ v).reshape(2 * heads, 12, 12)
    assert_close(whole[1], exact_ctx, scale=4)  # S and lse in (B*heads, Ch, Ch) and (B*heads, Ch)
    assert_close(whole[2], k.logsumexp(dim=2).reshape(2 * heads, 12), scale=4)
    for ours, theirs in zip(whole, three):  # out, S and lse
        assert ours.shape == theirs.shape
        assert_close(ours, theirs, scale=4)
    torch.testing.assert_close(bare[0], whole[0], atol=0, rtol=0)
    assert bare[1].shape == (0, 12, 12) and bare[2].shape == (0, 12)  # Ch, not BLOCK_D, head dims
    assert bare[3].shape == (0,) and whole[3].shape == (fa_ops().packed_size(weights),)


def test_backward_after_a_forward_without_stats_recomputes_them():
    qkv, size, heads, scale, weights, biases = make_inputs(1, 3, 4, 4, {3: 1, 5: 1}, torch.float32)
    inputs = [qkv, *weights, *biases]
    fwd = torch.ops.mpvit_kernels.factor_attention_fwd
    kept = torch.autograd.grad(fwd(qkv, *size, heads, scale, weights, biases, True)[0].sum(), inputs)
    with RecordLaunches() as rec:
        recomputed = torch.autograd.grad(fwd(qkv, *size, heads, scale, weights, biases, False)[0].sum(), inputs)
    assert launched(rec) == ["whole_map_kernel", "whole_map_kernel"] + BACKWARD_ONE_CHUNK
    assert [b["WRITE_STATS"] for _, b in rec.launches[:2]] == [False, True]
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_crpe_grads_take_the_layout_of_channels_last_weights():
    """A model converted with .to(memory_format=torch.channels_last) holds its (c, 1, k, k) CRPE
    weights with channels-last strides; their grads (views of the backward's one flat output)
    take those strides, as DDP's buckets expect (it warns at every other stride), and equal the
    grads of contiguous weights."""
    qkv, size, heads, scale, weights, biases = make_inputs(1, 3, 4, 4, {3: 1, 5: 1}, torch.float32)
    nhwc = [w.detach().to(memory_format=torch.channels_last).requires_grad_() for w in weights]
    shared = [w.detach().to(memory_format=torch.channels_last).requires_grad_() for w in weights]
    assert all(w.stride() != v.stride() for w, v in zip(nhwc, weights))
    for ws in (weights, nhwc, shared):  # the last through a packing shared as an encoder's layers share it
        packed = ops.crpe_packing(ws, biases, heads, qkv) if ws is shared else None
        ops.factor_attention(qkv, size, heads, scale, ws, biases, packed).sum().backward()
    for w, s, v in zip(nhwc, shared, weights):
        assert w.grad.stride() == w.stride() and s.grad.stride() == s.stride() and v.grad.stride() == v.stride()
        torch.testing.assert_close(w.grad, v.grad, atol=0, rtol=0)
        torch.testing.assert_close(s.grad, v.grad, atol=0, rtol=0)


@pytest.mark.slow
def test_gradcheck_float64_through_the_whole_map():
    # the op itself, w.r.t. qkv and every CRPE weight and bias, on an odd 3x5 map
    qkv, size, heads, scale, weights, biases = make_inputs(1, 3, 5, 5, {3: 1, 5: 1}, torch.float64)
    n = len(weights)

    def f(qkv, *crpe):
        return ops.factor_attention(qkv, size, heads, scale, list(crpe[:n]), list(crpe[n:]))

    with RecordLaunches() as rec:
        assert torch.autograd.gradcheck(f, (qkv, *weights, *biases), eps=1e-6, atol=1e-6, fast_mode=True)
    assert "whole_map_kernel" in launched(rec) and "output_kernel" not in launched(rec)


def test_module_forward_is_two_gemms_and_our_op_without_copies():
    # q, k, v are read in place from the qkv Linear's output and O is written ready for proj:
    # a layout copy (permute + contiguous, clone, cat) between them would show up here.
    m = FactorAttention(24, num_heads=2, crpe_window={3: 1, 7: 1}).to(KERNEL_DEVICE)
    x = torch.randn(2, 20, 24, device=KERNEL_DEVICE)
    with torch.no_grad(), RecordOps() as rec:
        m(x, (4, 5))
    assert rec.compute == ["aten.addmm", "mpvit_kernels.factor_attention_fwd", "aten.addmm"], rec.names


@pytest.mark.parametrize("window", [{3: 2, 5: 3, 7: 3}, {5: 1, 3: 2}, {3: 1}])
@pytest.mark.parametrize("dtype,acc", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                       (torch.float64, torch.float64)])
def test_crpe_packing_centres_each_window_in_one_cat_and_one_gather(window, dtype, acc):
    """The packed CRPE weights the kernels read: each head's k x k window centred in KMAX x KMAX,
    zeros around it, the biases after; made by one cat and one gather (and a cast for weights
    not in the accumulation type), since training packs at every forward (a pad per window, two
    cats and two casts before); a backward takes the forward's packing apart into the same views."""
    Ch = 3
    _, _, heads, _, weights, biases = make_inputs(1, 2, 2, Ch, window, dtype, requires_grad=False)
    kmax = max(window)
    want_w = torch.cat([torch.nn.functional.pad(w[:, 0], [(kmax - w.shape[-1]) // 2] * 4) for w in weights])
    fa_ops()._pack_crpe(weights, biases, Ch, acc)  # the layout's tables, built once
    with RecordOps() as rec:
        packed, w_packed, bias, ksize, got_kmax = fa_ops()._pack_crpe(weights, biases, Ch, acc)
    assert packed.shape == (fa_ops().packed_size(weights),)
    w_view, b_view, k_view, kmax_view = fa_ops()._crpe_views(packed, weights, Ch)  # as a backward takes it apart
    assert (w_view.shape, w_view.data_ptr(), b_view.shape, b_view.data_ptr()) == \
        (w_packed.shape, w_packed.data_ptr(), bias.shape, bias.data_ptr())
    assert k_view is ksize and kmax_view == got_kmax
    assert rec.compute == ["aten.cat", "aten.index_select"] + (["aten._to_copy"] if dtype != acc else [])
    assert len(rec.compute) == fa_ops().pack_launches(weights, acc)
    assert got_kmax == kmax and w_packed.dtype == bias.dtype == acc and w_packed.is_contiguous()
    assert torch.equal(w_packed, want_w.reshape(-1, kmax * kmax).to(acc))
    assert torch.equal(bias, torch.cat(biases).to(acc)) and bias.data_ptr() % 16 == 0
    assert ksize.tolist() == [k for k, h in window.items() for _ in range(h)]


def test_crpe_weights_are_packed_once_per_version_in_inference(monkeypatch):
    """Where no graph through the CRPE weights is built, their packing (a cat and a gather) runs
    once per version: not again in a second forward, again after an in-place update or
    clear_caches(). Where they take grads (training, gradcheck) every forward packs, and its
    backward reads the forward's packing."""
    fa = sys.modules["mpvit_kernels.ops.factor_attention"]  # the module (the package exports the function)
    calls = []
    pack = fa._pack_crpe
    monkeypatch.setattr(fa, "_pack_crpe", lambda *a: calls.append(1) or pack(*a))
    args = make_inputs(1, 3, 4, 4, {3: 1, 5: 1}, torch.float32)
    qkv, size, heads, scale, weights, biases = args
    with torch.no_grad():
        first = ops.factor_attention(*args)
        again = ops.factor_attention(*args)
        assert len(calls) == 1
        torch.testing.assert_close(again, first)
        weights[1].mul_(2.0)  # an optimiser step: a new version
        changed = ops.factor_attention(*args)
        assert len(calls) == 2
        with mpvit_kernels.use_backend("reference"):
            assert_close(changed, ops.factor_attention(*args))
        weights[1].data.mul_(0.5)  # .data bumps no version: the cache cannot see it...
        mpvit_kernels.clear_caches()  # ...so it is dropped by hand
        torch.testing.assert_close(ops.factor_attention(*args), first)
        assert len(calls) == 3
    out = ops.factor_attention(*args)
    torch.autograd.grad(out.sum(), [qkv, *weights, *biases])
    assert len(calls) == 4  # with grads: the forward packs, and its backward reads that packing


@pytest.mark.parametrize("window, dtype", [({3: 1, 5: 1}, torch.float32), ({3: 2, 7: 1}, torch.float64)],
                         ids=["C8-fp32", "C9-fp64"])
def test_calls_sharing_one_crpe_packing_pack_once_and_give_the_same_grads(window, dtype):
    """An MPViT encoder's layers share one CRPE: packed once for all of them (crpe_packing: a cat
    and a gather), autograd sums the layers' grads of the packing (one add a layer, not one per
    weight and bias) and takes the sum apart once (one gather); outputs and grads are those of
    calls that pack for themselves, bit for bit (the same sums in the same order; with 9
    channels the packing has an alignment gap before the biases, whose grad is zeroed)."""
    qkv1, size, heads, scale, weights, biases = make_inputs(2, 3, 5, 3, window, dtype)
    qkv2 = torch.randn_like(qkv1).requires_grad_()
    inputs = [qkv1, qkv2, *weights, *biases]

    def two_layers(shared: bool):
        packed = ops.crpe_packing(weights, biases, heads, qkv1) if shared else None
        assert (packed is not None) == shared
        out = [ops.factor_attention(q, size, heads, scale, weights, biases, packed) for q in (qkv1, qkv2)]
        return out[0] * out[1], packed

    ops.crpe_packing(weights, biases, heads, qkv1)  # the layout's tables, built once
    with RecordOps() as forward:
        out, packed = two_layers(True)
    with RecordOps() as backward:
        grads = torch.autograd.grad(out.sum(), inputs)
    assert packed.shape == (fa_ops().packed_size(weights),) and packed.grad_fn is not None
    assert forward.compute == ["aten.cat", "aten.index_select", *["mpvit_kernels.factor_attention_fwd"] * 2,
                               "aten.mul"]
    # the two calls' grads of the packing summed (one add), then taken apart (one gather)
    assert backward.compute.count("aten.add") == 1 and backward.compute.count("aten.index_select") == 1
    unshared = two_layers(False)[0]
    with RecordOps() as backward:
        unshared_grads = torch.autograd.grad(unshared.sum(), inputs)
    assert backward.compute.count("aten.add") == len(weights) + len(biases)  # one per weight and bias
    torch.testing.assert_close(out, unshared, atol=0, rtol=0)
    for got, want in zip(grads, unshared_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.no_grad():  # inference: each call reads the cached packing
        assert ops.crpe_packing(weights, biases, heads, qkv1) is None
    with mpvit_kernels.use_backend("reference"):  # no kernel of ours reads one
        assert ops.crpe_packing(weights, biases, heads, qkv1) is None
    # a compiled graph would rebuild the packing's index tables in its trace: each op packs there
    compiled = torch.compile(lambda q: ops.crpe_packing(weights, biases, heads, q) is None, backend="eager",
                             fullgraph=True)
    assert compiled(qkv1)


def test_a_crpe_packing_of_other_weights_or_dtype_is_refused():
    qkv, size, heads, scale, weights, biases = make_inputs(1, 2, 3, 4, {3: 1, 5: 1}, torch.float32)
    packed = ops.crpe_packing(weights, biases, heads, qkv)
    other = make_inputs(1, 2, 3, 4, {3: 1, 7: 1}, torch.float32)
    for bad in (packed[1:], packed.double(), ops.crpe_packing(other[4], other[5], heads, qkv),
                packed.detach().repeat(2)[::2]):
        with pytest.raises(ValueError, match="crpe_packed must be crpe_packing's packing"):
            ops.factor_attention(qkv, size, heads, scale, weights, biases, bad)
        with pytest.raises(ValueError, match="crpe_packed must be crpe_packing's packing"):
            torch.ops.mpvit_kernels.factor_attention_fwd(qkv, *size, heads, scale, weights, biases, True, bad)


@pytest.mark.slow
def test_opcheck_and_gradcheck_with_a_shared_crpe_packing():
    qkv, size, heads, scale, weights, biases = make_inputs(1, 2, 3, 4, {3: 1, 5: 1}, torch.float64)
    packed = ops.crpe_packing(weights, biases, heads, qkv)
    detached = [w.detach() for w in weights], [b.detach() for b in biases]
    fwd, bwd = torch.ops.mpvit_kernels.factor_attention_fwd, torch.ops.mpvit_kernels.factor_attention_bwd
    leaf = packed.detach().requires_grad_()
    torch.library.opcheck(fwd.default, (qkv, *size, heads, scale, *detached, True, leaf))
    with torch.no_grad():
        out, ctx, lse, none = fwd(qkv, *size, heads, scale, *detached, True, leaf)
    assert none.shape == (0,)  # the backward reads the given packing
    bwd_args = (torch.randn_like(out), qkv.detach(), ctx, lse, leaf.detach(), *size, heads, scale, *detached, True)
    torch.library.opcheck(bwd.default, bwd_args)
    dqkv, dpacked, empty = bwd(*bwd_args)
    assert dpacked.shape == packed.shape and empty.shape == (0,)
    # the same grads as the backward that takes them apart itself
    apart = bwd(*bwd_args[:-1])
    torch.testing.assert_close(dqkv, apart[0], atol=0, rtol=0)
    crpe = [*weights, *biases]
    by_packing = torch.autograd.grad(packed, crpe, dpacked)
    flat = torch.cat([apart[1], apart[2]])
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in by_packing]), flat, atol=0, rtol=0)
    n = len(weights)

    def f(qkv, *crpe):
        shared = ops.crpe_packing(list(crpe[:n]), list(crpe[n:]), heads, qkv)
        return ops.factor_attention(qkv, size, heads, scale, list(crpe[:n]), list(crpe[n:]), shared)

    assert torch.autograd.gradcheck(f, (qkv, *crpe), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("path", ["whole_map", "one_chunk", "three_passes"])
def test_strided_qkv_rows_are_read_in_place(path, monkeypatch):
    if path != "whole_map":
        monkeypatch.setattr(fa_ops(), "_WHOLE_MAP_MAX_N", 0)
    H, W = (12, 11) if path == "three_passes" else (4, 5)  # 132 tokens: two chunks, and the combine
    qkv, size, heads, scale, weights, biases = make_inputs(2, H, W, 12, {3: 1, 7: 1}, torch.float32,
                                                           requires_grad=False)
    wide = torch.randn(2, H * W, qkv.shape[-1] + 8, device=KERNEL_DEVICE)
    wide[..., :qkv.shape[-1]] = qkv
    strided = wide[..., :qkv.shape[-1]]
    assert not strided.is_contiguous()
    with RecordLaunches() as rec:
        out = ops.factor_attention(strided, size, heads, scale, weights, biases)
    assert launched(rec) == {"whole_map": ["whole_map_kernel"], "one_chunk": FORWARD_ONE_CHUNK,
                             "three_passes": FORWARD_THREE_PASSES}[path]
    assert_close(out, reference.factor_attention(qkv, size, heads, scale, weights, biases))


@pytest.mark.parametrize("dtype, Ch", [(torch.float32, 12)] + [
    # on a GPU: 16-bit tiles, where grad_partial and grad_combine run other warp counts, and wider heads
    pytest.param(dtype, Ch, marks=pytest.mark.cuda) for dtype in (torch.bfloat16, torch.float32) for Ch in (12, 27, 36)
    if (dtype, Ch) != (torch.float32, 12)], ids=lambda v: str(v).replace("torch.", ""))
def test_one_chunk_passes_write_what_the_combines_would_to_the_bit(dtype, Ch):
    """Where one chunk covers N, the context pass writes S and lse and the grad pass dS and c
    (FINAL) instead of partials for a combine: the same values, to the bit, as the combines make
    of one chunk (whose weight is exp(0) = 1; a combine's 0 + x may turn a -0.0 into +0.0, which
    torch.equal counts as equal)."""
    from mpvit_kernels.triton import factor_attention as fa

    qkv, size, heads, scale, weights, biases = make_inputs(2, 19, 17, Ch, {3: 1, 7: 1}, dtype, requires_grad=False)
    L = fa_ops()._Launch(qkv, heads, weights, biases)
    N, chunk = 19 * 17, fa_ops()._CHUNK_ALIGN * 3  # one chunk of whole tiles over all 323 tokens
    dout = torch.randn(2, N, L.C, device=KERNEL_DEVICE, dtype=dtype)
    kk = fa_ops()._next_pow2(L.kmax ** 2)
    common = dict(ACC=L.tl_acc, DOT_PRECISION=L.precision, BLOCK_D=L.BD)
    runs = []
    with backend.triton_device(qkv):  # (as the op launches them: on the tensors' device)
        for final in (False, True):
            m, l, s = L.empty(L.BH, 1, L.Ch), L.empty(L.BH, 1, L.Ch), L.empty(L.BH, 1, L.Ch, L.Ch)
            ctx, lse = L.empty(L.BH, L.Ch, L.Ch), L.empty(L.BH, L.Ch)
            fa.context_partial_kernel[(L.BH, 1)](qkv, m, l, s, ctx, lse, N, L.C, L.Ch, heads, qkv.stride(0),
                                                 qkv.stride(1), chunk, FINAL=final, **common)
            if not final:
                fa.context_combine_kernel[(L.BH,)](m, l, s, ctx, lse, 1, L.Ch, ACC=L.tl_acc, BLOCK_D=L.BD)
            ds_part, dw, db = L.empty(L.BH, 1, L.Ch, L.Ch), L.empty(L.BH, 1, kk, L.BD), L.empty(L.BH, 1, L.BD)
            ds, c = L.empty(L.BH, L.BD, L.BD), L.empty(L.BH, L.BD)
            fa.grad_partial_kernel[(L.BH, 1)](qkv, dout, ds_part, dw, db, L.ksize, ctx, ds, c, N, *size, L.C, L.Ch, heads,
                                              qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), chunk, scale,
                                              KMAX=L.kmax, KK=kk, FINAL=final, **common)
            if not final:
                fa.grad_combine_kernel[(L.BH,)](ds_part, ctx, ds, c, 1, L.Ch, scale, ACC=L.tl_acc, BLOCK_D=L.BD)
            runs.append((ctx, lse, ds, c, dw, db))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _, k, v = qkv.float().reshape(2, N, 3, heads, Ch).permute(2, 0, 3, 1, 4)  # each (B, heads, N, Ch)
    assert_close(runs[1][0], (k.softmax(dim=2).transpose(-1, -2) @ v).reshape(2 * heads, Ch, Ch), dtype=dtype, scale=4)


def test_one_chunk_forward_and_backward_skip_the_combines(monkeypatch):
    # _TARGET_PROGRAMS B*heads programs (batch 32 with 8 heads) make one chunk a head at any N
    monkeypatch.setattr(fa_ops(), "_TARGET_PROGRAMS", 4)
    args = make_inputs(2, 19, 17, 12, {3: 1, 7: 1}, torch.float64)
    with RecordLaunches() as rec:
        out, ref, grads, ref_grads = run_both(args)
    assert launched(rec) == FORWARD_ONE_CHUNK + BACKWARD_ONE_CHUNK == expected_launches(2, 2, 19 * 17)
    assert [b["FINAL"] for fn, b in rec.launches if "partial" in fn.__name__] == [True, True]
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, scale=10)


def test_large_keys_do_not_overflow():
    args = make_inputs(1, 6, 5, 12, {3: 1, 7: 1}, torch.float32)
    qkv = args[0]
    with torch.no_grad():
        qkv[..., 24:48] *= 1e4  # the keys: softmax over N must subtract the column max
    out, ref, grads, ref_grads = run_both(args)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)


def test_backward_is_deterministic():
    args = make_inputs(3, 9, 8, 12, {3: 1, 5: 1}, torch.float32)
    _, _, first, _ = run_both(args)
    _, _, second, _ = run_both(args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_module_matches_reference_in_every_parameter_gradient():
    torch.manual_seed(0)
    m = FactorAttention(48, num_heads=4, crpe_window={3: 1, 5: 2, 7: 1}).double().to(KERNEL_DEVICE)
    x_base = torch.randn(2, 7 * 6, 96, dtype=torch.float64, device=KERNEL_DEVICE)
    x = x_base[..., ::2].requires_grad_()  # non-contiguous input
    out = m(x, (7, 6))
    params = [x] + list(m.parameters())
    grads = torch.autograd.grad(out.sum(), params)
    with mpvit_kernels.use_backend("reference"):
        ref = m(x, (7, 6))
        ref_grads = torch.autograd.grad(ref.sum(), params)
    assert_close(out, ref, scale=4)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "crpe.conv_list.0.weight",
            "crpe.conv_list.2.bias"} <= set(names)
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None, name
        assert_close(g, r, scale=10)


def test_gradcheck_float64_through_the_module():
    # Through the public module, w.r.t. the input and the CRPE weights and biases (the qkv and
    # proj Linears are plain torch). fast_mode: a few random directions instead of every column
    # of the Jacobian, because the interpreter runs each forward in Python.
    m = FactorAttention(8, num_heads=2, crpe_window={3: 1, 5: 1}).double().to(KERNEL_DEVICE)
    x = torch.randn(1, 6, 8, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    names = [n for n, _ in m.named_parameters() if n.startswith("crpe.")]
    params = dict(m.named_parameters())

    def f(x, *crpe):
        return torch.func.functional_call(m, dict(zip(names, crpe)), (x, (2, 3)))

    inputs = (x, *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["whole_map", "three_passes"])
def test_opcheck(path, monkeypatch):
    if path == "three_passes":
        monkeypatch.setattr(fa_ops(), "_WHOLE_MAP_MAX_N", 0)
    qkv, size, heads, scale, weights, biases = make_inputs(1, 2, 3, 4, {3: 1, 5: 1}, torch.float32)
    fwd_args = (qkv, size[0], size[1], heads, scale, weights, biases, True)
    fwd = torch.ops.mpvit_kernels.factor_attention_fwd
    with RecordLaunches() as rec:
        torch.library.opcheck(fwd.default, fwd_args)
        # without stats: (0, Ch, Ch) and (0, Ch) placeholders; a backward recomputes them
        torch.library.opcheck(fwd.default, (*fwd_args[:-1], False))
    assert ("whole_map_kernel" in launched(rec)) == (path == "whole_map")
    assert ("output_kernel" in launched(rec)) == (path == "three_passes")
    if path == "three_passes":  # the rest does not depend on the forward's path
        return
    wide = torch.randn(1, 6, qkv.shape[-1] + 5, device=KERNEL_DEVICE)[..., :qkv.shape[-1]].requires_grad_()
    torch.library.opcheck(fwd.default, (wide, *fwd_args[1:]))  # strided rows
    with torch.no_grad():  # the backward op, on the S, lse and packing the whole map's forward left
        out, ctx, lse, packed = fwd(*fwd_args)
    bwd = torch.ops.mpvit_kernels.factor_attention_bwd
    bwd_args = (torch.randn_like(out), qkv.detach(), ctx, lse, packed, size[0], size[1], heads, scale,
                [w.detach() for w in weights], [b.detach() for b in biases])
    torch.library.opcheck(bwd.default, bwd_args)
    unpacked = (*bwd_args[:4], packed.new_empty(0), *bwd_args[5:])  # packs for itself: the same grads
    torch.library.opcheck(bwd.default, unpacked)
    for a, b in zip(bwd(*bwd_args), bwd(*unpacked)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with RecordOps() as rec:  # inside the op: after its kernels, the CRPE grads in two sums and a gather
        fa_ops().factor_attention_bwd._init_fn(*bwd_args)
    # (allocations; and Triton's interpreter moves each launch's arguments with new_empty, set_ and copy_)
    moved = {"aten.empty"} | ({"aten.new_empty", "aten.set_", "aten.copy_"} if not qkv.is_cuda else set())
    assert [n for n in rec.compute if n not in moved] == ["aten.sum", "aten.sum", "aten.index_select"]
    for bad in [packed[1:]] + ([packed.cpu()] if packed.is_cuda else []):  # another size, another device
        with pytest.raises(ValueError, match="crpe_packed must be empty or the forward's packing"):
            bwd(*bwd_args[:4], bad, *bwd_args[5:])
    # S and lse in any other layout than the forward's are refused, not misread
    padded = torch.zeros(lse.shape[0], 16, device=lse.device, dtype=lse.dtype)
    for bad in ({2: ctx.transpose(1, 2)}, {3: padded}):
        args = [bad.get(i, a) for i, a in enumerate(bwd_args)]
        with pytest.raises(ValueError, match="must be a contiguous"):
            torch.ops.mpvit_kernels.factor_attention_bwd(*args)


def test_module_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = FactorAttention(24, num_heads=2, crpe_window={3: 1, 7: 1}).to(KERNEL_DEVICE)
    x = torch.randn(2, 20, 24, device=KERNEL_DEVICE, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with RecordLaunches() as rec:
        out = compiled(x, (4, 5))
    with torch.no_grad(), RecordLaunches() as rec_no_grad:
        out_no_grad = compiled(x, (4, 5))  # a graph of its own, which keeps no S and lse
    ref = m(x, (4, 5))
    assert [(fn.__name__, b["WRITE_STATS"]) for fn, b in rec.launches] == [("whole_map_kernel", True)]
    assert [(fn.__name__, b["WRITE_STATS"]) for fn, b in rec_no_grad.launches] == [("whole_map_kernel", False)]
    assert_close(out, ref)
    torch.testing.assert_close(out_no_grad, out, atol=0, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert_close(g, g_ref)


def test_default_window_and_checkpoint_names():
    m = FactorAttention(64)
    assert [tuple(c.weight.shape) for c in m.crpe.conv_list] == [(16, 1, 3, 3), (24, 1, 5, 5), (24, 1, 7, 7)]
    assert set(m.state_dict()) == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
        *(f"crpe.conv_list.{i}.{p}" for i in range(3) for p in ("weight", "bias"))}
    shared = FactorAttention(64, shared_crpe=m.crpe)
    assert shared.crpe is m.crpe


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dim=30, num_heads=8), ValueError, "divisible"),
    (dict(dim=64, crpe_window={3: 2, 5: 3}), ValueError, "covers 5 heads"),
    (dict(dim=64, crpe_window={4: 8}), ValueError, "odd"),
])
def test_bad_module_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FactorAttention(**kwargs)


def test_bad_op_inputs_raise_before_any_kernel():
    qkv, size, heads, scale, weights, biases = make_inputs(1, 2, 3, 4, {3: 1, 5: 1}, torch.float32)
    with pytest.raises(ValueError, match="size"):
        ops.factor_attention(qkv, (3, 3), heads, scale, weights, biases)
    with pytest.raises(ValueError, match="qkv"):
        ops.factor_attention(qkv[..., :-1], size, heads, scale, weights, biases)
    with pytest.raises(TypeError, match="qkv"):
        ops.factor_attention(qkv.int(), size, heads, scale, weights, biases)
    with pytest.raises(ValueError, match="num_heads"):
        ops.factor_attention(qkv, size, 3, scale, weights, biases)
    with pytest.raises(ValueError, match=r"crpe_biases\[1\]"):
        ops.factor_attention(qkv, size, heads, scale, weights, [biases[0], biases[1][:-1]])
    with pytest.raises(ValueError, match="cover"):
        ops.factor_attention(qkv, size, heads, scale, weights[:1], biases[:1])
    with pytest.raises(ValueError, match="N="):
        FactorAttention(8, num_heads=2, crpe_window={3: 2})(torch.randn(1, 6, 8), (2, 2))


def test_heads_wider_than_the_kernels_take_run_the_reference_under_auto(monkeypatch):
    # The Triton kernels are compiled for head dims up to 64 (MPViT's are 8 to 60); a wider head
    # would ask a GPU for more shared memory than a block has. auto gives it to the eager
    # reference (one warning per head dim); the triton backend and the registered op refuse it
    # before any launch.
    fa = fa_ops()
    monkeypatch.setattr(mpvit_kernels.backend, "_warned", set())
    args = make_inputs(1, 2, 3, fa.MAX_TRITON_HEAD_DIM + 1, {3: 1, 5: 1}, torch.float32)
    with RecordLaunches() as rec, pytest.warns(RuntimeWarning, match="head dims .* at most 64, got 65"):
        out = ops.factor_attention(*args)
    assert rec.launches == []
    with mpvit_kernels.use_backend("reference"):
        assert torch.equal(out, ops.factor_attention(*args))
    monkeypatch.setattr(mpvit_kernels.backend, "_warned", set())
    with warnings_as_errors():  # no warning in a graph (it would break it)
        compiled = torch.compile(ops.factor_attention, backend="eager", fullgraph=True)
        assert torch.equal(compiled(*args), out)
    with pytest.warns(RuntimeWarning, match="head dims"):
        ops.factor_attention(*args)
    with warnings_as_errors():
        ops.factor_attention(*args)  # once per head dim
    with mpvit_kernels.use_backend("triton"), pytest.raises(ValueError, match="head dims"):
        ops.factor_attention(*args)
    qkv, size, heads, scale, weights, biases = args
    with RecordLaunches() as rec, pytest.raises(ValueError, match="head dims"):
        torch.ops.mpvit_kernels.factor_attention_fwd(qkv.detach(), *size, heads, scale, weights, biases, False)
    assert rec.launches == []
    # the widest head the kernels take runs them
    args = make_inputs(1, 1, 2, fa.MAX_TRITON_HEAD_DIM, {3: 1}, torch.float32, requires_grad=False)
    with RecordLaunches() as rec:
        out = ops.factor_attention(*args)
    assert launched(rec) == ["whole_map_kernel"]
    with mpvit_kernels.use_backend("reference"):
        assert_close(out, ops.factor_attention(*args))


def test_launch_grids_stay_within_a_gpus_axis_limits():
    # A GPU's grid axes 1 and 2 stop at 65535 programs, which the 16-token tiles of a 1024 x 1024
    # map pass: the per-token passes put their B * heads * tiles programs on axis 0 (heads
    # fastest); the reduction passes put only their chunks on axis 1, which _chunking bounds.
    args = make_inputs(2, 19, 19, 3, {3: 1, 5: 1}, torch.float32)
    with RecordLaunches() as rec:
        out, ref, grads, ref_grads = run_both(args)
    assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)
    launches = {fn.__name__: kw for fn, kw in rec.launches}
    grids = {name: kw["grid"](kw) if callable(kw["grid"]) else kw["grid"] for name, kw in launches.items()}
    tiles = -(-19 * 19 // launches["output_kernel"]["BLOCK_N"])
    assert tiles > 1 and grids["output_kernel"] == grids["grad_qkv_kernel"] == (2 * 2 * tiles,)
    assert fa_ops()._chunking(1, 1024 * 1024)[1] <= fa_ops()._TARGET_PROGRAMS
    for name in ("context_partial_kernel", "grad_partial_kernel"):
        assert grids[name] == (4, fa_ops()._chunking(4, 19 * 19)[1])


def test_fp64_launches_pass_every_float_argument_as_fp64():
    # Triton types a Python float argument as fp32 unless its parameter says otherwise, and fp64
    # math with an fp32-rounded scale is off by ~1e-8 (the interpreter hides it; a GPU does not).
    from mpvit_kernels.triton.static_compile import float_launch_type

    args = make_inputs(1, 3, 4, 6, {3: 1, 5: 1}, torch.float64)
    chunked = make_inputs(1, 12, 11, 6, {3: 1, 5: 1}, torch.float64)  # 132 tokens: two chunks, the combines
    with RecordLaunches() as rec:
        ops.factor_attention(*args).sum().backward()
        ops.factor_attention(*chunked).sum().backward()
        with torch.no_grad(), forced_three_passes():
            ops.factor_attention(*args)
    floats = [(fn, name) for fn, bound in rec.launches for name, value in bound.items() if isinstance(value, float)]
    assert {fn.__name__ for fn, _ in floats} == {"whole_map_kernel", "output_kernel", "grad_partial_kernel",
                                                 "grad_combine_kernel", "grad_qkv_kernel"}
    assert [(fn.__name__, name, float_launch_type(fn, name)) for fn, name in floats
            if float_launch_type(fn, name) != "fp64"] == []


def test_autotune_key_buckets_the_token_count():
    from mpvit_kernels.triton.factor_attention import n_bucket

    assert n_bucket(1) == 1 and n_bucket(49) == 64 and n_bucket(56 * 56) == n_bucket(60 * 60) == 4096
    assert n_bucket(4096) == 4096 and n_bucket(4097) == 8192
    # every map size of a multi-scale detection run (inputs 320..1333 at strides 4..32) tunes a handful of times
    sizes = {(h // s) * (w // s) for h in range(320, 1334, 32) for w in range(320, 1334, 32) for s in (4, 8, 16, 32)}
    assert len(sizes) > 500 and len({n_bucket(n) for n in sizes}) <= 12


def test_what_a_gpu_tunes():
    # The reduction passes never autotune (their tile fixes the summation order); the per-token
    # passes tune per (bucket of N, head-dim tile) unless MPVIT_KERNELS_AUTOTUNE=0, which pins
    # one tile each.
    results = read_as_a_gpu_process("mpvit_kernels.triton.factor_attention", """
        def read(fa):
            from mpvit_kernels.triton.static_compile import launched_kernels
            out = {}
            for name, k in launched_kernels(fa).items():
                if isinstance(k, triton.runtime.Autotuner):
                    out[name] = {"configs": len(k.configs), "key": k.keys}
                else:
                    out[name] = {"heuristics": sorted(k.values)}
            return out
    """)
    for autotune, kernels in results.items():
        for name in ("context_partial_kernel", "grad_partial_kernel"):
            assert {"BLOCK_N", "num_warps"} <= set(kernels[name]["heuristics"]), kernels[name]
        assert {"BLOCK_N", "BLOCK_OUT", "num_warps"} <= set(kernels["whole_map_kernel"]["heuristics"])
        for name in ("context_combine_kernel", "grad_combine_kernel"):
            assert kernels[name]["configs"] == 1
        for name in ("output_kernel", "grad_qkv_kernel"):
            if autotune == "1":
                assert kernels[name]["key"] == ["n_bucket", "BLOCK_D"] and kernels[name]["configs"] > 1, kernels[name]
            else:
                assert {"BLOCK_N", "num_warps"} <= set(kernels[name]["heuristics"]), kernels[name]


def test_reduction_tiles_depend_on_dtype_and_head_dim_alone():
    from mpvit_kernels.triton import factor_attention as fa

    for tiles in (fa.CONTEXT_TILES, fa.GRAD_REDUCE_TILES):
        for acc, precision in ((fa.tl.float32, "tf32x3"), (fa.tl.float32, "ieee"), (fa.tl.float64, "ieee")):
            for bd in (16, 32, 64):
                meta = {"ACC": acc, "DOT_PRECISION": precision, "BLOCK_D": bd}
                first = tiles.fitting(meta)[0]
                assert tiles.fitting({**meta, "N": 7, "Ch": bd - 1, "chunk": 128})[0] == first
                # whole tiles in every chunk, and big enough for tl.dot
                assert 128 % first[0] == 0 and first[0] >= 16
    for acc, precision in ((fa.tl.float32, "tf32x3"), (fa.tl.float32, "ieee"), (fa.tl.float64, "ieee")):
        for bd in (16, 32, 64):
            meta = {"ACC": acc, "DOT_PRECISION": precision, "BLOCK_D": bd}
            tiles = fa.WHOLE_MAP_TILES.tiles(meta)
            assert fa.WHOLE_MAP_TILES.tiles({**meta, "N": 49, "Ch": bd - 3}) == tiles and min(tiles) >= 16


# ---- the C++ CPU twin (what auto runs on CPU tensors outside the interpreter) ----------------

requires_ext = pytest.mark.skipif(not mpvit_kernels.extension_available(), reason="mpvit_kernels._C not built")
CPU_TWIN = dict(name="cuda", ops=["factor_attention"])  # the extension's kernel, on CPU tensors


def cpu_inputs(B, H, W, Ch, window, dtype, strided=False):
    """make_inputs on CPU; ``strided``: qkv rows wider than 3C (read in place by the twin)."""
    qkv, size, heads, scale, weights, biases = make_inputs(B, H, W, Ch, window, torch.float64, requires_grad=False)
    qkv = qkv.cpu()
    if strided:
        qkv = torch.cat([qkv, torch.randn(B, H * W, 5, dtype=qkv.dtype)], dim=2)[..., :qkv.shape[2]]
    leaves = [t.cpu().to(dtype).requires_grad_() for t in (qkv, *weights, *biases)]
    n = len(weights)
    return (leaves[0], size, heads, scale, leaves[1:1 + n], leaves[1 + n:]), leaves


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_twin_matches_reference(case, dtype):
    args, leaves = cpu_inputs(*case, dtype, strided=case[1] == 5)
    with mpvit_kernels.use_backend(**CPU_TWIN), RecordOps() as rec:
        out = ops.factor_attention(*args)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.1 + out.detach())
    assert "mpvit_kernels.factor_attention" in rec.names and "mpvit_kernels.factor_attention_backward" in rec.names
    with mpvit_kernels.use_backend("reference"):
        ref = ops.factor_attention(*args)
        ref_grads = torch.autograd.grad(ref, leaves, torch.ones_like(ref) * 0.1 + ref.detach())
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, scale=10)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_twin_low_precision_is_as_accurate_as_eager(dtype):
    """fp32 math inside: the error against fp64 at most eager's in the same dtype (plus rounding
    of the output)."""
    args, _ = cpu_inputs(2, 9, 7, 20, DEFAULT, dtype)
    exact = [args[0].double(), *args[1:4], [w.double() for w in args[4]], [b.double() for b in args[5]]]
    with torch.no_grad():
        want = reference.factor_attention(*exact)
        with mpvit_kernels.use_backend(**CPU_TWIN):
            ours = ops.factor_attention(*args)
        eager = reference.factor_attention(*args)
    assert ours.dtype == dtype
    err, eager_err = (ours.double() - want).abs().max(), (eager.double() - want).abs().max()
    assert err <= 2 * eager_err + 1e-3 * want.abs().max(), (err, eager_err)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_twin_low_precision_is_the_fp32_twin_rounded_once(dtype):
    """16-bit qkv runs the fp32 kernels on a widened copy: the fp32 twin's output rounded once
    (pins the design; test_depthwise's twin of this test says how it was checked against the
    former native 16-bit kernels)."""
    (qkv, size, heads, scale, weights, biases), _ = cpu_inputs(2, 5, 7, 12, DEFAULT, dtype, strided=True)
    twin = torch.ops.mpvit_kernels.factor_attention.default
    with torch.no_grad():
        out = twin(qkv, *size, heads, scale, weights, biases)
        out32 = twin(qkv.float(), *size, heads, scale, weights, biases)
    assert out.dtype == dtype and torch.equal(out, out32.to(dtype))


@requires_ext
def test_cpu_twin_ops_pass_opcheck_and_gradcheck():
    args, leaves = cpu_inputs(2, 4, 5, 4, {3: 1, 5: 1}, torch.float64, strided=True)
    qkv, (H, W), heads, scale, weights, biases = args
    torch.library.opcheck(torch.ops.mpvit_kernels.factor_attention.default, (qkv, H, W, heads, scale, weights, biases))
    dout = torch.randn(2, 20, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.mpvit_kernels.factor_attention_backward.default,
                          (dout, qkv.detach(), H, W, heads, scale, [w.detach() for w in weights],
                           [b.detach() for b in biases]))
    n = len(weights)
    with mpvit_kernels.use_backend(**CPU_TWIN):
        assert torch.autograd.gradcheck(
            lambda q, *p: ops.factor_attention(q, (H, W), heads, scale, list(p[:n]), list(p[n:])), leaves)


@requires_ext
def test_cpu_training_runs_the_reference_with_the_crpe_on_the_depthwise_twin(monkeypatch):
    """Where a backward follows on CPU tensors, auto runs the eager formula with its CRPE convs on
    the depthwise op's C++ twin (forward and backward): values and every gradient as the
    reference's F.conv2d, fp64 gradcheck; inference keeps the attention twin."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # auto as on a CPU without the interpreter
    args, leaves = cpu_inputs(2, 4, 5, 4, {3: 1, 5: 1, 7: 1}, torch.float64)
    _, (H, W), heads, scale, _, _ = args
    n = len(args[4])

    def op(q, *p):
        return ops.factor_attention(q, (H, W), heads, scale, list(p[:n]), list(p[n:]))

    with RecordOps() as rec:
        y = op(*leaves)
    assert rec.names.count("mpvit_kernels.depthwise") == n and "mpvit_kernels.factor_attention" not in rec.names
    want = reference.factor_attention(leaves[0], (H, W), heads, scale, leaves[1:1 + n], leaves[1 + n:])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(op, leaves)
    with torch.no_grad(), RecordOps() as rec:
        op(*leaves)
    assert rec.names == ["mpvit_kernels.factor_attention"]


@requires_ext
def test_cpu_twin_is_bitwise_the_same_for_any_thread_count_and_under_compile():
    from tests.utils import across_thread_counts

    torch._dynamo.reset()
    m = FactorAttention(48, 4, crpe_window={3: 2, 7: 2}).eval()
    x = torch.randn(3, 13 * 11, 48)
    with torch.no_grad(), mpvit_kernels.use_backend(**CPU_TWIN):
        outs = across_thread_counts(lambda: m(x, (13, 11)))
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x, (13, 11))
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(compiled, outs[0], rtol=0, atol=0)


@requires_ext
def test_cpu_twin_edge_cases():
    args, _ = cpu_inputs(1, 6, 5, 12, {3: 1, 7: 1}, torch.float32)
    qkv = args[0].detach().clone()
    with torch.no_grad(), mpvit_kernels.use_backend(**CPU_TWIN):
        empty = ops.factor_attention(qkv[:0], *args[1:])
        assert empty.shape == (0, 30, 24)
        qkv[..., 24:48] *= 1e4  # large keys: the softmax subtracts each column's max
        big = ops.factor_attention(qkv, *args[1:])
        with mpvit_kernels.use_backend("reference"):
            assert_close(big, ops.factor_attention(qkv, *args[1:]), scale=4)
        qkv[0, 3, 24] = float("nan")  # a NaN key poisons its head's context, never hidden
        nan = ops.factor_attention(qkv, *args[1:])
        assert nan[:, :, :12].isnan().all() and nan[:, :, 12:].isfinite().all()
        with pytest.raises(ValueError, match="H\\*W must be N"):
            torch.ops.mpvit_kernels.factor_attention(qkv, 5, 5, 2, 0.5, *args[4:])
    with mpvit_kernels.use_backend(**CPU_TWIN):  # first derivatives only, refused clearly beyond
        leaf = args[0].detach().requires_grad_()
        (g,) = torch.autograd.grad(ops.factor_attention(leaf, *args[1:]).square().sum(), leaf, create_graph=True)
        with pytest.raises(RuntimeError, match="second derivative"):
            g.square().sum().backward()


# ---- CUDA (run with a GPU: pytest -m cuda) -------------------------------------------------

# MPViT-S and MPViT-B stage shapes at 224x224 input: (N, C); 8 heads.
MPVIT_S_STAGES = [(56 * 56, 64), (28 * 28, 128), (14 * 14, 216), (7 * 7, 288)]
MPVIT_B_STAGES = [(56 * 56, 128), (28 * 28, 224), (14 * 14, 368), (7 * 7, 480)]
# Low precision tolerance: the kernel's normwise error against the fp64 reference may be at most
# this multiple of eager PyTorch's own error in the same dtype (plus 1e-3), for the output and for
# every gradient.
LOW_PRECISION_FACTOR = 2.0


def _all_grads(out, inputs, g):
    return [out, *torch.autograd.grad(out, inputs, g.to(out.dtype))]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
@pytest.mark.parametrize("N, C, forward", [(25, 32, "whole_map"), (25, 32, "three_passes")] + [
    pytest.param(N, C, "auto", marks=MODEL_SHAPES) for N, C in MPVIT_S_STAGES + MPVIT_B_STAGES],
    ids=lambda v: str(v))
def test_low_precision_every_gradient_within_twice_eager(N, C, forward, dtype, monkeypatch):
    """fp16/bf16 forward and every grad against fp64, within LOW_PRECISION_FACTOR times eager's
    error in the same dtype: the first cases small enough for the interpreter (bf16 there as a
    GPU computes it: tests/interpreter_numerics.py), one per forward path, the others at the
    model's shapes on a GPU."""
    if forward == "three_passes":
        monkeypatch.setattr(fa_ops(), "_WHOLE_MAP_MAX_N", 0)
    side, batch = int(N ** 0.5), 8 if KERNEL_DEVICE == "cuda" else 2
    qkv, size, heads, scale, weights, biases = make_inputs(batch, side, side, C // 8, DEFAULT, torch.float64)
    exact_inputs = [qkv, *weights, *biases]
    g = torch.randn(batch, N, C, dtype=torch.float64, device=qkv.device)
    exact = _all_grads(reference.factor_attention(qkv, size, heads, scale, weights, biases), exact_inputs, g)
    low = [t.detach().to(dtype).requires_grad_() for t in exact_inputs]
    ours = _all_grads(ops.factor_attention(low[0], size, heads, scale, low[1:4], low[4:7]), low, g)
    eager = _all_grads(reference.factor_attention(low[0], size, heads, scale, low[1:4], low[4:7]), low, g)
    # the three windows' weight grads as one vector, and their bias grads: a bias grad alone has
    # as few elements as its window's channels (8 in the small cases), too few for a measure of
    # rounding error (ours came out 1.7x eager's on one and 0.8x on another, by chance)
    groups = {"out": [0], "qkv": [1], "crpe weights": [2, 3, 4], "crpe biases": [5, 6, 7]}

    def joined(ts, idx):
        return torch.cat([ts[i].double().flatten() for i in idx])

    worse = []
    for name, idx in groups.items():
        err_ours = normwise_error(joined(ours, idx), joined(exact, idx))
        err_eager = normwise_error(joined(eager, idx), joined(exact, idx))
        if err_ours > LOW_PRECISION_FACTOR * err_eager + 1e-3:
            worse.append((name, err_ours, err_eager))
    assert worse == []


@pytest.mark.cuda
@pytest.mark.parametrize("N, C", MPVIT_S_STAGES)
def test_cuda_fp32_forward_backward_at_model_shapes(N, C):
    side = int(N ** 0.5)
    out, ref, grads, ref_grads = run_both(make_inputs(4, side, side, C // 8, DEFAULT, torch.float32))
    assert_close(out, ref, scale=10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic_at_large_n():
    args = make_inputs(1, 128, 128, 8, DEFAULT, torch.bfloat16)
    _, _, first, _ = run_both(args)
    for _ in range(2):
        _, _, again, _ = run_both(args)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@contextlib.contextmanager
def forced_tile(kernel, tile):
    """Run ``kernel`` (autotuned, or pinned by heuristics) with this (BLOCK_N, num_warps)."""
    import triton

    if isinstance(kernel, triton.runtime.Autotuner):
        saved = kernel.configs, dict(kernel.cache)
        kernel.configs = [triton.Config({"BLOCK_N": tile[0]}, num_warps=tile[1], maxnreg=saved[0][0].maxnreg)]
        kernel.cache.clear()
        try:
            yield
        finally:
            kernel.configs, kernel.cache = saved
    else:
        saved = dict(kernel.values)
        kernel.values.update(BLOCK_N=lambda meta: tile[0], num_warps=lambda meta: tile[1])
        try:
            yield
        finally:
            kernel.values.clear()
            kernel.values.update(saved)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, Ch", [(torch.bfloat16, 16), (torch.float32, 27)], ids=["bf16", "fp32"])
def test_cuda_token_tile_does_not_change_the_bits(dtype, Ch):
    # The per-token passes autotune their tile by timing: the bits must not depend on the pick
    # (the reduction passes pin theirs). Each tile the tuner may pick, forced in turn.
    from mpvit_kernels.ops.factor_attention import _block_d
    from mpvit_kernels.triton import factor_attention as fa

    args = make_inputs(2, 28, 28, Ch, DEFAULT, dtype)
    meta = {"BLOCK_D": _block_d(Ch), "ACC": fa.tl.float32,
            "DOT_PRECISION": fa.dot_precision("bf16" if dtype == torch.bfloat16 else "fp32")}
    pairs = list(itertools.zip_longest(fa.OUTPUT_TILES.fitting(meta), fa.GRAD_QKV_TILES.fitting(meta)))
    assert len(pairs) > 1
    results = []
    for out_tile, grad_tile in pairs:
        with contextlib.ExitStack() as stack:
            if out_tile:
                stack.enter_context(forced_tile(fa.output_kernel, out_tile))
            if grad_tile:
                stack.enter_context(forced_tile(fa.grad_qkv_kernel, grad_tile))
            out, ref, grads, ref_grads = run_both(args)
        results.append(((out_tile, grad_tile), [out, *grads]))
        if len(results) == 1:
            assert_close(out, ref, scale=4)
    (first_tiles, first), rest = results[0], results[1:]
    for tiles, tensors in rest:
        for a, b in zip(first, tensors):
            assert torch.equal(a, b), (first_tiles, tiles)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("side, Ch", [(7, 36), (14, 27), (16, 60)])
def test_cuda_whole_map_at_model_shapes(side, Ch, dtype):
    # MPViT stage 4 at 224 (MPViT-S), stage 3 at 224, stage 4 at 512 (MPViT-B): the whole-map
    # forward is bitwise reproducible, writes the same O without stats (null S and lse pointers),
    # and is as accurate against fp64 as the three passes.
    qkv, size, heads, scale, weights, biases = make_inputs(16, side, side, Ch, DEFAULT, dtype, requires_grad=False)
    args = (qkv, side, side, heads, scale, weights, biases)
    fwd = torch.ops.mpvit_kernels.factor_attention_fwd
    with RecordLaunches() as rec:
        whole, again, bare = fwd(*args, True), fwd(*args, True), fwd(*args, False)
    assert launched(rec) == ["whole_map_kernel"] * 3
    for a, b in zip(whole, again):
        assert torch.equal(a, b)
    assert torch.equal(bare[0], whole[0])
    with forced_three_passes():
        three = fwd(*args, True)
    exact = reference.factor_attention(qkv.double(), size, heads, scale, [w.double() for w in weights],
                                       [b.double() for b in biases])
    err_whole = (whole[0].double() - exact).abs().max().item()
    err_three = (three[0].double() - exact).abs().max().item()
    assert err_whole <= 2 * err_three + 1e-6 * exact.abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for ours, theirs in zip(whole[1:], three[1:]):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_runs_on_the_tensors_device_not_the_current_one():
    args = make_inputs(2, 7, 9, 16, DEFAULT, torch.float32)
    moved = [args[0].detach().to("cuda:1").requires_grad_(), args[1], args[2], args[3],
             [w.detach().to("cuda:1").requires_grad_() for w in args[4]],
             [b.detach().to("cuda:1").requires_grad_() for b in args[5]]]
    with torch.cuda.device(0):
        out, ref, grads, ref_grads = run_both(moved)
        assert torch.cuda.current_device() == 0
    assert out.device == torch.device("cuda:1")
    assert_close(out, ref, scale=4)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, scale=10)
