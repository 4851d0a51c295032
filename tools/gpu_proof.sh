#!/usr/bin/env bash
# The GPU proof on a lent GPU (`make gpu-proof`), on the device image as it is (its own
# python/torch/triton, nothing downloaded). Stages, in the order given:
#   build      preflight (pytest, setuptools, ninja import), the extension for this GPU's arch with
#              every core; fails unless the CUDA kernels are registered (never a silent CPU-only build);
#              then `python -m mpvit_kernels.info` (what each op family runs there) into summary.md
#   tests      every test file that exercises the kernels, on CUDA tensors (not only `-m cuda`),
#              one tile per Triton kernel (MPVIT_KERNELS_AUTOTUNE=0 unless set): tuning every
#              odd test shape would double the stage's compiles; the token-tile test forces each
#              tile the tuner may pick, and the bench stage runs the tuner. TESTS_WORKERS pytest-xdist
#              workers where xdist is installed (default min(8, cores); 0: one process): the
#              stage is mostly Triton compiles, one per specialisation a test launches (the CPU
#              suite alone launches about 460 distinct ones), each single-threaded
#   bench      the speed report (BENCH_ARGS, default "--resolutions 224 --no-compile --dtypes bf16":
#              every family against eager in bf16, the issues' speed goals, the GLI GEMM also
#              against cuBLAS, in one or two minutes (fp32 rows: --dtypes fp32 in a later call); the
#              torch.compile columns cost an Inductor compile per row, several minutes per
#              family on a GPU, so they come in calls of their own, e.g. BENCH_ARGS="--resolutions
#              224 --ops gli_projection"). Rows reach results.json as they are measured, the
#              GEMM and attention families first, so a run cut short keeps what it measured
#   model      the whole model end to end (MODEL_ARGS, default MPViT-S at 224, batch 64, bf16:
#              inference and a training step; eager, ours, their CUDA-graph replays (inference),
#              torch.compile, ours + compile), into
#              $OUT/model/ (results.json after every row, eager and ours of both modes before any
#              compiled column): its compiles take minutes, so run it as a call of its own
#   sanitizer  compute-sanitizer memcheck and racecheck over the kernel tests, caching allocator
#              off (so overruns inside PyTorch's cached blocks are seen) and one tile per Triton
#              kernel (MPVIT_KERNELS_AUTOTUNE=0), so that it fits one call
# STAGES defaults to "build tests bench": about 7 minutes on a 16-core H100 (each stage prints its
# time); run STAGES=sanitizer as its own call. Each stage has a time limit (*_TIMEOUT, seconds),
# cut to what is left of TOTAL_TIMEOUT (default 570: set it a little under the device call's
# timeout), so that the results are packed before the call is killed; a stage with under 30 s
# left is skipped. At its limit a stage gets SIGINT, so that a cut-short pytest still reports
# its failures. A stage that needs the extension builds it first when STAGES has no build
# and the checkout has none with CUDA kernels (a device machine gone cold between calls is bare).
#
# $OUT (default benchmarks/results/<device>/) receives at most eight files, two folders deep, so
# that a GPU run's results come back whole: summary.md (versions, stage times and results),
# results.json and speed_report.md (the speed report), speedup.png when the report draws one,
# logs.tar.gz (every log and the junit XML), refreshed after each stage, and model/ with the
# model stage's three (results.json, speed_report.md, speedup.png).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-"build tests bench"}
BENCH_ARGS=${BENCH_ARGS---resolutions 224 --no-compile --dtypes bf16}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-240}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-300}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}
MODEL_ARGS=${MODEL_ARGS---ops model --model-sizes small --resolutions 224 --model-batch 64 --dtypes bf16 --reps 10 --warmup 2}
MODEL_TIMEOUT=${MODEL_TIMEOUT:-420}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-480}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-570}
started_all=$(date +%s)
cores=$(nproc)
TESTS_WORKERS=${TESTS_WORKERS:-$(( cores < 8 ? cores : 8 ))}
# Kernel tests for the GPU: all but the CPU-only checks (the ahead-of-time compile, the wheel
# build, this script's no-GPU path).
TESTS=${TESTS:-"tests --ignore=tests/test_static_compile.py --ignore=tests/test_build.py --ignore=tests/test_gpu_proof.py"}
SANITIZED_TESTS="tests/test_affine_hswish.py tests/test_factor_attention.py tests/test_depthwise.py tests/test_dwconv_bn.py tests/test_gli_projection.py tests/test_residual_layernorm.py tests/test_linear.py"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-proof: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False): nothing to prove here." >&2
  echo "gpu-proof: run it on a machine with an NVIDIA GPU (see README, 'GPU proof')." >&2
  exit 2
fi

# the speed report's folder name for this GPU (mpvit_kernels.bench.timing.device_slug)
device=$("$PYTHON" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
OUT=${OUT:-benchmarks/results/$device}
mkdir -p "$OUT"
LOGS=$(mktemp -d)  # logs live outside $OUT and travel in one archive
trap 'rm -rf "$LOGS"' EXIT
summary="$OUT/summary.md"
status=0

log() { echo "[gpu-proof $(date +%H:%M:%S)] $*" | tee -a "$LOGS/gpu_proof.log"; }
pack() { tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .; }
# stage NAME SECONDS CMD...: runs CMD with a time limit, logs its time and result.
stage() {
  local name=$1 limit=$2 start rc left
  shift 2
  start=$(date +%s)
  left=$(( TOTAL_TIMEOUT - (start - started_all) - 15 ))  # 15 s: the kill's grace and the packing
  if [ "$left" -lt 30 ]; then
    log "stage $name: SKIPPED (${left}s of TOTAL_TIMEOUT=${TOTAL_TIMEOUT} left)"
    echo "| $name | SKIPPED: no time left | 0s |" >> "$summary"
    pack
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  # SIGINT at the limit, not timeout's SIGTERM: pytest then still prints its failures and
  # short summary and writes its junit XML (the bench and model stages have kept their rows
  # anyway). SIGKILL 10 s later if that hangs: exit 137, also the limit's doing.
  timeout -s INT --kill-after=10 "$limit" "$@"
  rc=$?
  local took=$(( $(date +%s) - start ))
  local verdict
  case $rc in
    0) verdict=ok ;;
    124) verdict="TIMED OUT after ${limit}s" ;;
    137) [ "$took" -ge "$limit" ] && verdict="TIMED OUT after ${limit}s (killed 10 s later)" ||
           verdict="FAILED (exit 137: killed, out of memory?)" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  log "stage $name: $verdict in ${took}s"
  echo "| $name | $verdict | ${took}s |" >> "$summary"
  pack
  return $rc
}

{
  echo "device: $device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'capability', torch.cuda.get_device_capability(0))"
  nvcc --version 2>&1 | tail -n 2 || true
  echo "cores: $cores"
  echo "commit: ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git here: pass GIT_COMMIT)")}"
} > "$LOGS/versions.txt" 2>&1
cat "$LOGS/versions.txt"
{
  echo "# GPU proof on $device ($(date -u +%Y-%m-%d))"
  echo
  echo '```'
  cat "$LOGS/versions.txt"
  echo '```'
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
} > "$summary"

# Whether this checkout's extension holds CUDA kernels (the package's own test, as its ops ask it).
cuda_kernels_built() {
  "$PYTHON" -c "import sys, torch; from mpvit_kernels import backend
sys.exit(0 if backend.extension_runs_on(torch.device('cuda')) else 1)"
}

build() {
  "$PYTHON" -c "import pytest, setuptools, ninja" || {
    echo "preflight: the build and the tests need pytest, setuptools and ninja in $PYTHON's environment" >&2; return 1; }
  local arch
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  echo "build for sm_${arch/./} with $(nproc) jobs"
  export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc)
  # An editable install can be refused (an old pip, a read-only site-packages): build in place then.
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ||
    { echo "editable install refused: building in place"; "$PYTHON" setup.py build_ext --inplace; } || return 1
  cuda_kernels_built && echo "CUDA kernels registered" || {
    echo "BUILD CAME OUT WITHOUT CUDA KERNELS: is nvcc on PATH, or CUDA_HOME set? (see the setup log above)"; return 1; }
}

if [[ " $STAGES " != *" build "* && " $STAGES " =~ \ (tests|bench|model|sanitizer)\  ]] &&
   ! cuda_kernels_built 2>/dev/null; then
  log "no extension with CUDA kernels in this checkout: the build stage first"
  STAGES="build $STAGES"
fi
for name in $STAGES; do
  case "$name" in
    build)
      log "build"
      stage build "$BUILD_TIMEOUT" bash -c "$(declare -f cuda_kernels_built build); build" > "$LOGS/build.log" 2>&1 ||
        { status=1; tail -n 5 "$LOGS/build.log"; break; }
      # what each op family runs on this GPU (a silent fallback to the reference would show here)
      { echo; echo '```'; timeout 60 "$PYTHON" -m mpvit_kernels.info 2>&1; echo '```'; echo; } | tee -a "$summary"
      ;;
    tests)
      workers=""
      if [ "$TESTS_WORKERS" -gt 1 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
        workers="-n $TESTS_WORKERS --dist worksteal"
      fi
      log "pytest $TESTS ${workers:-(one process)}"
      # shellcheck disable=SC2086
      MPVIT_KERNELS_AUTOTUNE=${MPVIT_KERNELS_AUTOTUNE:-0} stage tests "$TESTS_TIMEOUT" "$PYTHON" -m pytest $TESTS \
        $workers -q -ra -p no:cacheprovider --junitxml="$LOGS/pytest.xml" > "$LOGS/pytest.log" 2>&1 || status=1
      { echo; echo '```'; tail -n 40 "$LOGS/pytest.log"; echo '```'; echo; } >> "$summary"
      tail -n 3 "$LOGS/pytest.log"
      ;;
    bench)
      log "speed report $BENCH_ARGS"
      # The report writes results.json and speed_report.md into $OUT after each section (so a run cut
      # short keeps what it measured), and speedup.png at the end when it has timings to draw.
      # shellcheck disable=SC2086
      stage bench "$BENCH_TIMEOUT" "$PYTHON" -m mpvit_kernels.bench $BENCH_ARGS --out "$OUT" \
        > "$LOGS/bench.log" 2>&1 || status=1
      tail -n 5 "$OUT/speed_report.md"
      grep -m 5 -E "Traceback|Error|failed: |dropped at" "$LOGS/bench.log" || true
      ;;
    model)
      log "whole model $MODEL_ARGS"
      # shellcheck disable=SC2086
      stage model "$MODEL_TIMEOUT" "$PYTHON" -m mpvit_kernels.bench $MODEL_ARGS --out "$OUT/model" \
        > "$LOGS/model.log" 2>&1 || status=1
      tail -n 12 "$OUT/model/speed_report.md"
      grep -m 5 -E "Traceback|Error|failed: " "$LOGS/model.log" || true
      ;;
    sanitizer)
      if ! command -v compute-sanitizer > /dev/null; then log "compute-sanitizer not found: skipped"; continue; fi
      export PYTORCH_NO_CUDA_MEMORY_CACHING=1 MPVIT_KERNELS_AUTOTUNE=0
      log "compute-sanitizer memcheck"
      # -k's "not model_shapes" leaves out the tests of that mark as well as those of that name
      # shellcheck disable=SC2086
      stage memcheck "$SANITIZER_TIMEOUT" compute-sanitizer --tool memcheck --error-exitcode 3 \
        "$PYTHON" -m pytest -q -x -p no:cacheprovider $SANITIZED_TESTS \
        -k "not large_n and not model_shapes and not token_tile" \
        > "$LOGS/memcheck.log" 2>&1 || status=1
      tail -n 3 "$LOGS/memcheck.log"
      # racecheck: the determinism tests at small shapes (the CUDA reductions) and the small
      # fp16/bf16 cases of every Triton family (their dots through shared memory)
      log "compute-sanitizer racecheck (shared memory: the CUDA reductions and the Triton dots)"
      # shellcheck disable=SC2086
      stage racecheck "$SANITIZER_TIMEOUT" compute-sanitizer --tool racecheck --error-exitcode 3 \
        "$PYTHON" -m pytest -q -x -p no:cacheprovider $SANITIZED_TESTS \
        -k "(deterministic or twice_eager) and not large_n and not model_shapes" \
        > "$LOGS/racecheck.log" 2>&1 || status=1
      tail -n 3 "$LOGS/racecheck.log"
      unset PYTORCH_NO_CUDA_MEMORY_CACHING MPVIT_KERNELS_AUTOTUNE
      ;;
    *) log "unknown stage $name"; status=1 ;;
  esac
done
log "done (status $status); results in $OUT"
pack
exit $status
