"""The eager baseline: MPViT as its public code lays it out (module names, structure and op
sequence, written here in our words from the model description: concat + 1x1 Conv2d_BN for the
GLI, the attention as separate softmax, matmuls, depthwise convs and elementwise ops, NCHW
maps). It is what the speed report and the traffic counts compare against, and what the tests
hand to :func:`mpvit_kernels.fuse`. No mpvit_kernels op runs in it.
"""
import torch
import torch.nn as nn

from mpvit_kernels.models.mpvit import CONFIGS, NUM_PATH


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
        return self.proj(self.attend(self.qkv(x), size))

    def attend(self, qkv, size):
        """The core between the two Linears: (B, N, 3C) -> (B, N, C)."""
        B, N, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        ctx = k.softmax(dim=2).transpose(-1, -2) @ v
        out = self.scale * (q @ ctx) + self.crpe(q, v, size)
        return out.transpose(1, 2).reshape(B, N, C)


class DropPath(nn.Module):
    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep) / keep


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MHCABlock(nn.Module):
    def __init__(self, dim, mlp_ratio, drop_path, shared_cpe, shared_crpe):
        super().__init__()
        self.cpe, self.crpe = shared_cpe, shared_crpe
        self.factoratt_crpe = FactorAtt_ConvRelPosEnc(dim, 8, shared_crpe)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, size):
        x = self.cpe(x, size)
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MHCAEncoder(nn.Module):
    def __init__(self, dim, num_layers, mlp_ratio, drop_paths):
        super().__init__()
        self.cpe, self.crpe = ConvPosEnc(dim), ConvRelPosEnc(dim // 8)
        self.MHCA_layers = nn.ModuleList(MHCABlock(dim, mlp_ratio, drop_paths[i], self.cpe, self.crpe)
                                         for i in range(num_layers))

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
    def __init__(self, dim, out_dim, num_layers, mlp_ratio, num_path, drop_paths):
        super().__init__()
        self.mhca_blks = nn.ModuleList(MHCAEncoder(dim, num_layers, mlp_ratio, drop_paths) for _ in range(num_path))
        self.InvRes = ResBlock(dim)
        self.aggregate = Conv2d_BN(dim * (num_path + 1), out_dim, act_layer=nn.Hardswish)

    def forward(self, inputs):
        outs = [self.InvRes(inputs[0])]
        for x, enc in zip(inputs, self.mhca_blks):
            B, C, H, W = x.shape
            outs.append(enc(x.flatten(2).transpose(1, 2), (H, W)))
        return self.aggregate(torch.cat(outs, dim=1))


class Cls_head(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.cls = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.cls(x.mean((2, 3)))


class PublicStyleMPViT(nn.Module):
    """An MPViT with the public module names and structure: what fuse() meets in the wild and
    what MPViT users run today (the speed report's eager baseline)."""

    def __init__(self, size="tiny", num_classes=1000, drop_path_rate=0.0):
        super().__init__()
        layers, dims, mlp_ratio = CONFIGS[size]
        rates = torch.linspace(0, drop_path_rate, sum(layers)).tolist()
        stage_rates = [rates[sum(layers[:i]):sum(layers[:i + 1])] for i in range(4)]
        self.stem = nn.Sequential(Conv2d_BN(3, dims[0] // 2, 3, 2, nn.Hardswish),
                                  Conv2d_BN(dims[0] // 2, dims[0], 3, 2, nn.Hardswish))
        self.patch_embed_stages = nn.ModuleList(Patch_Embed_stage(dims[i], NUM_PATH[i], i > 0) for i in range(4))
        self.mhca_stages = nn.ModuleList(
            MHCA_stage(dims[i], dims[min(i + 1, 3)], layers[i], mlp_ratio, NUM_PATH[i], stage_rates[i])
            for i in range(4))
        self.cls_head = Cls_head(dims[3], num_classes)  # its Linear is cls_head.cls, as in the checkpoints

    def forward_features(self, x):
        x = self.stem(x)
        features = []
        for embed, stage in zip(self.patch_embed_stages, self.mhca_stages):
            x = stage(embed(x))
            features.append(x)
        return features

    def forward(self, x):
        return self.cls_head(self.forward_features(x)[-1])
