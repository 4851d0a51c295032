#!/usr/bin/env bash
# The whole GPU proof on a lent GPU, in one command (`make gpu-proof`): versions, a build for
# this device's arch, `pytest -m cuda`, compute-sanitizer, the speed report. Everything lands
# in $OUT (default benchmarks/results/<device>/) to be committed.
#
# Runs on the device image as it is: its own python/torch/triton, nothing downloaded.
#   STAGES="build tests sanitizer bench" (default: all, in that order; each can run alone so
#   that every call stays under the device tool's 10-minute limit), BENCH_ARGS for the report.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-"build tests sanitizer bench"}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-proof: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False): nothing to prove here." >&2
  echo "gpu-proof: run it on a machine with an NVIDIA GPU (see README, 'GPU proof')." >&2
  exit 2
fi

device=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
OUT=${OUT:-benchmarks/results/$device}
mkdir -p "$OUT"
log() { echo "[gpu-proof $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_proof.log"; }
status=0

{
  echo "device: $device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'capability', torch.cuda.get_device_capability(0))"
  nvcc --version 2>&1 | tail -n 2 || true
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

for stage in $STAGES; do
  case "$stage" in
    build)
      arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
      log "build for sm_${arch/./} with $(nproc) jobs"
      TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT/build.log" 2>&1 || { log "build FAILED (see build.log)"; exit 1; }
      ;;
    tests)
      log "pytest -m cuda"
      "$PYTHON" -m pytest -m cuda -q -ra -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" tests \
        > "$OUT/pytest_cuda.log" 2>&1 || status=1
      tail -n 3 "$OUT/pytest_cuda.log" | tee -a "$OUT/gpu_proof.log"
      ;;
    sanitizer)
      if ! command -v compute-sanitizer > /dev/null; then log "compute-sanitizer not found: skipped"; continue; fi
      log "compute-sanitizer memcheck (CUDA and Triton kernels)"
      compute-sanitizer --tool memcheck --error-exitcode 3 "$PYTHON" -m pytest -m cuda -q -x -p no:cacheprovider \
        tests/test_affine_hswish.py tests/test_factor_attention.py -k "not large_n" > "$OUT/memcheck.log" 2>&1 || status=1
      tail -n 3 "$OUT/memcheck.log" | tee -a "$OUT/gpu_proof.log"
      log "compute-sanitizer racecheck (the kernels that use shared memory)"
      compute-sanitizer --tool racecheck --error-exitcode 3 "$PYTHON" -m pytest -m cuda -q -x -p no:cacheprovider \
        tests/test_affine_hswish.py -k "deterministic" > "$OUT/racecheck.log" 2>&1 || status=1
      tail -n 3 "$OUT/racecheck.log" | tee -a "$OUT/gpu_proof.log"
      ;;
    bench)
      log "speed report ${BENCH_ARGS:-}"
      # shellcheck disable=SC2086
      "$PYTHON" -m mpvit_kernels.bench ${BENCH_ARGS:-} --json "$OUT/results.json" > "$OUT/speed_report.md" 2> "$OUT/bench.log" || status=1
      tail -n 5 "$OUT/speed_report.md" | tee -a "$OUT/gpu_proof.log"
      ;;
    *) log "unknown stage $stage"; exit 1 ;;
  esac
done
log "done (status $status); results in $OUT"
exit $status
