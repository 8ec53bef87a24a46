"""Smoke tests of benchmarks/bench_ops.py, bench_layer.py, bench_train.py and
bench_loss.py.

Each script runs as a subprocess at the tiniest settings, on the pure-JAX
reference engine, and must write its JSON (expected keys, positive finite
timings) and PNG. XLA's backend optimisation is turned off to cut compile
time: these runs check the scripts, they measure nothing. No number is
asserted against another.
"""

import glob
import json
import math
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, out_dir, *flags):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH")) if p)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_backend_optimization_level=0").strip()
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", name),
       "--out-dir", str(out_dir), "--engine", "reference", *flags],
      capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  stem = name[:-len(".py")]
  (json_path,) = glob.glob(os.path.join(str(out_dir), f"{stem}_*.json"))
  assert os.path.exists(json_path[:-len(".json")] + ".png")
  with open(json_path) as f:
    return json.load(f)


def positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_layer(tmp_path):
  report = run_script("bench_layer.py", tmp_path, "--tokens", "64",
                      "--hidden", "64", "--repeats", "1", "--warmup", "0",
                      "--backward", "lss,bitsplit")
  assert {"benchmark", "environment", "settings", "results"} <= set(report)
  assert report["settings"]["tokens"] == 64
  rows = report["results"]
  assert {(tuple(r["shape"]), r["case"]) for r in rows} == {
      ((64, 64, d_out), case) for d_out in (64, 256)
      for case in ("bf16 nn.Dense", "fp8 nn.Dense", "int4 lss", "int4 bitsplit")}
  for r in rows:
    for key in ("median_ms", "min_ms", "speedup_vs_bf16", "first_call_s",
                "residual_bytes_per_input_element"):
      assert positive(r[key]), (key, r)
    assert len(r["times_ms"]) == 1
    ((start, end),) = r["windows_s"]  # the sample's wall-clock window
    assert 0 < end - start < 600
  bf16 = [r for r in rows if r["case"] == "bf16 nn.Dense"]
  assert all(r["speedup_vs_bf16"] == 1.0 for r in bf16)
  assert all(r["residual_bytes_per_input_element"] == 2.0 for r in bf16)
  fp8 = [r for r in rows if r["case"] == "fp8 nn.Dense"]
  assert all(r["speedup_vs_fp8"] == 1.0 for r in fp8)
  assert all(positive(r["speedup_vs_fp8"]) for r in rows)


def test_bench_layer_without_fp8(tmp_path):
  report = run_script("bench_layer.py", tmp_path, "--tokens", "64", "--hidden", "64",
                      "--repeats", "1", "--warmup", "0", "--backward",
                      "bitsplit,bitsplit:tensor", "--no-fp8", "--tag", "split")
  assert glob.glob(os.path.join(str(tmp_path), "bench_layer_split_*.json"))
  assert {r["case"] for r in report["results"]} == {
      "bf16 nn.Dense", "int4 bitsplit", "int4 bitsplit:tensor"}
  assert {r["backward"] for r in report["results"]} == {None, "bitsplit", "bitsplit:tensor"}
  assert all(r["speedup_vs_fp8"] is None for r in report["results"])


@pytest.mark.parametrize("bad", ["bitsplit:col", "sparse", "lss:row:tensor"])
def test_bench_layer_rejects_unknown_modes(bad):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_layer.py"),
                         "--backward", bad], capture_output=True, text=True, timeout=300,
                        env=env, cwd=ROOT)
  assert proc.returncode == 2 and "unknown mode" in proc.stderr, proc.stderr


def test_bench_train(tmp_path):
  report = run_script("bench_train.py", tmp_path, "--small", "--hidden", "128",
                      "--seq-len", "32", "--tokens", "64", "--vocab", "64",
                      "--repeats", "1", "--warmup", "0", "--calls", "2",
                      "--split-scale", "tensor")
  assert {"benchmark", "environment", "settings", "results"} <= set(report)
  assert report["settings"]["calls"] == 2
  assert report["settings"]["split_scale"] == "tensor"   # reached the children
  assert report["settings"]["layers"] == 1  # from --small
  (row,) = report["results"]
  assert row["hidden"] == 128 and row["heads"] == 1
  assert report["settings"]["variants"] == ["bf16", "int4", "fp8"]
  for ratio in ("int4_vs_bf16", "fp8_vs_bf16", "int4_vs_fp8"):
    assert positive(row[f"{ratio}_tokens_per_s"])
    assert f"{ratio}_peak_memory" in row
  np_ratio = row["int4"]["tokens_per_s"] / row["fp8"]["tokens_per_s"]
  assert abs(row["int4_vs_fp8_tokens_per_s"] - np_ratio) < 1e-9
  # The FP8 step (its scales threaded through the optimizer state) trains.
  assert row["fp8"]["loss_last"] < row["fp8"]["loss_first"]
  for variant in ("bf16", "int4", "fp8"):
    r = row[variant]
    for key in ("median_ms", "tokens_per_s", "first_call_s", "n_params",
                "linear_input_bytes_saved", "activation_bytes_saved_vjp"):
      assert positive(r[key]), (variant, key, r)
    assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    assert "peak_bytes_in_use" in r
    assert len(r["times_ms"]) == 1  # --repeats samples of --calls steps
    assert len(r["windows_s"]) == 1 and r["windows_s"][0][0] < r["windows_s"][0][1]
    assert r["attention_run"] == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  assert (row["int4"]["linear_input_bytes_saved"]
          < row["bf16"]["linear_input_bytes_saved"]
          == row["fp8"]["linear_input_bytes_saved"])  # Flax's FP8 keeps bf16 inputs


def test_bench_ops(tmp_path):
  report = run_script("bench_ops.py", tmp_path, "--shapes", "64,32,32", "--repeats", "1",
                      "--compare", "64,32,32")
  (shape,) = report["shapes"].values()
  assert set(shape) == {"HQ-MM", "LSS-Act", "LSS-Weight", "BS-Act", "BS-Weight"}
  for op in shape.values():
    assert positive(op["int4_ms"]) and positive(op["bf16_ms"]) and positive(op["speedup"])
    assert op["stages"] and all(positive(s["median_ms"]) for s in op["stages"])
  from jint4.kernels.engine import OPS
  assert set(report["engine_ops"]) == set(OPS)
  for v in report["engine_ops"].values():
    assert positive(v["native_ms"]) and positive(v["reference_ms"])
    assert v["faster"] in ("native", "reference")


def test_bench_loss(tmp_path):
  report = run_script("bench_loss.py", tmp_path, "--hidden", "128", "--layers", "1",
                      "--seq-len", "16", "--batch", "2", "--vocab", "64", "--steps", "2")
  assert report["settings"]["steps"] == 2
  curves = report["losses"]
  assert set(curves) == {"bf16", "int4 exact", "int4 bitsplit", "int4 lss"}
  for ys in curves.values():
    assert len(ys) == 2 and all(positive(y) for y in ys)

