#!/usr/bin/env bash
# The C++ CPU twins (csrc/cpu, csrc/ops.cpp) under AddressSanitizer (`make asan-twins`): a
# scratch clone of the committed tree whose extension is those sources alone, built with
# -fsanitize=address, then the test files that run the twins, in a pytest that preloads the
# sanitizer's runtime (and the C++ runtime, whose exceptions it intercepts). Every load and store
# of the twins must stay inside its buffers; the first report fails the run. Not part of
# `make test`: 3m18s on 2 cores, 80 s of it the sanitized build.
#
# Environment: PYTHON (default .venv/bin/python, with torch and the test extra, as `make test`
# makes it), ASAN_TESTS (the test files, default below), KEEP=1 keeps the scratch tree.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ "$PYTHON" == */* ]] && PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"  # absolute, links kept
ASAN_TESTS=${ASAN_TESTS:-"tests/test_depthwise.py tests/test_affine_hswish.py tests/test_residual_layernorm.py
  tests/test_factor_attention.py tests/test_mpvit.py tests/test_properties.py tests/test_fuse.py"}
runtimes="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
for lib in $runtimes; do
  [ -f "$lib" ] || { echo "asan-twins: no $lib (g++ with AddressSanitizer is needed)" >&2; exit 2; }
done

scratch=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$scratch"' EXIT
git clone -q "$ROOT" "$scratch/tree"
cd "$scratch/tree"
torch_dir=$("$PYTHON" -c "import os, torch; print(os.path.dirname(torch.__file__))")
py_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
flags=(-std=c++20 -O1 -g -fsanitize=address -fno-omit-frame-pointer -fPIC -fopenmp -DTORCH_EXTENSION_NAME=_C
       -DTORCH_API_INCLUDE_EXTENSION_H -DPy_LIMITED_API=0x030A0000 -I"$torch_dir/include"
       -I"$torch_dir/include/torch/csrc/api/include" -I"$py_include")
objects=()
for src in csrc/ops.cpp csrc/cpu/*.cpp; do
  obj="$scratch/$(echo "$src" | tr / _).o"
  g++ "${flags[@]}" -c "$src" -o "$obj" &
  objects+=("$obj")
done
wait
g++ -shared -fsanitize=address -fopenmp "${objects[@]}" -L"$torch_dir/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
  -Wl,-rpath,"$torch_dir/lib" -o mpvit_kernels/_C.abi3.so

# The CUDA registrations are absent from this build: the tests that look for them are left out.
# shellcheck disable=SC2086
LD_PRELOAD="$runtimes" ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$scratch/asan" \
  "$PYTHON" -m pytest -q -p no:cacheprovider -n auto --dist worksteal $ASAN_TESTS \
  -k "not registers_cpu_and_cuda and not on_the_host" \
  || status=$?
if ls "$scratch"/asan.* >/dev/null 2>&1; then
  cat "$scratch"/asan.*
  echo "asan-twins: AddressSanitizer reported the errors above" >&2
  exit 1
fi
exit "${status:-0}"
