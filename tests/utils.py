"""Shared test helpers: one tolerance table per dtype, tensors in the layouts the ops meet."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (atol, rtol) of a kernel against the reference computed in the same dtype.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

LAYOUTS = ("nchw", "channels_last", "strided")


@contextlib.contextmanager
def cpu_auto():
    """``auto`` as a CPU runs it without Triton's interpreter: the C++ twins, oneDNN and ATen,
    the Triton families on their reference (the switch reads TRITON_INTERPRET at each op)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@contextlib.contextmanager
def gpu_tiles():
    """The Triton kernels launched with a GPU's tiles, where the interpreter's are taller (fewer
    programs, each as cheap to interpret as a small one): every family module's INTERPRET read
    as on a GPU, and the pinned launches' picks made under the other tiles forgotten, before
    and after. On CUDA tensors those are the tiles anyway."""
    from mpvit_kernels.triton.static_compile import kernel_modules

    modules = list(kernel_modules())
    kept = [module.INTERPRET for module in modules]
    forget_pinned_tiles()
    for module in modules:
        module.INTERPRET = False
    try:
        yield
    finally:
        for module, interpret in zip(modules, kept):
            module.INTERPRET = interpret
        forget_pinned_tiles()


def forget_pinned_tiles():
    """Every pinned launch's picks (tiles computed once per key) forgotten: what a test that
    changes how tiles are chosen calls before and after."""
    from mpvit_kernels.triton.launch import PinnedHeuristics
    from mpvit_kernels.triton.static_compile import kernel_modules

    for module in kernel_modules():
        for launch in vars(module).values():
            if isinstance(launch, PinnedHeuristics):
                launch._picked.clear()
                launch._direct.clear()


def assert_close(actual, expected, dtype=None, scale=1.0):
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol * scale)


def make_image(shape, dtype=torch.float32, layout="nchw", device="cpu", requires_grad=False):
    """A (B, C, H, W) tensor in `layout`: NCHW contiguous, channels-last, or a non-dense
    strided view (every other column of a wider tensor)."""
    B, C, H, W = shape
    if layout == "strided":
        x = torch.randn(B, C, H, 2 * W, dtype=dtype, device=device)[..., ::2]
    else:
        x = torch.randn(shape, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


@contextlib.contextmanager
def warnings_as_errors():
    """Every warning raised inside is an error, but those of the environment that a test of ours
    cannot help: Dynamo's on Python 3.13.0 (a CPython bug, fixed in 3.13.1, slows its guards)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Guards may run slower on Python 3.13.0", category=RuntimeWarning)
        yield


# Not views by their schema, yet aliases that move no data: torch 2.15's F.linear of a 3-d input
# returns addmm's output through it (2.14's through view).
_ALIASES = (torch.ops.aten._unsafe_view.default,)


class RecordOps(TorchDispatchMode):
    """Records the name of every aten/custom op dispatched inside the context; ``compute``
    keeps the ones that are not views or aliases (those move no data)."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.compute = []
        self.calls = []  # (name, args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        self.calls.append((str(func.overloadpacket), args))
        if not func.is_view and func not in _ALIASES:
            self.compute.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class RecordLaunches:
    """Records every Triton kernel launch inside the context, on a GPU or in the interpreter:
    ``launches`` holds (kernel function, {argument name: value}) after autotune and heuristics
    have filled in their meta-parameters."""

    def __init__(self):
        import triton
        from triton.runtime.interpreter import InterpretedFunction

        self.classes = (triton.runtime.JITFunction, InterpretedFunction)
        self.launches = []

    def __enter__(self):
        self.saved = [cls.run for cls in self.classes]
        for cls, run in zip(self.classes, self.saved):
            def recording(fn, *args, _run=run, **kwargs):
                self.launches.append((fn, {**dict(zip(fn.arg_names, args)), **kwargs}))
                return _run(fn, *args, **kwargs)

            cls.run = recording
        return self

    def __exit__(self, *exc):
        for cls, run in zip(self.classes, self.saved):
            cls.run = run


def normwise_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in fp64: the low-precision tests' measure. A max error
    would be decided by the few elements whose 16-bit rounding crossed a Hardswish kink (its
    slope jumps by 0.5 at +-3), for ours and eager alike, by chance."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def output_and_grad_errors(run, leaves, grad, want) -> list[float]:
    """Normwise errors of ``run()``'s output and of its grads w.r.t. ``leaves`` (upstream ``grad``)
    against ``want``, the exact output and grads in that order: the low-precision tests' measure,
    taken for ours and for eager alike."""
    out = run()
    grads = torch.autograd.grad(out, leaves, grad)
    return [normwise_error(a, b) for a, b in zip([out, *grads], want)]


def away_from_the_kinks(grad: torch.Tensor, z: torch.Tensor, dtype: torch.dtype, margin: float | None = None
                        ) -> torch.Tensor:
    """``grad`` with no upstream grad where the exact pre-activation ``z`` of a Hardswish lies
    within a few roundings of ``dtype`` from a kink (+-3) (or within ``margin``), for the tests
    that compare two roundings: where one (ours or eager's, by chance) crosses a kink, the slope
    there is off by 0.5, and at model shapes one such element could decide a whole parameter
    grad's normwise error (ours 2.9x eager's on one bn.weight seed of ten, from one channel), or
    fail an elementwise comparison. 0.2-2% of the grads in 16 bits."""
    margin = 24 * torch.finfo(dtype).eps if margin is None else margin
    return grad.masked_fill((z.detach().abs() - 3).abs() < margin, 0)


class LaunchSpy:
    """A stand-in for a Triton launcher (``kernel[grid](...)``) that appends ``name`` to ``taken``
    at each launch, then launches ``kernel``: which of two launchers an op picked."""

    def __init__(self, name, kernel, taken: list):
        self.name, self.kernel, self.taken = name, kernel, taken

    def __getitem__(self, grid):
        self.taken.append(self.name)
        return self.kernel[grid]


def across_thread_counts(fn, counts=(1, 2, 1)):
    """fn() run with each intra-op thread count in turn; the results, in order."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


def randomize_bn(model):
    """Non-trivial BatchNorm statistics and affine parameters, so outputs depend on them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def read_as_a_gpu_process(module: str, read: str) -> dict:
    """What a GPU run's Triton module looks like, read in a process of its own without the
    interpreter: ``read`` is the source of ``def read(m)`` (JSON-able result) over ``module``
    imported as ``m``; returns {"1": read(m) as imported, "0": read(m) after reloading it with
    MPVIT_KERNELS_AUTOTUNE=0, which triton/launch.py reads at import (reloaded first) and
    the kernel modules take from it at theirs}."""
    code = "if True:\n    import importlib, json, os, triton\n    import " + module + " as m\n" + \
        textwrap.indent(textwrap.dedent(read), "    ") + \
        "    on = read(m)\n    os.environ['MPVIT_KERNELS_AUTOTUNE'] = '0'\n" \
        "    importlib.reload(importlib.import_module('mpvit_kernels.triton.launch'))\n" \
        "    print(json.dumps({'1': on, '0': read(importlib.reload(m))}))\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MPVIT_KERNELS_AUTOTUNE")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# The host runs of the CUDA kernels (tests/cuda_host): these files' tests whose names hold the
# keyword. test_reliability runs them built under AddressSanitizer where g++ has its runtime
# (conftest then leaves them out of the session itself).
HOST_RUN_FILES = ("tests/test_depthwise.py", "tests/test_affine_hswish.py")
HOST_RUN_KEYWORD = "on_the_host"


def asan_runtimes():
    """g++'s AddressSanitizer runtime and the C++ runtime (whose exceptions it intercepts), in the
    order a process preloads them; None without g++ or without them."""
    import shutil

    if not shutil.which("g++"):
        return None
    paths = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
             for name in ("libasan.so", "libstdc++.so.6")]
    return paths if all(os.path.isabs(p) for p in paths) else None


def build_cuda_host(name: str, out_dir, defines=()):
    """tests/cuda_host/<name>.cpp (a kernel family's CUDA code on shim.h) built with g++ into a
    library loaded through ctypes; pytest skips without g++. With MPVIT_CUDA_HOST_ASAN=1 it is
    built under AddressSanitizer (the process must preload its runtime): the kernels' loads and
    stores, shared memory included, are then checked against the buffers they were given."""
    import ctypes

    return ctypes.CDLL(compile_cuda_host(name, out_dir, defines, asan=os.environ.get("MPVIT_CUDA_HOST_ASAN") == "1"))


def compile_cuda_host(name: str, out_dir, defines=(), asan: bool = False) -> str:
    """build_cuda_host's library, not loaded: its path. Built under AddressSanitizer where
    ``asan``: then only a process that preloads the sanitizer's runtime may load it."""
    import shutil

    import pytest
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    lib = os.path.join(str(out_dir), f"{name}.so")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas", *sanitize,
           *(f"-D{d}" for d in defines), *(f"-I{p}" for p in include_paths()[:1]),
           os.path.join(ROOT, "tests", "cuda_host", f"{name}.cpp"), "-o", lib]
    # g++ without the sanitizer's runtime that an ASan test process preloads (and hands down):
    # under it the compile took 2x longer
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return lib
