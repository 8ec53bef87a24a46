"""The card's clocks and power during each benchmark case's timed samples.

`tools/gpu_check.sh` logs `nvidia-smi` every 0.5 s to smi.csv, with a line
``# start <script> <unix seconds>`` before each benchmark; the benchmarks
record each timed sample's [start, end] in Unix seconds (``windows_s`` in
their JSON). This joins the two: per case, the log readings that fall inside
its samples, their median SM clock, their mean and peak power, and the share
of them with the software power cap (clock-event reason bit 0x4) active.

The log's wall-clock timestamps are in the device's local time; their offset
to Unix seconds is taken from the ``# start`` lines (the first reading after
each follows it within the 0.5 s logging period).

Usage: python3 tools/smi_by_case.py smi.csv bench_layer_gpu.json [more.json]
"""

import datetime
import json
import statistics
import sys

POWER_CAP = 0x4  # clocks_event_reasons: software power cap


def parse_smi(lines):
  """(readings, markers): readings as (local seconds, sm_mhz, watts, reasons
  or None); markers as (unix seconds, local seconds of the next reading)."""
  readings, markers, pending = [], [], []
  for line in lines:
    line = line.strip()
    if line.startswith("# start"):
      pending.append(float(line.split()[-1]))
      continue
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 5 or not parts[1].endswith("MHz"):
      continue  # header or an error line
    when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    reasons = int(parts[5], 16) if len(parts) > 5 and parts[5].startswith("0x") else None
    readings.append((when, float(parts[1].split()[0]), float(parts[3].split()[0]), reasons))
    markers.extend((unix, when) for unix in pending)
    pending = []
  return readings, markers


def clock_offset(markers):
  """Unix minus logged seconds, rounded to whole minutes' worth of time zone
  (the reading after a marker lags it by less than the logging period)."""
  if not markers:
    return 0.0
  diffs = sorted(unix - local for unix, local in markers)
  return round(statistics.median(diffs) / 900.0) * 900.0  # zones: 15-min steps


def summarize(readings, offset, windows):
  """Clock and power statistics of the readings inside ``windows``."""
  inside = [r for r in readings
            if any(a <= r[0] + offset <= b for a, b in windows)]
  if not inside:
    return {"readings": 0}
  with_reason = [r for r in inside if r[3] is not None]
  return {
      "readings": len(inside),
      "sm_mhz_median": statistics.median(r[1] for r in inside),
      "sm_mhz_min": min(r[1] for r in inside),
      "watts_mean": statistics.fmean(r[2] for r in inside),
      "watts_max": max(r[2] for r in inside),
      "power_capped_share": (sum(1 for r in with_reason if r[3] & POWER_CAP)
                             / len(with_reason)) if with_reason else None,
  }


def cases(report):
  """(label, windows) of every timed case in a benchmark JSON."""
  for row in report.get("results", report.get("rows", [])):
    if "windows_s" in row:  # bench_layer
      yield f"{row.get('shape')} {row.get('case')}", row["windows_s"]
    for key, value in row.items():  # bench_train (variants), bench_gemm (engines)
      if isinstance(value, dict) and "windows_s" in value:
        label = row.get("hidden", row.get("shape"))
        yield f"{label} {key}", value["windows_s"]


def main(argv):
  if len(argv) < 2:
    print(__doc__)
    return 2
  with open(argv[0]) as f:
    readings, markers = parse_smi(f)
  offset = clock_offset(markers)
  for path in argv[1:]:
    with open(path) as f:
      report = json.load(f)
    print(f"== {path}")
    for label, windows in cases(report):
      s = summarize(readings, offset, windows)
      if not s["readings"]:
        print(f"{label:40s} no readings inside its samples")
        continue
      cap = s["power_capped_share"]
      print(f"{label:40s} {s['readings']:4d} readings  SM {s['sm_mhz_median']:6.0f} MHz"
            f" (min {s['sm_mhz_min']:4.0f})  {s['watts_mean']:5.0f} W (max"
            f" {s['watts_max']:4.0f})  power-capped"
            f" {'n/a' if cap is None else f'{100 * cap:.0f}%'}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
