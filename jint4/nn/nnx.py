"""`Int4Linear`: a drop-in `flax.nnx.Linear` whose matmuls run in INT4.

Same constructor arguments and parameter names as `nnx.Linear` (``kernel`` of
shape (in, out), ``bias``) plus the quantizer state: the learned LSQ step sizes
``step_size_x`` / ``step_size_w`` (`nnx.Param`) and, as `QuantState`
variables, ``calibrated`` (0 until the step sizes are set) and the Hadamard
block in use (``hadamard_log2_block``, searched with ``hadamard_block="auto"``).

NNX builds parameters before any data is seen, so the step sizes are set by
`jint4.init_step_sizes` (the config's ``step_init`` rule, Sec. 4.1) on the
first batch the layer sees and its kernel at that time, eager or traced: the
first call uses the init values and passes their gradient on to the step
parameters, and stores the init values (NNX transforms such as `nnx.jit` and
`nnx.value_and_grad` carry that update out; with `nnx.split` / `nnx.merge`
keep the state the call returns). `Int4Linear.calibrate(batch)` and
`jint4.calibrate(model, batch)` set them again, e.g. after loading kernels.

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
from jint4.nn.linen import layer_errors
from jint4.quant_init import init_step_sizes

_data = getattr(nnx, "data", lambda value: value)
default_kernel_init = nnx.initializers.lecun_normal()


class QuantState(nnx.Variable):
  """Non-learned quantizer state (whether the steps are set, the block)."""


class Int4Linear(nnx.Module):
  """A linear transformation applied over the last dimension, in INT4.

  ``name``: the layer's path for error messages (`int4ify` sets it).
  """

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, dtype: Optional[Any] = None,
               param_dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Callable = default_kernel_init,
               bias_init: Callable = nnx.initializers.zeros_init(),
               config: Int4Config = Int4Config(),
               name: Optional[str] = None,
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
    self.name = name or f"Int4Linear({in_features} -> {out_features})"
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else _data(None))
    self.quant_rngs = (rngs["quant"].fork() if "quant" in rngs else _data(None))
    if config.quantizes_forward:
      add_lazy_step_sizes(self)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, *, config: Int4Config = Int4Config(),
                  name: Optional[str] = None,
                  rngs: Optional[nnx.Rngs] = None) -> "Int4Linear":
    """An `Int4Linear` computing ``linear`` (an `nnx.Linear`) in INT4.

    It takes over ``linear``'s ``kernel`` and ``bias`` (the same `nnx.Param`
    objects: values, state paths and metadata such as ``out_sharding``
    unchanged, as `jint4.int4ify` needs) and adds the lazy step sizes,
    which carry no sharding metadata (replicated). ``rngs``: an optional
    ``quant`` stream, as for the constructor.
    """
    if not isinstance(linear, nnx.Linear):
      raise TypeError(f"Int4Linear.from_linear takes an nnx.Linear; got"
                      f" {type(linear)}.")
    # Placeholders of no size, replaced by the Linear's own Params below.
    placeholder = lambda key, shape, dtype: jnp.zeros((0,), dtype)
    layer = cls(linear.in_features, linear.out_features,
                use_bias=linear.use_bias, dtype=linear.dtype,
                param_dtype=linear.param_dtype, kernel_init=placeholder,
                bias_init=placeholder, config=config, name=name,
                rngs=rngs if rngs is not None else nnx.Rngs(0))
    layer.kernel = linear.kernel
    layer.bias = linear.bias if linear.use_bias else _data(None)
    return layer

  def calibrate(self, inputs: jax.Array) -> None:
    """Sets the step sizes (and the "auto" block) from a batch and the
    current kernel, as the first call does."""
    if self.config.quantizes_forward:
      self.calibrated[...] = jnp.zeros((), jnp.int32)
      self._steps(self._promote(jnp.asarray(inputs))[0], self.kernel[...])

  def _promote(self, inputs):
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    # Integer inputs are cast to the parameters' dtype, as nnx.Linear does.
    return nnx.nn.dtypes.promote_dtype((inputs, kernel, bias), dtype=self.dtype)

  def _steps(self, inputs, kernel):
    """(step_x, step_w, log2 block) for this call; the first one (flag
    ``calibrated`` still 0, eager or traced) initialises them."""
    return lazy_step_sizes(self, inputs, kernel, self.config)

  def __call__(self, inputs: jax.Array, *,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    inputs, kernel, bias = self._promote(jnp.asarray(inputs))
    cfg = self.config
    with layer_errors(self.name):
      key = self._key(rngs, inputs, kernel)
      if not cfg.quantizes_forward:
        return int4_matmul(inputs, kernel, jnp.float32(1), jnp.float32(1), key,
                           config=cfg, bias=bias)
      step_x, step_w, log2 = self._steps(inputs, kernel)
      auto = cfg.uses_hadamard and cfg.hadamard_block == "auto"
      return int4_matmul(inputs, kernel, step_x, step_w, key, config=cfg,
                         bias=bias, hadamard_log2_block=log2 if auto else None)

  def _key(self, rngs, inputs, kernel):
    return call_key(self, rngs, inputs, kernel)


def call_key(layer: nnx.Module, rngs, inputs: jax.Array,
             kernel: jax.Array) -> jax.Array:
  """An NNX INT4 layer's key for one call: the call's ``rngs`` (an
  `nnx.Rngs`, whose ``quant`` stream is preferred, a stream or a key), else
  the layer's own ``quant_rngs`` stream, else a key derived from the data
  (`jint4.nn.linen.data_key`, with the layer's ``name``)."""
  if isinstance(rngs, nnx.Rngs):
    return rngs["quant"]() if "quant" in rngs else rngs()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  if rngs is not None:
    return rngs
  if layer.quant_rngs is not None:
    return layer.quant_rngs()
  return data_key(inputs, kernel, layer.name)


def add_lazy_step_sizes(layer: nnx.Module) -> None:
  """Gives ``layer`` the variables `lazy_step_sizes` reads, unset (0)."""
  layer.step_size_x = nnx.Param(jnp.zeros((), jnp.float32))
  layer.step_size_w = nnx.Param(jnp.zeros((), jnp.float32))
  layer.hadamard_log2_block = QuantState(jnp.zeros((), jnp.int32))
  layer.calibrated = QuantState(jnp.zeros((), jnp.int32))


def lazy_step_sizes(layer: nnx.Module, inputs: jax.Array, kernel: jax.Array,
                    config: Int4Config):
  """(step_x, step_w, log2 block) of an NNX INT4 layer for a call on
  ``inputs`` [..., D] and ``kernel`` [D, C].

  ``layer`` holds the `nnx.Param`s ``step_size_x`` / ``step_size_w`` and the
  `QuantState`s ``hadamard_log2_block`` / ``calibrated``. The first call
  (``calibrated`` still 0, eager or traced) sets them from
  `jint4.init_step_sizes` and uses the init values, with their gradient passed
  on to the parameters; later calls use the parameters.
  """
  params = (layer.step_size_x[...], layer.step_size_w[...],
            layer.hadamard_log2_block[...])
  flag = layer.calibrated[...]
  if not isinstance(flag, jax.core.Tracer) and int(flag):
    return params
  init = init_step_sizes(inputs, kernel, config)
  ready = flag > 0
  # The init value now, with the gradient passed on to the parameter.
  # (The init rule is data, not a function to differentiate through.)
  steps = tuple(jnp.where(ready, p,
                          jax.lax.stop_gradient(i) + (p - jax.lax.stop_gradient(p)))
                for p, i in zip(params[:2], init[:2]))
  log2 = jnp.where(ready, params[2], init.log2_block)
  layer.step_size_x[...] = jnp.where(ready, params[0], init.step_x)
  layer.step_size_w[...] = jnp.where(ready, params[1], init.step_w)
  layer.hadamard_log2_block[...] = log2
  layer.calibrated[...] = jnp.ones((), jnp.int32)
  return steps + (log2,)
