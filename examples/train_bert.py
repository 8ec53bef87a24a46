"""BERT-like byte-level encoder: MLM pre-training, then verse classification, in INT4.

The model is ordinary Flax Linen (`Bert` below: token and position
embeddings, post-LayerNorm encoder blocks as in BERT, or pre-LN with
``--pre-ln``, with Flax's own `nn.MultiHeadDotProductAttention` and a Dense
MLP, padding masked in attention; an MLM head or a pooler + classifier on the
CLS token). `jint4.int4ify` converts every Dense layer and attention
projection; the output heads (MLM decoder, classifier) stay in float, as the
paper keeps them. Two stages, both on real English text, the Bible (American
Standard Version, from the ``pythonbible`` package, installed with the
examples, no download):

* ``--stage pretrain``: masked-language-model pre-training on the Bible's
  bytes (or any text file, ``--text-file``). Vocabulary: the 256 bytes plus
  PAD, CLS and MASK. Each window is CLS + ``seq-len - 1`` bytes (32 tokens by
  default: short windows leave the MLM loss's unigram plateau within a few
  hundred steps, 64 takes about twice as many); 15% of the byte positions are
  picked, of which 80% become MASK, 10% a random byte and 10% stay; the loss
  is the cross-entropy on the picked positions only.
  Metric: masked-byte accuracy (the most frequent byte, space, is the
  baseline it prints).
* ``--stage finetune``: which of six divisions of the Bible (law, history,
  wisdom, prophets, gospels, letters) a verse comes from, from CLS + the
  verse's bytes (truncated / padded to ``--seq-len``, 64 by default; the
  position table, ``--max-len``, is the pre-training run's). ``--init-from DIR``
  starts from the encoder of the latest checkpoint of a pre-training run
  (usually the float one) with a fresh pooler and classifier; INT4 modes then
  set their step sizes from the loaded kernels (`jint4.calibrate`): INT4
  fine-tuning of a float-pretrained model, the paper's main regime. Metric:
  accuracy (the majority class share is printed as the baseline).

    python examples/train_bert.py --stage pretrain --quant fp       # 2-core CPU: ~1 minute
    python examples/train_bert.py --stage pretrain                  # hq_bitsplit: ~2-3 minutes
    python examples/train_bert.py --stage pretrain --keep 'attention/(value|out)$'
        # attention's value and output projections in float: where most of
        # INT4 pre-training's gap to fp sits on this model (docs/RESULTS.md)
    python examples/train_bert.py --stage finetune --init-from runs/bert_pretrain/fp/seed0
    python examples/train_bert.py --stage finetune --quant fp --init-from runs/bert_pretrain/fp/seed0
    python examples/train_bert.py --stage finetune --quant fp       # from scratch
    python examples/train_bert.py --stage pretrain --resume         # continue the last run

Writes runs/bert_pretrain/<quant>/seed<seed>/ and runs/bert_finetune/...
({metrics.json, curves.png, checkpoints/}). The encoder flags (``--d-model``,
``--layers``, ``--heads``, ``--mlp-dim``, ``--max-len``, ``--pre-ln``) of a
fine-tune must match its pre-training run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jint4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpora  # noqa: E402
import trainer  # noqa: E402

# Token ids: the 256 bytes, then the special ids.
PAD, CLS, MASK = corpora.BYTE_VOCAB, corpora.BYTE_VOCAB + 1, corpora.BYTE_VOCAB + 2
VOCAB = corpora.BYTE_VOCAB + 3
EVAL_ROWS = 64        # sequences per evaluation batch (the set is fixed, whatever --batch)
EVAL_SEED = 12345     # the held-out set is the same for every seed and mode

# Per stage: the trainer's defaults (steps, batch, lr, eval_every) and the
# sequence length. On a 2-core CPU a float run takes about a minute, an INT4
# one (whose quantizers CPUs run as extra passes) two to three.
STAGE_DEFAULTS = {
    "pretrain": dict(steps=400, batch=64, lr=2e-3, eval_every=100),
    "finetune": dict(steps=300, batch=32, lr=5e-4, eval_every=100),
}
SEQ_LEN = {"pretrain": 32, "finetune": 64}


# ----------------------------------------------------------------------------
# Model: ordinary Flax Linen, no jint4 inside.
# ----------------------------------------------------------------------------

class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1], name="fc2")(nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x)))


class EncoderBlock(nn.Module):
  """Post-LN (BERT) or pre-LN Transformer encoder block."""
  num_heads: int
  mlp_dim: int
  pre_ln: bool = False

  @nn.compact
  def __call__(self, x, mask):
    attend = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")
    mlp = MlpBlock(self.mlp_dim, name="mlp")
    if self.pre_ln:
      x = x + attend(nn.LayerNorm(name="ln_attention")(x), mask=mask)
      return x + mlp(nn.LayerNorm(name="ln_mlp")(x))
    x = nn.LayerNorm(name="ln_attention")(x + attend(x, mask=mask))
    return nn.LayerNorm(name="ln_mlp")(x + mlp(x))


def sinusoid_init(key, shape, dtype=jnp.float32):
  """Transformer sinusoids as the initial position table (trained, as BERT's):
  rows related by their offset make attending to neighbouring bytes, which
  is all a masked byte can go by, quicker to learn than from a random table
  (the MLM loss leaves its unigram plateau sooner)."""
  del key
  pos = np.arange(shape[0])[:, None]
  freq = np.exp(-np.log(10_000.0) * np.arange(0, shape[1], 2) / shape[1])
  table = np.zeros(shape, np.float32)
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq)
  # The scale of Flax's default embedding init (std 1/sqrt(d_model)).
  return jnp.asarray(table * np.sqrt(2.0 / shape[1]), dtype)


class Encoder(nn.Module):
  """Token + position embeddings and ``num_layers`` blocks; PAD is masked out
  of attention."""
  vocab_size: int = VOCAB
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 128
  pre_ln: bool = False

  @nn.compact
  def __call__(self, tokens):  # int32 [batch, seq]
    x = nn.Embed(self.vocab_size, self.d_model, name="word_embeddings")(tokens)
    x = x + nn.Embed(self.max_len, self.d_model, embedding_init=sinusoid_init,
                     name="position_embeddings")(
        jnp.arange(tokens.shape[1]))[None]
    if not self.pre_ln:
      x = nn.LayerNorm(name="ln_embeddings")(x)
    keep = tokens != PAD
    mask = nn.make_attention_mask(keep, keep)
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.pre_ln, name=f"layer_{i}")(x, mask)
    if self.pre_ln:
      x = nn.LayerNorm(name="ln_final")(x)
    return x


class Bert(nn.Module):
  """The encoder and one head: ``head="mlm"`` gives byte logits at every
  position (transform + LayerNorm + the ``mlm_head`` decoder);
  ``head="classify"`` gives class logits from the CLS position (``pooler``,
  ``classifier``)."""
  head: str = "mlm"
  num_classes: int = len(corpora.GENRES)
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 128
  pre_ln: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = Encoder(VOCAB, self.d_model, self.num_layers, self.num_heads, self.mlp_dim,
                self.max_len, self.pre_ln, name="encoder")(tokens)
    if self.head == "mlm":
      x = nn.LayerNorm(name="mlm_ln")(nn.gelu(nn.Dense(self.d_model, name="mlm_transform")(x)))
      return nn.Dense(corpora.BYTE_VOCAB, name="mlm_head")(x)
    pooled = jnp.tanh(nn.Dense(self.d_model, name="pooler")(x[:, 0]))
    return nn.Dense(self.num_classes, name="classifier")(pooled)


# ----------------------------------------------------------------------------
# Data: pure functions of (seed, step).
# ----------------------------------------------------------------------------

def mask_tokens(window: np.ndarray, rng: np.random.Generator, rate: float = 0.15
                ) -> Dict[str, np.ndarray]:
  """BERT's masking of byte windows [batch, n]: CLS + the bytes as inputs,
  ``round(rate * n)`` picked positions per row (80% MASK, 10% a random byte,
  10% unchanged), the original bytes as targets and weight 1 at the picked
  positions only."""
  b, n = window.shape
  k = max(1, int(round(rate * n)))
  picked = np.argsort(rng.random((b, n)), axis=1)[:, :k]
  rows = np.arange(b)[:, None]
  inputs = window.copy()
  r = rng.random((b, k))
  random_bytes = rng.integers(0, corpora.BYTE_VOCAB, size=(b, k), dtype=np.int32)
  inputs[rows, picked] = np.where(r < 0.8, MASK, np.where(r < 0.9, random_bytes,
                                                          window[rows, picked]))
  weights = np.zeros((b, n), np.float32)
  weights[rows, picked] = 1.0
  cls = np.full((b, 1), CLS, np.int32)
  return {"inputs": np.concatenate([cls, inputs], 1).astype(np.int32),
          "targets": np.concatenate([np.zeros_like(cls), window], 1).astype(np.int32),
          "weights": np.concatenate([np.zeros((b, 1), np.float32), weights], 1)}


def mlm_batch(data: np.ndarray, batch: int, seq_len: int, seed: int, step: int,
              rate: float = 0.15) -> Dict[str, np.ndarray]:
  """Batch ``step``: random windows of ``seq_len - 1`` bytes, masked."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(data) - seq_len, size=batch)
  window = data[starts[:, None] + np.arange(seq_len - 1)]
  return mask_tokens(window, rng, rate)


def encode_verses(texts, seq_len: int) -> np.ndarray:
  """CLS + each text's bytes, truncated / padded with PAD to ``seq_len``."""
  out = np.full((len(texts), seq_len), PAD, np.int32)
  out[:, 0] = CLS
  for i, text in enumerate(texts):
    ids = corpora.encode(text)[: seq_len - 1]
    out[i, 1: 1 + len(ids)] = ids
  return out


# ----------------------------------------------------------------------------
# Tasks.
# ----------------------------------------------------------------------------

def make_model(args, head: str) -> Bert:
  return Bert(head=head, d_model=args.d_model, num_layers=args.layers,
              num_heads=args.heads, mlp_dim=args.mlp_dim or 4 * args.d_model,
              max_len=args.max_len, pre_ln=args.pre_ln)


def pretrain_task(args) -> Tuple[trainer.Task, float]:
  """The MLM task and its baseline (the most frequent masked byte's share)."""
  text = corpora.text_corpus(args.text_file or None)

  def loss_fn(logits, batch):
    w = batch["weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    hits = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return (ce * w).sum() / w.sum(), {"accuracy": (hits * w).sum() / w.sum()}

  evals = [mlm_batch(text.eval, EVAL_ROWS, args.seq_len, EVAL_SEED, i, args.mask_rate)
           for i in range(args.eval_batches)]
  picked = np.concatenate([e["targets"][e["weights"] > 0] for e in evals])
  counts = np.bincount(picked, minlength=corpora.BYTE_VOCAB)
  top = int(np.argmax(counts))
  majority = float(counts[top] / counts.sum())
  print(f"masked-byte baseline: always {bytes([top])!r}, {majority:.1%} of the"
        f" {len(picked):,} held-out masked positions")
  return trainer.Task(
      model=make_model(args, "mlm"), loss_fn=loss_fn,
      batch=lambda step: mlm_batch(text.train, args.batch, args.seq_len, args.seed, step,
                                   args.mask_rate),
      eval_batches=evals, tokens_per_batch=args.batch * args.seq_len, keep=r"mlm_head",
      description=f"masked bytes of {text.description}"), majority


def finetune_task(args) -> Tuple[trainer.Task, float]:
  """The verse-division task and its baseline (the majority class's share)."""
  train_texts, train_y, eval_texts, eval_y = corpora.verse_genres()
  train_x = encode_verses(train_texts, args.seq_len)
  order = np.random.default_rng(EVAL_SEED).permutation(len(eval_y))
  n_eval = min(args.eval_batches * EVAL_ROWS, len(eval_y) // EVAL_ROWS * EVAL_ROWS)
  pick = order[:n_eval]
  eval_x, eval_y = encode_verses([eval_texts[i] for i in pick], args.seq_len), eval_y[pick]

  def loss_fn(logits, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"accuracy": (jnp.argmax(logits, -1) == batch["labels"]).mean()}

  def batch(step):
    idx = np.random.default_rng([args.seed, step]).integers(0, len(train_y), args.batch)
    return {"inputs": train_x[idx], "labels": train_y[idx]}

  evals = [{"inputs": eval_x[i: i + EVAL_ROWS], "labels": eval_y[i: i + EVAL_ROWS]}
           for i in range(0, n_eval, EVAL_ROWS)]
  shares = np.bincount(eval_y, minlength=len(corpora.GENRES)) / len(eval_y)
  majority = float(shares.max())
  print(f"verse divisions: {len(train_y):,} training verses, {n_eval:,} held out;"
        f" majority class {corpora.GENRES[int(np.argmax(shares))][0]!r}:"
        f" {majority:.1%} of the held-out set")
  return trainer.Task(
      model=make_model(args, "classify"), loss_fn=loss_fn, batch=batch, eval_batches=evals,
      tokens_per_batch=args.batch * args.seq_len, keep=r"classifier",
      description="which of 6 divisions of the Bible (ASV, pythonbible) a verse is from"
      ), majority


# ----------------------------------------------------------------------------
# Fine-tuning from a pre-trained encoder.
# ----------------------------------------------------------------------------

def _load_into(fresh, loaded, path=""):
  """``fresh``'s tree with every leaf taken from ``loaded`` (same paths and
  shapes; extra leaves in ``loaded``, e.g. an INT4 run's step sizes, are
  ignored)."""
  if isinstance(fresh, Mapping):
    if not isinstance(loaded, Mapping):
      raise SystemExit(f"--init-from: {path} is not a subtree in the checkpoint")
    out = {}
    for k, v in fresh.items():
      if k not in loaded:
        raise SystemExit(f"--init-from: the checkpoint has no {path}/{k}: pass the"
                         " pre-training run's encoder flags (--layers, --pre-ln, ...)")
      out[k] = _load_into(v, loaded[k], f"{path}/{k}")
    return out
  if tuple(np.shape(loaded)) != tuple(np.shape(fresh)):
    raise SystemExit(f"--init-from: {path} is {np.shape(loaded)} in the checkpoint,"
                     f" {np.shape(fresh)} here: pass the pre-training run's encoder"
                     " flags (--d-model, --heads, --mlp-dim, --max-len)")
  return jnp.asarray(loaded, dtype=fresh.dtype)


def _step_sizes(tree):
  return [v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
          if "step_size" in str(path[-1].key)]


def task(args) -> trainer.Task:
  """The task of ``args.stage`` (what `examples/report.py`'s diagnostics build)."""
  return (pretrain_task if args.stage == "pretrain" else finetune_task)(args)[0]


def finetune_variables(args, task: trainer.Task) -> Optional[Dict[str, Any]]:
  """The variables a fine-tune starts from: a fresh init of the classifier
  model (the same for every mode: float init, seed ``args.seed``) whose
  ``encoder`` subtree is the latest checkpoint's under ``--init-from``; for
  INT4 modes, the int4ified model's step sizes are then set from the loaded
  kernels and the calibration batch ``task.batch(0)`` (a batch training never
  sees: its steps start at 1). None without ``--init-from`` (a fresh init)."""
  if not args.init_from:
    print("note: no --init-from: fine-tuning from scratch (random encoder)")
    return None
  inputs = jnp.asarray(task.batch(0)["inputs"])
  params = dict(jax.jit(task.model.init)(jax.random.key(args.seed), inputs)["params"])
  loaded = trainer.load_params(args.init_from)
  if "encoder" not in loaded:
    raise SystemExit(f"--init-from {args.init_from}: no encoder in its checkpoint"
                     " (not a train_bert.py --stage pretrain run?)")
  params["encoder"] = _load_into(params["encoder"], loaded["encoder"], "encoder")
  n = len(jax.tree_util.tree_leaves(params["encoder"]))
  print(f"loaded {n} encoder arrays from {args.init_from}; fresh pooler and classifier")
  config = trainer.quant_config(args)
  if config is None:
    return {"params": params}
  model = jint4.int4ify(task.model, config, keep=trainer.keep_pattern(task, args.keep))
  # Under jit: the same result as eager calibration, in a fraction of the time.
  variables = jax.jit(lambda v, x: jint4.calibrate(model, x, variables=v))(
      {"params": params}, inputs)
  steps = _step_sizes(variables["params"])
  print(f"calibrated {len(steps)} INT4 step sizes from the loaded kernels"
        f" (min {min(float(s) for s in steps):.3g})")
  return variables


# ----------------------------------------------------------------------------

def parse_args(argv=None):
  stage = argparse.ArgumentParser(add_help=False)
  stage.add_argument("--stage", default="pretrain", choices=tuple(STAGE_DEFAULTS))
  which = stage.parse_known_args(argv)[0].stage
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--stage", default="pretrain", choices=tuple(STAGE_DEFAULTS),
                 help="pretrain: masked bytes; finetune: verse divisions (the"
                      " defaults of --steps, --batch, --lr, --eval-every are the stage's)")
  trainer.add_flags(p, **STAGE_DEFAULTS[which])
  p.add_argument("--d-model", type=int, default=128, help="a multiple of 32 (the Hadamard block)")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp-dim", type=int, default=0, help="0: 4 x --d-model")
  p.add_argument("--max-len", type=int, default=128, help="position embeddings")
  p.add_argument("--pre-ln", action="store_true", help="pre-LN blocks (default: BERT's post-LN)")
  p.add_argument("--seq-len", type=int, default=SEQ_LEN[which],
                 help="tokens per sequence, CLS included")
  p.add_argument("--eval-batches", type=int, default=16,
                 help=f"held-out batches of {EVAL_ROWS} sequences")
  p.add_argument("--mask-rate", type=float, default=0.15, help="pretrain: share of bytes picked")
  p.add_argument("--text-file", default="", help="pretrain on this UTF-8 file instead")
  p.add_argument("--init-from", default="",
                 help="finetune: a pretrain run's --out-dir (its latest checkpoint's encoder)")
  args = p.parse_args(argv)
  for flag, width in (("--d-model", args.d_model), ("--mlp-dim", args.mlp_dim)):
    if width % 32:
      p.error(f"{flag} {width}: give a multiple of 32 (the Hadamard block of the INT4"
              " layers that contract over it)")
  if args.seq_len > args.max_len:
    p.error(f"--seq-len {args.seq_len} > --max-len {args.max_len}")
  if args.init_from and args.stage != "finetune":
    p.error("--init-from is for --stage finetune")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.stage == "pretrain":
    task, majority = pretrain_task(args)
    result = trainer.train(args, task, "bert_pretrain")
  else:
    task, majority = finetune_task(args)
    result = trainer.train(args, task, "bert_finetune",
                           variables=finetune_variables(args, task))
  result["majority_accuracy"] = majority
  with open(os.path.join(trainer.out_dir(args, result["example"]), "metrics.json"), "w") as f:
    json.dump(result, f, indent=1)
  final = result["final"]
  what = "masked-byte" if args.stage == "pretrain" else "verse-division"
  print(f"final eval loss {final['eval_loss']:.4f}, {what} accuracy"
        f" {final['eval_accuracy']:.1%} (majority baseline {majority:.1%})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
