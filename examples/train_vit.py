"""A Vision Transformer trained from scratch on real handwritten digits, in INT4.

The model is ordinary Flax Linen, laid out as google-research's
vision_transformer: a patch-embedding `nn.Conv` (kernel_size == strides,
VALID), a class token, learned position embeddings, pre-LayerNorm encoder
blocks with Flax's own `nn.MultiHeadDotProductAttention` and a Dense MLP, a
final LayerNorm and a Dense classification head. No jint4 inside the model:
`jint4.int4ify` converts it, keeping the head in float as the paper keeps its
output heads. The data is scikit-learn's 8x8 handwritten digits (1,797 real
scans, 10 classes; installed with the examples, no download): 1,442 for
training, a fixed fifth of every class (355) held out. Training images are
lightly augmented (half of them shifted by up to a pixel); batches and shifts
are a pure function of (seed, step), so ``--resume`` retraces the same run.

What runs in INT4 (the table `int4ify` prints at the start of a run): every
attention projection (query, key, value, out) and both MLP Dense layers of
every block, and the patch embedding as well: a conv with kernel_size ==
strides and VALID padding is a Dense on flattened patches, contracting over
patch * patch * channels values, here 2 * 2 * 1 = 4, for which the Hadamard
block is fitted down from 32 to 4 (the smallest block jint4 takes; ``--patch
1`` would contract over 1 and leave it float under the HQ modes; ``lsq_luq``
has no Hadamard transform and converts it at any size). The head stays float
(``keep=``); attention's Q K^T and P V stay float, as in the paper.

The defaults (patch 2: 16 patches + the class token; hidden 64, 2 blocks, 4
heads, MLP 128; batch 64, 800 steps) reach about 96% held-out accuracy in
float and about 94-95% in INT4, in one (float) to three (hq_lss) minutes a run
on two CPU cores.

    python examples/train_vit.py                        # hq_bitsplit, CPU: ~2 min
    python examples/train_vit.py --quant fp             # its float twin
    python examples/train_vit.py --quant hq_lss --seed 1
    python examples/train_vit.py --resume               # continue the last run

Writes runs/vit/<quant>/seed<seed>/{metrics.json, curves.png, checkpoints/}.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpora  # noqa: E402
import trainer  # noqa: E402


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0")(x))
    return nn.Dense(x.shape[-1], name="Dense_1")(y)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm: x + attention(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                        name="MultiHeadDotProductAttention_0")(y)
    x = x + y
    y = nn.LayerNorm(name="LayerNorm_2")(x)
    return x + MlpBlock(self.mlp_dim, name="MlpBlock_3")(y)


class ViT(nn.Module):
  """google-research/vision_transformer's ViT (no dropout), at a small size."""
  num_classes: int = 10
  patch: int = 2
  hidden: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.hidden, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", name="embedding")(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(self.num_layers):
      x = Encoder1DBlock(self.num_heads, self.mlp_dim, name=f"encoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  trainer.add_flags(p, steps=800, batch=64, lr=3e-3, eval_every=100)
  p.add_argument("--patch", type=int, default=2, help="patch size (8 / patch must be whole)")
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp-dim", type=int, default=128)
  p.add_argument("--shift", type=int, default=1,
                 help="augmentation: random translation by up to this many pixels (0: none)")
  p.add_argument("--shift-prob", type=float, default=0.5,
                 help="the fraction of training images translated")
  p.add_argument("--eval-batches", type=int, default=5,
                 help="the held-out set, in this many batches")
  return p.parse_args(argv)


def shift_images(images: np.ndarray, max_shift: int, prob: float,
                 rng: np.random.Generator) -> np.ndarray:
  """Light augmentation: each image, with probability ``prob``, translated by
  a random (dy, dx) in [-max_shift, max_shift]^2, zero-filled (the digit
  moves, the frame stays)."""
  if max_shift <= 0 or prob <= 0:
    return images
  n, h, w, _ = images.shape
  s = max_shift
  dy, dx = rng.integers(-s, s + 1, size=(2, n))
  moved = rng.random(n) < prob
  dy, dx = np.where(moved, dy, 0) + s, np.where(moved, dx, 0) + s
  padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
  rows = dy[:, None] + np.arange(h)          # [n, h]
  cols = dx[:, None] + np.arange(w)          # [n, w]
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def task(args) -> trainer.Task:
  data = corpora.digits()
  size = data.train_x.shape[1]
  if args.patch < 1 or size % args.patch:
    raise SystemExit(f"--patch {args.patch} does not tile {size}x{size} images")
  model = ViT(num_classes=len(data.classes), patch=args.patch, hidden=args.hidden,
              num_layers=args.layers, num_heads=args.heads, mlp_dim=args.mlp_dim)
  tokens = (size // args.patch) ** 2 + 1  # patches + the class token
  n = len(data.train_y)

  @functools.lru_cache(maxsize=4)
  def epoch_order(epoch):
    return np.random.default_rng([args.seed, epoch]).permutation(n)

  def batch(step):
    # Step s (from 1) takes positions [(s-1) B, s B) of an endless stream of
    # seeded per-epoch permutations: a pure function of (seed, step). (Step 0,
    # the sample `trainer.build` inits from, is step 1's batch.)
    first = max(step - 1, 0) * args.batch
    pos = np.arange(first, first + args.batch)
    idx = np.array([epoch_order(int(e))[i] for e, i in zip(*np.divmod(pos, n))])
    rng = np.random.default_rng([args.seed, step, 1])
    return {"inputs": shift_images(data.train_x[idx], args.shift, args.shift_prob, rng),
            "labels": data.train_y[idx]}

  def loss_fn(logits, batch):
    labels = batch["labels"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  # The held-out set, unaugmented, the same for every seed and mode (355
  # images: 5 batches of 71 by default, whose mean is the set's own).
  evals = [{"inputs": x, "labels": y} for x, y in zip(
      np.array_split(data.eval_x, args.eval_batches),
      np.array_split(data.eval_y, args.eval_batches))]
  return trainer.Task(model=model, loss_fn=loss_fn, batch=batch, eval_batches=evals,
                      tokens_per_batch=args.batch * tokens, keep=r"^head$",
                      description=f"{data.description}; {tokens} tokens per image")


def main(argv=None) -> int:
  args = parse_args(argv)
  result = trainer.train(args, task(args), "vit")
  print(f"final eval loss {result['final']['eval_loss']:.4f},"
        f" accuracy {result['final']['eval_accuracy']:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
