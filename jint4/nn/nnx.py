"""`Int4Linear`: a drop-in `flax.nnx.Linear` whose matmuls run in INT4.

Same constructor arguments and parameter names as `nnx.Linear` (``kernel`` of
shape (in, out), ``bias``) plus the quantizer state: the learned LSQ step sizes
``step_size_x`` / ``step_size_w`` (`nnx.Param`) and, as `QuantState`
variables, the Hadamard block of ``hadamard_block="auto"``.

NNX builds parameters before any data is seen, so ``step_size_w`` is set from
the initial kernel at construction (s0 = 2 mean|W Hb| / sqrt(Qp)) while
``step_size_x`` (and the "auto" block) are set by the first call, from the
first batch (paper Sec. 4.1). Make that first call outside a gradient
transformation, e.g. one forward pass on a sample batch before training
(`Int4Linear.calibrate` / `jint4.calibrate` do it for a whole model); a call
made before then uses the init rule on its batch without learning the step.

Randomness: ``rngs=nnx.Rngs(params=0, quant=1)`` gives the layer a ``quant``
stream (also accepted per call); without one the key is derived from the bits
of the input and kernel sums, so it changes every step. ``config.warmup_steps``
is a Linen feature and is rejected here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jint4.config import Int4Config
from jint4.matmul import int4_matmul
from jint4.nn.linen import data_key
from jint4.quant import hadamard
from jint4.quant import lsq

_data = getattr(nnx, "data", lambda value: value)
default_kernel_init = nnx.initializers.lecun_normal()


class QuantState(nnx.Variable):
  """Non-learned quantizer state (chosen Hadamard block)."""


class Int4Linear(nnx.Module):
  """A linear transformation applied over the last dimension, in INT4."""

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, dtype: Optional[Any] = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Callable = default_kernel_init,
               bias_init: Callable = nnx.initializers.zeros_init(),
               config: Int4Config = Int4Config(),
               rngs: nnx.Rngs):
    del precision  # the products are exact integer GEMMs
    if not isinstance(config, Int4Config):
      raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
    if config.warmup_steps:
      raise ValueError("Int4Config.warmup_steps is supported by the Linen"
                       " Int4Dense only; use warmup_steps=0 with Int4Linear.")
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.config = config
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = nnx.Param(kernel)
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else _data(None))
    self.quant_rngs = (rngs["quant"].fork() if "quant" in rngs else _data(None))
    if config.quantizes_forward:
      auto = config.uses_hadamard and config.hadamard_block == "auto"
      self.hadamard_log2_block = QuantState(jnp.full((), -1 if auto else 0,
                                                     jnp.int32))
      block = self._static_block()
      self.step_size_w = nnx.Param(
          lsq.init_step_size(hadamard.hadamard_transform(
              kernel, 1 if block is None else block, axis=0), qp=config.qp)
          if block is not None else jnp.zeros((), jnp.float32))
      self.step_size_x = nnx.Param(jnp.zeros((), jnp.float32))

  def _static_block(self):
    cfg = self.config
    if not cfg.uses_hadamard:
      return 1
    return None if cfg.hadamard_block == "auto" else cfg.hadamard_block

  def calibrate(self, inputs: jax.Array) -> None:
    """Sets the data-dependent state (step_size_x, the "auto" block) from a
    batch, as the first call does. Call it outside jax transformations."""
    self._initialize(jnp.asarray(inputs))

  def _initialize(self, inputs):
    cfg = self.config
    kernel = self.kernel[...]
    block = self._static_block()
    if block is None:
      log2 = hadamard.search_hadamard_block(inputs, kernel, qn=cfg.qn, qp=cfg.qp)
      self.hadamard_log2_block[...] = log2
      self.step_size_w[...] = lsq.init_step_size(
          hadamard.hadamard_transform_dynamic(kernel, log2, axis=0), qp=cfg.qp)
      xh = hadamard.hadamard_transform_dynamic(inputs, log2, axis=-1)
    else:
      xh = hadamard.hadamard_transform(inputs, block, axis=-1)
    self.step_size_x[...] = lsq.init_step_size(xh, qp=cfg.qp)

  def __call__(self, inputs: jax.Array, *,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    inputs = jnp.asarray(inputs)
    cfg = self.config
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = nnx.nn.dtypes.promote_dtype(
        (inputs, kernel, bias), dtype=self.dtype)
    key = self._key(rngs, inputs, kernel)
    if not cfg.quantizes_forward:
      return int4_matmul(inputs, kernel, jnp.float32(1), jnp.float32(1), key,
                         config=cfg, bias=bias)
    if isinstance(self.step_size_x[...], jax.core.Tracer):
      step_x = self.step_size_x[...]
      ready = step_x > 0
    else:
      if float(self.step_size_x[...]) <= 0:
        self._initialize(inputs)
      step_x, ready = self.step_size_x[...], True
    if ready is not True:
      block = self._static_block()
      if block is None:
        block = jnp.maximum(self.hadamard_log2_block[...], 0)
      fallback = lsq.init_step_size(
          hadamard.apply_block_hadamard(inputs, block, axis=-1), qp=cfg.qp)
      step_x = jnp.where(ready, step_x, jax.lax.stop_gradient(fallback))
    log2 = self.hadamard_log2_block[...] if self._static_block() is None else None
    if log2 is not None:
      log2 = jnp.maximum(log2, 0)
    return int4_matmul(inputs, kernel, step_x, self.step_size_w[...], key,
                       config=cfg, bias=bias, hadamard_log2_block=log2)

  def _key(self, rngs, inputs, kernel):
    if isinstance(rngs, nnx.Rngs):
      return rngs["quant"]() if "quant" in rngs else rngs()
    if isinstance(rngs, nnx.RngStream):
      return rngs()
    if rngs is not None:
      return rngs
    if self.quant_rngs is not None:
      return self.quant_rngs()
    return data_key(inputs, kernel, f"Int4Linear{self.in_features}x{self.out_features}")
