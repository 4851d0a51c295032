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

# One pytest-xdist worker per core: each worker's intra-op threads share the cores with the
# others', and OpenMP threads that outnumber the cores spin-wait on each other (the interpreted
# kernels ran 2-3x slower so); so each worker takes its share of the cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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

    rows, compiled, tuned, seen = [], 0, 0, set()
    for module in kernel_modules():
        for name, kernel in launched_kernels(module).items():
            fn = jit_function(kernel)  # two launchers (pinned and tuned) may share one
            n = 0 if id(fn) in seen else sum(len(caches[0]) for caches in getattr(fn, "device_caches", {}).values())
            seen.add(id(fn))
            keys = len(kernel.cache) if isinstance(kernel, triton.runtime.Autotuner) and len(kernel.configs) > 1 else 0
            compiled, tuned = compiled + n, tuned + keys
            rows.append(f"{name} {n}" + (f" ({keys} keys tuned)" if keys else ""))
    terminalreporter.write_line(f"Triton: {compiled} kernels compiled, {tuned} autotune keys tuned: " + ", ".join(rows))
