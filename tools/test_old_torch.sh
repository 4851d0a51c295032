#!/usr/bin/env bash
# The whole test suite on an older torch (`make test-old-torch`): a scratch clone of the committed
# tree with a venv of its own holding OLD_TORCH (default torch==2.11.0, the GPU image's: a CUDA
# 13.0 build, so the extension is built with its CUDA kernels against 2.11's headers, as the GPU
# proof's build stage will; torch==2.13.0+cpu is the other one on this project's machines) and
# Triton 3.8 (3.6's interpreter cannot run our kernels), the extension built against it, then
# pytest. Dynamo changes between versions: torch 2.13's stopped every compiled module of ours
# at the backend switch's ContextVar, which 2.14 traces. Not part of `make test`: 6 minutes on
# 2 cores.
#
# Environment: PYTHON (a python 3.10+ to make the venv from, default python3), OLD_TORCH,
# OLD_TRITON (default triton==3.8.*), KEEP=1 keeps the scratch tree. A newer torch than this
# machine's pip allows (its constraints file caps torch at 2.14.1): PIP_CONSTRAINT=/dev/null
# OLD_TORCH=torch==2.15.0 OLD_TRITON='triton==3.9.*'.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
OLD_TORCH=${OLD_TORCH:-torch==2.11.0}
OLD_TRITON=${OLD_TRITON:-triton==3.8.*}
scratch=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$scratch"' EXIT
git clone -q "$ROOT" "$scratch/tree"
cd "$scratch/tree"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "$OLD_TORCH" setuptools wheel ninja pybind11 pytest pytest-xdist hypothesis numpy onnx onnxscript \
    onnxruntime
# Triton apart and without its dependencies: a CUDA build of torch pins its own (2.11: 3.6.0)
.venv/bin/python -m pip install -q --no-deps "$OLD_TRITON"
.venv/bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e '.[test]'
.venv/bin/python -m pytest -q -ra -n auto --dist worksteal -p no:cacheprovider tests
