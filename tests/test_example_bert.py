"""The BERT example at a tiny size: INT4 MLM pre-training writes its metrics
and a checkpoint; an INT4 fine-tune loads that checkpoint's encoder, sets its
step sizes from the loaded kernels and trains the verse classifier."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = ["--steps", "4", "--batch", "4", "--seq-len", "32", "--max-len", "32",
        "--d-model", "32", "--heads", "2", "--layers", "1", "--eval-batches", "1",
        "--eval-every", "2", "--no-progress"]


def _example():
  if "train_bert" not in sys.modules:
    if str(EXAMPLES) not in sys.path:
      sys.path.insert(0, str(EXAMPLES))  # its own imports: corpora, trainer
    spec = importlib.util.spec_from_file_location("train_bert", EXAMPLES / "train_bert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses (Flax modules) look it up
    spec.loader.exec_module(module)
  return sys.modules["train_bert"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """An INT4 (hq_bitsplit) pre-training run, with its curves plotted."""
  out = tmp_path_factory.mktemp("bert_pretrain")
  assert _example().main(["--stage", "pretrain", "--quant", "hq_bitsplit",
                          "--out-dir", str(out)] + TINY) == 0
  return out


def test_mlm_masking_follows_bert():
  ex = _example()
  window = np.random.default_rng(0).integers(0, 256, (64, 99)).astype(np.int32)
  batch = ex.mask_tokens(window, np.random.default_rng(1))
  assert batch["inputs"].shape == batch["targets"].shape == (64, 100)
  assert (batch["inputs"][:, 0] == ex.CLS).all() and (batch["weights"][:, 0] == 0).all()
  picked = batch["weights"] > 0
  assert (picked.sum(1) == 15).all()  # 15% of the 99 bytes, every row
  assert (batch["targets"][:, 1:] == window).all()
  inputs, targets = batch["inputs"][picked], batch["targets"][picked]
  masked = (inputs == ex.MASK).mean()
  assert 0.7 < masked < 0.9, masked
  assert ((inputs != ex.MASK) & (inputs == targets)).mean() > 0.05  # kept as is
  rest = ~picked[:, 1:]
  assert (batch["inputs"][:, 1:][rest] == window[rest]).all()


def test_pretrain_writes_finite_metrics_and_curves(pretrained):
  metrics = json.loads((pretrained / "metrics.json").read_text())
  assert metrics["example"] == "bert_pretrain" and metrics["quant"] == "hq_bitsplit"
  losses = [h[k] for h in metrics["history"] for k in ("train_loss", "eval_loss") if k in h]
  assert len(losses) >= 4 and all(math.isfinite(v) for v in losses), losses
  assert 0 <= metrics["final"]["eval_accuracy"] <= 1
  assert 0 < metrics["majority_accuracy"] < 1
  assert (pretrained / "curves.png").stat().st_size > 0
  assert (pretrained / "checkpoints").is_dir()


def test_finetune_loads_the_pretrained_encoder_and_calibrates(pretrained, tmp_path, capsys,
                                                              monkeypatch):
  ex = _example()
  import trainer
  started = []
  finetune_variables = ex.finetune_variables

  def record(args, task):
    started.append(finetune_variables(args, task))
    return started[-1]

  monkeypatch.setattr(ex, "finetune_variables", record)
  capsys.readouterr()
  assert ex.main(["--stage", "finetune", "--quant", "hq_bitsplit", "--init-from",
                  str(pretrained), "--out-dir", str(tmp_path), "--no-plot"] + TINY) == 0
  out = capsys.readouterr().out
  assert "loaded" in out and "encoder arrays" in out and "calibrated" in out

  # The variables training started from: the checkpoint's encoder kernels...
  (variables,) = started
  checkpoint = trainer.load_params(str(pretrained))
  for layer in ("mlp/fc1", "attention/query"):
    path = ["encoder", "layer_0", *layer.split("/")]
    got, want = variables["params"], checkpoint
    for k in path:
      got, want = got[k], want[k]
    np.testing.assert_array_equal(np.asarray(got["kernel"]), np.asarray(want["kernel"]))
  # ... with step sizes set from them, for every INT4 layer.
  steps = ex._step_sizes(variables["params"])
  assert len(steps) == 2 * 7  # q k v out fc1 fc2 pooler: x and w each
  assert all(float(s) > 0 and math.isfinite(float(s)) for s in steps)
  fc1 = variables["params"]["encoder"]["layer_0"]["mlp"]["fc1"]
  assert float(fc1["step_size_w"]) > 0 and float(fc1["step_size_x"]) > 0
  # A fresh classifier (float), no MLM head.
  assert set(variables["params"]["classifier"]) == {"kernel", "bias"}
  assert "mlm_head" not in variables["params"]

  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["example"] == "bert_finetune" and metrics["quant"] == "hq_bitsplit"
  assert 0 <= metrics["final"]["eval_accuracy"] <= 1
  assert math.isfinite(metrics["final"]["eval_loss"])
  assert not (tmp_path / "curves.png").exists()


def test_finetune_from_scratch_runs(tmp_path, capsys):
  ex = _example()
  assert ex.main(["--stage", "finetune", "--quant", "fp", "--out-dir", str(tmp_path),
                  "--no-plot"] + TINY) == 0
  assert "from scratch" in capsys.readouterr().out
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert math.isfinite(metrics["final"]["eval_loss"])
