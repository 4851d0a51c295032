"""Data-parallel training with synchronised BatchNorm: mpvit_kernels.convert_sync_batchnorm on
the fused MPViT (nn.SyncBatchNorm's twin for CPU, where DDP refuses nn.SyncBatchNorm), DDP over
two CPU processes (gloo), gives the gradients, running statistics and loss of one process on
the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mpvit_kernels
from mpvit_kernels.models import mpvit_tiny
from tests.utils import RecordOps, randomize_bn

WORLD = 2
# Every op family on its reference path: interpreted Triton cost 6 s a step in fp64 (its
# BatchNorm statistics, LayerNorm and GEMM kernels), and the BatchNorm synchronisation is the
# same either way (each op's kernels are checked against the reference in its own tests).


def _model():
    torch.manual_seed(0)
    return randomize_bn(mpvit_tiny(num_classes=5)).double().train()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 40, 36, generator=g, dtype=torch.float64), torch.tensor([0, 4, 2, 1])


def _step(model, x, target):
    with mpvit_kernels.use_backend("reference"):
        loss = F.cross_entropy(model(x), target)
        loss.backward()
    return loss.detach()


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = mpvit_kernels.convert_sync_batchnorm(_model())
        assert sum(isinstance(m, mpvit_kernels.SyncBatchNorm2d) for m in model.modules()) == 29  # every BatchNorm of MPViT-T
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, target = _batch()
        per = x.shape[0] // WORLD
        with RecordOps() as rec:
            loss = _step(ddp, x[rank * per:(rank + 1) * per], target[rank * per:(rank + 1) * per])
        # no value read back to the host (.item(): on a GPU a wait for the all-reduce and the
        # work queued before it, at every BatchNorm)
        assert "aten._local_scalar_dense" not in rec.names
        dist.all_reduce(loss)
        if rank == 0:
            torch.save((loss / WORLD, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())),
                       os.path.join(out_dir, "ddp.pt"))
        # Both ranks tear the group down together: one that left while the other still worked
        # aborted once in gloo's teardown ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_with_sync_batchnorm_equals_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    loss, grads, buffers = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = _model()  # one process on the global batch
    x, target = _batch()
    want_loss = _step(single, x, target)
    want_grads = {n: p.grad for n, p in single.named_parameters()}
    want_buffers = dict(single.named_buffers())
    torch.testing.assert_close(loss, want_loss)
    assert grads.keys() == want_grads.keys() and buffers.keys() == want_buffers.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-10, rtol=1e-8, msg=name)
    for name, b in want_buffers.items():
        torch.testing.assert_close(buffers[name], b, atol=1e-12, rtol=1e-10, msg=name)
    assert int(buffers["stem.0.bn.num_batches_tracked"]) == 1


def test_convert_sync_batchnorm_shares_the_tensors_and_acts_alone_as_batchnorm():
    model = _model()
    before = model.state_dict(keep_vars=True)
    assert mpvit_kernels.convert_sync_batchnorm(model) is model
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    bn = torch.nn.BatchNorm2d(6).double()
    sync = mpvit_kernels.convert_sync_batchnorm(bn)
    assert isinstance(sync, mpvit_kernels.SyncBatchNorm2d) and sync.weight is bn.weight
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    plain = torch.nn.BatchNorm2d(6).double()
    torch.testing.assert_close(sync(x), plain(x))  # no process group: a BatchNorm2d
    torch.testing.assert_close(sync.running_var, plain.running_var)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_from_a_count_left_on_the_device(momentum):
    # SyncBatchNorm2d's all-reduced count stays a tensor: the update is the int count's, and an
    # empty batch (NaN mean and var) keeps the statistics, chosen without reading the count back
    from mpvit_kernels.nn import track_batch_stats

    bns = [torch.nn.BatchNorm2d(6, momentum=momentum).double().train() for _ in range(2)]
    start = torch.randn(6, dtype=torch.float64)
    for bn in bns:
        bn.running_mean.copy_(start)
    for count in (7, 1, 0):
        mean, var = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
        if count == 0:
            mean, var = mean * float("nan"), var * float("nan")
        track_batch_stats(bns[0], mean, var, count)
        with RecordOps() as rec:
            track_batch_stats(bns[1], mean, var, torch.full((1,), count, dtype=torch.float64))
        assert "aten._local_scalar_dense" not in rec.names
        for a, b in zip(bns[0].buffers(), bns[1].buffers()):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
