"""Loss curves: where an INT4 model's training loss departs from bf16's.

Not a speed benchmark: it separates the sources of the slower loss decrease
seen in bench_train.py. The same small GPT-like model (bench_train.GPT)
memorizes one fixed random batch with AdamW, once per variant, with a fresh
quantization key every step:

  bf16           the plain model;
  int4 exact     HQ + LSQ forward (INT4), float gradient products: the
                 forward quantizer's share of the gap;
  int4 nonzero   + bit splitting of the output gradient, every row kept;
  int4 lss       + leverage score sampling (the paper's backward).

``nonzero`` matching ``exact`` says bit splitting adds nothing; the distance
of ``lss`` from them is the sampling variance (paper Sec. 5.3 and Table 2's
small LSS degradation). The ``exact`` vs bf16 distance is the 4-bit forward.

    PYTHONPATH=. python benchmarks/bench_loss.py               # 40 steps, CPU ok
    PYTHONPATH=. python benchmarks/bench_loss.py --steps 5 --hidden 128

Writes ``<out-dir>/bench_loss_<platform>.json`` and ``.png`` (the loss per
step of each variant).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import common  # noqa: E402
import jint4  # noqa: E402

VARIANTS = ("bf16", "int4 exact", "int4 nonzero", "int4 lss")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--engine", default="auto", choices=jint4.config.ENGINES)
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  if min(args.hidden, args.layers, args.seq_len, args.batch, args.vocab, args.steps) < 1:
    p.error("--hidden, --layers, --seq-len, --batch, --vocab and --steps must be positive")
  if args.hidden % bench_train.HEAD_DIM:
    p.error(f"--hidden must be a multiple of the head size {bench_train.HEAD_DIM}")
  return args


def losses(args, variant: str) -> list:
  """Training loss at every step of one variant."""
  model = bench_train.GPT(args.vocab, args.hidden, args.layers, args.seq_len)
  if variant != "bf16":
    config = jint4.Int4Config(backward=variant.split()[1], engine=args.engine)
    model = jint4.int4ify(model, config, keep=r"lm_head")
  k_data, k_init, k_quant = jax.random.split(jax.random.key(0), 3)
  data = jax.random.randint(k_data, (args.batch, args.seq_len + 1), 0, args.vocab)
  inputs, targets = data[:, :-1], data[:, 1:]
  params = model.init(k_init, inputs[:1])["params"]
  tx = optax.adamw(args.lr, weight_decay=0.1,
                   mask=lambda p: jax.tree_util.tree_map(lambda a: a.ndim >= 2, p))
  opt_state = tx.init(params)

  def loss_fn(params, key):
    logits = model.apply({"params": params}, inputs, rngs={"quant": key})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()

  @jax.jit
  def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  out = []
  for i in range(args.steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(k_quant, i))
    out.append(float(loss))
  return out


def plot(args, curves, name):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for variant, ys in curves.items():
    ax.plot(range(1, len(ys) + 1), ys, label=variant)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (one fixed batch)")
  ax.set_title(f"GPT d={args.hidden} x{args.layers}, seq {args.seq_len}, batch {args.batch},"
               f" AdamW {args.lr:g}", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(args.out_dir, f"{name}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None):
  args = parse_args(argv)
  curves = {v: losses(args, v) for v in VARIANTS}
  name = f"bench_loss_{jax.default_backend()}"
  print(f"{'variant':>14} " + " ".join(f"{'step ' + str(s):>9}" for s in
                                        range(0, args.steps, max(1, args.steps // 8))))
  for v, ys in curves.items():
    print(f"{v:>14} " + " ".join(f"{y:9.3f}" for y in ys[::max(1, args.steps // 8)]))
  common.write(args.out_dir, name, {
      "benchmark": "training loss per step, one fixed random batch (bench_loss.py)",
      "environment": common.environment(args.engine), "settings": vars(args),
      "losses": curves})
  plot(args, curves, name)
  print(f"wrote {os.path.join(args.out_dir, name)}.json and .png")


if __name__ == "__main__":
  main()
