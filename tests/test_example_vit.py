"""The ViT example (examples/train_vit.py) at a tiny size: an INT4 run writes
its metrics, and a run stopped and resumed from its checkpoint retraces the
uninterrupted one exactly."""

import importlib.util
import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 4x4 patches (4 tokens + the class token, contraction 16), one small block.
TINY = ["--patch", "4", "--hidden", "32", "--layers", "1", "--heads", "2", "--mlp-dim", "32",
        "--batch", "8", "--eval-batches", "1", "--no-progress"]


def _example():
  if "train_vit" not in sys.modules:
    examples = str(ROOT / "examples")
    if examples not in sys.path:
      sys.path.insert(0, examples)  # its own imports: corpora, trainer
    spec = importlib.util.spec_from_file_location("train_vit", ROOT / "examples" / "train_vit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses (Flax modules) look it up
    spec.loader.exec_module(module)
  return sys.modules["train_vit"]


def _metrics(directory):
  with open(directory / "metrics.json") as f:
    return json.load(f)


def test_int4_run_writes_finite_metrics(tmp_path, capsys):
  out = tmp_path / "run"
  argv = TINY + ["--quant", "hq_lss", "--steps", "4", "--eval-every", "2", "--out-dir", str(out)]
  assert _example().main(argv) == 0
  printed = capsys.readouterr().out
  # The patch embedding runs in INT4 (contraction 4 * 4 * 1 = 16), the head float.
  rows = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
  assert "Conv" in rows["embedding"] and " yes " in rows["embedding"], printed
  assert " no " in rows["head"] and "kept by keep=" in rows["head"], printed
  assert "7 of 10 linear-like layers in INT4" in printed, printed
  m = _metrics(out)
  assert m["quant"] == "hq_lss" and [h["step"] for h in m["history"]] == [0, 2, 4]
  final = m["final"]
  assert math.isfinite(final["eval_loss"]) and 0.0 <= final["eval_accuracy"] <= 1.0
  assert all(math.isfinite(h["train_loss"]) for h in m["history"][1:])
  assert (out / "curves.png").exists()


def test_stopped_and_resumed_run_retraces_the_uninterrupted_one(tmp_path):
  example = _example()
  # Three runs, so no encoder block (a third of the compile time): the INT4
  # patch embedding's leverage score sampling and stochastic rounding are what
  # must replay, from the step-indexed batches and 'quant' keys.
  run = TINY + ["--layers", "0", "--quant", "hq_lss", "--steps", "6", "--eval-every", "2",
                "--no-plot"]
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  assert example.main(run + ["--out-dir", str(whole)]) == 0
  assert example.main(run + ["--out-dir", str(parts), "--stop-after", "4"]) == 0
  assert [h["step"] for h in _metrics(parts)["history"]] == [0, 2, 4]
  assert example.main(run + ["--out-dir", str(parts), "--resume"]) == 0
  # Everything but the wall-clock time matches to the last bit.
  strip = lambda m: [{k: v for k, v in h.items() if k != "time_s"} for h in m["history"]]
  a, b = _metrics(whole), _metrics(parts)
  assert [h["step"] for h in a["history"]] == [0, 2, 4, 6]
  assert strip(a) == strip(b)
  assert a["final"] == b["final"]
