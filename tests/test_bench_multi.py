"""Smoke test of benchmarks/bench_multi.py on CPU host devices.

Runs the benchmark's main in this process (tests/conftest.py gives 8 CPU
devices) at a tiny size on 2 devices, every layout but fsdp_tensor, and
checks its JSON and PNG: positive tokens/s for both models, the 1-device
loss check, and the FSDP kernel gathers read from the compiled HLO (INT4's
u8 codes a quarter of a bf16 gather: an HLO fact on any platform). No speed
is asserted.
"""

import json
import math
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2
LAYOUTS = ("data", "tensor", "fsdp")

pytestmark = pytest.mark.skipif(
    len(jax.devices("cpu")) < DEVICES or jax.default_backend() != "cpu",
    reason=f"needs {DEVICES} CPU devices as the default backend: run under"
           " tests/conftest.py (--xla_force_host_platform_device_count=8)")


def positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_multi(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import bench_multi
  rc = bench_multi.main([
      "--hidden", "64", "--heads", "2", "--layers", "1", "--seq-len", "32",
      "--batch", "2", "--vocab", "64", "--steps", "2", "--warmup", "0",
      "--devices", str(DEVICES), "--layouts", ",".join(LAYOUTS),
      "--engine", "reference", "--out-dir", str(tmp_path)])
  assert rc == 0
  with open(tmp_path / "bench_multi_cpu.json") as f:
    report = json.load(f)
  assert (tmp_path / "bench_multi_cpu.png").exists()
  assert report["settings"]["devices"] == DEVICES
  for m in ("bf16", "int4"):
    assert positive(report["one_device"][m]["tokens_per_s"])
  assert set(report["layouts"]) == set(LAYOUTS)
  for layout, row in report["layouts"].items():
    for m in ("bf16", "int4"):
      r = row[m]
      assert positive(r["tokens_per_s"]) and positive(r["scaling_efficiency"]), (layout, m)
      assert len(r["times_ms"]) == 2
      assert r["global_batch"] == (2 if layout == "tensor" else 2 * DEVICES)
      check = r["check"]
      assert check["rel_diff"] < 1e-3, (layout, m, check)
    assert positive(row["int4_vs_bf16_tokens_per_s"])
    if layout != "fsdp":   # replicated or tensor-sharded kernels: not gathered
      assert row["int4"]["collectives"]["kernel_gather_bytes"] == 0, layout
  fsdp = report["layouts"]["fsdp"]
  b, i = fsdp["bf16"]["collectives"], fsdp["int4"]["collectives"]
  assert i["kernel_gather_dtypes"] == ["u8"]
  assert i["kernel_gather_bytes"] > 0 and b["kernel_gather_bytes"] > 0
  # One gather of 4-bit codes: a quarter of the bf16 kernel's bytes.
  assert fsdp["largest_kernel_gather_int4_vs_bf16"] <= 0.25
  # Per step, as compiled here (a CPU gathers the bf16 model's kernels in float32).
  assert fsdp["kernel_gather_bytes_int4_vs_bf16"] <= 0.25
  assert i["total_bytes"] > 0 and b["total_bytes"] > 0
