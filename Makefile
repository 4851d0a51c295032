# The two commands a fresh machine needs: `make test` and `make bench` (each creates .venv,
# installs torch and the test extra, builds the extension, then runs; bench adds the bench extra).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA 13.0 build of PyTorch (from local disk on the project's machines).
TORCH_SPEC ?= torch==2.14.1
# Options of the speed report, e.g. BENCH_ARGS=--quick (python -m mpvit_kernels.bench --help).
BENCH_ARGS ?=
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')

.PHONY: test bench build wheel clean gpu-proof static-report static-report-triton asan-twins test-old-torch launch-check

# The packages' bytecode is compiled on every core (11 s on 2) rather than by pip, one file at a
# time (19 s); a few files in the wheels are for other Pythons and fail, as they did under pip.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile "$(TORCH_SPEC)" setuptools wheel ninja pybind11 pytest pytest-benchmark pytest-xdist hypothesis numpy \
		onnx onnxscript onnxruntime
	site=$$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") && test -d "$$site" && \
		{ $(PY) -m compileall -qq -j 0 "$$site" || echo "compileall: some files are for other Pythons (as under pip)"; }
	touch $@

# The extension, rebuilt when a source or setup.py changes.
$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -e '.[test]'
	touch $@

build: $(VENV)/.built

# One pytest worker per core (pytest-xdist): the interpreted Triton tests are CPU-bound. Work
# stealing: an idle worker takes pending tests from a busy one, and conftest runs the tests marked
# slow (20-30 s the longest) first, so that no core idles at the end waiting on one of them.
# --durations: every log names the slowest tests (what to trim when make test grows).
test: build
	$(PY) -m pytest -q -ra -n auto --dist worksteal --durations=12 tests

# The bench extra of pyproject.toml (the report's figure and progress bar), installed once.
$(VENV)/.bench-deps: $(VENV)/.deps
	$(PY) -m pip install -q "matplotlib>=3.7" tqdm
	touch $@

# `make bench BENCH_ARGS=--quick`: about a minute on 2 cores. Results in benchmarks/results/<device>/.
bench: build $(VENV)/.bench-deps
	$(PY) -m mpvit_kernels.bench $(BENCH_ARGS)

# On a machine with a GPU, with its own torch (no venv): build, the kernel tests on CUDA, speed
# report (STAGES=sanitizer: compute-sanitizer); results under benchmarks/results/<device>/.
gpu-proof:
	bash tools/gpu_proof.sh

# The C++ CPU twins built under AddressSanitizer in a scratch clone, and the tests that run them
# (3m18s on 2 cores; not part of `make test`). The CUDA kernels' host runs are checked
# so in `make test` itself (tests/test_reliability.py).
asan-twins: build
	bash tools/asan_cpu_twins.sh

# The whole suite on an older torch (OLD_TORCH, default torch==2.11.0, the GPU image's, its CUDA
# kernels built) with its own venv in a scratch clone (6 minutes on 2 cores; not part of `make test`).
test-old-torch:
	bash tools/test_old_torch.sh

# Every Triton kernel compiled for sm_80 / sm_90a here (no GPU needed): registers, shared
# memory, spills, occupancy.
static-report: build
	$(PY) -m mpvit_kernels.triton.static_compile --out benchmarks/results/static/resource_usage.md

# Every Triton launch of the models' eval forwards and training steps as a GPU would take it
# (compiled for sm_90 and bound through Triton's launch path, no GPU needed; options:
# LAUNCH_ARGS="--arch 80 --every-config", see tools/launch_check.py). 2 minutes cold.
LAUNCH_ARGS ?=
launch-check: build
	$(PY) tools/launch_check.py $(LAUNCH_ARGS)

# The same ahead-of-time compile with another Triton (default 3.6.0, the GPU image's) in a side
# venv of its own (that Triton and a CPU torch): `make static-report-triton TRITON=3.6.0` writes
# benchmarks/results/static/resource_usage_triton36.md. Run from /tmp: nothing of this tree's
# build (its extension is built against another torch) is picked up from the working directory.
TRITON ?= 3.6.0
SIDE_TORCH ?= torch==2.13.0+cpu
SIDE_VENV ?= .venv-triton-$(TRITON)
TRITON_TAG := $(subst .,,$(basename $(TRITON)))

$(SIDE_VENV)/.deps:
	$(PYTHON) -m venv $(SIDE_VENV)
	$(SIDE_VENV)/bin/python -m pip install -q "triton==$(TRITON)" "$(SIDE_TORCH)" numpy
	touch $@

static-report-triton: $(SIDE_VENV)/.deps
	cd /tmp && PYTHONPATH=$(CURDIR) $(abspath $(SIDE_VENV))/bin/python -m mpvit_kernels.triton.static_compile \
		--out $(CURDIR)/benchmarks/results/static/resource_usage_triton$(TRITON_TAG).md

wheel: $(VENV)/.deps
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info mpvit_kernels/_C*.so $(VENV)
