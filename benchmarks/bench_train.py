"""Benchmark a GPT training step: the int4ified model vs the same model in bf16.

What is measured: the full training step of a decoder-only Transformer (GPT
style: token + position embeddings, pre-LayerNorm blocks of causal
self-attention with a fused QKV projection and a 4x GELU MLP, final LayerNorm,
LM head, cross-entropy on random tokens), i.e. forward, backward and the
``optax.adamw`` update, as one ``jax.jit`` with the parameters and optimizer
state donated. Master weights are float32; every layer computes in bfloat16
(Flax ``dtype=bfloat16``: Dense, Embed, LayerNorm; GELU, softmax and
attention run on bfloat16 activations; the loss is taken on float32 logits).
Attention is ``jax.nn.dot_product_attention`` with ``--attention``: ``auto``
(default) picks cuDNN's fused flash attention on a GPU and XLA's on a CPU;
``xla`` materialises the [T, T] scores.

Variants (``--variants``): ``bf16`` is that model as written (``nn.Dense``
everywhere); ``int4`` is the very same model passed through
``jint4.int4ify(model, Int4Config(backward=..., engine=...), keep="lm_head")``,
so every Dense of the blocks runs HQ forward + INT4 backward while the LM head
stays in float, as in the paper (embeddings are ``nn.Embed`` and stay float);
``fp8`` is what a Flax user would pick instead: every Dense of the blocks with
Flax's own FP8 ``dot_general`` (``dot_general_cls=flax.linen.fp8_ops.
Fp8DotGeneralOp``: e4m3 inputs and kernels, e5m2 output gradients, delayed
scaling from an amax history, which the train step overwrites with its
gradient as Flax prescribes), the LM head again in bf16.

How: each (width, variant) runs in a fresh subprocess (this script re-invoked
with the internal ``--_one`` flag, printing one JSON line), so that the peak
device memory, ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``, is
that variant's own (null where the backend has no memory stats, e.g. CPU).
In the subprocess the step is compiled by a first call, run ``--warmup``
times, then timed in ``--repeats`` samples of ``--calls`` back-to-back steps
with one ``jax.block_until_ready`` each (per-step time = sample / calls: a
training loop dispatches asynchronously, so the host's dispatch of a step
overlaps the device's work on the previous one); the median is reported, as
tokens/s = tokens per step / median step time. Ratio = int4 tokens/s / bf16 tokens/s (> 1: INT4
faster). Also recorded per variant: bytes the linear layers' inputs keep for
the backward (analytic: 7D input elements per token per block, at the bytes
per element that the layer's vjp keeps, 2 for bf16 and jint4's residual
measured by tracing an Int4Dense) and the activation bytes the whole model's
vjp keeps (``jax.vjp`` residuals before XLA's optimisations, traced for one
and two sequences, the difference scaled to the batch).

Defaults: hidden D in 2048, 2560, 4096, 5120, 8192 with D/128 heads, 2 blocks,
sequence 2048, 16384 tokens per step (batch 8), vocab 32000 (D = 8192 fits an
80 GB GPU). ``--small``: a tiny CPU configuration (D in 128, 256, sequence
64, 256 tokens, 1 block, vocab 256); flags given explicitly override it.
``--budget-s``: no new width is started after that many seconds; the rest
are recorded as skipped.

    PYTHONPATH=. python benchmarks/bench_train.py                # GPU
    PYTHONPATH=. python benchmarks/bench_train.py --small        # CPU smoke

Writes ``<out-dir>/bench_train_<platform>.json`` (``--tag T``:
``bench_train_T_<platform>.json``; rewritten after every width) and ``.png`` (int4/bf16 ratios of tokens/s and of peak memory per
width); prints a table. Never asserted by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import flax.linen as nn
from flax.linen import fp8_ops
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jint4  # noqa: E402

# NOTE: the parent process must not initialise a JAX backend (no device
# calls): on a GPU it would hold memory that the subprocesses need.

VARIANTS = ("bf16", "int4", "fp8")
HEAD_DIM = 128
LINEAR_INPUTS_PER_BLOCK = 7  # x D elements per token: qkv, out, up (D each), down (4D)
RESULT_MARK = "BENCH_TRAIN_RESULT "
DEFAULTS = dict(hidden=[2048, 2560, 4096, 5120, 8192], layers=2, seq_len=2048,
                tokens=16384, vocab=32000)
SMALL = dict(hidden=[128, 256], layers=1, seq_len=64, tokens=256, vocab=256)
BF16 = jnp.bfloat16


# ----------------------------------------------------------------------------
# The model: GPT with plain nn.Dense layers, computing in bfloat16.
# ----------------------------------------------------------------------------

class Block(nn.Module):
  heads: int
  attention: str = "xla"
  fp8: bool = False      # Flax's FP8 dot_general in every Dense

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    dense = functools.partial(nn.Dense, dtype=BF16, dot_general_cls=(
        fp8_ops.Fp8DotGeneralOp if self.fp8 else None))
    h = nn.LayerNorm(dtype=BF16, name="ln_1")(x)
    qkv = dense(3 * d, name="qkv")(h).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                     implementation=self.attention)
    x = x + dense(d, name="out")(a.reshape(b, t, d))
    h = nn.LayerNorm(dtype=BF16, name="ln_2")(x)
    return x + dense(d, name="down")(nn.gelu(dense(4 * d, name="up")(h)))


class GPT(nn.Module):
  vocab: int
  hidden: int
  layers: int
  seq_len: int
  attention: str = "xla"
  fp8: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.hidden, dtype=BF16, name="tok_emb")(tokens)
    x = x + nn.Embed(self.seq_len, self.hidden, dtype=BF16, name="pos_emb")(
        jnp.arange(tokens.shape[1]))
    for i in range(self.layers):
      x = Block(self.hidden // HEAD_DIM, self.attention, self.fp8, name=f"block_{i}")(x)
    x = nn.LayerNorm(dtype=BF16, name="ln_f")(x)
    return nn.Dense(self.vocab, dtype=BF16, name="lm_head")(x)


# ----------------------------------------------------------------------------
# One (width, variant), in its own process.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Training:
  """A model, one fixed random batch and its jitted AdamW step."""
  params: dict
  opt_state: object
  inputs: jax.Array
  targets: jax.Array
  k_quant: jax.Array       # base key of the per-step quantization keys
  loss_fn: object          # (params, inputs, targets, key) -> loss
  train_step: object       # (params, opt_state, inputs, targets, key) -> (params, opt_state, loss)


def training(model, *, config=None, vocab, seq_len, batch, lr=1e-4) -> Training:
  """``model`` (through ``jint4.int4ify`` when ``config`` is an Int4Config),
  a random batch of ``batch`` sequences, its parameters, AdamW(lr) state and
  the jitted train step (parameters and optimizer state donated). Shared by
  bench_train.py and bench_loss.py."""
  if config is not None:
    model = jint4.int4ify(model, config, keep=r"lm_head")
  k_data, k_init, k_quant = jax.random.split(jax.random.key(0), 3)
  data = jax.random.randint(k_data, (batch, seq_len + 1), 0, vocab)
  inputs, targets = data[:, :-1], data[:, 1:]
  # One sequence is enough for init (and int4's step-size init) and keeps
  # init's memory out of the peak.
  variables = dict(jax.jit(model.init)(k_init, inputs[:1]))
  params = variables.pop("params")
  # Other collections: FP8's scales and amax histories, which its train step
  # overwrites with their gradients (Flax's OVERWRITE_WITH_GRADIENT rule).
  # They travel inside the optimizer state, so that every variant's step has
  # the same signature.
  extra0 = variables
  tx = optax.adamw(lr, weight_decay=0.1,
                   mask=lambda p: jax.tree_util.tree_map(lambda a: a.ndim >= 2, p))
  opt_state = jax.jit(tx.init)(params)
  if extra0:
    opt_state = (opt_state, extra0)

  def apply_loss(params, extra, inputs, targets, key):
    logits = model.apply({"params": params, **extra}, inputs, rngs={"quant": key})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()

  def loss_fn(params, inputs, targets, key):
    return apply_loss(params, extra0, inputs, targets, key)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, inputs, targets, key):
    adam, extra = opt_state if extra0 else (opt_state, {})
    loss, (grads, extra) = jax.value_and_grad(apply_loss, argnums=(0, 1))(
        params, extra, inputs, targets, key)
    updates, adam = tx.update(grads, adam, params)
    return optax.apply_updates(params, updates), (adam, extra) if extra0 else adam, loss

  return Training(params=params, opt_state=opt_state, inputs=inputs, targets=targets,
                  k_quant=k_quant, loss_fn=loss_fn, train_step=train_step)


def resolve_attention(name: str) -> str:
  """The dot_product_attention implementation of ``--attention`` here."""
  if name == "auto":
    return "cudnn" if jax.default_backend() == "gpu" else "xla"
  return name


def run_one(args) -> dict:
  """Times the train step of one variant at one width; returns a JSON dict."""
  variant, d = args._one, args.hidden[0]
  attention = resolve_attention(args.attention)
  config = (jint4.Int4Config(backward=args.backward, engine=args.engine,
                             split_scale=args.split_scale)
            if variant == "int4" else None)
  t = training(GPT(args.vocab, d, args.layers, args.seq_len, attention,
                   fp8=variant == "fp8"), config=config,
               vocab=args.vocab, seq_len=args.seq_len, batch=args.tokens // args.seq_len)
  params, inputs, targets, k_quant = t.params, t.inputs, t.targets, t.k_quant
  loss_fn, train_step = t.loss_fn, t.train_step

  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  activation_bytes = whole_model_activation_bytes(loss_fn, params, inputs,
                                                  targets, k_quant)
  per_element = linear_residual_bytes_per_element(d, variant, args.backward, args.engine)

  state = (params, t.opt_state)
  losses, times = [], []
  t0 = time.perf_counter()
  # A fresh quantization key per step (fold_in of the step number), as a real
  # training loop draws them: the stochastic rounding noise then averages out
  # across steps instead of repeating.
  n_steps = 1 + args.warmup + args.repeats * args.calls
  step_keys = [jax.random.fold_in(k_quant, i) for i in range(n_steps)]
  jax.block_until_ready(step_keys)
  *state, loss = train_step(*state, inputs, targets, step_keys[0])
  jax.block_until_ready((state, loss))
  compile_s = time.perf_counter() - t0
  losses.append(float(loss))
  keys = iter(step_keys[1:])
  for _ in range(args.warmup):
    *state, loss = train_step(*state, inputs, targets, next(keys))
  jax.block_until_ready((state, loss))
  windows = []
  for _ in range(args.repeats):
    # `calls` back-to-back steps, one sync (as a training loop dispatches).
    t0, w0 = time.perf_counter(), time.time()
    for _ in range(args.calls):
      *state, loss = train_step(*state, inputs, targets, next(keys))
    jax.block_until_ready((state, loss))
    times.append(1e3 * (time.perf_counter() - t0) / args.calls)
    windows.append([w0, time.time()])
  losses.append(float(loss))

  stats = jax.devices()[0].memory_stats() or {}
  median_ms = statistics.median(times)
  return {
      "variant": variant, "hidden": d, "environment": common.environment(args.engine),
      "backward_run": jint4.matmul.backward_mode(config) if config else None,
      "attention_run": attention,
      "n_params": int(n_params), "first_call_s": compile_s,
      "median_ms": median_ms, "min_ms": min(times), "max_ms": max(times),
      "times_ms": times, "windows_s": windows,
      "tokens_per_s": args.tokens / (median_ms * 1e-3),
      "loss_first": losses[0], "loss_last": losses[-1],
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "bytes_limit": stats.get("bytes_limit"),
      "residual_bytes_per_linear_input_element": per_element,
      "linear_input_bytes_saved": per_element * LINEAR_INPUTS_PER_BLOCK * d
                                  * args.layers * args.tokens,
      "activation_bytes_saved_vjp": activation_bytes,
  }


def whole_model_activation_bytes(loss_fn, params, inputs, targets, key):
  """Residual bytes of the model's vjp that grow with the batch, for the
  whole batch: (R(2 sequences) - R(1 sequence)) x batch (tracing only)."""
  size = [common.residual_bytes(
      lambda p: loss_fn(p, inputs[:n], targets[:n], key), params) for n in (1, 2)]
  return (size[1] - size[0]) * inputs.shape[0]


def linear_residual_bytes_per_element(d, variant, backward, engine):
  """Bytes one of the variant's linear layers, d -> d on bf16 inputs, keeps
  per element of its input."""
  if variant == "int4":
    layer = jint4.Int4Dense(d, dtype=BF16, config=jint4.Int4Config(
        backward=backward, engine=engine))
  else:
    layer = nn.Dense(d, dtype=BF16, dot_general_cls=(
        fp8_ops.Fp8DotGeneralOp if variant == "fp8" else None))
  return common.residual_bytes_per_element(layer, d, dtype=BF16)


# ----------------------------------------------------------------------------
# The driver: one subprocess per (width, variant).
# ----------------------------------------------------------------------------

def run_child(args, width: int, variant: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--_one", variant,
         "--hidden", str(width), "--layers", str(args.layers),
         "--seq-len", str(args.seq_len), "--tokens", str(args.tokens),
         "--vocab", str(args.vocab), "--repeats", str(args.repeats),
         "--warmup", str(args.warmup), "--engine", args.engine,
         "--backward", args.backward, "--split-scale", args.split_scale,
         "--attention", args.attention,
         "--calls", str(args.calls)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=args.child_timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {args.child_timeout_s:g} s"}
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_MARK):
      return json.loads(line[len(RESULT_MARK):])
  tail = (proc.stderr or proc.stdout)[-3000:]
  return {"error": f"exit status {proc.returncode}: {tail}"}


def error_summary(text: str) -> str:
  """The last 'SomeError: message' line of a traceback, else its last line."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  errors = [l for l in lines if re.match(r"^[\w.]*(Error|Exception)\b", l)]
  return (errors or lines or [""])[-1][:300]


def ratio(a, b):
  return a / b if a is not None and b else None


def print_table(rows, variants):
  gib = lambda b: f"{b / 2**30:7.2f}" if b is not None else f"{'-':>7}"
  others = [v for v in variants if v != "bf16"]
  header = (f"{'D':>5} | {'params':>7} | " + " | ".join(f"{v + ' tok/s':>11}" for v in variants)
            + "".join(f" | {v + '/bf16':>9}" for v in others)
            + (" | int4/fp8" if {"int4", "fp8"} <= set(variants) else "")
            + " | " + " | ".join(f"{v + ' GiB':>8}" for v in variants))
  print("\n" + header + "\n" + "-" * len(header))
  for r in rows:
    failed = [v for v in variants if "error" in r.get(v, {})]
    if "skipped" in r or failed:
      why = r.get("skipped") or "; ".join(
          f"{v} failed: {error_summary(r[v]['error'])}" for v in failed)
      print(f"{r['hidden']:>5} | {why}")
      continue
    line = (f"{r['hidden']:>5} | {r['bf16']['n_params'] / 1e6:6.0f}M | "
            + " | ".join(f"{r[v]['tokens_per_s']:11.0f}" for v in variants)
            + "".join(f" | {r[f'{v}_vs_bf16_tokens_per_s']:8.2f}x" for v in others))
    if {"int4", "fp8"} <= set(variants):
      line += f" | {r['int4_vs_fp8_tokens_per_s']:7.2f}x"
    line += " | " + " | ".join(f"{gib(r[v]['peak_bytes_in_use']):>8}" for v in variants)
    print(line)


def plot(args, rows, name, device):
  others = [v for v in args.variants if v != "bf16"]
  done = [r for r in rows if all(f"{v}_vs_bf16_tokens_per_s" in r for v in others)]
  nan = lambda v: math.nan if v is None else v
  series = {f"tokens/s {v} / bf16": [r[f"{v}_vs_bf16_tokens_per_s"] for r in done]
            for v in others}
  for v in others:
    if any(r[f"{v}_vs_bf16_peak_memory"] is not None for r in done):
      series[f"peak memory {v} / bf16"] = [nan(r[f"{v}_vs_bf16_peak_memory"]) for r in done]
  return common.bar_plot(
      args.out_dir, name, [f"D={r['hidden']}" for r in done], series,
      "variant / bf16",
      f"GPT train step, {args.layers} blocks, {args.tokens} tokens/step,"
      f" {device}, engine {args.engine}\n(tokens/s > 1: faster than bf16;"
      " memory < 1: smaller)", hline=1.0)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args._one:
    print(RESULT_MARK + json.dumps(run_one(args), default=str), flush=True)
    return 0

  start = time.perf_counter()
  report = {
      "benchmark": "GPT train step (jit of fwd + bwd + adamw, donated state):"
                   " int4ify(model) vs the bf16 model",
      "environment": None,
      "settings": {k: getattr(args, k) for k in (
          "hidden", "layers", "seq_len", "tokens", "vocab", "repeats", "calls",
          "warmup", "engine", "backward", "split_scale", "attention", "budget_s", "small",
          "variants")},
      "results": [],
  }
  report["settings"].update(
      batch=args.tokens // args.seq_len, head_dim=HEAD_DIM, mlp_ratio=4,
      statistic="median", dtype="float32 master weights, bfloat16 compute",
      keep_in_float="lm_head (and the nn.Embed embeddings)",
      process="one fresh subprocess per (width, variant)")
  name, failed = None, False
  for width in args.hidden:
    row = {"hidden": width, "heads": width // HEAD_DIM}
    elapsed = time.perf_counter() - start
    if args.budget_s is not None and elapsed > args.budget_s:
      row["skipped"] = f"budget of {args.budget_s:g} s spent"
      report["results"].append(row)
      print(f"  D={width}: skipped (budget)", flush=True)
      continue
    for variant in args.variants:
      r = run_child(args, width, variant)
      if "error" in r:
        failed = True
        print(f"  D={width} {variant}: FAILED: {r['error']}", file=sys.stderr,
              flush=True)
      else:
        env = r.pop("environment")
        report["environment"] = report["environment"] or env
        name = name or common.output_name("bench_train", args.tag, env["backend"])
        print(f"  D={width} {variant}: {r['median_ms']:.2f} ms/step,"
              f" {r['tokens_per_s']:.0f} tokens/s, loss {r['loss_first']:.3f}"
              f" -> {r['loss_last']:.3f}", flush=True)
      row[variant] = r
    pairs = [(v, "bf16") for v in args.variants if v != "bf16"]
    if {"int4", "fp8"} <= set(args.variants):
      pairs.append(("int4", "fp8"))
    for a, b in pairs:
      if "error" not in row[a] and "error" not in row[b]:
        row[f"{a}_vs_{b}_tokens_per_s"] = ratio(row[a]["tokens_per_s"], row[b]["tokens_per_s"])
        row[f"{a}_vs_{b}_peak_memory"] = ratio(row[a]["peak_bytes_in_use"],
                                               row[b]["peak_bytes_in_use"])
    report["results"].append(row)
    if name:
      common.write(args.out_dir, name, report)

  # Every subprocess has ended: this process may now touch the backend.
  if report["environment"] is None:
    report["environment"] = common.environment(args.engine)
  name = name or common.output_name("bench_train", args.tag, jax.default_backend())
  report["total_s"] = time.perf_counter() - start
  json_path = common.write(args.out_dir, name, report)
  print_table(report["results"], args.variants)
  png_path = plot(args, report["results"], name, report["environment"]["device"])
  print(f"\nwrote {json_path} and {png_path}")
  return 1 if failed else 0


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--hidden", type=common.comma_list(int), default=None,
                 help="comma-separated model widths D (multiples of 128;"
                      f" default {','.join(map(str, DEFAULTS['hidden']))})")
  p.add_argument("--layers", type=int, default=None,
                 help=f"Transformer blocks (default {DEFAULTS['layers']})")
  p.add_argument("--seq-len", type=int, default=None,
                 help=f"sequence length (default {DEFAULTS['seq_len']})")
  p.add_argument("--tokens", type=int, default=None,
                 help="tokens per step, a multiple of --seq-len (default"
                      f" {DEFAULTS['tokens']})")
  p.add_argument("--vocab", type=int, default=None,
                 help=f"vocabulary size (default {DEFAULTS['vocab']})")
  p.add_argument("--small", action="store_true",
                 help="tiny defaults for a CPU smoke run: " + ", ".join(
                     f"{k}={v}" for k, v in SMALL.items()))
  p.add_argument("--repeats", type=int, default=5,
                 help="timed samples per variant (the median is reported)")
  p.add_argument("--calls", type=int, default=4,
                 help="back-to-back steps per timed sample (one sync each)")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after the compiling one")
  p.add_argument("--variants", type=common.comma_list(str), default=list(VARIANTS),
                 help="comma-separated, of " + ",".join(VARIANTS) + " (bf16 is the"
                      " baseline every ratio divides by, always run)")
  p.add_argument("--engine", default="auto", choices=jint4.config.ENGINES,
                 help="Int4Config.engine of the int4 variant")
  p.add_argument("--backward", default="auto",
                 choices=jint4.config.BACKWARD_MODES,
                 help="Int4Config.backward of the int4 variant")
  p.add_argument("--split-scale", default=jint4.Int4Config().split_scale,
                 choices=jint4.config.SPLIT_SCALES,
                 help="Int4Config.split_scale of the int4 variant (its bit split's scale:"
                      " per token row or per tensor)")
  p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                 help="jax.nn.dot_product_attention implementation (auto:"
                      " cudnn on a GPU, xla elsewhere)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="soft wall-clock budget: no width is started after it"
                      " (the rest are recorded as skipped)")
  p.add_argument("--child-timeout-s", type=float, default=1800,
                 help="wall-clock limit of one (width, variant) subprocess")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "results"), help="where the JSON/PNG go")
  p.add_argument("--tag", default="",
                 help="output name bench_train_<tag>_<backend> instead of"
                      " bench_train_<backend> (a run kept beside the default one)")
  p.add_argument("--_one", choices=VARIANTS, default=None,
                 help=argparse.SUPPRESS)  # internal: run one variant, print JSON
  args = p.parse_args(argv)
  for key, value in (SMALL if args.small else DEFAULTS).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  bad = [v for v in args.variants if v not in VARIANTS]
  if bad:
    p.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
  args.variants = ["bf16"] + [v for v in VARIANTS[1:] if v in args.variants]
  if not args.hidden or any(d < HEAD_DIM or d % HEAD_DIM for d in args.hidden):
    p.error(f"--hidden: widths must be positive multiples of {HEAD_DIM} (the"
            f" head size); got {args.hidden}")
  if args.seq_len < 1 or args.tokens < args.seq_len or args.tokens % args.seq_len:
    p.error(f"--tokens ({args.tokens}) must be a positive multiple of --seq-len"
            f" ({args.seq_len})")
  if min(args.layers, args.vocab, args.repeats, args.calls) < 1 or args.warmup < 0:
    p.error("--layers, --vocab, --repeats and --calls must be >= 1, --warmup >= 0")
  return args


if __name__ == "__main__":
  sys.exit(main())
