"""The body of Linen's ``nn.Einsum`` with its product in INT4.

``nn.Einsum(shape, "btd,dnh->btnh")`` computes ``einsum(inputs, kernel) +
bias`` with a learned kernel of ``shape``. It calls ``jnp.einsum`` itself and
takes no product hook, so `jint4.int4ify` runs this body in the layer's own
scope instead (a Flax method interceptor, as for ``nn.Dense``): the params
keep ``nn.Einsum``'s names, shapes and initializers (``kernel``, ``bias``)
and gain the step sizes ``step_size_x`` / ``step_size_w`` beside them.

The einsum must be one ``dot_general`` (`einsum_dimension_numbers`): the
input's indices shared with the kernel and absent from the output are the
contraction, along which the Hadamard transform runs; shared indices kept in
the output are batch dims. The kernel is the rhs, quantized with
``step_size_w`` (paper Sec. 4: HQ on both operands of every linear layer).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jint4.config import Int4Config
from jint4.nn.dot_general import einsum_dimension_numbers
from jint4.nn.dot_general import linen_dot_general
from jint4.nn.linen import layer_errors
from jint4.nn.linen import layer_path


def int4_einsum(module: nn.Einsum, inputs: jax.Array, einsum_str=None, *,
                config: Int4Config, rng_collection: str = "quant") -> jax.Array:
  """``nn.Einsum.__call__(inputs, einsum_str)`` in INT4, in ``module``'s scope."""
  with layer_errors(layer_path(module)):
    einsum_str = nn.merge_param("einsum_str", module.einsum_str, einsum_str)
    equation = check_equation(einsum_str)
    kernel = module.param("kernel", module.kernel_init, module.shape,
                          module.param_dtype)
    bias = None
    if module.use_bias:
      bias_shape, broadcast_shape = module._get_bias_shape(  # pylint: disable=protected-access
          equation, inputs, kernel)
      bias = module.param("bias", module.bias_init, bias_shape,
                          module.param_dtype)
    promote = getattr(module, "promote_dtype", nn.dtypes.promote_dtype)
    inputs, kernel, bias = promote(inputs, kernel, bias, dtype=module.dtype)
    dims, perm = einsum_dimension_numbers(equation, inputs, kernel)
    y = linen_dot_general(
        module, inputs, kernel, dims, config=config,
        rng_collection=rng_collection, precision=module.precision,
        preferred_element_type=getattr(module, "preferred_element_type", None))
    y = jnp.transpose(y, perm)
    if bias is not None:
      y = y + jnp.reshape(bias, broadcast_shape)
    return y


def check_equation(einsum_str: str) -> str:
  """The equation without spaces, checked as ``nn.Einsum`` checks it."""
  equation = einsum_str.replace(" ", "")
  if "->" not in equation or equation.count(",") != 1:
    raise ValueError(
        "nn.Einsum's einsum_str must be explicit ('->') with exactly two"
        f" operands (inputs, kernel); got {einsum_str!r}.")
  return equation


def einsum_contraction(equation: str, kernel_shape) -> int:
  """The size of the kernel's dims an ``inputs,kernel->out`` einsum sums over."""
  operands, out = check_equation(equation).split("->")
  x, kernel = operands.split(",")
  summed = [i for i, c in enumerate(kernel) if c in x and c not in out]
  return int(np.prod([kernel_shape[i] for i in summed]))
