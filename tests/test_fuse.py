"""fuse(): an MPViT built by other code, with the public module names and structure (written
here from the model description, not imported), runs through our fused modules in place,
sharing its very Parameters and buffers."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import fuse
from mpvit_kernels.models.mpvit import MHCAStage, PatchEmbedStage
from tests.utils import RecordOps

# The Triton families run their reference here (interpreting them costs seconds per call, and
# test_mpvit runs the whole model through them); depthwise and affine_hswish run their C++ twins.
TRITON = ["factor_attention", "dwconv_bn", "gli_projection"]


class Conv2d_BN(nn.Module):
    def __init__(self, cin, cout, k=1, stride=1, act_layer=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DWConv2d_BN(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.dwconv = nn.Conv2d(cin, cin, k, stride, (k - 1) // 2, groups=cin, bias=False)
        self.pwconv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.bn(self.pwconv(self.dwconv(x))))


class DWCPatchEmbed(nn.Module):
    def __init__(self, dim, stride):
        super().__init__()
        self.patch_conv = DWConv2d_BN(dim, dim, 3, stride)

    def forward(self, x):
        return self.patch_conv(x)


class Patch_Embed_stage(nn.Module):
    def __init__(self, dim, num_path, is_pool):
        super().__init__()
        self.patch_embeds = nn.ModuleList(DWCPatchEmbed(dim, 2 if is_pool and i == 0 else 1) for i in range(num_path))

    def forward(self, x):
        outs = []
        for embed in self.patch_embeds:
            x = embed(x)
            outs.append(x)
        return outs


class ConvPosEnc(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, size):
        B, N, C = x.shape
        img = x.transpose(1, 2).reshape(B, C, *size)
        return (self.proj(img) + img).flatten(2).transpose(1, 2)


class ConvRelPosEnc(nn.Module):
    def __init__(self, Ch, window={3: 2, 5: 3, 7: 3}):
        super().__init__()
        self.splits = [h * Ch for h in window.values()]
        self.conv_list = nn.ModuleList(nn.Conv2d(c, c, k, 1, k // 2, groups=c) for k, c in zip(window, self.splits))

    def forward(self, q, v, size):
        B, h, N, Ch = q.shape
        img = v.transpose(-1, -2).reshape(B, h * Ch, *size)
        conv = torch.cat([m(x) for m, x in zip(self.conv_list, torch.split(img, self.splits, dim=1))], dim=1)
        return q * conv.reshape(B, h, Ch, N).transpose(-1, -2)


class FactorAtt_ConvRelPosEnc(nn.Module):
    def __init__(self, dim, num_heads, shared_crpe):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.crpe = shared_crpe

    def forward(self, x, size):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        ctx = k.softmax(dim=2).transpose(-1, -2) @ v
        out = self.scale * (q @ ctx) + self.crpe(q, v, size)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DropPath(nn.Module):
    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x  # the tests run it at rate 0


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MHCABlock(nn.Module):
    def __init__(self, dim, mlp_ratio, shared_cpe, shared_crpe):
        super().__init__()
        self.cpe, self.crpe = shared_cpe, shared_crpe
        self.factoratt_crpe = FactorAtt_ConvRelPosEnc(dim, 8, shared_crpe)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(0.0)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, size):
        x = self.cpe(x, size)
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MHCAEncoder(nn.Module):
    def __init__(self, dim, num_layers, mlp_ratio):
        super().__init__()
        self.cpe, self.crpe = ConvPosEnc(dim), ConvRelPosEnc(dim // 8)
        self.MHCA_layers = nn.ModuleList(MHCABlock(dim, mlp_ratio, self.cpe, self.crpe) for _ in range(num_layers))

    def forward(self, x, size):
        for layer in self.MHCA_layers:
            x = layer(x, size)
        B, N, C = x.shape
        return x.transpose(1, 2).reshape(B, C, *size)


class ResBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv1 = Conv2d_BN(dim, dim, act_layer=nn.Hardswish)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.norm, self.act = nn.BatchNorm2d(dim), nn.Hardswish()
        self.conv2 = Conv2d_BN(dim, dim)

    def forward(self, x):
        return x + self.conv2(self.act(self.norm(self.dwconv(self.conv1(x)))))


class MHCA_stage(nn.Module):
    def __init__(self, dim, out_dim, num_layers, mlp_ratio, num_path):
        super().__init__()
        self.mhca_blks = nn.ModuleList(MHCAEncoder(dim, num_layers, mlp_ratio) for _ in range(num_path))
        self.InvRes = ResBlock(dim)
        self.aggregate = Conv2d_BN(dim * (num_path + 1), out_dim, act_layer=nn.Hardswish)

    def forward(self, inputs):
        outs = [self.InvRes(inputs[0])]
        for x, enc in zip(inputs, self.mhca_blks):
            B, C, H, W = x.shape
            outs.append(enc(x.flatten(2).transpose(1, 2), (H, W)))
        return self.aggregate(torch.cat(outs, dim=1))


class PublicStyleMPViT(nn.Module):
    """MPViT-T with the public names: what fuse() meets in the wild."""

    def __init__(self, num_classes=5, dims=(64, 96, 176, 216), layers=(1, 2, 4, 1), paths=(2, 3, 3, 3), mlp_ratio=2):
        super().__init__()
        self.stem = nn.Sequential(Conv2d_BN(3, dims[0] // 2, 3, 2, nn.Hardswish),
                                  Conv2d_BN(dims[0] // 2, dims[0], 3, 2, nn.Hardswish))
        self.patch_embed_stages = nn.ModuleList(Patch_Embed_stage(dims[i], paths[i], i > 0) for i in range(4))
        self.mhca_stages = nn.ModuleList(MHCA_stage(dims[i], dims[min(i + 1, 3)], layers[i], mlp_ratio, paths[i])
                                         for i in range(4))
        self.cls_head = nn.Linear(dims[3], num_classes)

    def forward(self, x):
        x = self.stem(x)
        for embed, stage in zip(self.patch_embed_stages, self.mhca_stages):
            x = stage(embed(x))
        return self.cls_head(x.mean((2, 3)))


def randomized():
    torch.manual_seed(0)
    model = PublicStyleMPViT()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def test_fuse_replaces_every_stage_in_place_sharing_the_tensors():
    model = randomized().eval()
    x = torch.randn(2, 3, 33, 29)
    with torch.no_grad():
        want = model(x)
    tensors = model.state_dict(keep_vars=True)
    assert fuse(model) is model
    assert all(isinstance(s, PatchEmbedStage) for s in model.patch_embed_stages)
    assert all(isinstance(s, MHCAStage) for s in model.mhca_stages)
    assert all(isinstance(b, mpvit_kernels.Conv2dBN) for b in model.stem)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys() and all(after[k] is tensors[k] for k in tensors)
    with mpvit_kernels.use_backend("reference", ops=TRITON), torch.no_grad(), RecordOps() as rec:
        got = model(x)
    assert "mpvit_kernels.depthwise" in rec.names and "mpvit_kernels.affine_hswish" in rec.names
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    modules = list(model.modules())
    assert fuse(model) is model and list(model.modules()) == modules  # a second call changes nothing


def test_fused_training_step_matches_the_original():
    model = randomized().train()
    original = copy.deepcopy(model)
    fuse(model)
    x, target = torch.randn(2, 3, 33, 29), torch.tensor([1, 3])
    with mpvit_kernels.use_backend("reference", ops=TRITON):
        F.cross_entropy(model(x), target).backward()
    F.cross_entropy(original(x), target).backward()
    theirs = dict(original.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-4, rtol=1e-3, msg=name)
    for (name, a), b in zip(model.named_buffers(), original.buffers()):
        torch.testing.assert_close(a, b, msg=name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the optimiser sees the same Parameters
    before = model.mhca_stages[0].aggregate.conv.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.mhca_stages[0].aggregate.conv.weight, before)


def test_unknown_modules_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fuse(model) is model and isinstance(model[0], nn.Conv2d)
    odd = randomized()
    odd.mhca_stages[1].aggregate = nn.Conv2d(96 * 4, 176, 1)  # not a Conv2d_BN: that stage stays
    fuse(odd)
    assert isinstance(odd.mhca_stages[0], MHCAStage) and not isinstance(odd.mhca_stages[1], MHCAStage)
