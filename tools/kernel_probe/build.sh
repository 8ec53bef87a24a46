#!/usr/bin/env bash
# Builds tools/kernel_probe/kernel_probe (sm_90a; ARCH=80 for sm_80) against
# the XLA FFI headers of the installed jaxlib (or FFI_INC). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")"
FFI_INC="${FFI_INC:-$(python3 -c 'import jax; print(jax.ffi.include_dir())')}"
ARCH="${ARCH:-90a}"
FLAGS=(-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -fmad=false
       -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -I../../xla_ffi -isystem "$FFI_INC")
OBJ="${OBJ_DIR:-/tmp/kernel_probe_obj}"
mkdir -p "$OBJ"
for f in main probe_quantize probe_bitsplit probe_lsq; do
  nvcc "${FLAGS[@]}" -c "$f.cu" -o "$OBJ/$f.o" &
done
wait
nvcc -gencode "arch=compute_${ARCH},code=sm_${ARCH}" "$OBJ"/*.o -o kernel_probe
echo "built $(pwd)/kernel_probe"
