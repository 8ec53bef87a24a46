"""INT4 `dot_general` hooks for Flax's own layers.

Flax's linear layers take the product they compute as an argument, as Flax's
fp8 ops (`flax.linen.fp8_ops`) and Transformer Engine use them. These hooks
make that product `jint4.int4_dot_general`, so a model keeps its layers and
their parameter trees and gains only the step sizes:

Linen, `Int4DotGeneral` as ``dot_general_cls`` (Flax calls
``dot_general_cls()`` inside the layer, so the hook is a submodule of it)::

    nn.Dense(features, dot_general_cls=jint4.Int4DotGeneral)
    nn.DenseGeneral(features, axis=(-2, -1),
                    dot_general_cls=functools.partial(jint4.Int4DotGeneral,
                                                      config=cfg))

  params/<layer>/Int4DotGeneral_0/step_size_x, step_size_w   (+ the layer's
  own kernel and bias, unchanged); quant_state/<layer>/Int4DotGeneral_0/...
  as for `jint4.Int4Dense` (the "auto" block, the warm-up counters). The
  step sizes are set at init by `jint4.init_step_sizes`, and again by
  `jint4.calibrate`. Linen's ``nn.Einsum`` takes no product hook (it calls
  ``jnp.einsum`` itself).

NNX, an `Int4NnxDotGeneral` instance as ``dot_general`` (``nnx.Linear``,
``nnx.LinearGeneral``) or as ``einsum_op`` (``nnx.Einsum``); the layer keeps
it as an attribute, so it is part of the layer's graph::

    nnx.Linear(d, f, dot_general=jint4.Int4NnxDotGeneral(rngs=rngs), rngs=rngs)
    nnx.Einsum("btd,dnh->btnh", (d, n, h),
               einsum_op=jint4.Int4NnxDotGeneral(rngs=rngs), rngs=rngs)

  <layer>.dot_general.step_size_x / step_size_w (`nnx.Param`),
  .calibrated / .hadamard_log2_block (`jint4.QuantState`), set by the first
  call, eager or traced, as `jint4.Int4Linear`'s (``einsum_op`` in place of
  ``dot_general`` for ``nnx.Einsum``). Not ``dot_general_cls``: NNX
  instantiates it anew on every call, so it could hold no state.

rhs (the layer's kernel) takes the kernel's part: its step is
``step_size_w``, and the step sizes are per tensor, shared by all batch
elements of a batched product (`int4_dot_general` says how their gradient
is scaled). The Hadamard block runs along the joined contraction dims and
must divide their product.
"""

from __future__ import annotations

import warnings
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from flax import nnx

from jint4.config import MIN_HADAMARD_BLOCK
from jint4.config import Int4Config
from jint4.config import fit_hadamard_block
from jint4.matmul import flatten_dot_general
from jint4.matmul import int4_dot_general
from jint4.nn.linen import quant_key
from jint4.nn.linen import step_size_variables
from jint4.nn.linen import data_key
from jint4.nn.linen import layer_errors
from jint4.nn.linen import layer_path
from jint4.nn.nnx import add_lazy_step_sizes
from jint4.nn.nnx import lazy_step_sizes
from jint4.quant_init import init_step_sizes

_data = getattr(nnx, "data", lambda value: value)


class Int4DotGeneral(nn.Module):
  """Linen: an INT4 ``dot_general_cls`` for ``nn.Dense`` / ``nn.DenseGeneral``,
  and an INT4 einsum for ``nn.MultiHeadDotProductAttention``'s
  ``qk_attn_weights_einsum_cls`` / ``attn_weights_value_einsum_cls``
  (called as ``(equation, lhs, rhs)``).

  Attributes:
    config: the quantization recipe (`jint4.Int4Config`).
    rng_collection: the rng stream for stochastic rounding and sampling;
      without it the key comes from the operands' bits and the layer path.
    fit_block: fit the Hadamard block to each call's contraction size
      (`jint4.config.fit_hadamard_block`), and compute in float where no
      block fits: for products whose contraction size varies between calls,
      such as attention's P V over the keys. Off: a block that does not
      divide the contraction size is an error.
  """
  config: Int4Config = Int4Config()
  rng_collection: str = "quant"
  fit_block: bool = False

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers=None, precision=None,
               preferred_element_type=None, out_sharding=None) -> jax.Array:
    with layer_errors(layer_path(self)):
      _check_hook_args(self.config, out_sharding)
      return _product(
          lambda l, r, dims, cfg: linen_dot_general(
              self, l, r, dims, config=cfg, rng_collection=self.rng_collection,
              precision=precision, preferred_element_type=preferred_element_type),
          lhs, rhs, dimension_numbers, self.config, self.fit_block,
          layer_path(self), precision, preferred_element_type)


def linen_dot_general(module: nn.Module, lhs, rhs, dimension_numbers, *,
                      config: Int4Config, rng_collection: str = "quant",
                      precision=None, preferred_element_type=None) -> jax.Array:
  """`jint4.int4_dot_general` with its quantizer state in ``module``'s
  scope: ``step_size_x`` / ``step_size_w`` params (set by
  `jint4.init_step_sizes` at init), the "auto" block and the warm-up
  counters in ``quant_state``, as `jint4.Int4Dense` has them."""
  ops = flatten_dot_general(lhs, rhs, dimension_numbers)
  key = quant_key(module, lhs, rhs, rng_collection)
  step_x = step_w = jnp.float32(1)
  log2 = None
  if config.quantizes_forward:
    step_x, step_w, log2 = step_size_variables(
        module, config,
        lambda log2_block: _init_steps(ops, config, log2_block=log2_block))
  return int4_dot_general(
      lhs, rhs, dimension_numbers, step_x, step_w, key, config=config,
      hadamard_log2_block=log2, precision=precision,
      preferred_element_type=preferred_element_type)


def _product(int4_product, lhs, rhs, dimension_numbers, config, fit_block, name,
             precision, preferred_element_type):
  """Runs ``int4_product(lhs, rhs, dimension_numbers, config)`` for a hook
  called as ``dot_general(lhs, rhs, dimension_numbers)`` or as
  ``einsum(equation, lhs, rhs)``; with ``fit_block``, with the block fitted
  to the contraction size, or as the float product where none fits."""
  perm = None
  if isinstance(lhs, str):
    equation, lhs, rhs = lhs, rhs, dimension_numbers
    dimension_numbers, perm = einsum_dimension_numbers(equation, lhs, rhs)
  elif dimension_numbers is None:
    raise TypeError("The INT4 dot_general needs dimension_numbers (or is"
                    " called as an einsum: (equation, lhs, rhs)).")
  if fit_block:
    (contract, _), _ = dimension_numbers
    k = int(np.prod([jnp.shape(lhs)[a] for a in contract]))
    config, _ = fit_hadamard_block(config, k)
    if config is None:
      _warn_float_product(name, k)
      y = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=preferred_element_type)
  if config is not None:
    y = int4_product(lhs, rhs, dimension_numbers, config)
  return y if perm is None else jnp.transpose(y, perm)


_warned_float: set = set()


def _warn_float_product(name, k):
  if name not in _warned_float:
    _warned_float.add(name)
    warnings.warn(
        f"{name}: no Hadamard block >= {MIN_HADAMARD_BLOCK} divides the"
        f" contraction size {k}, so this product runs in float (this warning"
        " is given once per layer).", RuntimeWarning, stacklevel=4)


class Int4NnxDotGeneral(nnx.Module):
  """NNX: an INT4 ``dot_general`` (``nnx.Linear``, ``nnx.LinearGeneral``)
  or ``einsum_op`` (``nnx.Einsum``), one instance per layer.

  Args:
    config: the quantization recipe (`jint4.Int4Config`; no warm-up in NNX).
    name: the path its errors are prefixed with.
    rngs: its ``quant`` stream, if any, draws the stochastic rounding and
      sampling keys; without one they come from the operands' bits.
  """

  def __init__(self, config: Int4Config = Int4Config(), *,
               name: Optional[str] = None, rngs: Optional[nnx.Rngs] = None,
               fit_block: bool = False):
    if not isinstance(config, Int4Config):
      raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
    if config.warmup_steps:
      raise ValueError("Int4Config.warmup_steps is supported by the Linen"
                       " hooks only; use warmup_steps=0 with"
                       " Int4NnxDotGeneral.")
    self.config = config
    self.fit_block = fit_block
    self.name = name or type(self).__name__
    self.quant_rngs = (rngs["quant"].fork() if rngs is not None
                       and "quant" in rngs else _data(None))
    if config.quantizes_forward:
      add_lazy_step_sizes(self)

  def __call__(self, lhs, rhs, dimension_numbers=None, precision=None,
               preferred_element_type=None, out_sharding=None) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` in INT4; called as
    ``(equation, lhs, rhs, ...)``, as ``nnx.Einsum`` calls its
    ``einsum_op``, ``jnp.einsum(equation, lhs, rhs)`` in INT4."""
    with layer_errors(self.name):
      _check_hook_args(self.config, out_sharding)
      return _product(
          lambda l, r, dims, cfg: self._dot_general(
              l, r, dims, cfg, precision, preferred_element_type),
          lhs, rhs, dimension_numbers, self.config, self.fit_block, self.name,
          precision, preferred_element_type)

  def _dot_general(self, lhs, rhs, dimension_numbers, cfg, precision,
                   preferred_element_type):
    ops = flatten_dot_general(lhs, rhs, dimension_numbers)
    key = self.quant_rngs() if self.quant_rngs is not None else data_key(
        lhs, rhs, self.name)
    step_x = step_w = jnp.float32(1)
    log2 = None
    if cfg.quantizes_forward:
      step_x, step_w, log2 = lazy_step_sizes(self, *ops.init_view(), cfg)
      if not (cfg.uses_hadamard and cfg.hadamard_block == "auto"):
        log2 = None
    return int4_dot_general(lhs, rhs, dimension_numbers, step_x, step_w, key,
                            config=cfg, hadamard_log2_block=log2,
                            precision=precision,
                            preferred_element_type=preferred_element_type)


def einsum_dimension_numbers(equation: str, lhs, rhs):
  """(dimension_numbers, perm) of a two-operand einsum that is one
  dot_general: ``jnp.einsum(equation, lhs, rhs) ==
  transpose(lax.dot_general(lhs, rhs, dimension_numbers), perm)``.

  Indices in both operands are contracted (not in the output) or batch dims
  (in the output); each other index must be in the output. Ellipses are
  expanded as ``jnp.einsum`` does.
  """
  equation = equation.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise ValueError(
        "The INT4 einsum needs an explicit two-operand equation"
        f" ('ab,bc->ac'); got {equation!r}.")
  operands, out, _ = opt_einsum.parser.parse_einsum_input((equation, lhs, rhs))
  a, b = operands.split(",")
  for name, s in (("lhs", a), ("rhs", b), ("output", out)):
    if len(set(s)) != len(s):
      raise ValueError(
          f"The INT4 einsum takes no repeated index within one term; {name}"
          f" has {s!r} in {equation!r}.")
  for c in a + b:
    if c not in out and (c in a) != (c in b):
      raise ValueError(
          f"The INT4 einsum cannot sum index {c!r} of one operand alone in"
          f" {equation!r}: keep it in the output or sum the operand first.")
  batch = [c for c in a if c in b and c in out]
  contract = [c for c in a if c in b and c not in out]
  dims = (((tuple(a.index(c) for c in contract),
            tuple(b.index(c) for c in contract)),
           (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch))))
  result = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
  return dims, tuple(result.index(c) for c in out)


def _init_steps(ops, config, log2_block=None):
  return init_step_sizes(*ops.init_view(), config, log2_block=log2_block)


def _check_hook_args(config, out_sharding):
  if not isinstance(config, Int4Config):
    raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
  if out_sharding is not None:
    raise ValueError(
        "The INT4 dot_general takes no out_sharding; leave it None and"
        " constrain the layer's output instead (jax.lax.with_sharding_constraint"
        " / jax.sharding.reshard).")
