"""The backend switch: per thread (a server's inference threads each keep their own), nested,
per op family, and checked."""
import threading

import pytest
import torch

import mpvit_kernels
from mpvit_kernels import ops
from tests.utils import RecordOps


def test_use_backend_in_one_thread_leaves_the_others_alone():
    barrier = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def run(name, backend):
        try:
            x, s, t = torch.randn(2, 4, 3, 3), torch.rand(4), torch.randn(4)
            with mpvit_kernels.use_backend(backend) if backend else torch.no_grad():
                barrier.wait()  # both threads inside their block at once
                with RecordOps() as rec:
                    ops.affine_hswish(x, s, t, True)
                seen[name] = (mpvit_kernels.get_backend(), "mpvit_kernels.affine_hswish" in rec.names)
                barrier.wait()
        except Exception as e:  # noqa: BLE001  (reported below, from the test's thread)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=("off", "reference")), threading.Thread(target=run, args=("on", None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen["off"] == ("reference", False)
    assert seen["on"] == ("auto", mpvit_kernels.extension_available())


def test_use_backend_nests_per_op_family_and_restores():
    assert mpvit_kernels.get_backend() == "auto"
    with mpvit_kernels.use_backend("reference"):
        with mpvit_kernels.use_backend("auto", ops=["depthwise"]):
            assert mpvit_kernels.get_backend("depthwise") == "auto"
            assert mpvit_kernels.get_backend("dwconv_bn") == "reference"
        assert mpvit_kernels.get_backend("depthwise") == "reference"
    assert mpvit_kernels.get_backend("depthwise") == "auto"
    # (an unknown backend or op family: test_affine_hswish's backend test)
    with pytest.raises(TypeError, match="ops"):
        with mpvit_kernels.use_backend("reference", ops="depthwise"):
            pass


def test_meta_tensors_go_through_the_registered_ops():
    # Shapes without data (the traffic counts run the model so): the ops' fakes answer.
    from mpvit_kernels.models import mpvit_tiny

    model = mpvit_tiny(num_classes=7).to("meta").eval()
    with torch.no_grad(), RecordOps() as rec:
        out = model(torch.empty(2, 3, 64, 48, device="meta"))
    assert out.shape == (2, 7) and out.device.type == "meta"
    compiled = ("depthwise", "affine_hswish") if mpvit_kernels.extension_available() else ()
    for op in ("dwconv_bn", "gli_projection", "factor_attention_fwd") + compiled:
        assert f"mpvit_kernels.{op}" in rec.names, op
