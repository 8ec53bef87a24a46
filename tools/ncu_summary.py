"""Pivot an Nsight Compute CSV (``ncu --csv --metrics ...``, one row per
metric) into one line per kernel: time, DRAM GB/s, SM and DRAM % of peak,
occupancy, registers and the top warp stall reasons."""

from __future__ import annotations

import collections
import csv
import sys

STALL = "smsp__average_warps_issue_stalled_"


def main(path):
  rows = collections.OrderedDict()
  with open(path) as f:
    lines = [l for l in f if l.startswith('"')]
  for r in csv.DictReader(lines):
    k = (r["ID"], r["Kernel Name"])
    try:
      v = float(r["Metric Value"].replace(",", ""))
    except ValueError:
      continue
    rows.setdefault(k, {})[(r["Metric Name"], r["Metric Unit"])] = v
  print(f"{'us':>8} {'GB/s':>6} {'dram%':>5} {'sm%':>5} {'occ%':>5} {'reg':>4} {'smem':>6}"
        f" {'grid':>8}  top stalls (per issue) | kernel")
  for (kid, name), m in rows.items():
    get = lambda key: next((v for (n, u), v in m.items() if n == key), float("nan"))
    t_ns = next((v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(u, 1)
                 for (n, u), v in m.items() if n == "gpu__time_duration.sum"), float("nan"))
    byts = sum(v * {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(u, 1)
               for (n, u), v in m.items() if n in ("dram__bytes_read.sum", "dram__bytes_write.sum"))
    stalls = sorted(((v, n[len(STALL):].replace("_per_issue_active.ratio", ""))
                     for (n, u), v in m.items() if n.startswith(STALL)), reverse=True)[:3]
    print(f"{t_ns / 1e3:8.1f} {byts / t_ns:6.0f} {get('dram__throughput.avg.pct_of_peak_sustained_elapsed'):5.1f}"
          f" {get('sm__throughput.avg.pct_of_peak_sustained_elapsed'):5.1f}"
          f" {get('sm__warps_active.avg.pct_of_peak_sustained_active'):5.1f}"
          f" {get('launch__registers_per_thread'):4.0f} {get('launch__shared_mem_per_block_static'):6.0f}"
          f" {get('launch__grid_size'):8.0f}  "
          + " ".join(f"{n}={v:.1f}" for v, n in stalls) + f" | {name[:90]}")


if __name__ == "__main__":
  main(sys.argv[1])
