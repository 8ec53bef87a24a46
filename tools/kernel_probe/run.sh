#!/usr/bin/env bash
# Device run of the kernel probe: build, time at the layer shapes, then one
# Nsight Compute pass (NCU=0 skips it). Results under $OUT (default ./probe_out).
set -uo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-$PWD/probe_out}"
mkdir -p "$OUT"
bash build.sh > "$OUT/probe_build.log" 2>&1 || { tail -30 "$OUT/probe_build.log"; exit 1; }
# PROBE_SHAPES: "N D C" triples separated by ';'.
IFS=';' read -ra SHAPES <<< "${PROBE_SHAPES:-16384 4096 4096;8192 8192 8192}"
for shape in "${SHAPES[@]}"; do
  ./kernel_probe $shape 2>&1 | tee -a "$OUT/probe_times.txt"
done
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  timeout "${NCU_TIMEOUT:-150}" ncu --clock-control none --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis ${NCU_ARGS:-} \
    ./kernel_probe ${NCU_SHAPE:-16384 4096 4096} --once > "$OUT/probe_ncu.txt" 2>&1
  echo "ncu rc=$? ($(grep -c 'Section: GPU Speed Of Light' "$OUT/probe_ncu.txt") kernels profiled)"
fi
