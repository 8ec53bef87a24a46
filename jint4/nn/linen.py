"""`Int4Dense`: a drop-in `flax.linen.Dense` whose matmuls run in INT4.

Same constructor arguments and parameter names as `nn.Dense` (``kernel`` of
shape (in, out), ``bias``), plus the quantizer state:

  params/step_size_x, params/step_size_w   learned LSQ step sizes (scalars),
      initialised by `jint4.init_step_sizes` (the ``step_init`` rule) on
      the init batch and the initial kernel (paper Sec. 4.1); after loading
      other kernels, `jint4.calibrate` sets them again.
  quant_state/hadamard_log2_block          only with hadamard_block="auto": the
      block chosen by the per-layer search at init.
  quant_state/step, step_ratio_x, step_ratio_w   only with warmup_steps > 0.

Randomness: the stochastic rounding and sampling draw from the ``'quant'`` rng
stream when the caller passes one (``rngs={'quant': key}``). Without it, the
key is derived from the bits of the layer's input and kernel sums and from the
layer's path, so it changes every step as data and weights change, and the
same inputs give the same result.

Warm-up (paper, pre-training): with ``config.warmup_steps = K > 0`` the step
sizes follow the init rule of the current batch for the first K calls made
with the ``quant_state`` collection mutable (``model.apply(variables, x,
mutable=['quant_state'])``, as for BatchNorm's statistics); learning then
continues from the last warm-up value. A call without it mutable warns once
per layer: the counter cannot advance then.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jint4 import partition
from jint4.config import Int4Config
from jint4.matmul import int4_matmul
from jint4.quant_init import init_step_sizes

QUANT_STATE = "quant_state"
default_kernel_init = nn.initializers.lecun_normal()


class Int4Dense(nn.Module):
  """A linear transformation applied over the last dimension, in INT4.

  Attributes:
    features: the number of output features.
    use_bias: whether to add a bias to the output.
    dtype: the dtype of the computation (default: inferred from input and
      params).
    param_dtype: the dtype passed to parameter initializers.
    precision: accepted for `nn.Dense` compatibility; unused (the products are
      exact integer GEMMs).
    kernel_init: initializer for the kernel.
    bias_init: initializer for the bias.
    config: the quantization recipe (`jint4.Int4Config`).
    rng_collection: the rng stream for stochastic rounding and sampling.
  """
  features: int
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  config: Int4Config = Int4Config()
  rng_collection: str = "quant"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    return int4_dense(
        self, inputs, features=self.features, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init,
        config=self.config, rng_collection=self.rng_collection)


def int4_dense(module: nn.Module, inputs: jax.Array, *, features: int,
               use_bias: bool, dtype, param_dtype, kernel_init, bias_init,
               config: Int4Config, rng_collection: str = "quant") -> jax.Array:
  """The body of `Int4Dense.__call__`, run in ``module``'s scope.

  `jint4.int4ify` runs it inside intercepted `nn.Dense` calls, so an int4ified
  model and a hand-written one with `Int4Dense` have the same variables.
  """
  if not isinstance(config, Int4Config):
    raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
  inputs = jnp.asarray(inputs)
  kernel = module.param("kernel", kernel_init,
                        (jnp.shape(inputs)[-1], features), param_dtype)
  bias = (module.param("bias", bias_init, (features,), param_dtype)
          if use_bias else None)
  # Integer inputs are cast to the parameters' dtype, as nn.Dense does.
  inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias,
                                                 dtype=dtype)
  with layer_errors(layer_path(module)):
    return quantized_dense(module, inputs, kernel, bias, config, rng_collection)


def quantized_dense(module, inputs, kernel, bias, config, rng_collection):
  """``int4_matmul(inputs, kernel) + bias`` with the step sizes (and the
  "auto" block, the warm-up state) as variables of ``module``'s scope: the
  INT4 part of every Linen layer whose product is a matmul."""
  key = quant_key(module, inputs, kernel, rng_collection)
  if not config.quantizes_forward:
    return int4_matmul(inputs, kernel, jnp.float32(1), jnp.float32(1), key,
                       config=config, bias=bias)
  step_x, step_w, log2 = step_size_variables(
      module, config,
      lambda log2_block: init_step_sizes(inputs, kernel, config,
                                         log2_block=log2_block))
  return int4_matmul(inputs, kernel, step_x, step_w, key, config=config,
                     bias=bias, hadamard_log2_block=log2)


def step_size_variables(module, config, init):
  """(step_x, step_w, log2 block or None) as variables of ``module``'s scope:
  the params ``step_size_x`` / ``step_size_w``, set at init by
  ``init(log2_block)`` (a `jint4.QuantInit`), the "auto" block in
  ``quant_state`` (searched by ``init(None)``), and the warm-up state."""
  log2 = None
  if config.uses_hadamard and config.hadamard_block == "auto":
    log2 = module.variable(QUANT_STATE, "hadamard_log2_block",
                           lambda: init(None).log2_block).value

  def initial():
    return init(log2)

  step_x = module.param("step_size_x", lambda _: initial().step_x)
  step_w = module.param("step_size_w", lambda _: initial().step_w)
  if config.warmup_steps:
    step_x, step_w = warmup(module, config.warmup_steps, step_x, step_w, initial)
  return step_x, step_w, log2


def layer_path(module: nn.Module) -> str:
  """A Linen module's path, "/"-joined ("Dense_0" style names)."""
  return "/".join(map(str, module.path)) or type(module).__name__


@contextlib.contextmanager
def layer_errors(path: str):
  """Prefixes a layer's bad-input errors with the layer's path (also those
  found when XLA partitions the layer's op: `jint4.partition.naming`)."""
  try:
    with partition.naming(path):
      yield
  except (ValueError, TypeError) as e:
    # Only the plain types: subclasses (JAX's tracer errors) have their own
    # constructors and messages.
    if type(e) not in (ValueError, TypeError) or str(e).startswith(f"{path}: "):
      raise
    raise type(e)(f"{path}: {e}") from e


_warned_frozen: set = set()


def warmup(module, steps, step_x, step_w, initial):
  """Step sizes during and after the paper's pre-training warm-up."""
  counter = module.variable(QUANT_STATE, "step", lambda: jnp.zeros((), jnp.int32))
  ratio_x = module.variable(QUANT_STATE, "step_ratio_x",
                            lambda: jnp.ones((), jnp.float32))
  ratio_w = module.variable(QUANT_STATE, "step_ratio_w",
                            lambda: jnp.ones((), jnp.float32))
  advance = module.is_mutable_collection(QUANT_STATE) and not module.is_initializing()
  path = layer_path(module)
  if not advance and not module.is_initializing() and path not in _warned_frozen:
    # Without the collection mutable the counter cannot advance: during the
    # warm-up the steps would follow the init rule forever and never learn.
    _warned_frozen.add(path)
    warnings.warn(
        f"{path}: Int4Config(warmup_steps={steps}) but the {QUANT_STATE!r}"
        " collection is not mutable, so the warm-up counter does not advance"
        " and, while it lasts, the step sizes follow the init rule instead of"
        f" being learned. Train with apply(..., mutable=[{QUANT_STATE!r}]) and"
        " keep the returned state (fine to ignore for evaluation).",
        RuntimeWarning, stacklevel=2)
  warm = counter.value < steps
  rules = initial()
  out = []
  for param, ratio, rule in ((step_x, ratio_x, rules.step_x),
                             (step_w, ratio_w, rules.step_w)):
    rule_value = jax.lax.stop_gradient(rule)
    # During warm-up s follows the rule and is not learned; afterwards it is
    # the learned parameter rescaled to continue from the last warm-up value.
    out.append(jnp.where(warm, rule_value, param * ratio.value))
    if advance:
      ratio.value = jnp.where(
          warm, rule_value / jax.lax.stop_gradient(param), ratio.value)
  if advance:
    counter.value = counter.value + 1
  return out


def quant_key(module, inputs, kernel, rng_collection):
  """The layer's rng stream if the caller passed one, else `data_key`."""
  if module.has_rng(rng_collection):
    return module.make_rng(rng_collection)
  return data_key(inputs, kernel, "/".join(map(str, module.path)))


def data_key(inputs: jax.Array, kernel: jax.Array, name: str) -> jax.Array:
  """A PRNG key from the bits of the inputs, of the kernel and a layer name.

  Used when no rng stream is given: it changes whenever the data or the
  weights change (every training step) and is a pure function of them. The
  bits are summed as integers (mod 2^32): an exact sum in any order, so the
  key is the same however the arrays are sharded.
  """
  def bits(t):
    t = jax.lax.stop_gradient(t).astype(jnp.float32)
    return jnp.sum(jax.lax.bitcast_convert_type(t, jnp.uint32), dtype=jnp.uint32)

  key = jax.random.key(zlib.crc32(name.encode()) & 0x7FFFFFFF)
  key = jax.random.fold_in(key, bits(inputs))
  return jax.random.fold_in(key, bits(kernel))
