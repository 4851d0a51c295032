"""`python -m mpvit_kernels.info`: what each op family runs on this machine's devices, as the ops
themselves decide it."""
import os
import subprocess
import sys

import pytest
import torch

import mpvit_kernels
from mpvit_kernels import backend, info, ops
from tests.conftest import KERNEL_DEVICE
from tests.utils import ROOT, RecordOps


def rows(report: str) -> dict[str, list[str]]:
    """{op family: its cells, one per device} from the report's table."""
    out = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in backend.OP_FAMILIES:
            out[cells[0]] = cells[1:]
    return out


def test_report_names_every_family_and_device_and_follows_the_backend_switch():
    report = info.report()
    assert f"mpvit-kernels {mpvit_kernels.__version__}" in report and f"torch {torch.__version__}" in report
    table = rows(report)
    devices = 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert sorted(table) == sorted(backend.OP_FAMILIES) and all(len(c) == devices for c in table.values())
    if KERNEL_DEVICE == "cpu":  # the suite runs the Triton kernels interpreted
        twin = "C++ CPU twin" if backend.extension_available() else "eager reference"
        assert table == {op: [twin if op in info.CUDA_FAMILIES else "Triton kernels, interpreted"]
                         for op in backend.OP_FAMILIES}
    with mpvit_kernels.use_backend("reference"):
        assert all(cells == ["eager reference"] * devices for cells in rows(info.report()).values())
    with mpvit_kernels.use_backend("reference", ops=["linear"]):
        assert rows(info.report())["linear"] == ["eager reference"] * devices
    with mpvit_kernels.use_backend("reference", ops=["dwconv_bn"]):  # its depthwise op still runs ours
        assert all(cell.startswith("unfused: the depthwise op") for cell in rows(info.report())["dwconv_bn"])


def test_report_agrees_with_what_an_op_runs():
    # the cell of factor_attention on CPU tensors, checked against the op's own call
    qkv = torch.randn(1, 12, 3 * 16)
    args = (qkv, (3, 4), 2, 0.25, [torch.randn(8, 1, 3, 3), torch.randn(8, 1, 5, 5)], [torch.randn(8)] * 2)
    with torch.no_grad(), RecordOps() as rec:
        ops.factor_attention(*args)
    cell = info.implementation("factor_attention", torch.device("cpu"))
    assert ("mpvit_kernels.factor_attention_fwd" in rec.names) == cell.startswith("Triton"), (cell, rec.names)
    with mpvit_kernels.use_backend("reference"), torch.no_grad(), RecordOps() as rec:
        ops.factor_attention(*args)
    assert not any(n.startswith("mpvit_kernels.") for n in rec.names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU column of a machine without a GPU")
def test_command_without_the_interpreter_says_the_cpu_twins_run():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MPVIT_KERNELS_BACKEND")}
    out = subprocess.run([sys.executable, "-m", "mpvit_kernels.info"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    table = rows(out.stdout)
    if not backend.extension_available():
        pytest.skip("mpvit_kernels._C not built")
    assert table["depthwise"] == ["C++ CPU twin"] and table["affine_hswish"] == ["C++ CPU twin"]
    assert table["factor_attention"][0].startswith("C++ CPU twin (inference")
    assert table["residual_layernorm"][0].startswith("C++ CPU twin (inference")
    assert table["linear"] == ["eager reference"]
    assert table["dwconv_bn"][0].startswith("unfused: the depthwise op")
    assert table["gli_projection"][0].startswith("unfused: PyTorch's 1x1 conv per input")
    assert "GPUs: none visible" in out.stdout and "notes:" not in out.stdout
    # the attention's cell against its own call there: the twin's op in inference, under autograd
    # the reference with the depthwise op for its CRPE convs
    probe = ("import torch; from mpvit_kernels import info, ops; from tests.utils import RecordOps\n"
             "args = (torch.randn(1, 12, 48), (3, 4), 2, 0.25, [torch.randn(8, 1, 3, 3), torch.randn(8, 1, 5, 5)],"
             " [torch.randn(8)] * 2)\n"
             "with torch.no_grad(), RecordOps() as inference: ops.factor_attention(*args)\n"
             "args[0].requires_grad_()\n"
             "with RecordOps() as training: ops.factor_attention(*args)\n"
             "print(info.implementation('factor_attention', torch.device('cpu')))\n"
             "print(sorted({n for n in inference.names + training.names if n.startswith('mpvit_kernels.')}))\n"
             # forced (the variable is read per call), the twin takes training calls too
             "import os; os.environ['MPVIT_KERNELS_BACKEND'] = 'cuda'; print(info.report())")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    cell, ran, forced = out.stdout.split("\n", 2)
    assert cell == "C++ CPU twin (inference; under autograd: eager reference, its CRPE convs on the depthwise twin)"
    assert ran == "['mpvit_kernels.depthwise', 'mpvit_kernels.factor_attention']", ran
    assert rows(forced)["factor_attention"] == ["C++ CPU twin"] and "backend: cuda" in forced, forced


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_family_runs_its_kernels_on_the_gpu():
    # the GPU proof's first check: no op family falls back to the reference on this GPU
    report = info.report()
    gpu = rows(report)
    assert all(cells[1] in ("CUDA kernel", "Triton kernels") for cells in gpu.values()), report
    assert "notes:" not in report, report


def test_notes_are_the_package_warnings_not_a_library_s(monkeypatch):
    import warnings

    def library_warns(op, device):
        warnings.warn("a library's own warning", UserWarning)  # raised here, outside the package
        backend.warn_once("k", "ours, from the package")  # attributed to the package's caller, as the ops' are
        return False

    monkeypatch.setattr(backend, "use_triton", library_warns)
    report = info.report()
    assert "a library's own warning" not in report and "- ours, from the package" in report, report


def test_report_lists_every_switch_the_package_reads():
    # an MPVIT_KERNELS_* variable read anywhere in the package (or its build) is one a user sets:
    # the report says whether it is set
    import glob
    import re

    read = set()
    for path in glob.glob(os.path.join(ROOT, "mpvit_kernels", "**", "*.py"), recursive=True) + \
            [os.path.join(ROOT, "setup.py")]:
        with open(path) as f:
            read |= set(re.findall(r"MPVIT_KERNELS_[A-Z_]+", f.read()))
    assert read and read <= set(info.ENV_VARS), sorted(read - set(info.ENV_VARS))
