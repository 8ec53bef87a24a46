#!/usr/bin/env bash
# Builds jint4 with its CUDA handlers from this checkout and runs the tests
# that need a GPU.
#
# Usage: bash tools/gpu_test.sh [--out DIR] [--wheel-dir DIR] [--ffi-include DIR]
#                               [--no-cpu-suite] [--no-build]
#
#   --out DIR          where the logs and summary.txt go (default:
#                      $TMPDIR/jint4_gpu_test, or /tmp/jint4_gpu_test)
#   --wheel-dir DIR    install the build requirements (pyproject.toml's
#                      [build-system] requires, minus jaxlib) from the wheels in
#                      DIR, without a package index: for machines that cannot
#                      reach one. They must include nvidia-cutlass.
#   --ffi-include DIR  build against the XLA FFI headers in DIR (e.g. the
#                      include/ folder of the oldest jaxlib you support; see
#                      docs/HOPPER.md). Default: the installed jaxlib's headers.
#   --no-cpu-suite     skip step 3 (the CPU suite, which CPU-only CI runs too).
#   --no-build         skip the build in step 1 and test the jint4 that the
#                      active Python imports (e.g. PYTHONPATH at a checkout
#                      whose jint4/ holds an extension built elsewhere for
#                      this Python); step 1 still checks it has CUDA handlers.
#
# Needs: nvcc on PATH, a CUDA GPU, and jax with its CUDA plugin, flax, optax,
# pytest and pytest-xdist (the dev extra) installed in the active Python
# environment. The tests run in-process (-n 0): xdist workers would share the GPU.
#
# Steps, each logged to DIR and summarized in DIR/summary.txt:
#   1. build: pip install --no-build-isolation -e . (the CUDA handlers must
#      be in the result);
#   2. the GPU suite: pytest -m gpu tests/ (CUDA handlers against the pure-JAX
#      engine and the CPU handlers);
#   3. the CPU handlers' suite: tests/kernels/test_native.py (on the CPU);
#   4. the bad-input script of test_native.py with the CUDA backend present
#      (step 3 runs it under JAX_PLATFORMS=cpu only);
#   5. compute-sanitizer memcheck over a small run of every op, when
#      compute-sanitizer is on PATH;
#   6. tools/ffi_error_probe: does this jaxlib turn a failing FFI handler into
#      a Python exception, whatever way its message was built, on the CPU and
#      on the GPU (needs g++)?
# Exits 0 when every step that ran passed.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
OUT="${TMPDIR:-/tmp}/jint4_gpu_test" WHEEL_DIR="" FFI_INCLUDE="" CPU_SUITE=1 BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --wheel-dir) WHEEL_DIR="$2"; shift 2 ;;
    --ffi-include) FFI_INCLUDE="$2"; shift 2 ;;
    --no-cpu-suite) CPU_SUITE=0; shift ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_test.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Paths given relative to the caller's directory, then work in the repository.
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
[ -z "$WHEEL_DIR" ] || WHEEL_DIR="$(cd "$WHEEL_DIR" && pwd)" || exit 2
[ -z "$FFI_INCLUDE" ] || FFI_INCLUDE="$(cd "$FFI_INCLUDE" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
: > "$OUT/summary.txt"
PY=python3
FAILED=0
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME COMMAND...: runs COMMAND, logs to OUT/NAME.log, records pass/fail
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then say "PASS $name ($((SECONDS - start)) s)"
  else FAILED=1; say "FAIL $name (rc $rc, $((SECONDS - start)) s): $(tail -1 "$OUT/$name.log")"; fi
  return $rc
}

command -v nvidia-smi > /dev/null &&
  say "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
say "$("$PY" -c 'import sys, jax, jaxlib; print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())' 2>&1 | tail -1)"
command -v nvcc > /dev/null || { say "FAIL nvcc is not on PATH: the CUDA handlers would not be built"; exit 1; }

# 1. Build. The build requirements come from pyproject.toml, except jaxlib,
# which is pinned there only for its FFI headers (--ffi-include replaces it
# here) and must not replace the installed one.
build_requirements() {
  "$PY" - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
  requires = tomllib.load(f)["build-system"]["requires"]
print(" ".join(r.replace(" ", "") for r in requires if not r.startswith("jaxlib")))
EOF
}
build() {
  [ $BUILD -eq 1 ] || { check_build; return; }
  local index=() config=() deps=()
  [ -z "$WHEEL_DIR" ] || index=(--no-index --find-links "$WHEEL_DIR")
  [ -z "$FFI_INCLUDE" ] || config=(-C "cmake.define.JINT4_FFI_INCLUDE_DIR=$FFI_INCLUDE")
  local req
  for req in $(build_requirements); do
    # nvidia-cutlass is needed for its headers only: not its Python deps.
    case "$req" in nvidia-cutlass*) deps=(--no-deps) ;; *) deps=() ;; esac
    "$PY" -m pip install "${index[@]}" "${deps[@]}" "$req" || return
  done
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip install -v --no-build-isolation "${index[@]}" "${config[@]}" -e . || return
  check_build
}
check_build() {
  "$PY" - <<'EOF'
import json, sys
import jint4
from jint4.kernels import native
info = native.build_info()
print(json.dumps(info, default=str))
if not info.get("cuda"):
  sys.exit("the native extension was built without its CUDA handlers")
if not native.available():
  sys.exit(f"the native extension is not usable: {native.reason()}")
EOF
}
step build build || { tail -40 "$OUT/build.log"; exit 1; }
say "$(tail -1 "$OUT/build.log")"

# 2-3. Test suites (JINT4_REQUIRE_NATIVE=1: a missing native engine fails
# them instead of skipping them).
# -v: each test's outcome is logged as it ends, so a run stopped by an outer
# time limit still says which tests failed (the tracebacks come at the end).
export JINT4_REQUIRE_NATIVE=1 PYTHONUNBUFFERED=1
step gpu_suite "$PY" -m pytest -v --tb=short -n 0 -rfE -p no:cacheprovider -m gpu tests/
# The CPU handlers' suite compares them with the pure-JAX twins on the CPU;
# on the GPU the twins would run on XLA:GPU's int8 dot, which is not exact
# for some small shapes (test_native_gpu.py's test_xla_gpu_int8_dot_exactness).
[ $CPU_SUITE -eq 0 ] ||
  step native_cpu_suite env JAX_PLATFORMS=cpu "$PY" -m pytest -q -n 0 -rfE -p no:cacheprovider tests/kernels/test_native.py

# 4. The bad-input script with the CUDA backend up: every bad call must raise
# a Python error with its reason, not crash the process (faulthandler prints
# where a crash happened).
"$PY" - > "$OUT/bad_input.py" <<'EOF'
import re
text = open("tests/kernels/test_native.py").read()
print(re.search(r'_BAD_INPUT_SCRIPT = r?"""(.*?)"""', text, re.S).group(1))
EOF
step bad_input env JAX_PLATFORMS=cuda,cpu "$PY" -X faulthandler -u "$OUT/bad_input.py"

# 5. compute-sanitizer (memcheck) over test_native_gpu.py's small case.
if command -v compute-sanitizer > /dev/null; then
  step sanitizer compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/kernels/test_native_gpu.py -k sanitizer
else
  say "SKIP sanitizer (compute-sanitizer is not on PATH)"
fi

# 6. Failing FFI handlers of every kind must raise, on both platforms.
if command -v g++ > /dev/null; then
  step ffi_error_probe "$PY" tools/ffi_error_probe/run.py --platforms cpu,cuda \
    --out "$OUT" ${FFI_INCLUDE:+--ffi-include "$FFI_INCLUDE"}
else
  say "SKIP ffi_error_probe (g++ is not on PATH)"
fi

exit $FAILED
