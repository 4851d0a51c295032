"""Builds mpvit_kernels._C: CUDA kernels plus their CPU twins when nvcc and a CUDA build of
torch are there, the CPU twins alone otherwise, nothing with MPVIT_KERNELS_NO_EXTENSION=1.

Honoured environment: CUDA_HOME (else found from the real path of nvcc), TORCH_CUDA_ARCH_LIST
(default below when no GPU is visible), MAX_JOBS, MPVIT_KERNELS_NO_EXTENSION.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Compute capabilities built when no GPU is visible to pick from: A100 and H100 (+PTX so newer
# GPUs can JIT the kernels). sm_80 cubins also run on 8.6/8.9 parts.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[mpvit_kernels setup] {msg}", file=sys.stderr)


def find_cuda_home(environ=os.environ, fallback="/usr/local/cuda"):
    """CUDA_HOME/CUDA_PATH, else the toolkit of the nvcc on PATH, else that of ``fallback``'s nvcc
    (where torch itself looks last: an image may have the toolkit without nvcc on PATH). torch
    alone would take dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper or a link."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return environ[var]
    nvcc = shutil.which("nvcc", path=environ.get("PATH")) or shutil.which("nvcc", path=os.path.join(fallback, "bin"))
    if nvcc is None:
        return None
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
        return candidate
    # A wrapper script: ask nvcc itself where its toolkit is.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None  # TOP is <toolkit>/bin/..


def extensions():
    if os.environ.get("MPVIT_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
        log("MPVIT_KERNELS_NO_EXTENSION set: building no extension; ops run on the reference path")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.version.cuda is not None and cuda_home is not None
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -g0: Python's CFLAGS ask for debug info, which makes the templated CPU kernels compile
    # ~1.6x slower for nothing a user runs.
    cxx_flags = ["-O3", "-g0", "-DPy_LIMITED_API=0x030A0000"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP in torch's headers: without -fopenmp the CPU kernels
        # run on one thread. The link finds libgomp.so.1, the one torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    os.environ["MAX_JOBS"] = jobs
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU's")
        # <name>.cu: kernels, no ATen headers (nvcc parses a .cu's headers once per arch and once
        # for the host); <name>_op.cpp: their ATen side, for g++ alone
        sources += [os.path.relpath(p, ROOT) for pattern in ("*.cu", "*.cpp")
                    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", pattern)))]
        log(f"building CUDA + CPU kernels: CUDA_HOME={cuda_home}, archs {archs}, {jobs} jobs")
        ext = cpp_extension.CUDAExtension(
            "mpvit_kernels._C", sources, py_limited_api=True,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link_flags)
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "no nvcc / CUDA_HOME"
        log(f"building the CPU kernels only ({why}), {jobs} jobs")
        ext = cpp_extension.CppExtension("mpvit_kernels._C", sources, py_limited_api=True,
                                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """One object folder for every build of this tree, where editable installs would compile
        in a fresh temporary folder each time: ninja recompiles only what changed (a changed
        compile command included), so `make build` then `pip wheel .` compiles once."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # also under pip (setuptools runs this file as __main__); tests import it
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass,
          options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
