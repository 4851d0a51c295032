import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter; it must be
# chosen before triton is imported anywhere. With a GPU they run for real on CUDA tensors.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # fp32 references in fp32: cuDNN's convs would otherwise run in TF32 (1e-3 relative error)
    torch.backends.cudnn.allow_tf32 = False

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """On a GPU: how many Triton kernels this run compiled and how many autotune keys it tuned,
    per kernel: what a GPU test run costs beyond the tests (gpu_proof.sh keeps it)."""
    import sys

    if not torch.cuda.is_available() or not any(m.startswith("mpvit_kernels.triton.") for m in sys.modules):
        return
    import triton

    from mpvit_kernels.triton.static_compile import jit_function, kernel_modules, launched_kernels

    rows, compiled, tuned = [], 0, 0
    for module in kernel_modules():
        for name, kernel in launched_kernels(module).items():
            n = sum(len(caches[0]) for caches in getattr(jit_function(kernel), "device_caches", {}).values())
            keys = len(kernel.cache) if isinstance(kernel, triton.runtime.Autotuner) and len(kernel.configs) > 1 else 0
            compiled, tuned = compiled + n, tuned + keys
            rows.append(f"{name} {n}" + (f" ({keys} keys tuned)" if keys else ""))
    terminalreporter.write_line(f"Triton: {compiled} kernels compiled, {tuned} autotune keys tuned: " + ", ".join(rows))
