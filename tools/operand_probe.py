"""Which operand of which layers costs a training run its loss.

    python tools/operand_probe.py --operand weight --layers 'attention/(value|out)$' \
        examples/train_bert.py --stage pretrain --quant hq_bitsplit \
        --keep 'attention/(value|out)$' --seed 0

Runs an example script's ``main(argv)`` (everything after the script's path
is its argv) with an operand of some *float* layers fake-quantized to 4 bits
(or ``--bits``) on every call: the input (``--operand input``), the kernel
(``--operand weight``) or both (``--operand both``) of every ``nn.Dense`` /
``nn.DenseGeneral`` whose path (``encoder/layer_0/attention/value``) matches
``--layers``. The layers that `jint4.int4ify` converted are not probed: keep
the probed ones float with the example's ``--keep`` (or train ``--quant fp``)
and compare runs of the same seed: the layers float, their input quantized,
their weight quantized. The operand whose quantization brings back the
all-INT4 run's loss is the one that costs it.

The fake quantizer is jint4's forward recipe without the learned step: the
operand times a block Hadamard transform along the contraction (block 32, or
the largest power of two that divides it; ``--block``), values in [-7, 7]
(``--bits 4``; [-(2^(b-1) - 1), 2^(b-1) - 1] for ``--bits b``) at the step
of least squared error of the whole transformed tensor (``--scale tensor``)
or of each output column (``--scale channel``, weights only), re-fit on every
call, rounded to nearest or stochastically (``--rounding stochastic``: noise
keyed by the tensor's own bits, so fresh whenever the tensor changes),
transformed back; the gradient passes straight through. ``--rounding noise``
adds Gaussian noise of the nearest rounding's mean squared error instead of
rounding (same keying): the same error size without its structure. With
``--operand both --quant fp`` and ``--bits`` the probe measures what the
forward's resolution costs a run. Never part of jint4's training path: a
measuring instrument for docs/RESULTS.md-style ablations.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Optional, Set

import flax.linen as nn
import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jint4.quant import hadamard  # noqa: E402
from jint4.quant import lsq  # noqa: E402

MAX_BLOCK_LOG2 = 5   # block 32, jint4's default
ROUNDINGS = ("nearest", "stochastic", "noise")


def fake_quantize(t: jax.Array, *, per_column: bool = False, rounding: str = "nearest",
                  block_log2: int = MAX_BLOCK_LOG2, bits: int = 4) -> jax.Array:
  """``bits``-bit HQ fake quantization of a 2-D ``t`` [K, M] along its axis 0
  (the contraction), straight-through: the forward value is Hb^T Q(Hb t),
  the gradient the identity. The block is 2^block_log2, or the largest power
  of two that divides K if that is smaller. Q rounds to nearest or
  stochastically onto the levels -L..L, L = 2^(bits-1) - 1, or (``"noise"``)
  adds Gaussian noise whose variance is the nearest rounding's mean squared
  error (per tensor, or per column with ``per_column``)."""
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
  qn = qp = 2 ** (bits - 1) - 1
  k = t.shape[0]
  block = 2 ** min(block_log2, hadamard.max_log2_block(k))
  th = hadamard.apply_block_hadamard(t.astype(jnp.float32), block, axis=0)
  if per_column:
    step = jax.vmap(lambda col: lsq.mse_step_size(col, qn=qn, qp=qp))(th.T)[None, :]
  else:
    step = lsq.mse_step_size(th, qn=qn, qp=qp)
  step = jax.lax.stop_gradient(step)
  # Noise keyed by the tensor's own bits: fresh whenever the tensor changes.
  tensor_bits = jax.lax.bitcast_convert_type(jnp.sum(th), jnp.uint32)
  if rounding == "stochastic":
    u = jax.random.uniform(jax.random.fold_in(jax.random.key(0), tensor_bits), th.shape)
    q = jnp.clip(jnp.floor(th / step + u), -qn, qp) * step
  else:
    q = lsq.fake_quantize_value(th, step, qn=qn, qp=qp)
  if rounding == "noise":
    axis = 0 if per_column else None
    sd = jnp.sqrt(jnp.mean(jnp.square(q - th), axis=axis, keepdims=per_column))
    # A stream apart from stochastic rounding's.
    z = jax.random.normal(jax.random.fold_in(jax.random.key(1), tensor_bits), th.shape)
    q = th + sd * z
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


OPERANDS = ("input", "weight", "both")


class Probe:
  """An ``nn.intercept_methods`` interceptor that fake-quantizes one operand
  (or both) of the matching float Dense / DenseGeneral layers."""

  def __init__(self, operand: str, layers: str, *, per_column: bool = False,
               rounding: str = "nearest", block_log2: int = MAX_BLOCK_LOG2,
               bits: int = 4, weight_bits: Optional[int] = None):
    if operand not in OPERANDS:
      raise ValueError(f"operand must be one of {OPERANDS}; got {operand!r}")
    if per_column and operand == "input":
      raise ValueError("a step per output column is for the weight operand only")
    weight_bits = bits if weight_bits is None else weight_bits
    for name, b in (("bits", bits), ("weight_bits", weight_bits)):
      if not 2 <= b <= 8:
        raise ValueError(f"{name} must be in 2..8; got {b}")
    self.operand = operand
    self.pattern = re.compile(layers)
    self.per_column = per_column
    self.quantize = functools.partial(fake_quantize, rounding=rounding,
                                      block_log2=block_log2)
    self.bits, self.weight_bits = bits, weight_bits
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
      what = {"input": f"{self.bits}-bit input", "weight": f"{self.weight_bits}-bit weight",
              "both": f"{self.bits}-bit input and {self.weight_bits}-bit weight"}
      print(f"operand_probe: {what[self.operand]} of {path}", flush=True)
    x, rest = args[0], args[1:]
    n = _contraction(module, x.ndim)
    kernel = module.get_variable("params", "kernel")
    k = 1
    for d in kernel.shape[:n]:
      k *= d
    if self.operand != "weight":
      x = self.quantize(x.reshape(-1, k).T, bits=self.bits).T.reshape(x.shape)
    y = next_fun(x, *rest, **kwargs)
    if self.operand == "input":
      return y
    # The weight: y(Wq) = y(W) + x (Wq - W), the difference without gradient
    # (straight through to W, as jint4's layers).
    w2 = kernel.reshape(k, -1)
    delta = jax.lax.stop_gradient(
        self.quantize(w2, per_column=self.per_column, bits=self.weight_bits) - w2)
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
  p.add_argument("--operand", choices=OPERANDS, required=True,
                 help="which operand of the matching layers is fake-quantized")
  p.add_argument("--layers", required=True,
                 help="regex searched in each float Dense / DenseGeneral's path")
  p.add_argument("--scale", choices=("tensor", "channel"), default="tensor",
                 help="one step per tensor, or per output column (weight only)")
  p.add_argument("--rounding", choices=ROUNDINGS, default="nearest",
                 help="noise: Gaussian noise of the nearest rounding's squared error")
  p.add_argument("--bits", type=int, default=4,
                 help="levels -(2^(bits-1) - 1) .. 2^(bits-1) - 1 (2..8)")
  p.add_argument("--weight-bits", type=int, default=None,
                 help="the weight's bits, where they differ from --bits")
  p.add_argument("--block", type=int, default=2 ** MAX_BLOCK_LOG2,
                 help="Hadamard block (a power of two; capped by the contraction)")
  p.add_argument("script", help="an example script with main(argv), e.g."
                 " examples/train_bert.py")
  p.add_argument("script_args", nargs=argparse.REMAINDER,
                 help="the script's own arguments")
  args = p.parse_args(argv)
  if args.block < 1 or args.block & (args.block - 1):
    p.error(f"--block must be a power of two; got {args.block}")
  try:
    probe = Probe(args.operand, args.layers, per_column=args.scale == "channel",
                  rounding=args.rounding, block_log2=args.block.bit_length() - 1,
                  bits=args.bits, weight_bits=args.weight_bits)
  except ValueError as e:   # Probe checks its arguments; say so as argparse would
    p.error(str(e))
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
