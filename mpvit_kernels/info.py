"""What runs where on this machine: ``python -m mpvit_kernels.info``.

Versions (Python, torch and its CUDA, Triton), the extension (built? with CUDA kernels?), the
backend in force and the environment variables the package reads, and for every op family the
implementation its calls take on CPU tensors and on each visible GPU, decided by the same
functions the ops ask (mpvit_kernels.backend). The warnings those raise (an old GPU, an
extension without code for this GPU, ...) are printed as notes. Paste it into a bug report.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings

import torch

from mpvit_kernels import __version__, backend

ENV_VARS = ("MPVIT_KERNELS_BACKEND", "MPVIT_KERNELS_AUTOTUNE", "MPVIT_KERNELS_DIRECT_LAUNCH", "MPVIT_KERNELS_GLI_TMA",
            "MPVIT_KERNELS_NO_EXTENSION", "TRITON_INTERPRET", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")
# families whose GPU kernels are the extension's CUDA ones (the others' are Triton's)
CUDA_FAMILIES = ("affine_hswish", "depthwise")
# families whose C++ CPU twin runs inference only under auto (a call that autograd records runs the
# reference, which is faster there)
INFERENCE_TWINS = ("factor_attention", "residual_layernorm")
# what the fused families run off their Triton kernels, and the op families of ours in it
_FOLDED = "the BatchNorm folded into it (CPU fp32/fp64 eval) or the affine_hswish op"
UNFUSED = {"dwconv_bn": (f"unfused: the depthwise op, PyTorch's 1x1 conv, {_FOLDED}", ("depthwise", "affine_hswish")),
           "gli_projection": (f"unfused: PyTorch's 1x1 conv per input, {_FOLDED}", ("affine_hswish",))}


def implementation(op: str, device: torch.device) -> str:
    """What a call of op family ``op`` on tensors of ``device`` runs under the backend in force
    (raising what such a call would raise where a forced backend cannot run here)."""
    cpu = device.type == "cpu"
    if op in CUDA_FAMILIES:
        if backend.use_extension(op, device):
            return "C++ CPU twin" if cpu else "CUDA kernel"
        return "eager reference"
    if op in INFERENCE_TWINS and cpu and backend.use_cpu_kernel(op, device):
        if backend.get_backend(op) == "cuda":  # forced: the twin's backward too
            return "C++ CPU twin"
        training = "eager reference"
        if op == "factor_attention" and backend.use_extension("depthwise", device):
            training += ", its CRPE convs on the depthwise twin"
        return f"C++ CPU twin (inference; under autograd: {training})"
    if backend.use_triton(op, device):
        # the interpreter runs the kernels on the host, CUDA tensors copied over
        return "Triton kernels, interpreted" if backend._env_flag("TRITON_INTERPRET") else "Triton kernels"
    if op in UNFUSED:
        what, parts = UNFUSED[op]
        if all(backend.get_backend(o) == "reference" for o in (op, *parts)):
            return "eager reference"
        if "depthwise" in parts:  # every such call runs it (affine_hswish only where no fold): its errors
            implementation("depthwise", device)
        return what
    return "eager reference"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _extension() -> str:
    if not backend.extension_available():
        return "not built, or MPVIT_KERNELS_NO_EXTENSION set (no CUDA kernels, no CPU twins)"
    from mpvit_kernels import _C

    kernels = "with CUDA kernels" if backend._extension_cuda else "CPU twins only (built without nvcc)"
    return f"built, {kernels} ({_C.__file__})"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _backend() -> str:
    try:
        return backend.get_backend()
    except ValueError as e:  # a misspelt MPVIT_KERNELS_BACKEND: every op call would raise this
        return f"error: {e}"


def report() -> str:
    """The report ``python -m mpvit_kernels.info`` prints. Its notes are the warnings the ops give
    once per process, given again here whatever has run before (and still given by the ops)."""
    lines = [f"mpvit-kernels {__version__}",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
             f"triton {_triton_version()}",
             f"extension mpvit_kernels._C: {_extension()}",
             f"backend: {_backend()}",
             "environment: " + ", ".join(f"{name}={os.environ[name]!r}" if name in os.environ else f"{name} unset"
                                         for name in ENV_VARS)]
    devices = _devices()
    if len(devices) == 1:
        lines.append("GPUs: none visible (torch.cuda.is_available() is False)")
    for d in devices[1:]:
        props = torch.cuda.get_device_properties(d)
        lines.append(f"{d}: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB")
    lines += ["", "| op family | " + " | ".join(str(d) for d in devices) + " |",
              "|---|" + "---|" * len(devices)]
    errors = []
    warned, backend._warned = backend._warned, set()  # warn_once's keys: its warnings given again here
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for op in backend.OP_FAMILIES:
                cells = []
                for d in devices:
                    try:
                        cells.append(implementation(op, d))
                    except (RuntimeError, ValueError) as e:  # what a call would raise here
                        cells.append("error (notes)")
                        errors.append(str(e))
                lines.append(f"| {op} | " + " | ".join(cells) + " |")
    finally:
        backend._warned = warned
    lines.append("(eager reference: PyTorch's own ops, mpvit_kernels.reference, unfused)")
    package = os.path.dirname(os.path.abspath(__file__))
    ours = [str(w.message) for w in caught if os.path.abspath(w.filename).startswith(package)]  # not a library's
    notes = list(dict.fromkeys(errors + ours))
    if notes:
        lines += ["", "notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
