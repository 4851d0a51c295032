"""The reference MPViT: checkpoint parity, dense features, odd sizes, kernels on vs off."""
import copy
import functools
import os

import pytest
import torch

import mpvit_kernels
from tests.conftest import BF16_KERNELS, KERNEL_DEVICE, NO_BF16_KERNELS
from tests.utils import RecordOps, cpu_auto, normwise_error, randomize_bn
from mpvit_kernels.models import MPViT, load_checkpoint, mpvit_base, mpvit_small, mpvit_tiny, mpvit_xsmall
from mpvit_kernels.models.mpvit import CONFIGS

SIZES = {"tiny": mpvit_tiny, "xsmall": mpvit_xsmall, "small": mpvit_small, "base": mpvit_base}
PARAMS = {"tiny": 5_843_736, "xsmall": 10_573_448, "small": 22_892_400, "base": 74_845_976}
EMBED = {"tiny": (64, 96, 176, 216), "xsmall": (64, 128, 192, 256), "small": (64, 128, 216, 288),
         "base": (128, 224, 368, 480)}
# Every state_dict key and shape of the public checkpoints, one "key<TAB>(shape)" a line.
REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "data")


def shallow_tiny(num_classes: int) -> MPViT:
    """MPViT-T's widths with one block a stage but two in the second (blocks share their stage's
    CPE and CRPE): every module and op of the model in 14 attention calls, not 23. For the tests
    whose time goes with the graph's size (compile, export), not with what the blocks compute."""
    _, embed_dims, mlp_ratio = CONFIGS["tiny"]
    return MPViT((1, 2, 1, 1), embed_dims, mlp_ratio, num_classes)


def reference_keys(size):
    with open(os.path.join(REFERENCE_DIR, f"mpvit_{size}_state_dict_keys.txt")) as f:
        return dict(line.rstrip("\n").split("\t") for line in f if line.strip())


@pytest.fixture(autouse=True)
def _auto_as_on_a_cpu(request):
    """Model tests run on CPU tensors, where the Triton kernels run only through the interpreter
    (seconds per call): they run what auto runs on a CPU (the C++ twins, the Triton families'
    reference), except the tests that run the model (or a stage of it) through the kernels."""
    if "through_the_kernels" in request.node.name:
        yield
        return
    with cpu_auto():
        yield


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_keys_shapes_and_parameter_count(size):
    model = SIZES[size]()
    ours = {k: str(tuple(v.shape)) for k, v in model.state_dict().items()}
    expected = reference_keys(size)
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == PARAMS[size]


def test_cpe_and_crpe_are_shared_like_the_checkpoint():
    enc = mpvit_tiny().mhca_stages[2].mhca_blks[1]
    for layer in enc.MHCA_layers:
        assert layer.cpe is enc.cpe and layer.crpe is enc.crpe and layer.factoratt_crpe.crpe is enc.crpe


@pytest.mark.parametrize("size", SIZES)
def test_dense_features_shapes_and_strides(size):
    model = SIZES[size]().eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 96))
    e = EMBED[size]
    assert [tuple(f.shape) for f in feats] == [
        (1, e[1], 16, 24), (1, e[2], 8, 12), (1, e[3], 4, 6), (1, e[3], 2, 3)]


@pytest.mark.parametrize("hw", [(97, 75), (33, 29), (1, 1)])
def test_odd_input_sizes(hw):
    model = mpvit_tiny(num_classes=7).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, *hw))
        logits = model(torch.randn(2, 3, *hw))
    h, w = hw
    for f in feats:
        h, w = (h + 1) // 2, (w + 1) // 2  # each stride-2 conv with padding 1
        if f is feats[0]:
            h, w = (h + 1) // 2, (w + 1) // 2  # the stem has two
        assert f.shape[-2:] == (h, w)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_in_chans_and_bad_inputs():
    model = mpvit_tiny(num_classes=3, in_chans=1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match=r"H, W >= 1"):  # rather than the stem conv's RuntimeError
        model(torch.randn(1, 1, 0, 32))
    with pytest.raises(TypeError, match="Tensor"):
        model([[1.0]])
    with pytest.raises(ValueError, match="drop_path_rate"):
        mpvit_tiny(drop_path_rate=1.5)


@pytest.mark.parametrize("wrap", ["model", "bare"])
def test_checkpoint_round_trip(tmp_path, wrap):
    src = randomize_bn(mpvit_tiny()).eval()
    state = src.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state} if wrap == "model" else state, path)
    dst = load_checkpoint(mpvit_tiny(), path).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_checkpoint_errors_list_the_keys(tmp_path):
    state = mpvit_tiny().state_dict()
    state.pop("cls_head.cls.bias")
    state["extra.weight"] = torch.zeros(1)
    state["stem.0.conv.weight"] = torch.zeros(1, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(mpvit_tiny(), path)
    msg = str(err.value)
    assert "missing (1): cls_head.cls.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "stem.0.conv.weight" in msg and "mis-shaped" in msg
    with pytest.raises(ValueError, match="mis-shaped"):  # shapes are checked even when not strict
        load_checkpoint(mpvit_tiny(), path, strict=False)
    torch.save({"model": [1, 2]}, path)
    with pytest.raises(ValueError, match="not an MPViT checkpoint"):
        load_checkpoint(mpvit_tiny(), path)


def test_checkpoint_already_loaded():
    src = randomize_bn(mpvit_tiny())
    for ckpt in (src.state_dict(), {"model": src.state_dict()}, {"state_dict": src.state_dict(), "epoch": 3}):
        dst = load_checkpoint(mpvit_tiny(), ckpt)
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
    with pytest.raises(TypeError, match="path must be"):
        load_checkpoint(mpvit_tiny(), [1, 2])
    with pytest.raises(ValueError, match="not an MPViT checkpoint"):
        load_checkpoint(mpvit_tiny(), {"model": {"a": 1}})


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_kernels_on_equal_kernels_off(memory_format):
    model = randomize_bn(mpvit_tiny()).eval()
    x = torch.randn(2, 3, 64, 56).contiguous(memory_format=memory_format)
    with torch.no_grad(), RecordOps() as rec:
        on = model(x)
        with mpvit_kernels.use_backend("reference"):
            off = model(x)
    if mpvit_kernels.extension_available():
        # what auto runs on a CPU: every eval BatchNorm folded away (the stem's two and the 1x1
        # convs' into their weights, InvRes's into its depthwise op), every block's CPE one
        # depthwise op and its attention one op (the C++ twins)
        num_blocks = sum(type(m).__name__ == "MHCABlock" for m in model.modules())
        num_embeds = sum(isinstance(m, mpvit_kernels.DWConv2dBN) for m in model.modules())
        assert not [n for n in rec.names if "batch_norm" in n or n == "mpvit_kernels.affine_hswish"], rec.names
        assert rec.names.count("mpvit_kernels.depthwise") == 4 + num_blocks + num_embeds
        assert rec.names.count("mpvit_kernels.factor_attention") == num_blocks
    torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_whole_model_through_the_kernels_equals_kernels_off():
    """Eval logits with every fused op on equal kernels off. The same forward is channels-last
    without copies: no clone/copy/contiguous/cat dispatched but the one that makes the NCHW
    3-channel input NHWC, and every activation a conv or fused op receives is a channels-last map
    or unit-channel-stride tokens, so no op converts a layout inside either. On CPU the attention
    takes its C++ twin here (the interpreted Triton attention costs most of a minute over the
    model's 23 blocks; test_factor_attention runs it at the model's head widths). The token
    Linears run their Triton kernels (interpreted) here."""
    from torch.utils._pytree import tree_leaves

    twin = KERNEL_DEVICE == "cpu" and mpvit_kernels.extension_available()
    model = randomize_bn(mpvit_tiny(num_classes=10)).eval().to(KERNEL_DEVICE)
    x = torch.randn(1, 3, 24, 20, device=KERNEL_DEVICE)
    with torch.no_grad():
        with mpvit_kernels.use_backend("cuda" if twin else "auto", ops=["factor_attention"]), RecordOps() as rec:
            on = model(x)
        with mpvit_kernels.use_backend("reference"):
            off = model(x)
    attention = "mpvit_kernels.factor_attention" if twin else "mpvit_kernels.factor_attention_fwd"
    assert rec.names.count(attention) == 23  # every block of every path
    assert rec.names.count("mpvit_kernels.dwconv_bn") == 11  # every patch embedding of every stage
    assert rec.names.count("mpvit_kernels.gli_projection") == 12  # every stage's aggregate and InvRes 1x1s
    # norm1 -> qkv of every block; the rest of the block in one op where C <= 128 (stages 1 and 2:
    # 2 + 6 blocks), else residual_layernorm and fc1 -> GELU
    assert rec.names.count("mpvit_kernels.linear") == 23 + 15
    assert rec.names.count("mpvit_kernels.linear_proj_mlp") == 8
    torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-4)
    assert rec.names.count("aten.clone") == 1  # the input
    assert not {"aten.copy_", "aten._to_copy", "aten.contiguous", "aten.cat", "aten.constant_pad_nd"} & set(rec.names)
    for name, args in rec.calls:
        if name.startswith("mpvit_kernels") or name == "aten.convolution":
            # a conv's activation; its weight may be a stem weight with the BatchNorm folded in
            for t in tree_leaves(args[:1] if name == "aten.convolution" else args):
                if isinstance(t, torch.Tensor) and not t.requires_grad and t.dim() == 4 and t.shape[1] > 3:
                    assert t.is_contiguous(memory_format=torch.channels_last), (name, tuple(t.shape), t.stride())
                if isinstance(t, torch.Tensor) and t.dim() == 3:
                    assert t.stride(-1) == 1, (name, tuple(t.shape), t.stride())


@pytest.mark.slow
@pytest.mark.skipif(not BF16_KERNELS, reason=NO_BF16_KERNELS)
def test_whole_model_through_the_kernels_under_bf16_autocast():
    """The configuration of the speed goals, bf16 autocast over fp32 parameters, through every
    fused op (the weights cast once per version, the activations bf16): eval logits within twice
    eager autocast's error against the fp64 model. On CPU the Triton kernels compute bf16 as a
    GPU does (tests/interpreter_numerics.py) and the attention takes its C++ twin, as above."""
    twin = KERNEL_DEVICE == "cpu" and mpvit_kernels.extension_available()
    model = randomize_bn(mpvit_tiny(num_classes=10)).eval().to(KERNEL_DEVICE)
    x = torch.randn(1, 3, 24, 20, device=KERNEL_DEVICE)
    with torch.no_grad():
        with mpvit_kernels.use_backend("reference"):
            want = copy.deepcopy(model).double()(x.double())
        with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
            with mpvit_kernels.use_backend("cuda" if twin else "auto", ops=["factor_attention"]), RecordOps() as rec:
                on = model(x)
            with mpvit_kernels.use_backend("reference"):
                off = model(x)
    assert on.dtype == off.dtype == torch.bfloat16
    for op, calls in (("dwconv_bn", 11), ("gli_projection", 12), ("linear", 38), ("linear_proj_mlp", 8),
                      ("residual_layernorm_fwd", 15)):
        assert rec.names.count(f"mpvit_kernels.{op}") == calls, op
    assert normwise_error(on, want) <= 2 * normwise_error(off, want) + 1e-3


def test_cpu_inference_runs_the_encoders_over_slices_of_the_batch(monkeypatch):
    """Inference on a CPU: an encoder whose qkv would pass SLICE_BYTES runs over slices of the
    batch (each slice's blocks see fewer images), with the very same result; not where autograd
    records a graph."""
    import mpvit_kernels.models.mpvit as mpvit

    model = randomize_bn(mpvit_tiny(num_classes=10)).eval()
    x = torch.randn(5, 3, 40, 36)
    batches = []
    for m in model.modules():
        if isinstance(m, mpvit.MHCABlock):
            m.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    with torch.no_grad():
        whole = model(x)
        assert set(batches) == {5}
        monkeypatch.setattr(mpvit, "SLICE_BYTES", 3 * 64 * 10 * 9 * 4 * 2)  # stage 1: 2 images a slice
        batches.clear()
        sliced = model(x)
    assert torch.equal(sliced, whole)
    assert {1, 2} <= set(batches)  # stage 1's 5 images in slices of 2, 2, 1 (stage 2 in 3, 2)
    batches.clear()
    model(x)
    assert set(batches) == {5}


def test_cpu_inference_slices_the_batch_under_torch_compile_fullgraph(monkeypatch):
    """An encoder's slices are traced too (one graph, fullgraph): the same values as eager's."""
    import mpvit_kernels.models.mpvit as mpvit

    torch._dynamo.reset()
    encoder = mpvit_tiny().mhca_stages[0].mhca_blks[0].eval()
    x = torch.randn(3, 64, 10, 9).to(memory_format=torch.channels_last)
    cats = []

    def count_cats(gm, example_inputs):  # concats along the batch
        cats.append(sum(node.target is torch.cat and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) == 0
                        for node in gm.graph.nodes))
        return gm.forward

    with torch.no_grad(), mpvit_kernels.use_backend("reference"):
        whole = encoder(x)
        monkeypatch.setattr(mpvit, "SLICE_BYTES", 3 * 64 * 10 * 9 * 4 * 2)  # 2 images a slice
        got = torch.compile(encoder, fullgraph=True, backend=count_cats)(x)
    assert cats == [1]  # slices of 2 and 1 images
    torch.testing.assert_close(got, whole)


def test_training_step_with_drop_path():
    model = mpvit_tiny(num_classes=5, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert int(model.stem[0].bn.num_batches_tracked) == 1


@pytest.mark.slow
def test_whole_model_through_the_kernels_training_step_of_the_gemm_ops():
    """A training step with the patch embeddings' fused dwconv_bn and the fused GLI projections
    (batch statistics in their epilogues, their backward kernels) equals kernels off: every grad, running statistics. In fp64:
    at this input stage 4's BatchNorms see 2 values per channel, which amplifies any rounding
    (fp32 grads differ by 3e-3 of their size either way). Attention takes the reference (its
    interpreted backward would cost minutes here), and so does ``linear`` (test_linear checks its
    training step in the block)."""
    torch.manual_seed(0)
    on = randomize_bn(shallow_tiny(num_classes=5)).train().to(KERNEL_DEVICE, torch.float64)
    off = copy.deepcopy(on)
    x, target = torch.randn(2, 3, 24, 28, device=KERNEL_DEVICE, dtype=torch.float64), torch.tensor([1, 3], device=KERNEL_DEVICE)
    with mpvit_kernels.use_backend("reference", ops=["factor_attention", "linear"]), RecordOps() as rec:
        torch.nn.functional.cross_entropy(on(x), target).backward()
    assert rec.names.count("mpvit_kernels.dwconv_bn_train") == 11
    assert rec.names.count("mpvit_kernels.gli_projection_train") == 12  # aggregates, InvRes 1x1s
    with mpvit_kernels.use_backend("reference"):
        torch.nn.functional.cross_entropy(off(x), target).backward()
    for (name, a), b in zip(on.named_parameters(), off.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-7, msg=name)
    for (name, a), b in zip(on.named_buffers(), off.buffers()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)


@pytest.mark.slow
def test_activation_checkpointing_of_the_blocks_through_the_kernels_gives_the_grads_of_kernels_off():
    """torch.utils.checkpoint around each encoder block (what segmentation code bases do at high
    resolution to save memory), through the Triton ops: non-reentrant (the block recomputed in
    the backward, its saved tensors checked against the first forward's, so the ops must take the
    same path and save the same tensors both times) and reentrant (the first forward under
    no_grad, where the block runs its inference kernel ``linear_proj_mlp``; the backward's
    recompute records the training ops). The grads are those of kernels off, not checkpointed."""
    from torch.utils.checkpoint import checkpoint

    from mpvit_kernels.models.mpvit import MHCAEncoder

    torch.manual_seed(0)
    ckpt = MHCAEncoder(16, 2, 2.0, [0.0, 0.0]).train().to(KERNEL_DEVICE, torch.float64)
    plain = copy.deepcopy(ckpt)
    for layer, reentrant in zip(ckpt.MHCA_layers, (False, True)):
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=reentrant)
    # one image: the attention's kernels take a program per (image, head), the interpreted time
    x = torch.randn(1, 16, 3, 4, device=KERNEL_DEVICE, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn_like(x)
    grads = []
    for model, backend in ((ckpt, "auto"), (plain, "reference")):
        inp = x.clone().requires_grad_()
        with mpvit_kernels.use_backend(backend), RecordOps() as rec:
            (model(inp) * g).sum().backward()
        grads.append([inp.grad] + [p.grad for p in model.parameters()])
        if model is ckpt:  # two blocks, each run twice forward and once backward
            assert rec.names.count("mpvit_kernels.factor_attention_fwd") == 4
            assert rec.names.count("mpvit_kernels.linear_proj_mlp") == 1
            assert rec.names.count("mpvit_kernels.factor_attention_bwd") == 2
    for (name, _), a, b in zip([("x", None), *ckpt.named_parameters()], *grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def test_an_encoder_through_the_kernels_packs_its_shared_crpe_once_a_training_forward():
    """The layers of an encoder share one CRPE: in training it is packed once a forward (one
    gather) for all of them, and in the backward taken apart once (one gather), autograd summing
    the layers' grads of the packing; inference reads the cached packing. On meta tensors, where
    the ops run their fakes."""
    from mpvit_kernels.models.mpvit import MHCAEncoder

    encoder = MHCAEncoder(16, 3, 2.0, [0.0] * 3).to(device="meta").train()
    x = torch.empty(2, 16, 3, 4, device="meta").contiguous(memory_format=torch.channels_last)
    with RecordOps() as forward:
        out = encoder(x)
    with RecordOps() as backward:
        out.sum().backward()
    assert forward.names.count("mpvit_kernels.factor_attention_fwd") == 3
    assert forward.names.count("aten.index_select") == 1 and backward.names.count("aten.index_select") == 1
    assert backward.names.count("mpvit_kernels.factor_attention_bwd") == 3
    with torch.no_grad(), RecordOps() as inference:
        encoder(x)
    assert "aten.index_select" not in inference.names


def test_whole_model_through_the_kernels_training_step_fills_no_zero_grads_for_side_outputs():
    """The fused ops' side outputs (the attention's S, lse and CRPE packing, the training
    BatchNorms' pre-BN map and statistics, residual_layernorm's mean and rstd) take no grads:
    autograd would otherwise fill a zero tensor for each, a launch apiece (183 a training step of
    MPViT-S). Counted on meta tensors, where every fused op runs its registered fake and autograd."""
    model = mpvit_tiny(num_classes=5).to(memory_format=torch.channels_last).to(device="meta").train()
    loss = torch.nn.functional.cross_entropy(model(torch.empty(2, 3, 64, 64, device="meta")),
                                             torch.zeros(2, dtype=torch.long, device="meta"))
    with RecordOps() as rec:
        loss.backward()
    for op in ("factor_attention_bwd", "residual_layernorm_bwd", "affine_hswish_batch_backward", "linear_mlp_grad"):
        assert f"mpvit_kernels.{op}" in rec.names
    assert rec.names.count("aten.zeros") == 0, rec.names
    # (fc1's GELU grad in the GEMM that recomputes its input, the hidden's grad from fc2's in registers)
    assert not {"aten.gelu_backward", "mpvit_kernels.linear_gelu_grad"} & set(rec.names)


def test_eval_batchnorm_folds_are_cached_until_a_statistic_or_parameter_changes():
    model = randomize_bn(mpvit_tiny(num_classes=4)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
        with RecordOps() as rec:
            again = model(x)
        assert "aten.rsqrt" not in rec.names  # no BatchNorm folded again
        torch.testing.assert_close(again, first)
        bn = model.mhca_stages[0].aggregate.bn
        bn.running_var.mul_(4.0)  # an in-place change bumps the version: that BN folds again
        with RecordOps() as rec:
            changed = model(x)
        assert rec.names.count("aten.rsqrt") == 1
        assert not torch.allclose(changed, first)
        bn.running_var.div_(4.0)
        torch.testing.assert_close(model(x), first)
        bn.running_var.data.mul_(4.0)  # .data bumps no version: the cache cannot see it...
        mpvit_kernels.clear_caches()  # ...so it is dropped by hand
        torch.testing.assert_close(model(x), changed)
        bn.running_var.data.div_(4.0)
        mpvit_kernels.clear_caches()
        with torch.inference_mode():
            torch.testing.assert_close(model(x), first)
        double = model.double()(x.double())  # .to() swaps the tensors' data: folds again, in fp64
        torch.testing.assert_close(double.float(), first, atol=1e-4, rtol=1e-4)


def test_eval_after_a_training_forward_folds_the_new_running_statistics():
    """nn.BatchNorm2d's training forward (the stem's k x k convs, ResBlock's norm) updates the
    running statistics inside ATen's kernel, which bumps no version counter: the fold cache
    follows num_batches_tracked too, or eval after a training epoch read the stale folds."""
    model = randomize_bn(mpvit_tiny(num_classes=4)).eval()
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        model(x)  # folds cached
        model.train()(x)  # running statistics updated
        got = model.eval()(x)
        fresh = copy.deepcopy(model)(x)  # no cached fold
    torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_torch_jit_trace_runs_and_follows_the_weights(monkeypatch):
    """torch.jit.trace (deprecated by PyTorch, still in deployment tool chains): the sizes it hands
    the modules are 0-dim tensors, taken as the constants a trace keeps; BatchNorm folds are traced
    from the parameters, not from the cache, so the traced model follows in-place weight changes
    (which also lets torch.jit.trace's own check, a second trace compared, pass: left off here
    for its 5 s); another batch runs, another height and width are refused."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # what auto runs on CPU tensors: the C++ twins
    model = randomize_bn(mpvit_tiny(num_classes=5)).eval()
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad(), mpvit_kernels.use_backend("auto"):
        model(x)  # the folds cached first: a trace must not take them as constants
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))
        for p in model.parameters():
            p.mul_(1.1)
        for b in model.buffers():
            if b.is_floating_point():
                b.mul_(1.2)
        x3 = torch.randn(3, 3, 40, 36)
        torch.testing.assert_close(traced(x3), model(x3))
        with pytest.raises(RuntimeError, match="expanded size"):  # as many tokens, on another grid
            traced(torch.randn(2, 3, 36, 40))


def test_frozen_batchnorm_finetuning_gets_affine_grads():
    # Detection fine-tuning: BN in eval (running stats), its weight and bias still trained.
    model = randomize_bn(mpvit_tiny(num_classes=4)).eval()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    bn = model.stem[0].bn
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert bn.bias.grad is not None and bn.bias.grad.abs().sum() > 0


def test_norm_eval_keeps_every_batchnorm_in_eval_while_training():
    model = randomize_bn(mpvit_tiny(num_classes=4, norm_eval=True)).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    assert model.training and model.mhca_stages[0].mhca_blks[0].MHCA_layers[0].norm1.training
    stats = copy.deepcopy([(bn.running_mean, bn.running_var) for bn in bns])
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    for bn, (mean, var) in zip(bns, stats):  # used, never updated
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert bn.weight.grad is not None and bn.bias.grad is not None
    plain = copy.deepcopy(model)
    plain.norm_eval = False
    plain.train()
    for m in plain.modules():  # what norm_eval means: the same model with its BatchNorms in eval
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    torch.testing.assert_close(plain(x), out)
    assert not model.eval().training and not any(bn.training for bn in bns)


@pytest.mark.parametrize("frozen", [0, 2])
def test_frozen_stages_take_no_grads_and_stay_in_eval(frozen):
    model = randomize_bn(mpvit_tiny(num_classes=4, frozen_stages=frozen)).train()
    frozen_modules = [model.stem, *model.patch_embed_stages[:frozen], *model.mhca_stages[:frozen]]
    live = [*model.patch_embed_stages[frozen:], *model.mhca_stages[frozen:], model.cls_head]
    frozen_params = {id(p) for m in frozen_modules for p in m.parameters()}
    assert all(not m.training for f in frozen_modules for m in f.modules())
    assert all(m.training for f in live for m in f.modules())
    buffers = copy.deepcopy([b for m in frozen_modules for b in m.buffers()])
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3])).backward()
    for p in model.parameters():
        if id(p) in frozen_params:
            assert not p.requires_grad and p.grad is None
        else:
            assert p.requires_grad and p.grad is not None
    assert all(torch.equal(a, b) for a, b in zip([b for m in frozen_modules for b in m.buffers()], buffers))
    assert set(model.state_dict()) == set(mpvit_tiny(num_classes=4).state_dict())
    with pytest.raises(ValueError, match="frozen_stages"):
        mpvit_tiny(frozen_stages=5)


def test_a_model_made_under_inference_mode_runs(monkeypatch):
    """Tensors made under torch.inference_mode (a model built or converted there) have no version
    counter: the caches of BatchNorm folds, CRPE packings and weight casts compute their values
    afresh for them (they raised before). What auto runs on CPU tensors: the C++ twins."""
    from mpvit_kernels import backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backend, "_warned", set())
    backend.clear_caches()
    with torch.inference_mode(), mpvit_kernels.use_backend("auto"):
        model = randomize_bn(mpvit_tiny(num_classes=5)).eval()
        x = torch.randn(1, 3, 32, 28)
        with pytest.warns(RuntimeWarning, match="recomputed at every call"):
            got = model(x)
        assert not backend._DERIVED
        with mpvit_kernels.use_backend("reference"):
            want = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_whole_model_through_the_kernels_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = randomize_bn(shallow_tiny(num_classes=10)).eval().to(KERNEL_DEVICE)
    x = torch.randn(1, 3, 20, 24, device=KERNEL_DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # linear takes the reference and, on a CPU, the attention its C++ twin: their Triton kernels,
    # interpreted inside a compiled graph under pytest, cost 20 s and 15 s more here
    # (test_linear and test_factor_attention compile the ops and modules themselves; the eager
    # run above checks linear's in the model)
    twin = KERNEL_DEVICE == "cpu" and mpvit_kernels.extension_available()
    with torch.no_grad(), mpvit_kernels.use_backend("reference", ops=["linear"]), \
            mpvit_kernels.use_backend("cuda" if twin else "auto", ops=["factor_attention"]):
        got = compiled(x)
    with torch.no_grad(), mpvit_kernels.use_backend("reference"):
        want = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["kernels", "cpu-auto"])
def test_whole_model_through_the_kernels_exports_with_a_dynamic_batch_and_size(path, monkeypatch, tmp_path):
    """Deployment through torch.export: the program of the fused model, exported under no_grad
    (the inference kernels) with a dynamic batch, height and width, keeps our ops whole and gives
    the eager logits at another batch and size; a program of ours saves and loads (in a process
    that imported mpvit_kernels, which registers the ops). "kernels": the Triton ops (on CPU the export alone, the
    attention on its C++ twin there as in the test above; a GPU runs the program too);
    "cpu-auto": what auto runs on CPU tensors, the C++ twins and oneDNN, whose size-based choices
    (batch slices, 1x1 conv vs GEMM) must not guard a symbolic size."""
    import collections

    device = KERNEL_DEVICE
    twin = device == "cpu" and mpvit_kernels.extension_available()
    attention_backend = "cuda" if twin else "auto"
    if path == "cpu-auto":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        device, attention_backend = "cpu", "auto"
    torch.manual_seed(0)
    model = randomize_bn(shallow_tiny(num_classes=10)).eval().to(device)
    x = torch.randn(3, 3, 45, 34, device=device)
    # the batch's range needs a bound: the ops' 32-bit limits (pixels per call) bound it anyway;
    # sides from 33, where the last stage's map (a 32nd of the input) is at least 2 wide: PyTorch
    # decides a tensor's contiguity differently for a dim of 1
    batch, height, width = (torch.export.Dim(n, min=m, max=M) for n, m, M in
                            (("batch", 1, 256), ("height", 33, 4096), ("width", 33, 4096)))
    dims, example = {0: batch, 2: height, 3: width}, x[:2, :, :40, :33].contiguous()
    if torch.torch_version.TorchVersion(torch.__version__) < "2.14":
        # torch 2.13 and 2.11 cannot prove the guards their own stride reasoning adds for
        # channels-last maps of a symbolic size (strides such as Min(64, 64 * W)): the batch alone
        # is dynamic there
        dims, example = {0: batch}, x[:2]
    with torch.no_grad(), mpvit_kernels.use_backend(attention_backend, ops=["factor_attention"]):
        program = torch.export.export(model, (example,), dynamic_shapes={"x": dims})
    def our_ops(program):
        return collections.Counter(str(n.target).removesuffix(".default") for n in program.graph.nodes
                                   if n.op == "call_function" and str(n.target).startswith("mpvit_kernels."))

    ours = our_ops(program)
    attention = "mpvit_kernels.factor_attention" if twin or path == "cpu-auto" else "mpvit_kernels.factor_attention_fwd"
    assert ours[attention] == 14 and ours["mpvit_kernels.depthwise"] > 0, ours
    if path == "kernels":
        assert ours["mpvit_kernels.dwconv_bn"] == 11 and ours["mpvit_kernels.gli_projection"] == 12, ours
        if device == "cpu":  # running it interpreted costs seconds more; its fakes are opcheck'd per op
            return
    with torch.no_grad(), mpvit_kernels.use_backend("reference"):
        want = model(x)
    torch.testing.assert_close(program.module()(x), want, atol=1e-4, rtol=1e-4)  # 3 x 45 x 34, exported at 2 x 40 x 33
    if path == "cpu-auto":
        # The file round trip, on stage 1's program (patch embedding, InvRes, encoders, GLI),
        # which holds each op of ours that the whole one does: a load is mostly sympy parsing the
        # symbolic shapes, 10 s save and load for the whole model against 1.3 for the stage.
        stage = torch.nn.Sequential(model.patch_embed_stages[0], model.mhca_stages[0]).eval()
        with torch.no_grad():
            example, x = (model.stem(t.contiguous(memory_format=torch.channels_last)) for t in (example, x))
            if 2 in dims:
                dims = {0: batch, 2: torch.export.Dim("rows", min=2, max=1024), 3: torch.export.Dim("cols", min=2, max=1024)}
            program = torch.export.export(stage, (example,), dynamic_shapes={"input": dims})
        assert our_ops(program).keys() == ours.keys()
        torch.export.save(program, tmp_path / "stage.pt2")
        loaded = torch.export.load(tmp_path / "stage.pt2").module()
        with torch.no_grad(), mpvit_kernels.use_backend("reference"):
            want = stage(x)
        torch.testing.assert_close(loaded(x), want, atol=1e-4, rtol=1e-4)  # 3 x 64 x 12 x 9, exported at 2 x 64 x 10 x 9


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("exporter,path", [("torch.export", "kernels"), ("torchscript", "cpu-auto")])
def test_onnx_export_of_a_stage_through_the_kernels_gives_the_reference_in_onnxruntime(exporter, path, monkeypatch):
    """Deployment through ONNX (ONNX Runtime, TensorRT): torch.onnx.export of the model with the
    kernels on, by either exporter (torch.export's, the default since torch 2.9, or the
    TorchScript one, deprecated there). ONNX has no kernels of ours, so while it exports every op
    takes its reference; the file holds standard ONNX ops only, and ONNX Runtime gives the
    kernels-off output at another batch than the exported one. "kernels": the Triton ops (a
    GPU's, interpreted here), "cpu-auto": the C++ twins auto runs on CPU tensors. MPViT-T's stem,
    first patch embedding and first MHCA stage: most op families in seconds of export (the whole
    model, 40-46 s with a dynamic batch and size, checked by hand: README)."""
    import io

    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.export's exporter translates with it
    if path == "cpu-auto":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    model = randomize_bn(shallow_tiny(num_classes=10)).eval()
    first_stage = torch.nn.Sequential(model.stem, model.patch_embed_stages[0], model.mhca_stages[0]).eval()
    x = torch.randn(2, 3, 37, 34)
    # what the kernels on run outside an export (the Triton ops' on meta tensors: no interpreting)
    with torch.no_grad(), RecordOps() as rec:
        if path == "kernels":
            copy.deepcopy(first_stage).to("meta")(x.to("meta"))
        else:
            first_stage(x)
    ours = {name.removeprefix("mpvit_kernels.") for name in rec.names if name.startswith("mpvit_kernels.")}
    assert {"depthwise", "dwconv_bn", "gli_projection", "linear", "factor_attention_fwd"} <= ours \
        if path == "kernels" else {"depthwise", "factor_attention"} <= ours, ours
    with torch.no_grad():
        if exporter == "torch.export":
            proto = torch.onnx.export(first_stage, (x,), dynamo=True, verbose=False,
                                      dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(first_stage, (x,), f, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
            proto = onnx.load_from_string(f.getvalue())
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # conftest's share of the cores, not all
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 37, 34)
    with torch.no_grad(), mpvit_kernels.use_backend("reference"):
        want = first_stage(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
