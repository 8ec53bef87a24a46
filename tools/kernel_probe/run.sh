#!/usr/bin/env bash
# Builds the kernel probe, times the handlers at each shape, then profiles one
# shape with Nsight Compute when ncu is on PATH. Run from anywhere.
#
# Usage: bash tools/kernel_probe/run.sh [--out DIR] [--shapes "N D C;N D C"]
#                                       [--no-ncu] [--ncu-shape "N D C"] [--ncu-args "..."]
#   --out        where probe_build.log, probe_times.txt, probe_ncu.txt go
#                (default: tools/kernel_probe/probe_out)
#   --shapes     x[N, D], kernel[D, C], g[N, C] shapes to time
#                (default "16384 4096 4096;8192 8192 8192")
#   --no-ncu     skip the Nsight Compute pass
#   --ncu-shape  the shape to profile (default "16384 4096 4096")
#   --ncu-args   extra ncu arguments, e.g. "--kernel-name regex:Split"
set -uo pipefail
usage() { sed -n '2,/^set -/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$HERE/probe_out" SHAPES="16384 4096 4096;8192 8192 8192" NCU=1
NCU_SHAPE="16384 4096 4096" NCU_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --shapes) SHAPES="$2"; shift 2 ;;
    --no-ncu) NCU=0; shift ;;
    --ncu-shape) NCU_SHAPE="$2"; shift 2 ;;
    --ncu-args) NCU_ARGS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$HERE" || exit 2
bash build.sh > "$OUT/probe_build.log" 2>&1 || { tail -30 "$OUT/probe_build.log"; exit 1; }
IFS=';' read -ra shapes <<< "$SHAPES"
: > "$OUT/probe_times.txt"
for shape in "${shapes[@]}"; do
  # shellcheck disable=SC2086  # "N D C" splits into three arguments
  ./kernel_probe $shape 2>&1 | tee -a "$OUT/probe_times.txt"
done
if [ "$NCU" = 1 ] && command -v ncu > /dev/null; then
  # shellcheck disable=SC2086
  timeout 600 ncu --clock-control none --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis $NCU_ARGS \
    ./kernel_probe $NCU_SHAPE --once > "$OUT/probe_ncu.txt" 2>&1
  echo "ncu rc=$? ($(grep -c 'Section: GPU Speed Of Light' "$OUT/probe_ncu.txt") kernels profiled)"
fi
