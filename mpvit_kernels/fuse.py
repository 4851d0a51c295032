"""``fuse(model)``: an MPViT built by other code (the public classification model, or a
segmentation / detection backbone with the same module tree, alone or inside the detector or
segmentor that holds it) made to run through our fused modules, in place.

Recognised by structure and attribute names only (``stem``, ``patch_embed_stages[i].patch_embeds``,
``mhca_stages[i]`` with ``mhca_blks``, ``InvRes`` and ``aggregate``), never by importing that code.
Each recognised stage is replaced by ours, built to the same shapes, whose parameters and buffers
ARE the original tensors (the same Parameter objects): optimisers, checkpoints and
``state_dict()`` keys are unchanged. The model's own forward keeps running; it calls the stages
as before. A stage whose tensors do not line up exactly with ours is left alone, as is every
module not recognised; a second call changes nothing.
"""
from __future__ import annotations

import torch.nn as nn

from mpvit_kernels.models.mpvit import NUM_HEADS, MHCAStage, PatchEmbedStage
from mpvit_kernels.nn import Conv2dBN


def _share(ours: nn.Module, theirs: nn.Module) -> bool:
    """Make every parameter and buffer of ``ours`` the tensor at the same path in ``theirs`` and
    copy the per-module settings that matter (training flag, BatchNorm/LayerNorm eps and
    momentum). False, with nothing of ``theirs`` changed, unless both state_dicts have the same
    keys and shapes."""
    mine, other = ours.state_dict(keep_vars=True), theirs.state_dict(keep_vars=True)
    if mine.keys() != other.keys() or any(mine[k].shape != other[k].shape for k in mine):
        return False
    for name, mod in ours.named_modules(remove_duplicate=False):
        try:
            src = theirs.get_submodule(name) if name else theirs
        except AttributeError:  # a parameterless module of ours they lack
            continue
        for pname in list(mod._parameters):
            if mod._parameters[pname] is not None:
                mod._parameters[pname] = src._parameters[pname]
        for bname in list(mod._buffers):
            if mod._buffers[bname] is not None:
                mod._buffers[bname] = src._buffers[bname]
        mod.training = src.training
        for attr in ("eps", "momentum", "track_running_stats"):
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)) and hasattr(src, attr):
                setattr(mod, attr, getattr(src, attr))
    return True


def _drop_rate(layer: nn.Module) -> float:
    return float(getattr(getattr(layer, "drop_path", None), "drop_prob", 0.0) or 0.0)


def _patch_embed_stage(stage: nn.Module) -> nn.Module | None:
    embeds = getattr(stage, "patch_embeds", None)
    if not isinstance(embeds, nn.ModuleList) or not embeds:
        return None
    dw = embeds[0].patch_conv.dwconv
    ours = PatchEmbedStage(dw.in_channels, len(embeds), downsample=dw.stride[0] == 2)
    strides = [e.patch_conv.dwconv.stride[0] for e in embeds]
    if strides != [e.patch_conv.dwconv.stride[0] for e in ours.patch_embeds]:
        return None
    return ours if _share(ours, stage) else None


def _mhca_stage(stage: nn.Module) -> nn.Module | None:
    blks = getattr(stage, "mhca_blks", None)
    if not isinstance(blks, nn.ModuleList) or not blks or not hasattr(stage, "InvRes") or not hasattr(stage, "aggregate"):
        return None
    layers = blks[0].MHCA_layers
    att = layers[0].factoratt_crpe
    if getattr(att, "num_heads", NUM_HEADS) != NUM_HEADS:
        return None
    fc1 = layers[0].mlp.fc1
    ours = MHCAStage(stage.InvRes.conv1.conv.in_channels, stage.aggregate.conv.out_channels, len(layers),
                     fc1.out_features / fc1.in_features, len(blks), [_drop_rate(layer) for layer in layers])
    if not _share(ours, stage):
        return None
    for enc, their_enc in zip(ours.mhca_blks, blks):
        for layer, their_layer in zip(enc.MHCA_layers, their_enc.MHCA_layers):
            layer.drop_path_rate = _drop_rate(their_layer)
            layer.factoratt_crpe.scale = getattr(their_layer.factoratt_crpe, "scale", layer.factoratt_crpe.scale)
    return ours


def _conv_bn(block: nn.Module) -> nn.Module | None:
    conv, bn = getattr(block, "conv", None), getattr(block, "bn", None)
    act = getattr(block, "act", nn.Identity())
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or conv.bias is not None or \
            conv.groups != 1 or not isinstance(act, (nn.Hardswish, nn.Identity)):
        return None
    k = conv.kernel_size[0]
    ours = Conv2dBN(conv.in_channels, conv.out_channels, k, conv.stride[0], hswish=isinstance(act, nn.Hardswish))
    if ours.conv.padding != conv.padding or ours.conv.stride != conv.stride:
        return None
    return ours if _share(ours, block) else None


def _recognise(build, module: nn.Module) -> nn.Module | None:
    try:
        return build(module)
    except (AttributeError, IndexError, TypeError):  # not the structure we know: leave it
        return None


def fuse(model: nn.Module) -> nn.Module:
    """Replace, in place, the recognised stem blocks, patch-embedding stages and MHCA stages of
    every MPViT-shaped module in ``model`` (``model`` itself, or a backbone anywhere inside it,
    as in a detector or segmentor that holds one) by fused modules sharing its parameters and
    buffers; returns ``model``. Modules already ours, or not recognised, are left as they are."""
    backbones = [m for m in model.modules()
                 if isinstance(getattr(m, "patch_embed_stages", None), nn.ModuleList)
                 or isinstance(getattr(m, "mhca_stages", None), nn.ModuleList)]
    for backbone in backbones:
        _fuse_backbone(backbone)
    return model


def _fuse_backbone(model: nn.Module) -> None:
    stem = getattr(model, "stem", None)
    if isinstance(stem, nn.Sequential):
        for i, block in enumerate(stem):
            if not isinstance(block, Conv2dBN) and (fused := _recognise(_conv_bn, block)) is not None:
                stem[i] = fused
    for attr, ours_type, build in (("patch_embed_stages", PatchEmbedStage, _patch_embed_stage),
                                   ("mhca_stages", MHCAStage, _mhca_stage)):
        stages = getattr(model, attr, None)
        if not isinstance(stages, nn.ModuleList):
            continue
        for i, stage in enumerate(stages):
            if not isinstance(stage, ours_type) and (fused := _recognise(build, stage)) is not None:
                stages[i] = fused
