"""fuse(): an MPViT built by other code, with the public module names and structure
(mpvit_kernels.bench.public_mpvit, written from the model description, not imported), runs
through our fused modules in place, sharing its very Parameters and buffers."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels import fuse
from mpvit_kernels.bench.public_mpvit import PublicStyleMPViT
from mpvit_kernels.models.mpvit import MHCAStage, PatchEmbedStage
from tests.test_mpvit import reference_keys
from tests.utils import RecordOps, cpu_auto, randomize_bn



@pytest.fixture(autouse=True)
def on_a_cpus_auto():
    # (interpreting the Triton kernels cost 12 of the base model's 16 s a step, and test_mpvit
    # runs the whole model through them)
    with cpu_auto():
        yield


def randomized(size="tiny", drop_path_rate=0.0):
    torch.manual_seed(0)
    return randomize_bn(PublicStyleMPViT(size, num_classes=5, drop_path_rate=drop_path_rate))


SIZES = ["tiny", "xsmall", "small", "base"]


@pytest.mark.parametrize("size", SIZES)
def test_fuse_replaces_every_stage_in_place_sharing_the_tensors(size):
    model = randomized(size).eval()
    x = torch.randn(2, 3, 33, 29)
    with torch.no_grad():
        want = model(x)
    tensors = model.state_dict(keep_vars=True)
    # the stand-in has the public checkpoints' very keys (their head is cls_head.cls) and shapes
    # (but the head's: 5 classes here)
    shapes, expected = {k: str(tuple(v.shape)) for k, v in tensors.items()}, reference_keys(size)
    assert shapes.keys() == expected.keys()
    assert {k: v for k, v in shapes.items() if v != expected[k]}.keys() == {"cls_head.cls.weight", "cls_head.cls.bias"}
    assert fuse(model) is model
    assert all(isinstance(s, PatchEmbedStage) for s in model.patch_embed_stages)
    assert all(isinstance(s, MHCAStage) for s in model.mhca_stages)
    assert all(isinstance(b, mpvit_kernels.Conv2dBN) for b in model.stem)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys() and all(after[k] is tensors[k] for k in tensors)
    with torch.no_grad(), RecordOps() as rec:
        got = model(x)
    # a CPU's fused ops (its stem's BatchNorms fold into the convs)
    assert {"mpvit_kernels.depthwise", "mpvit_kernels.factor_attention", "mpvit_kernels.residual_layernorm"} <= set(rec.names)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    modules = list(model.modules())
    assert fuse(model) is model and list(model.modules()) == modules  # a second call changes nothing


@pytest.mark.slow
@pytest.mark.parametrize("size, drop_path_rate", [(size, 0.0) for size in SIZES] + [("tiny", 0.4)],
                         ids=SIZES + ["tiny-drop_path"])
def test_fused_training_step_matches_the_original(size, drop_path_rate):
    # with drop path, one seed drops the same images' branches in both (the fused block draws its
    # masks as the original's drop path does)
    model = randomized(size, drop_path_rate).train()
    original = copy.deepcopy(model)
    fuse(model)
    x, target = torch.randn(2, 3, 33, 29), torch.tensor([1, 3])
    torch.manual_seed(1)
    F.cross_entropy(model(x), target).backward()
    torch.manual_seed(1)
    F.cross_entropy(original(x), target).backward()
    theirs = dict(original.named_parameters())
    for name, p in model.named_parameters():
        # fp32 rounding through train-mode BatchNorms: the error scales with the largest grad
        # of the tensor (fp64 agrees to 1e-11), so the absolute tolerance does too
        want = theirs[name].grad
        torch.testing.assert_close(p.grad, want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-3,
                                   msg=name)
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


class DenseBackbone(PublicStyleMPViT):
    """A segmentation/detection backbone as such code has it: the four maps by name, and
    ``norm_eval`` (BatchNorms stay in eval in training) through a ``train`` override."""

    def __init__(self):
        super().__init__("tiny", num_classes=5)
        self.norm_eval = True

    def forward(self, x):
        return {f"res{i + 2}": f for i, f in enumerate(self.forward_features(x))}

    def train(self, mode=True):
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.ModuleDict({"bottom_up": randomize_bn(DenseBackbone())})
        self.head = nn.Conv2d(216, 4, 1)

    def forward(self, x):
        feats = self.backbone["bottom_up"](x)
        return self.head(feats["res5"]), feats


def test_fuse_finds_the_backbone_inside_a_detector_and_keeps_its_norm_eval():
    torch.manual_seed(0)
    model = Detector().eval()
    x = torch.randn(2, 3, 33, 29)
    with torch.no_grad():
        want, want_feats = model(x)
    tensors = model.state_dict(keep_vars=True)
    assert fuse(model) is model
    backbone = model.backbone["bottom_up"]
    assert all(isinstance(s, MHCAStage) for s in backbone.mhca_stages)
    assert all(isinstance(s, PatchEmbedStage) for s in backbone.patch_embed_stages)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys() and all(after[k] is tensors[k] for k in tensors)
    with torch.no_grad():
        got, feats = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for k in want_feats:
        torch.testing.assert_close(feats[k], want_feats[k], atol=1e-4, rtol=1e-4, msg=k)
    # the backbone's own train() still reaches our fused modules' BatchNorms
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 29 and not any(bn.training for bn in bns)
    stats = [bn.running_mean.clone() for bn in bns]
    model(x)[0].sum().backward()
    assert all(torch.equal(bn.running_mean, s) for bn, s in zip(bns, stats))
    assert backbone.mhca_stages[0].aggregate.bn.weight.grad is not None
