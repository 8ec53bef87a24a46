"""Which operand of which layers costs a training run its loss.

    python tools/operand_probe.py --operand weight --layers 'attention/(value|out)$' \
        examples/train_bert.py --stage pretrain --quant hq_bitsplit \
        --keep 'attention/(value|out)$' --seed 0

Runs an example script's ``main(argv)`` (everything after the script's path
is its argv) with one operand of some *float* layers fake-quantized to 4 bits
on every call: the input (``--operand input``) or the kernel
(``--operand weight``) of every ``nn.Dense`` / ``nn.DenseGeneral`` whose path
(``encoder/layer_0/attention/value``) matches ``--layers``. The layers that
`jint4.int4ify` converted are not probed: keep the probed ones float with the
example's ``--keep`` and compare three runs of the same seed: the layers
float, their input quantized, their weight quantized. The operand whose
quantization brings back the all-INT4 run's loss is the one that costs it.

The fake quantizer is jint4's forward recipe without the learned step: the
operand times a block Hadamard transform along the contraction (block 32, or
the largest power of two that divides it; ``--block``), values in [-7, 7] at the step of
least squared error of the whole transformed tensor (``--scale tensor``) or of
each output column (``--scale channel``, weights only), re-fit on every call,
rounded to nearest or stochastically (``--rounding stochastic``: noise keyed
by the tensor's own bits, so fresh whenever the tensor changes), transformed
back; the gradient passes straight through. Never part of jint4's training
path: a measuring instrument for docs/RESULTS.md-style ablations.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Set

import flax.linen as nn
import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jint4.quant import hadamard  # noqa: E402
from jint4.quant import lsq  # noqa: E402

QN = QP = 7
MAX_BLOCK_LOG2 = 5   # block 32, jint4's default


def fake_quantize(t: jax.Array, *, per_column: bool = False, stochastic: bool = False,
                  block_log2: int = MAX_BLOCK_LOG2) -> jax.Array:
  """4-bit HQ fake quantization of a 2-D ``t`` [K, M] along its axis 0 (the
  contraction), straight-through: the forward value is Hb^T Q(Hb t), the
  gradient the identity. The block is 2^block_log2, or the largest power of
  two that divides K if that is smaller."""
  k = t.shape[0]
  block = 2 ** min(block_log2, hadamard.max_log2_block(k))
  th = hadamard.apply_block_hadamard(t.astype(jnp.float32), block, axis=0)
  if per_column:
    step = jax.vmap(lambda col: lsq.mse_step_size(col, qn=QN, qp=QP))(th.T)[None, :]
  else:
    step = lsq.mse_step_size(th, qn=QN, qp=QP)
  step = jax.lax.stop_gradient(step)
  if stochastic:
    bits = jax.lax.bitcast_convert_type(jnp.sum(th), jnp.uint32)
    u = jax.random.uniform(jax.random.fold_in(jax.random.key(0), bits), th.shape)
    q = jnp.clip(jnp.floor(th / step + u), -QN, QP) * step
  else:
    q = lsq.fake_quantize_value(th, step, qn=QN, qp=QP)
  back = hadamard.apply_block_hadamard(q, block, axis=0)
  return t + jax.lax.stop_gradient(back.astype(t.dtype) - t)


def _contraction(module, ndim: int) -> int:
  """How many trailing input axes the layer contracts (1 for nn.Dense)."""
  if not isinstance(module, nn.DenseGeneral):
    return 1
  axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  n = len(axes)
  if module.batch_dims or sorted(a % ndim for a in axes) != list(range(ndim - n, ndim)):
    raise ValueError(f"operand_probe: {_path(module)}: only layers that contract their"
                     f" input's last axes are probed (axis={module.axis},"
                     f" batch_dims={module.batch_dims})")
  return n


def _path(module) -> str:
  return "/".join(str(p) for p in module.scope.path)


class Probe:
  """An ``nn.intercept_methods`` interceptor that fake-quantizes one operand
  of the matching float Dense / DenseGeneral layers."""

  def __init__(self, operand: str, layers: str, *, per_column: bool = False,
               stochastic: bool = False, block_log2: int = MAX_BLOCK_LOG2):
    if operand not in ("input", "weight"):
      raise ValueError(f"operand must be 'input' or 'weight'; got {operand!r}")
    if per_column and operand != "weight":
      raise ValueError("a step per output column is for the weight operand only")
    self.operand = operand
    self.pattern = re.compile(layers)
    self.per_column = per_column
    self.stochastic = stochastic
    self.block_log2 = block_log2
    self.matched: Set[str] = set()

  def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
    module = context.module
    if (context.method_name != "__call__"
        or not isinstance(module, (nn.Dense, nn.DenseGeneral))
        or not self.pattern.search(_path(module))
        or not module.has_variable("params", "kernel")   # init makes it
        or module.has_variable("params", "step_size_w")):  # int4ify converted it
      return next_fun(*args, **kwargs)
    path = _path(module)
    if path not in self.matched:
      self.matched.add(path)
      print(f"operand_probe: 4-bit {self.operand} of {path}", flush=True)
    x, rest = args[0], args[1:]
    n = _contraction(module, x.ndim)
    kernel = module.get_variable("params", "kernel")
    k = 1
    for d in kernel.shape[:n]:
      k *= d
    if self.operand == "input":
      xq = fake_quantize(x.reshape(-1, k).T, stochastic=self.stochastic,
                         block_log2=self.block_log2).T
      return next_fun(xq.reshape(x.shape), *rest, **kwargs)
    # The weight: y(Wq) = y(W) + x (Wq - W), the difference without gradient
    # (straight through to W, as jint4's layers).
    y = next_fun(*args, **kwargs)
    w2 = kernel.reshape(k, -1)
    delta = jax.lax.stop_gradient(
        fake_quantize(w2, per_column=self.per_column, stochastic=self.stochastic,
                      block_log2=self.block_log2) - w2)
    extra = x.reshape(-1, k) @ delta.astype(x.dtype)
    return y + extra.reshape(y.shape).astype(y.dtype)


def load_script(path: str):
  """The example script at ``path`` as a module (its directory importable,
  as the examples import their shared modules)."""
  path = os.path.abspath(path)
  folder, name = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
  if folder not in sys.path:
    sys.path.insert(0, folder)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module   # its dataclasses (Flax modules) look it up
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--operand", choices=("input", "weight"), required=True,
                 help="which operand of the matching layers is fake-quantized")
  p.add_argument("--layers", required=True,
                 help="regex searched in each float Dense / DenseGeneral's path")
  p.add_argument("--scale", choices=("tensor", "channel"), default="tensor",
                 help="one step per tensor, or per output column (weight only)")
  p.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest")
  p.add_argument("--block", type=int, default=2 ** MAX_BLOCK_LOG2,
                 help="Hadamard block (a power of two; capped by the contraction)")
  p.add_argument("script", help="an example script with main(argv), e.g."
                 " examples/train_bert.py")
  p.add_argument("script_args", nargs=argparse.REMAINDER,
                 help="the script's own arguments")
  args = p.parse_args(argv)
  if args.block < 1 or args.block & (args.block - 1):
    p.error(f"--block must be a power of two; got {args.block}")
  probe = Probe(args.operand, args.layers, per_column=args.scale == "channel",
                stochastic=args.rounding == "stochastic",
                block_log2=args.block.bit_length() - 1)
  module = load_script(args.script)
  with nn.intercept_methods(probe):
    rc = module.main(args.script_args)
  if not probe.matched:
    raise SystemExit(
        f"operand_probe: no float nn.Dense / nn.DenseGeneral path matched"
        f" --layers {args.layers!r}: nothing was probed. Layers that int4ify"
        " converted are not probed; keep them float (the examples' --keep).")
  return rc


if __name__ == "__main__":
  sys.exit(main())
