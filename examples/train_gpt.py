"""GPT-like byte-level language model pre-training on real English text, in INT4.

The model is ordinary Flax Linen (`train_transformer.GPT`: token and position
embeddings, pre-LayerNorm blocks with Flax's own
`nn.MultiHeadDotProductAttention` and a Dense MLP, an LM head); `jint4.int4ify`
converts every Dense layer and attention projection, keeping the LM head in
float as the paper does. The corpus is the Bible (American Standard Version,
from the ``pythonbible`` package: real prose, installed with the examples, no
download) or any text file (``--text-file``).

    python examples/train_gpt.py                        # hq_bitsplit, CPU: minutes
    python examples/train_gpt.py --quant fp             # its float twin
    python examples/train_gpt.py --quant hq_lss --seed 1 --steps 2000
    python examples/train_gpt.py --resume               # continue the last run

Writes runs/gpt/<quant>/seed<seed>/{metrics.json, curves.png, checkpoints/}.
`examples/report.py` runs the grid of modes and seeds.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpora  # noqa: E402
import trainer  # noqa: E402
from train_transformer import GPT  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  trainer.add_flags(p, steps=600, batch=16, lr=2e-3, eval_every=100)
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--text-file", default="", help="train on this UTF-8 file instead")
  return p.parse_args(argv)


def task(args) -> trainer.Task:
  text = corpora.text_corpus(args.text_file or None)
  model = GPT(vocab_size=corpora.BYTE_VOCAB, d_model=args.d_model, num_layers=args.layers,
              num_heads=args.heads, max_len=args.seq_len)

  def lm_batch(data, seed, step):
    x, y = corpora.lm_batch(data, args.batch, args.seq_len, seed, step)
    return {"inputs": x, "targets": y}

  def loss_fn(logits, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return loss, {"bits_per_byte": loss / jnp.log(2.0)}

  # The held-out set is the same for every seed and mode.
  evals = [lm_batch(text.eval, 12345, i) for i in range(args.eval_batches)]
  return trainer.Task(model=model, loss_fn=loss_fn,
                      batch=lambda step: lm_batch(text.train, args.seed, step),
                      eval_batches=evals, tokens_per_batch=args.batch * args.seq_len,
                      keep=r"lm_head", description=text.description)


def main(argv=None) -> int:
  args = parse_args(argv)
  result = trainer.train(args, task(args), "gpt")
  print(f"final eval loss {result['final']['eval_loss']:.4f}"
        f" ({result['final']['eval_bits_per_byte']:.3f} bits/byte)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
