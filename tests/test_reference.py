"""The reference ops against straightforward eager compositions of torch.nn modules and loops."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpvit_kernels import reference
from tests.utils import assert_close


def random_bn(C, dtype=torch.float64):
    bn = nn.BatchNorm2d(C).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


@pytest.mark.parametrize("hswish", [True, False])
def test_affine_hswish_is_eval_batchnorm_then_hardswish(hswish):
    bn = random_bn(6)
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    scale, shift = reference.fold_bn(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    expected = F.hardswish(bn(x)) if hswish else bn(x)
    assert_close(reference.affine_hswish(x, scale, shift, hswish), expected)


def test_affine_hswish_keeps_dtype_and_channels_last():
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = reference.affine_hswish(x, torch.ones(4), torch.zeros(4))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("k, stride", [(3, 1), (3, 2), (5, 1), (7, 1)])
def test_depthwise_conv_is_grouped_conv(k, stride):
    conv = nn.Conv2d(5, 5, k, stride, k // 2, groups=5).double()
    x = torch.randn(2, 5, 11, 8, dtype=torch.float64)
    assert_close(reference.depthwise_conv(x, conv.weight, conv.bias, stride), conv(x))


def test_cpe_adds_the_identity():
    conv = nn.Conv2d(4, 4, 3, 1, 1, groups=4).double()
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    assert_close(reference.cpe(x, conv.weight, conv.bias), x + conv(x))


@pytest.mark.parametrize("stride", [1, 2])
def test_dwconv_bn_is_the_module_chain(stride):
    dw = nn.Conv2d(6, 6, 3, stride, 1, groups=6, bias=False).double()
    pw = nn.Conv2d(6, 10, 1, bias=False).double()
    bn = random_bn(10)
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    scale, shift = reference.fold_bn(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert_close(reference.dwconv_bn(x, dw.weight, pw.weight, scale, shift, stride), F.hardswish(bn(pw(dw(x)))))


def test_gli_projection_is_concat_conv_bn_hswish():
    xs = [torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(3)]
    conv = nn.Conv2d(12, 7, 1, bias=False).double()
    bn = random_bn(7)
    scale, shift = reference.fold_bn(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    assert_close(reference.gli_projection(xs, conv.weight, scale, shift), F.hardswish(bn(conv(torch.cat(xs, 1)))))


def naive_factor_attention(qkv, size, num_heads, scale, weights, biases):
    """Head by head, softmax written out, one conv per head from its window group."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    Ch = C // num_heads
    H, W = size
    head_w = [hw for w in weights for hw in w.split(Ch)]
    head_b = [hb for b in biases for hb in b.split(Ch)]
    out = torch.empty(B, N, C, dtype=qkv.dtype)
    for b in range(B):
        for h in range(num_heads):
            q = qkv[b, :, h * Ch:(h + 1) * Ch]
            k = qkv[b, :, C + h * Ch:C + (h + 1) * Ch]
            v = qkv[b, :, 2 * C + h * Ch:2 * C + (h + 1) * Ch]
            e = torch.exp(k - k.max(dim=0).values)
            a = e / e.sum(dim=0)
            v_img = v.t().reshape(1, Ch, H, W)
            conv = F.conv2d(v_img, head_w[h], head_b[h], padding=head_w[h].shape[-1] // 2, groups=Ch)
            out[b, :, h * Ch:(h + 1) * Ch] = scale * q @ (a.t() @ v) + q * conv.reshape(Ch, N).t()
    return out


@pytest.mark.parametrize("B, H, W, Ch, window", [
    (1, 1, 1, 3, {3: 2, 5: 3, 7: 3}),
    (2, 5, 7, 4, {3: 2, 5: 3, 7: 3}),
    (3, 9, 4, 3, {3: 1, 7: 1}),
    (1, 6, 6, 2, {5: 4}),
])
def test_factor_attention_matches_head_by_head_loop(B, H, W, Ch, window):
    heads = sum(window.values())
    C = heads * Ch
    qkv = torch.randn(B, H * W, 3 * C, dtype=torch.float64)
    weights = [torch.randn(h * Ch, 1, k, k, dtype=torch.float64) for k, h in window.items()]
    biases = [torch.randn(h * Ch, dtype=torch.float64) for h in window.values()]
    scale = Ch ** -0.5
    assert_close(reference.factor_attention(qkv, (H, W), heads, scale, weights, biases),
                 naive_factor_attention(qkv, (H, W), heads, scale, weights, biases))
