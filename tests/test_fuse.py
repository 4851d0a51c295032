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
from tests.utils import RecordOps, randomize_bn

# The Triton families run their reference here (interpreting them costs seconds per call, and
# test_mpvit runs the whole model through them); depthwise and affine_hswish run their C++ twins.
TRITON = ["factor_attention", "dwconv_bn", "gli_projection"]


def randomized(size="tiny"):
    torch.manual_seed(0)
    return randomize_bn(PublicStyleMPViT(size, num_classes=5))


SIZES = ["tiny", "xsmall", "small", "base"]


@pytest.mark.parametrize("size", SIZES)
def test_fuse_replaces_every_stage_in_place_sharing_the_tensors(size):
    model = randomized(size).eval()
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


@pytest.mark.parametrize("size", SIZES)
def test_fused_training_step_matches_the_original(size):
    model = randomized(size).train()
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
