#!/usr/bin/env bash
# Builds tools/kernel_probe/kernel_probe: jint4's elementwise CUDA handlers
# called without JAX (see main.cu). Run from anywhere.
#
# Usage: bash tools/kernel_probe/build.sh [--arch 90a] [--ffi-include DIR]
#   --arch         CUDA architecture, as in sm_<arch> (default 90a; 80 for A100)
#   --ffi-include  XLA FFI headers (default: those of the installed jaxlib)
set -euo pipefail
usage() { sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
ARCH=90a FFI_INC=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --ffi-include) FFI_INC="$(cd "$2" && pwd)"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")"
[ -n "$FFI_INC" ] || FFI_INC="$(python3 -c 'import jax; print(jax.ffi.include_dir())')"
FLAGS=(-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -fmad=false
       -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -I../../xla_ffi -isystem "$FFI_INC")
OBJ="$(mktemp -d)"
trap 'rm -rf "$OBJ"' EXIT
pids=()
for f in main probe_quantize probe_bitsplit probe_residual probe_lsq_backward probe_lsq_weight; do
  nvcc "${FLAGS[@]}" -c "$f.cu" -o "$OBJ/$f.o" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
nvcc -gencode "arch=compute_${ARCH},code=sm_${ARCH}" "$OBJ"/*.o -o kernel_probe
echo "built $(pwd)/kernel_probe"
