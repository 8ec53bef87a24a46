"""Loss curves: where an INT4 model's training loss departs from bf16's.

Not a speed benchmark: it separates the sources of the slower loss decrease
seen in bench_train.py. The same small GPT-like model (bench_train.GPT)
memorizes one fixed random batch with AdamW, once per variant, with a fresh
quantization key every step:

  bf16           the plain model;
  int4 exact     HQ + LSQ forward (INT4), float gradient products: the
                 forward quantizer's share of the gap;
  int4 bitsplit  + bit splitting of the output gradient, every row kept;
  int4 lss       + leverage score sampling (the paper's backward).

``bitsplit`` matching ``exact`` says bit splitting adds nothing; the distance
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import common  # noqa: E402
import jint4  # noqa: E402

VARIANTS = ("bf16", "int4 exact", "int4 bitsplit", "int4 lss")


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
  config = (None if variant == "bf16" else
            jint4.Int4Config(backward=variant.split()[1], engine=args.engine))
  t = bench_train.training(bench_train.GPT(args.vocab, args.hidden, args.layers, args.seq_len),
                           config=config, vocab=args.vocab, seq_len=args.seq_len,
                           batch=args.batch, lr=args.lr)
  params, opt_state, out = t.params, t.opt_state, []
  for i in range(args.steps):
    params, opt_state, loss = t.train_step(params, opt_state, t.inputs, t.targets,
                                           jax.random.fold_in(t.k_quant, i))
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
