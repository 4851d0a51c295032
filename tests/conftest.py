import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter; it must be
# chosen before triton is imported anywhere. With a GPU they run for real on CUDA tensors.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BF16_INTERPRETED = False
_ACCESSES_CHECKED = False
if KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton 3.8's interpreter, 9% faster (see the module); MPVIT_TESTS_PLAIN_INTERPRETER=1: as it is
    if os.environ.get("MPVIT_TESTS_PLAIN_INTERPRETER", "0") in ("", "0"):
        from tests.interpreter_speedups import install

        install()
    # bf16 computed as a GPU computes it, fp32 dots at TF32 refused, float arguments passed as a
    # GPU's launch passes them (see the module); without it the bf16 kernel cases skip
    from tests.interpreter_numerics import install as install_numerics

    _BF16_INTERPRETED = install_numerics()
    # every load and store of an interpreted launch checked against its tensor arguments, and
    # against the other programs' (see the module)
    from tests.interpreter_sanitizer import install as install_sanitizer

    _ACCESSES_CHECKED = install_sanitizer()
    # and what they read before anything wrote it shows: in deterministic mode torch.empty & co.
    # fill floats with NaN and integers with their maximum (fill_uninitialized_memory), so a
    # partial-sum row or an output element a kernel leaves unwritten spoils its result. (On a GPU
    # the mode needs CUBLAS_WORKSPACE_CONFIG and refuses some ops: not there.)
    torch.use_deterministic_algorithms(True)
else:  # fp32 references in fp32: cuDNN's convs would otherwise run in TF32 (1e-3 relative error)
    torch.backends.cudnn.allow_tf32 = False
    try:  # each launch that skips Triton's binding checked against that binding, on the device
        from mpvit_kernels.triton.launch import DirectLaunch

        DirectLaunch.VERIFY = True
    except ImportError:  # (no Triton: the tests that need it skip)
        pass

import pytest  # noqa: E402

# bf16 through the Triton kernels: on a GPU, or in an interpreter that computes it as one does
BF16_KERNELS = KERNEL_DEVICE != "cpu" or _BF16_INTERPRETED
NO_BF16_KERNELS = "this Triton's interpreter computes bf16 on raw bits, and tests/interpreter_numerics.py does not fit it"
BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not BF16_KERNELS, reason=NO_BF16_KERNELS))

# a parameter set at the model's full shapes: on a GPU only (too big for the interpreter), and left
# out of the compute-sanitizer runs (tools/gpu_proof.sh), which are orders of magnitude slower
MODEL_SHAPES = [pytest.mark.cuda, pytest.mark.model_shapes]


# One pytest-xdist worker per core: each worker's intra-op threads share the cores with the
# others', and OpenMP threads that outnumber the cores spin-wait on each other (the interpreted
# kernels ran 2-3x slower so); so each worker takes its share of the cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


_ASAN_TEST = "test_cuda_kernels_on_the_host_stay_in_bounds_under_addresssanitizer"


def pytest_collection_modifyitems(config, items):
    # The host runs of the CUDA kernels once per session: where the AddressSanitizer test is
    # selected and can run, it runs them (in a process of its own), so the session leaves them out
    if os.environ.get("MPVIT_CUDA_HOST_ASAN") != "1" and any(item.name == _ASAN_TEST for item in items):
        from tests.utils import HOST_RUN_FILES, HOST_RUN_KEYWORD, asan_runtimes

        files = {os.path.basename(f) for f in HOST_RUN_FILES}
        twice = [item for item in items if item.path.name in files and HOST_RUN_KEYWORD in item.name]
        if twice and asan_runtimes():
            config.hook.pytest_deselected(items=twice)
            items[:] = [item for item in items if item not in twice]
    # The slow tests first (a stable sort): pytest-xdist hands each worker a contiguous half of the
    # collection and an idle worker steals from the end of the other's queue, so the run ends on
    # short tests and the workers finish together, not one waiting on a 20-second test
    on_gpu = torch.cuda.is_available()
    items.sort(key=lambda item: not ("slow" in item.keywords and (on_gpu or "cuda" not in item.keywords)))
    if on_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _triton_counts():
    """On a GPU: (kernels compiled, autotune keys tuned, {kernel: [compiled, tuned]}) of this
    process's Triton kernels; None where none ran."""
    import sys

    if not torch.cuda.is_available() or not any(m.startswith("mpvit_kernels.triton.") for m in sys.modules):
        return None
    import triton

    from mpvit_kernels.triton.static_compile import jit_function, kernel_modules, launched_kernels

    per_kernel, seen = {}, set()
    for module in kernel_modules():
        for name, kernel in launched_kernels(module).items():
            fn = jit_function(kernel)  # two launchers (pinned and tuned) may share one
            n = 0 if id(fn) in seen else sum(len(caches[0]) for caches in getattr(fn, "device_caches", {}).values())
            seen.add(id(fn))
            keys = len(kernel.cache) if isinstance(kernel, triton.runtime.Autotuner) and len(kernel.configs) > 1 else 0
            per_kernel[name] = [n, keys]
    return sum(n for n, _ in per_kernel.values()), sum(k for _, k in per_kernel.values()), per_kernel


def pytest_sessionfinish(session):
    """A pytest-xdist worker hands its counts to the controller, which prints the summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    counts = _triton_counts() if workeroutput is not None else None
    if counts:
        workeroutput["triton_counts"] = counts


_WORKER_COUNTS = []


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown where xdist is not installed
def pytest_testnodedown(node, error):
    counts = getattr(node, "workeroutput", {}).get("triton_counts")
    if counts:
        _WORKER_COUNTS.append(counts)


def pytest_terminal_summary(terminalreporter):
    """On a GPU: how many Triton kernels this run compiled and how many autotune keys it tuned,
    per kernel: what a GPU test run costs beyond the tests (gpu_proof.sh keeps it). Under
    pytest-xdist, summed over the workers: each compiled what it launched or loaded it from
    Triton's on-disk cache, which they share."""
    counts, where = None, ""
    if _WORKER_COUNTS:
        per_kernel = {}
        for _, _, kernels in _WORKER_COUNTS:
            for name, (n, keys) in kernels.items():
                total = per_kernel.setdefault(name, [0, 0])
                total[0], total[1] = total[0] + n, total[1] + keys
        counts = (sum(c[0] for c in _WORKER_COUNTS), sum(c[1] for c in _WORKER_COUNTS), per_kernel)
        where = f" (summed over {len(_WORKER_COUNTS)} xdist workers)"
    else:
        counts = _triton_counts()
    if counts is None:
        return
    compiled, tuned, per_kernel = counts
    rows = [f"{name} {n}" + (f" ({keys} keys tuned)" if keys else "") for name, (n, keys) in per_kernel.items()]
    terminalreporter.write_line(f"Triton{where}: {compiled} kernels compiled, {tuned} autotune keys tuned: "
                                + ", ".join(rows))
