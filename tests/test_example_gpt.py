"""The GPT pre-training example and the grid report, at a tiny size: real text,
an INT4 mode that learns, a checkpoint resumed on the very same curve, and a
RESULTS page with the paired ratio to float."""

import dataclasses
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint4
from jint4.quant import hadamard

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--steps", "8", "--eval-every", "4", "--d-model", "32", "--layers", "1",
        "--seq-len", "32", "--batch", "4", "--eval-batches", "1", "--no-progress"]


def _load(name):
  if name not in sys.modules:
    if str(EXAMPLES) not in sys.path:
      sys.path.insert(0, str(EXAMPLES))  # the examples import their shared modules
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses (Flax modules) look it up
    spec.loader.exec_module(module)
  return sys.modules[name]


def _metrics(path):
  return json.loads((path / "metrics.json").read_text())


def test_corpus_is_real_text_with_a_disjoint_held_out_split():
  corpora = _load("corpora")
  text = corpora.text_corpus()
  assert len(text.train) > 3_000_000 and len(text.eval) > 300_000
  sample = bytes(text.train[:2000].astype(np.uint8)).decode()
  assert "In the beginning God created" in sample
  # Held-out chapters are not in the training text.
  held = bytes(text.eval[5000:5200].astype(np.uint8)).decode()
  train = bytes(text.train.astype(np.uint8)).decode()
  assert held not in train
  x, y = corpora.lm_batch(text.train, 4, 16, seed=3, step=7)
  x2, _ = corpora.lm_batch(text.train, 4, 16, seed=3, step=7)
  np.testing.assert_array_equal(x, x2)  # a pure function of (seed, step)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_int4_gpt_learns_and_writes_metrics_and_curves(tmp_path):
  gpt = _load("train_gpt")
  assert gpt.main(TINY + ["--quant", "hq_lss", "--out-dir", str(tmp_path)]) == 0
  m = _metrics(tmp_path)
  losses = [h["eval_loss"] for h in m["history"]]
  assert m["quant"] == "hq_lss" and "backward='lss'" in m["config"]
  assert [h["step"] for h in m["history"]] == [0, 4, 8]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5
  assert (tmp_path / "curves.png").stat().st_size > 1000


def test_resume_continues_the_same_curve(tmp_path):
  gpt = _load("train_gpt")
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  argv = TINY + ["--quant", "hq_bitsplit", "--no-plot"]
  assert gpt.main(argv + ["--out-dir", str(whole)]) == 0
  assert gpt.main(argv + ["--out-dir", str(parts), "--stop-after", "4"]) == 0
  assert _metrics(parts)["history"][-1]["step"] == 4
  assert gpt.main(argv + ["--out-dir", str(parts), "--resume"]) == 0
  drop_time = lambda hs: [{k: v for k, v in h.items() if k != "time_s"} for h in hs]
  # The quantizer's step sizes and the optimizer state came back with the
  # weights, and batches and keys depend only on the step: the same numbers.
  assert drop_time(_metrics(parts)["history"]) == drop_time(_metrics(whole)["history"])


def test_report_runs_a_grid_and_writes_the_results_page(tmp_path):
  report = _load("report")
  out = tmp_path / "RESULTS.md"
  extra = " ".join(TINY[:-1])
  argv = ["--examples", "gpt", "--stages", "gpt", "--modes", "fp,hq_lss", "--seeds", "1",
          "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--extra", extra]
  assert report.main(argv) == 0
  text = out.read_text()
  assert "| fp | 1 |" in text and "| hq_lss | 1 |" in text
  fp = _metrics(tmp_path / "runs" / "cpu" / "gpt" / "fp" / "seed0")["final"]["eval_loss"]
  lss = _metrics(tmp_path / "runs" / "cpu" / "gpt" / "hq_lss" / "seed0")["final"]["eval_loss"]
  assert f"{lss / fp:.4f}" in text  # the ratio to fp, paired by seed
  # Where the runs were measured, as each run recorded it.
  machine = _metrics(tmp_path / "runs" / "cpu" / "gpt" / "fp" / "seed0")["machine"]
  assert f"jax {jax.__version__}" in machine and "CPU" in machine
  assert f"Measured: {machine}." in text
  # ... and which jint4 engine ran the INT4 run's ops.
  gpt = _load("train_gpt")
  engine = _metrics(tmp_path / "runs" / "cpu" / "gpt" / "hq_lss" / "seed0")["engine"]
  config = gpt.trainer.quant_config(gpt.parse_args(["--quant", "hq_lss"]))
  assert engine == gpt.trainer.engine_used(config)
  assert _metrics(tmp_path / "runs" / "cpu" / "gpt" / "fp" / "seed0")["engine"] is None
  assert f"jint4 engine of the INT4 runs: {engine}." in text
  assert (tmp_path / "results" / "gpt_cpu.png").stat().st_size > 1000
  # jint4.diagnose on the final hq_lss weights: one row per INT4 product.
  assert "## Diagnostics" in text and "block_0/mlp/down" in text
  assert (tmp_path / "results" / "diagnosis_gpt_cpu.png").stat().st_size > 1000
  # A finished grid is not run again.
  before = (tmp_path / "runs" / "cpu" / "gpt" / "fp" / "seed0" / "metrics.json").stat().st_mtime
  assert report.main(argv) == 0
  after = (tmp_path / "runs" / "cpu" / "gpt" / "fp" / "seed0" / "metrics.json").stat().st_mtime
  assert before == after


def test_width_stages_run_the_examples_at_other_widths_on_request():
  report, gpt = _load("report"), _load("train_gpt")
  default = report.selected_stages(report.parse_args([]))
  assert not set(default) & set(report.STAGES["width"])
  stages = [s for s in report.selected_stages(report.parse_args(["--examples", "width"]))
            if s.script == "train_gpt.py"]
  base = gpt.parse_args([]).d_model
  assert [gpt.parse_args(list(s.argv)).d_model for s in stages] == [base // 2, 2 * base]
  gpu = report.STAGES_BY_NAME["gpt"].gpu_argv
  wide = gpt.parse_args(list(gpu)).d_model
  assert [gpt.parse_args([*s.argv, *s.gpu_argv]).d_model for s in stages] == [wide // 2, 2 * wide]
  bert = _load("train_bert")
  wide_bert = report.STAGES_BY_NAME["bert_pretrain_w256"]
  assert bert.parse_args(list(wide_bert.argv)).d_model == 2 * bert.parse_args([]).d_model


def test_cells_run_at_once_share_the_gpu_memory():
  report = _load("report")
  one = report.cell_env(report.parse_args([]), {"PATH": "/bin"})
  assert one == {"PATH": "/bin"}
  many = report.cell_env(report.parse_args(["--jobs", "4", "--single-thread"]), {})
  assert many["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert "--xla_cpu_multi_thread_eigen=false" in many["XLA_FLAGS"]
  kept = report.cell_env(report.parse_args(["--jobs", "4"]),
                         {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})
  assert kept["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_measured_on_names_every_machine_of_a_stage():
  report = _load("report")
  runs = {"fp": {0: {"machine": "A"}, 1: {"machine": "A"}}, "hq_lss": {0: {}}}
  assert report.measured_on(runs) == "A (2 runs); not recorded (1 runs)"
  assert report.measured_on({"fp": {0: {"machine": "A"}}}) == "A"


def test_engines_used_names_the_engine_of_every_int4_run():
  report = _load("report")
  runs = {"fp": {0: {"engine": None}}, "hq_lss": {0: {"engine": "native"}, 1: {}},
          "hq_bitsplit": {0: {"engine": "native"}, 1: {"engine": "reference"}}}
  assert report.engines_used(runs) == "native (2 runs); reference (1 runs)"
  assert report.engines_used({"hq_lss": {0: {"engine": "native"}}}) == "native"
  assert report.engines_used({"fp": {0: {"engine": None}}}) == ""


def test_engine_used_says_which_engine_runs_the_int4_ops():
  trainer = _load("train_gpt").trainer
  assert trainer.engine_used(None) is None
  config = trainer.quant_config(_load("train_gpt").parse_args(["--quant", "hq_lss"]))
  assert trainer.engine_used(dataclasses.replace(config, engine="reference")) == "reference"
  info = jint4.engine_info(config.engine)
  ops = info["platforms"][info["default_platform"]]["ops"]
  native = sum(op["runs"] == "native" for op in ops.values())
  assert trainer.engine_used(config) == (
      "reference" if native == 0 else "native" if native == len(ops)
      else f"native for {native} of {len(ops)} ops")


def test_recipe_flags_reach_the_int4_config():
  gpt, trainer = _load("train_gpt"), _load("trainer")
  args = gpt.parse_args(["--quant", "hq_bitsplit", "--qn", "8", "--hadamard-block", "16",
                         "--step-init", "lsq", "--lss-budget", "1.5",
                         "--split-scale", "tensor"])
  config = trainer.quant_config(args)
  assert (config.qn, config.hadamard_block, config.step_init, config.lss_budget,
          config.split_scale) == (8, 16, "lsq", 1.5, "tensor")
  default = trainer.quant_config(gpt.parse_args(["--quant", "hq_bitsplit"]))
  assert (default.qn, default.hadamard_block, default.step_init) == (7, 32, "mse")
  assert trainer.quant_config(gpt.parse_args(["--quant", "fp"])) is None


def test_keep_flag_leaves_more_layers_float_beside_the_head():
  gpt, trainer = _load("train_gpt"), _load("trainer")
  args = gpt.parse_args(TINY + ["--quant", "hq_only", "--keep", r"mlp/down"])
  model, _ = trainer.build(gpt.task(args), trainer.quant_config(args), 0, keep=args.keep)
  float_layers = {r.path for r in jint4.int4ify_report(model)
                  if not r.converted and r.why.startswith("kept")}
  assert float_layers == {"block_0/mlp/down", "lm_head"}
  task = gpt.task(gpt.parse_args(TINY))
  assert trainer.keep_pattern(task) == "(?:lm_head)"
  # A --keep that matches no layer stops the run, naming the paths.
  args = gpt.parse_args(TINY + ["--quant", "hq_only", "--keep", r"attention/out$"])
  with pytest.raises(SystemExit, match=r"matches none of the model's layer paths: .*mha/out"):
    trainer.build(gpt.task(args), trainer.quant_config(args), 0, keep=args.keep)


def _probe():
  spec = importlib.util.spec_from_file_location("operand_probe",
                                                ROOT / "tools" / "operand_probe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_operand_probe_quantizes_one_operand_of_the_matching_float_layers(tmp_path, capsys):
  """tools/operand_probe.py: the fake quantizer is 4-bit HQ with a straight-
  through gradient; a run with it differs from the plain run only through
  the probed layer; a pattern that matches no float layer is an error."""
  probe = _probe()
  t = jax.random.normal(jax.random.key(0), (64, 24))
  for per_column in (False, True):
    q = probe.fake_quantize(t, per_column=per_column)
    levels = np.abs(np.asarray(hadamard.apply_block_hadamard(q, 32, axis=0)))
    for col in levels.T if per_column else [levels.reshape(-1)]:
      k = col[col > 1e-6] / col[col > 1e-6].min()   # multiples of the step: 1 .. 7
      assert np.allclose(k, np.round(k), atol=1e-3) and np.round(k).max() <= 7
    assert 0.0 < float(jnp.linalg.norm(q - t) / jnp.linalg.norm(t)) < 0.2
  # --bits 5: levels up to 15 steps, half the 4-bit error (a Gaussian's
  # least-error steps: relative error 0.11 at 4 bits, 0.06 at 5).
  q5 = probe.fake_quantize(t, bits=5)
  levels = np.abs(np.asarray(hadamard.apply_block_hadamard(q5, 32, axis=0))).reshape(-1)
  k = levels[levels > 1e-6] / levels[levels > 1e-6].min()
  assert np.allclose(k, np.round(k), atol=1e-3) and 7 < np.round(k).max() <= 15
  err = lambda q: float(jnp.linalg.norm(q - t) / jnp.linalg.norm(t))
  assert 0.4 < err(q5) / err(probe.fake_quantize(t)) < 0.7
  # --rounding noise: the nearest rounding's error size, off its grid.
  noisy = probe.fake_quantize(t, rounding="noise")
  assert abs(err(noisy) / err(probe.fake_quantize(t)) - 1) < 0.1
  levels = np.abs(np.asarray(hadamard.apply_block_hadamard(noisy, 32, axis=0))).reshape(-1)
  assert not np.allclose(levels / levels.min(), np.round(levels / levels.min()), atol=1e-3)
  with pytest.raises(ValueError, match="rounding"):
    probe.fake_quantize(t, rounding="up")
  c = jax.random.normal(jax.random.key(1), t.shape)
  for rounding in probe.ROUNDINGS:
    grad = jax.grad(lambda t: jnp.sum(probe.fake_quantize(t, rounding=rounding) * c))(t)
    np.testing.assert_array_equal(grad, c)

  common = TINY + ["--quant", "hq_only", "--keep", r"mlp/down$", "--no-plot"]
  runs = {}
  for name, flags in (("plain", []), ("weight", ["--operand", "weight"]),
                      ("input", ["--operand", "input", "--block", "16"]),
                      ("both", ["--operand", "both", "--bits", "5", "--weight-bits", "6"])):
    out = tmp_path / name
    if flags:
      assert probe.main(flags + ["--layers", "mlp/down$", str(EXAMPLES / "train_gpt.py")]
                        + common + ["--out-dir", str(out)]) == 0
      said = {"weight": "4-bit weight", "input": "4-bit input",
              "both": "5-bit input and 6-bit weight"}[name]
      assert f"{said} of block_0/mlp/down" in capsys.readouterr().out
    else:
      assert _load("train_gpt").main(common + ["--out-dir", str(out)]) == 0
    runs[name] = [h["eval_loss"] for h in _metrics(out)["history"]]
  assert len({runs[name][0] for name in runs}) == 4
  with pytest.raises(SystemExit):   # argparse: out of range
    probe.main(["--operand", "both", "--bits", "9", "--layers", "x",
                str(EXAMPLES / "train_gpt.py")])
  with pytest.raises(SystemExit):   # argparse: not a power of two
    probe.main(["--operand", "input", "--block", "24", "--layers", "x",
                str(EXAMPLES / "train_gpt.py")])
  with pytest.raises(SystemExit, match="nothing was probed"):
    probe.main(["--operand", "weight", "--layers", "mlp/up$", str(EXAMPLES / "train_gpt.py")]
               + common + ["--out-dir", str(tmp_path / "none")])
