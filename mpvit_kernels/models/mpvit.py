"""MPViT (Lee et al., CVPR 2022), written from ../shared/MPVIT_SPEC.md.

Module and parameter names equal the public checkpoints', so they load strictly. Ops with a
fused implementation go through mpvit_kernels.nn / mpvit_kernels.ops, so the backend switch
(``mpvit_kernels.use_backend("reference")`` or ``MPVIT_KERNELS_BACKEND``) turns kernels off.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mpvit_kernels import backend, ops
from mpvit_kernels.backend import weight_as
from mpvit_kernels.ops.affine_hswish import check_strided
from mpvit_kernels.ops.linear import MLP_MAX_C
from mpvit_kernels.nn import (Conv2dBN, ConvPosEnc, ConvRelPosEnc, DWConv2dBN, FactorAttention, GLIProjection,
                              depthwise_bn_hswish)

# size: (num_layers, embed_dims, mlp_ratio)
CONFIGS = {
    "tiny": ((1, 2, 4, 1), (64, 96, 176, 216), 2),
    "xsmall": ((1, 2, 4, 1), (64, 128, 192, 256), 4),
    "small": ((1, 3, 6, 3), (64, 128, 216, 288), 4),
    "base": ((1, 3, 8, 3), (128, 224, 368, 480), 4),
}
NUM_PATH = (2, 3, 3, 3)
NUM_HEADS = 8


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def dropped(branch: torch.Tensor, rate: float, base: torch.Tensor | None = None) -> torch.Tensor:
    """``base + drop_path(branch, rate, True)`` for a branch of (B, N, C) in one pass (an
    addcmul; no base: 0): the mask drawn as drop_path draws it (shape, dtype, one draw), so that
    one seed drops the same images, and 1/keep applied in fp32 as drop_path's division is (in
    the branch's 16-bit dtype it would scale every kept bf16 branch 0.16% low at keep 0.9)."""
    keep = 1.0 - rate
    mask = branch.new_empty((branch.shape[0], 1, 1)).bernoulli_(keep)
    return torch.addcmul(branch.new_zeros(()) if base is None else base, branch, mask, value=1.0 / keep)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MHCABlock(nn.Module):
    """One transformer block; ``cpe`` and ``crpe`` are its encoder's shared modules."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path_rate: float, cpe: ConvPosEnc, crpe: ConvRelPosEnc):
        super().__init__()
        self.cpe = cpe
        self.crpe = crpe
        self.factoratt_crpe = FactorAttention(dim, NUM_HEADS, qkv_bias=True, shared_crpe=crpe)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, size: tuple[int, int], crpe_packed: torch.Tensor | None = None) -> torch.Tensor:
        x = self.cpe(x, size)
        att, mlp = self.factoratt_crpe, self.mlp
        norm1, norm2 = self.norm1, self.norm2
        drop = self.drop_path_rate if self.training else 0.0
        # `is None` tests: `None in (tensors)` would call each tensor's __eq__ (70 us a block)
        if att.proj.bias is None or mlp.fc2.bias is None or norm1.weight is None or norm1.bias is None or \
                norm2.weight is None or norm2.bias is None:
            x = x + drop_path(att(norm1(x), size, crpe_packed), self.drop_path_rate, self.training)
            return x + drop_path(mlp(norm2(x)), self.drop_path_rate, self.training)
        # norm1 inside the qkv GEMM and GELU in fc1's (ops.linear); the residual adds, norm2 and
        # both biases in one pass (ops.residual_layernorm); fc2 accumulates onto its residual
        # output in place. Rows (B*N, C): r is then a tensor of its own, not a view, which
        # autograd's in-place handling would copy whole grads for.
        # Each map is let go as soon as it has been read, so that the next one may take its memory:
        # on a CPU a fresh map costs its page faults (MPViT-T eval batch 8 fp32: 4% a forward).
        B, N, C = x.shape
        qkv = ops.linear(x, att.qkv.weight, att.qkv.bias, norm1.weight, norm1.bias, norm1.eps)
        a = att.core(qkv, size, crpe_packed).reshape(B * N, C)
        del qkv
        fc1, fc2 = mlp.fc1, mlp.fc2
        if drop:
            # drop path: each branch's output, its bias in, dropped per image (one addcmul each), the
            # masks drawn in the unfused block's order; residual_layernorm then adds no bias of its own
            y = dropped(F.linear(a, att.proj.weight, att.proj.bias).view(B, N, C), drop).view(B * N, C)
            del a
            zero = y.new_zeros(C, dtype=norm2.weight.dtype)
            r, u = ops.residual_layernorm(x.reshape(B * N, C), y, zero, zero, norm2.weight, norm2.bias, norm2.eps)
            del x, y
            h = ops.linear(u, fc1.weight, fc1.bias, gelu=True)
            del u
            return dropped(F.linear(h, fc2.weight, fc2.bias).view(B, N, C), drop, r.view(B, N, C))
        if C <= MLP_MAX_C and fc1.bias is not None and backend.use_triton("linear", x.device) and \
                backend.use_triton("residual_layernorm", x.device) and not (torch.is_grad_enabled() and any(
                    t.requires_grad for t in (x, a, att.proj.weight, att.proj.bias, norm2.weight, norm2.bias,
                                              fc1.weight, fc1.bias, fc2.weight, fc2.bias))):
            # no graph to record: the rest of the block in one kernel, whose proj output, norm2
            # output and hidden never reach memory (training keeps the ops below and their backward)
            return ops.linear_proj_mlp(a, x.reshape(B * N, C), att.proj.weight, att.proj.bias, norm2.weight, norm2.bias,
                                       norm2.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias).view(B, N, C)
        y = F.linear(a, att.proj.weight)
        del a
        r, u = ops.residual_layernorm(x.reshape(B * N, C), y, att.proj.bias, mlp.fc2.bias, norm2.weight, norm2.bias,
                                      norm2.eps)
        del x, y
        if torch.is_grad_enabled() and backend.use_triton("linear", u.device) and \
                (u.requires_grad or mlp.fc1.weight.requires_grad or mlp.fc2.weight.requires_grad):
            # a graph is recorded: fc1, GELU and fc2 onto r in one op, whose backward computes fc1's
            # pre-activation grad with the hidden's grad in registers (ops.linear_mlp)
            return ops.linear_mlp(u, r, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight).view(B, N, C)
        h = ops.linear(u, mlp.fc1.weight, mlp.fc1.bias, gelu=True)
        del u
        if h.dtype != r.dtype:
            # autocast over a wider stream: fc2 in the autocast dtype, as eager's (not an fp32 GEMM
            # over a cast copy of the 4C-wide hidden), then the residual add in the stream's dtype
            return (r + F.linear(h, mlp.fc2.weight)).view(B, N, C)
        return r.addmm_(h, weight_as(mlp.fc2.weight, r.dtype).t()).view(B, N, C)


class MHCAEncoder(nn.Module):
    """One path's encoder: its layers share one cpe and one crpe."""

    def __init__(self, dim: int, num_layers: int, mlp_ratio: float, drop_path_rates: Sequence[float]):
        super().__init__()
        self.cpe = ConvPosEnc(dim, 3)
        self.crpe = ConvRelPosEnc(dim // NUM_HEADS, NUM_HEADS)
        self.MHCA_layers = nn.ModuleList(
            MHCABlock(dim, mlp_ratio, drop_path_rates[i], self.cpe, self.crpe) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (not in training mode: drop path would draw its masks slice by slice)
        images = B if self.training else _images_per_slice(x, 3 * C * H * W)
        if images < B:
            return torch.cat([self.forward(x[i:i + images]) for i in range(0, B, images)])
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C); a view of a channels-last image
        # the layers' shared CRPE packed once a forward where each layer would pack it (training),
        # so that autograd sums the layers' grads on the packing and takes them apart once
        convs = self.crpe.conv_list
        packed = ops.crpe_packing([c.weight for c in convs], [c.bias for c in convs], NUM_HEADS, tokens)
        for layer in self.MHCA_layers:
            tokens = layer(tokens, (H, W), packed)
        return tokens.transpose(1, 2).reshape(B, C, H, W)


# Inference on a CPU runs an encoder over slices of the batch whose qkv (its largest map) stays
# under this many bytes: every map of a block is then served from glibc's heap and reused slice
# after slice, where a batch-wide qkv is a fresh mapping whose page faults cost more than its
# writes (MPViT-T eval batch 8 fp32, stage 1 in slices of 2 images: 1.005x-1.08x, same bits;
# under torch.compile, whose buffers come from the same heap, 1.125x).
# Images are independent in every op of a block, so the slices give the same values.
SLICE_BYTES = 8 << 20


def _images_per_slice(x: torch.Tensor, elements_per_image: int) -> int:
    B = x.shape[0]
    if torch.is_grad_enabled() or x.device.type != "cpu" or isinstance(B, torch.SymInt):
        return B  # a dynamic batch (torch.export, dynamic compile): no guard on its size
    images = B
    while images > 1 and images * elements_per_image * x.element_size() > SLICE_BYTES:
        images = (images + 1) // 2
    return images


class ResBlock(nn.Module):
    """``InvRes``, the local path: 1x1 conv-BN-Hardswish -> dw3x3 -> BN -> Hardswish ->
    1x1 conv-BN, plus the identity (added in the last GEMM's epilogue in eval)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = Conv2dBN(dim, dim, 1, hswish=True)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.conv2 = Conv2dBN(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(depthwise_bn_hswish(self.conv1(x), self.dwconv, self.norm), residual=x)


class PatchEmbedStage(nn.Module):
    """``num_path`` DWConv2d_BN applied in a chain; every path's output is kept."""

    def __init__(self, dim: int, num_path: int, downsample: bool):
        super().__init__()
        self.patch_embeds = nn.ModuleList(DWCPatchEmbed(dim, 2 if downsample and j == 0 else 1) for j in range(num_path))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.jit.is_tracing():
            # the ops take H and W as ints, which torch.jit.trace keeps as constants: this expand
            # to them, recorded in the trace, makes the traced model refuse another H or W
            # (a map of the same token count, transposed, would otherwise run on the wrong grid)
            x = x.expand(-1, -1, int(x.shape[2]), int(x.shape[3]))
        outs = []
        for embed in self.patch_embeds:
            x = embed(x)
            outs.append(x)
        return outs


class DWCPatchEmbed(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.patch_conv = DWConv2dBN(dim, dim, 3, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_conv(x)


class MHCAStage(nn.Module):
    """InvRes on path 0's input, one encoder per path, then the GLI ``aggregate`` over the
    channel concat [InvRes, path 0, path 1, ...], which GLIProjection never builds."""

    def __init__(self, dim: int, out_dim: int, num_layers: int, mlp_ratio: float, num_path: int,
                 drop_path_rates: Sequence[float]):
        super().__init__()
        self.mhca_blks = nn.ModuleList(MHCAEncoder(dim, num_layers, mlp_ratio, drop_path_rates) for _ in range(num_path))
        self.InvRes = ResBlock(dim)
        self.aggregate = GLIProjection(dim, out_dim, num_path + 1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        outs = [self.InvRes(inputs[0])] + [enc(x) for enc, x in zip(self.mhca_blks, inputs)]
        return self.aggregate(outs)


class ClsHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.cls = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(x.mean(dim=(2, 3)))


class MPViT(nn.Module):
    """Multi-Path Vision Transformer. ``forward(x)`` gives logits, ``forward_features(x)`` the
    four stage maps (strides 4, 8, 16, 32) for dense prediction. Any H and W.

    As the public segmentation/detection backbones: ``frozen_stages`` = k >= 0 freezes the stem
    and, for k >= 1, the first k stages (patch embedding + MHCA stage): no grads, always in eval;
    ``norm_eval`` keeps every BatchNorm in eval in training (running statistics used, not
    updated; their weight and bias still train unless frozen)."""

    def __init__(self, num_layers: Sequence[int], embed_dims: Sequence[int], mlp_ratio: float,
                 num_classes: int = 1000, drop_path_rate: float = 0.0, in_chans: int = 3, *,
                 norm_eval: bool = False, frozen_stages: int = -1):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be positive, got {in_chans} and {num_classes}")
        if not (isinstance(frozen_stages, int) and -1 <= frozen_stages <= 4):
            raise ValueError(f"frozen_stages must be an int in -1..4, got {frozen_stages!r}")
        self.norm_eval = bool(norm_eval)
        self.frozen_stages = frozen_stages
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dims = tuple(embed_dims)
        rates = torch.linspace(0, drop_path_rate, sum(num_layers)).tolist()
        stage_rates = [rates[sum(num_layers[:i]):sum(num_layers[:i + 1])] for i in range(4)]
        self.stem = nn.Sequential(
            Conv2dBN(in_chans, embed_dims[0] // 2, 3, 2, hswish=True),
            Conv2dBN(embed_dims[0] // 2, embed_dims[0], 3, 2, hswish=True))
        self.patch_embed_stages = nn.ModuleList(
            PatchEmbedStage(embed_dims[i], NUM_PATH[i], downsample=i > 0) for i in range(4))
        self.mhca_stages = nn.ModuleList(
            MHCAStage(embed_dims[i], embed_dims[min(i + 1, 3)], num_layers[i], mlp_ratio, NUM_PATH[i], stage_rates[i])
            for i in range(4))
        self.cls_head = ClsHead(embed_dims[3], num_classes)
        self._init_weights()
        self._freeze_stages()

    def _frozen(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        k = self.frozen_stages
        return [self.stem, *self.patch_embed_stages[:k], *self.mhca_stages[:k]]

    def _freeze_stages(self) -> None:
        for module in self._frozen():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "MPViT":
        """nn.Module.train, then frozen stages back to eval and, with ``norm_eval`` in training,
        every BatchNorm too."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MPViT: x must be a Tensor, got {type(x).__name__}")
        check_strided("MPViT", "x", x)
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"MPViT: x must be (B, {self.in_chans}, H, W) with H, W >= 1, "
                             f"got shape {tuple(x.shape)}")
        # NHWC from the first conv on: every later activation is channels-last (the fused ops
        # read and write it, image <-> token changes are views). Copying the 3-channel input is
        # cheap next to converting any later map.
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        features = []
        for embed, stage in zip(self.patch_embed_stages, self.mhca_stages):
            x = stage(embed(x))
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.forward_features(x)[-1])


def _build(size: str, num_classes: int, drop_path_rate: float, in_chans: int, **options) -> MPViT:
    num_layers, embed_dims, mlp_ratio = CONFIGS[size]
    return MPViT(num_layers, embed_dims, mlp_ratio, num_classes, drop_path_rate, in_chans, **options)


# options: norm_eval, frozen_stages (see MPViT)
def mpvit_tiny(num_classes: int = 1000, drop_path_rate: float = 0.0, in_chans: int = 3, **options) -> MPViT:
    return _build("tiny", num_classes, drop_path_rate, in_chans, **options)


def mpvit_xsmall(num_classes: int = 1000, drop_path_rate: float = 0.0, in_chans: int = 3, **options) -> MPViT:
    return _build("xsmall", num_classes, drop_path_rate, in_chans, **options)


def mpvit_small(num_classes: int = 1000, drop_path_rate: float = 0.0, in_chans: int = 3, **options) -> MPViT:
    return _build("small", num_classes, drop_path_rate, in_chans, **options)


def mpvit_base(num_classes: int = 1000, drop_path_rate: float = 0.0, in_chans: int = 3, **options) -> MPViT:
    return _build("base", num_classes, drop_path_rate, in_chans, **options)


def load_checkpoint(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a public MPViT checkpoint into ``model``: ``path`` a file (read with
    ``weights_only=True``) or an already loaded checkpoint, either ``{"model": state_dict}``,
    ``{"state_dict": ...}`` or a bare state_dict; an argument that is neither a path, a file
    object nor a dict is a TypeError, a dict or file holding no state_dict a ValueError. With
    ``strict`` (default), any missing, unexpected or mis-shaped key is a ValueError that lists them;
    without, mis-shaped keys still are, the rest is skipped."""
    if isinstance(path, dict):
        ckpt, path = path, "the checkpoint given"
    elif isinstance(path, (str, bytes, os.PathLike)) or hasattr(path, "read"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise TypeError(f"load_checkpoint: path must be a file path, a file object or a loaded checkpoint dict, "
                        f"got {type(path).__name__}")
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{_name(path)}: not an MPViT checkpoint (expected a state_dict, or a dict with 'model' or "
                         "'state_dict')")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    problems = [("mis-shaped", mis_shaped)] + ([("missing", missing), ("unexpected", unexpected)] if strict else [])
    if any(keys for _, keys in problems):
        lines = [f"  {what} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
                 for what, keys in problems if keys]
        raise ValueError(f"{_name(path)} does not fit {type(model).__name__}:\n" + "\n".join(lines))
    model.load_state_dict(state, strict=strict)
    return model


def _name(path) -> str:
    return os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(getattr(path, "name", path))
