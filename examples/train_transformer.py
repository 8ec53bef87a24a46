"""Quick start: train a small GPT with INT4 matmuls, next to its float twin.

The model below is ordinary Flax Linen code: `nn.Dense` MLPs and Flax's own
`nn.MultiHeadDotProductAttention`. `jint4.int4ify` turns it into an
INT4-training model without touching that code: its Dense layers and
attention's projections compute their forward and backward
matmuls in 4-bit integers (Hadamard quantizer + LSQ step sizes forward, bit
splitting backward, with leverage score sampling on GPUs with INT4 tensor
cores: ``backward="auto"``; Xi et al. 2023). As in the paper, the LM head is
kept in float (``keep=r"lm_head"``).

The script trains both models side by side, with the same initial weights, the
same batches and the same `jax.jit` + `optax.adamw` loop, as a character-level
language model on Python source code that ships with the interpreter (a few
standard-library modules), so it needs no download. Run it with

    PYTHONPATH=. python examples/train_transformer.py
    PYTHONPATH=. python examples/train_transformer.py --backward lss

It prints train / eval loss every few steps for both models, and exits with
status 1 if the INT4 model did not learn (final eval loss not below 90% of its
initial eval loss).

`GPT`, `load_text`, `encode` and `make_batches` are importable, e.g. by tests:

    from examples.train_transformer import GPT, make_batches
"""

from __future__ import annotations

import argparse
import inspect
import re
import importlib
import sys
import time
from typing import Iterator, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jint4

# ----------------------------------------------------------------------------
# Data: Python's own standard library, as a character-level corpus.
# ----------------------------------------------------------------------------

# Modules whose source makes up the corpus (about 1 MB of text). They all ship
# with CPython, so `inspect.getsource` always finds them.
CORPUS_MODULES = (
    "argparse", "collections", "dataclasses", "functools", "inspect",
    "json.decoder", "json.encoder", "pathlib", "textwrap", "typing",
)

VOCAB_SIZE = 128  # ASCII; any other character is mapped to "?"


def load_text(modules=CORPUS_MODULES) -> str:
  """The concatenated source code of some standard-library modules."""
  return "\n\n".join(
      inspect.getsource(importlib.import_module(name)) for name in modules)


def encode(text: str) -> np.ndarray:
  """Characters -> int32 token ids in [0, VOCAB_SIZE)."""
  data = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
  return data.astype(np.int32)


def decode(tokens) -> str:
  return bytes(np.asarray(tokens, dtype=np.uint8)).decode("ascii")


def make_batches(data: np.ndarray, batch: int, seq_len: int, seed: int = 0
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Endless random (inputs, targets) windows of ``data``, [batch, seq_len].

  The targets are the inputs shifted by one character: next-token prediction.
  """
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    window = data[starts[:, None] + offsets]
    yield window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------
# Model: a small decoder-only Transformer, with Flax's own layers.
# ----------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
  """Flax's own multi-head attention, each token seeing tokens <= itself."""
  num_heads: int

  @nn.compact
  def __call__(self, x):
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    return nn.MultiHeadDotProductAttention(self.num_heads, name="mha")(x, mask=causal)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(4 * d, name="up")(x)
    x = nn.gelu(x)
    return nn.Dense(d, name="down")(x)


class Block(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x):
    # Pre-LayerNorm residual block, as in GPT-2.
    x = x + CausalSelfAttention(self.num_heads, name="attn")(nn.LayerNorm()(x))
    x = x + MLP(name="mlp")(nn.LayerNorm()(x))
    return x


class GPT(nn.Module):
  """Token + position embeddings, ``num_layers`` blocks, LayerNorm, LM head."""
  vocab_size: int = VOCAB_SIZE
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 64

  @nn.compact
  def __call__(self, tokens):  # tokens: int32 [batch, seq]
    t = tokens.shape[1]
    x = nn.Embed(self.vocab_size, self.d_model, name="tok_emb")(tokens)
    x = x + nn.Embed(self.max_len, self.d_model, name="pos_emb")(jnp.arange(t))
    for i in range(self.num_layers):
      x = Block(self.num_heads, name=f"block_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.vocab_size, name="lm_head")(x)  # logits


# ----------------------------------------------------------------------------
# Training: one generic loop, used for both the float and the INT4 model.
# ----------------------------------------------------------------------------

def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine decay; weight decay on matrices only.

  Biases, LayerNorm scales and jint4's scalar step sizes (step_size_x,
  step_size_w) are not decayed.
  """
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=lr / 10)
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2,
                                                     params)
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, weight_decay=0.1, mask=decay_mask))


def make_steps(model, tx):
  """Jitted (train_step, eval_loss) for any object with Linen's ``apply``.

  ``model`` is a `GPT` or the `jint4.Int4Model` that `jint4.int4ify` returns:
  the code is the same for both.
  """
  def loss_fn(params, inputs, targets, key):
    # The 'quant' rng stream drives jint4's stochastic rounding and sampling.
    # It is optional (without it jint4 derives a key from the data), and a
    # float model simply ignores it.
    logits = model.apply({"params": params}, inputs, rngs={"quant": key})
    return cross_entropy(logits, targets)

  @jax.jit
  def train_step(params, opt_state, inputs, targets, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_loss(params, inputs, targets):
    # No 'quant' key: the INT4 forward pass is deterministic anyway.
    return cross_entropy(model.apply({"params": params}, inputs), targets)

  return train_step, eval_loss


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--steps", type=int, default=300, help="training steps")
  p.add_argument("--d-model", type=int, default=64,
                 help="model width (a multiple of the Hadamard block, 32)")
  p.add_argument("--layers", type=int, default=2, help="Transformer blocks")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument("--seq-len", type=int, default=64, help="context length")
  p.add_argument("--batch", type=int, default=32, help="sequences per batch")
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
  p.add_argument("--forward", default="hq", choices=jint4.config.FORWARD_MODES,
                 help="jint4 forward quantizer")
  p.add_argument("--backward", default="auto",
                 choices=jint4.config.BACKWARD_MODES,
                 help="jint4 gradient quantizer")
  p.add_argument("--attention-products", action="store_true",
                 help="also run attention's Q K^T and P V in INT4 (the paper"
                      " keeps them float)")
  p.add_argument("--mesh", default="",
                 help="train on a device mesh, e.g. 'data=4,model=2': batches"
                      " sharded over 'data', attention heads and MLP columns"
                      " over 'model' (Megatron tensor parallelism); on CPU the"
                      " devices are host devices")
  p.add_argument("--fsdp", action="store_true",
                 help="with --mesh: also shard the kernels' model dim over"
                      " 'data' (FSDP / ZeRO-3); jint4 gathers them as 4-bit"
                      " codes")
  p.add_argument("--log-every", type=int, default=0,
                 help="print losses every N steps; 0: steps / 10")
  p.add_argument("--eval-batches", type=int, default=8,
                 help="held-out batches per evaluation")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Multi-device: the user's sharding, by parameter path (as MaxText's logical
# axis rules do); jint4 needs nothing more.
# ----------------------------------------------------------------------------

def parse_mesh(spec: str):
  """'data=4,model=2' -> (('data', 4), ('model', 2))."""
  axes = []
  for part in spec.split(","):
    name, _, size = part.partition("=")
    if name not in ("data", "model") or not size.isdigit():
      raise SystemExit(f"--mesh takes data=N,model=M; got {spec!r}")
    axes.append((name, int(size)))
  return tuple(axes)


def make_mesh(axes):
  """A mesh over the first prod(sizes) devices; on CPU, host devices (the
  XLA flag must be set before JAX starts its CPU backend)."""
  count = int(np.prod([size for _, size in axes]))
  if jax.default_backend() == "cpu" and jax.device_count() < count:
    raise SystemExit(
        f"--mesh needs {count} devices; run with XLA_FLAGS="
        f"--xla_force_host_platform_device_count={count} (set before JAX"
        " starts)")
  names = tuple(name for name, _ in axes)
  sizes = tuple(size for _, size in axes)
  return jax.sharding.Mesh(np.array(jax.devices()[:count]).reshape(sizes), names)


def param_sharding(params, mesh, fsdp: bool):
  """NamedShardings for the GPT's params: attention heads and the MLP's
  hidden units over 'model' (column-parallel q/k/v and up, row-parallel out
  and down), with --fsdp the model dim over 'data' too; the rest replicated.
  """
  P = jax.sharding.PartitionSpec
  model = "model" if "model" in mesh.axis_names else None
  data = "data" if fsdp and "data" in mesh.axis_names else None
  rules = (
      (r"attn/mha/(query|key|value)/kernel", P(data, model, None)),
      (r"attn/mha/(query|key|value)/bias", P(model, None)),
      (r"attn/mha/out/kernel", P(model, None, data)),
      (r"mlp/up/kernel", P(data, model)),
      (r"mlp/up/bias", P(model)),
      (r"mlp/down/kernel", P(model, data)),
  )

  def spec(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    for pattern, rule in rules:
      if re.search(pattern, name):
        return jax.sharding.NamedSharding(mesh, rule)
    return jax.sharding.NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(spec, params)


def main(argv=None) -> int:
  script_start = time.time()
  args = parse_args(argv)
  log_every = args.log_every or max(1, args.steps // 10)
  mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None

  # Data: the first 90% of the corpus for training, the rest held out.
  data = encode(load_text())
  split = int(0.9 * len(data))
  train_data, eval_data = data[:split], data[split:]
  train_batches = make_batches(train_data, args.batch, args.seq_len, args.seed)
  # A fixed held-out set, so every evaluation sees the same text.
  eval_iter = make_batches(eval_data, args.batch, args.seq_len, args.seed + 1)
  eval_set = [next(eval_iter) for _ in range(args.eval_batches)]

  # The float model and its INT4 twin. int4ify leaves the model code alone
  # and keeps the LM head in float, as the paper does.
  model = GPT(d_model=args.d_model, num_layers=args.layers,
              num_heads=args.heads, max_len=args.seq_len)
  config = jint4.Int4Config(forward=args.forward, backward=args.backward,
                            attention_products=args.attention_products)
  # report=True prints, at init, every layer: converted to INT4 or kept, and why.
  int4_model = jint4.int4ify(model, config, keep=r"lm_head", report=True)

  # Same init key -> same initial weights. The INT4 model's Dense layers also
  # get step_size_x / step_size_w, initialised from this first batch.
  init_key = jax.random.key(args.seed)
  sample = jnp.asarray(next(make_batches(train_data, args.batch, args.seq_len,
                                         args.seed))[0])
  runs = {}
  for name, m in (("float32", model), ("int4", int4_model)):
    params = jax.jit(m.init)(init_key, sample)["params"]
    if mesh is not None:
      params = jax.device_put(params, param_sharding(params, mesh, args.fsdp))
    tx = make_optimizer(args.lr, args.steps)
    train_step, eval_loss = make_steps(m, tx)
    runs[name] = dict(params=params, opt_state=jax.jit(tx.init)(params),
                      train_step=train_step, eval_loss=eval_loss, losses=[])

  def evaluate(run):
    return float(np.mean([run["eval_loss"](run["params"], jnp.asarray(x),
                                           jnp.asarray(y))
                          for x, y in eval_set]))

  n_params = sum(p.size for p in jax.tree_util.tree_leaves(runs["float32"]["params"]))
  print(f"corpus: {len(data):,} characters of Python stdlib source; model:"
        f" {n_params:,} parameters; {args.steps} steps of {args.batch} x"
        f" {args.seq_len} tokens")
  print(f"jint4 config: {config}")
  if mesh is not None:
    print(f"mesh: {dict(zip(mesh.axis_names, mesh.devices.shape))} over"
          f" {mesh.devices.size} {jax.default_backend()} devices; FSDP:"
          f" {'on' if args.fsdp else 'off'}")
  print(f"{'step':>6} | {'float32 train':>13} {'eval':>7} | {'int4 train':>10}"
        f" {'eval':>7} | {'time':>6}")
  print("-" * 62)

  initial = {name: evaluate(run) for name, run in runs.items()}
  print(f"{0:>6} | {'-':>13} {initial['float32']:>7.4f} | {'-':>10}"
        f" {initial['int4']:>7.4f} | {0.0:>5.0f}s")

  start = time.time()
  quant_key = jax.random.key(args.seed + 1)
  batch_sharding = (None if mesh is None else jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data" if "data" in mesh.axis_names else None)))
  for step in range(1, args.steps + 1):
    inputs, targets = (jax.device_put(jnp.asarray(a), batch_sharding)
                       for a in next(train_batches))
    key = jax.random.fold_in(quant_key, step)
    for run in runs.values():  # both models see the very same batch
      tic = time.time()
      run["params"], run["opt_state"], loss = run["train_step"](
          run["params"], run["opt_state"], inputs, targets, key)
      run["losses"].append(loss)
      if step == 1:  # the first call traces and compiles the train step
        jax.block_until_ready(loss)
        run["first_step_s"] = time.time() - tic
    if step % log_every == 0 or step == args.steps:
      train = {name: float(np.mean(jax.device_get(run["losses"])))
               for name, run in runs.items()}
      evals = {name: evaluate(run) for name, run in runs.items()}
      for run in runs.values():
        run["losses"] = []
      print(f"{step:>6} | {train['float32']:>13.4f} {evals['float32']:>7.4f} |"
            f" {train['int4']:>10.4f} {evals['int4']:>7.4f} |"
            f" {time.time() - start:>5.0f}s")

  final = evals
  print()
  for name in runs:
    print(f"final eval loss {name:>7}: {final[name]:.4f} (initial"
          f" {initial[name]:.4f}, {final[name] / initial[name]:.0%} of it)")
  gap = final["int4"] - final["float32"]
  print(f"INT4 - float32 eval loss gap: {gap:+.4f}")
  print(f"first train step (tracing + XLA compilation): float32"
        f" {runs['float32']['first_step_s']:.1f}s, int4"
        f" {runs['int4']['first_step_s']:.1f}s; total wall time"
        f" {time.time() - script_start:.0f}s")

  if not final["int4"] < 0.9 * initial["int4"]:
    print("FAIL: the INT4 model's eval loss did not fall below 90% of its"
          " initial value.", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
