"""Reliability: an empty batch (B = 0) through every module gives an empty result of the right
shape, forward and backward, on every backend (no kernel is launched over nothing); a second
derivative through any op is refused with a clear error; a training step is bitwise
reproducible in deterministic mode."""
import copy

import pytest
import torch

import mpvit_kernels
from mpvit_kernels.models import mpvit_tiny

BACKENDS = ["auto", "reference"]  # auto: the Triton kernels (interpreted here) and the C++ twins


def modules():
    torch.manual_seed(0)
    return {
        "FactorAttention": (mpvit_kernels.FactorAttention(16, 8), lambda m, B: m(torch.randn(B, 12, 16), (3, 4)),
                            (12, 16)),
        "ConvPosEnc": (mpvit_kernels.ConvPosEnc(16), lambda m, B: m(torch.randn(B, 12, 16), (3, 4)), (12, 16)),
        "DWConv2dBN": (mpvit_kernels.DWConv2dBN(8, 12, 3, 2), lambda m, B: m(torch.randn(B, 8, 7, 5)), (12, 4, 3)),
        "GLIProjection": (mpvit_kernels.GLIProjection(8, 12, 3),
                          lambda m, B: m([torch.randn(B, 8, 5, 4) for _ in range(3)]), (12, 5, 4)),
        "Conv2dBN 1x1": (mpvit_kernels.Conv2dBN(8, 12, 1, hswish=True), lambda m, B: m(torch.randn(B, 8, 5, 4)),
                         (12, 5, 4)),
        "Conv2dBN 3x3 s2": (mpvit_kernels.Conv2dBN(3, 8, 3, 2, hswish=True), lambda m, B: m(torch.randn(B, 3, 9, 8)),
                            (8, 5, 4)),
        "MPViT-T": (mpvit_tiny(num_classes=5), lambda m, B: m(torch.randn(B, 3, 32, 28)), (5,)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(modules()))
def test_empty_batch_forward_and_backward(name, backend):
    module, run, shape = modules()[name]
    module.eval()  # training BatchNorm refuses an empty batch, as nn.BatchNorm2d does
    with mpvit_kernels.use_backend(backend):
        out = run(module, 0)
        assert tuple(out.shape) == (0, *shape), name
        out.sum().backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is None or (g.shape == p.shape and not g.any()) for g, p in zip(grads, module.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_in_training_keeps_the_statistics_as_batchnorm_does(backend):
    torch.manual_seed(0)
    for module, run in ((mpvit_kernels.DWConv2dBN(8, 12), lambda m: m(torch.randn(0, 8, 7, 5))),
                        (mpvit_kernels.GLIProjection(8, 12, 2), lambda m: m([torch.randn(0, 8, 5, 4)] * 2))):
        module.train()
        with mpvit_kernels.use_backend(backend):
            out = run(module)
            out.sum().backward()
        assert out.shape[0] == 0 and out.shape[1] == 12
        bn = module.bn
        assert torch.equal(bn.running_mean, torch.zeros(12)) and torch.equal(bn.running_var, torch.ones(12))
        assert int(bn.num_batches_tracked) == 1  # counted, as nn.BatchNorm2d counts an empty batch


def op_calls():
    """(name, inputs requiring grad, fn of them) for every family's forward op."""
    from mpvit_kernels import ops

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    pw = torch.randn(12, 8, 1, 1)
    scale, shift = torch.rand(12) + 0.5, torch.randn(12)
    qkv = torch.randn(2, 12, 48, requires_grad=True)
    crpe = [torch.randn(4, 1, 3, 3), torch.randn(12, 1, 5, 5)], [torch.randn(4), torch.randn(12)]
    return [
        ("affine_hswish", x, lambda x: ops.affine_hswish(x, torch.rand(8), torch.randn(8), True)),
        ("depthwise", x, lambda x: ops.depthwise(x, w, b, 1, hswish=True)),
        ("dwconv_bn", x, lambda x: ops.dwconv_bn(x, w, pw, 1, scale, shift, hswish=True)),
        ("dwconv_bn_train", x, lambda x: ops.dwconv_bn_train(x, w, pw, 1, scale, shift, 1e-5, hswish=True)[0]),
        ("gli_projection", x, lambda x: ops.gli_projection([x, x], torch.randn(12, 16), scale, shift, hswish=True)),
        ("factor_attention", qkv, lambda q: ops.factor_attention(q, (3, 4), 4, 0.5, *crpe)),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in op_calls()])
def test_double_backward_is_refused_clearly(case):
    name, x, fn = op_calls()[case]
    (g,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g.square().sum().backward()


def test_training_step_is_bitwise_reproducible_in_deterministic_mode():
    # The C++ twins and the eager ops here; each Triton kernel's backward has its own test.
    from tests.utils import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(mpvit_tiny(num_classes=5)).train()
    x, target = torch.randn(2, 3, 36, 32), torch.tensor([0, 4])
    runs = []
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            m = copy.deepcopy(model)
            with mpvit_kernels.use_backend("reference", ops=["factor_attention", "dwconv_bn", "gli_projection"]):
                torch.nn.functional.cross_entropy(m(x), target).backward()
            runs.append([p.grad for p in m.parameters()] + list(m.buffers()))
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
