"""Attention's two batched products, Q K^T and P V, as INT4 products.

Dot-product attention computes ``P = softmax(Q K^T / sqrt(d) + bias)`` per
head, then ``P V``. The paper (Xi et al., NeurIPS 2023, Sec. 6) quantizes the
linear layers around it and keeps these two products in float; with
``Int4Config(attention_products=True)`` `jint4.int4ify` runs them as INT4
products too, each with its own learned step sizes, through the same
quantizers and engine ops as the linear layers:

  Q K^T  contracts head_dim: HQ along head_dim on Q and K,
  P V    contracts the keys: HQ along the key axis on P and V,

batched over (batch..., heads), and the configured backward (bit splitting,
leverage score sampling, ...) for both operands' gradients. The Hadamard
block is fitted to each call's contraction size (`fit_hadamard_block`): a
key length with no power-of-two block >= 4 runs P V in float, with a warning.

Linen's ``nn.MultiHeadDotProductAttention`` takes the two products as hooks
(``qk_attn_weights_einsum_cls`` / ``attn_weights_value_einsum_cls``), which
int4ify sets to `jint4.Int4DotGeneral` submodules named ``qk_product`` and
``pv_product``. NNX's ``nnx.MultiHeadAttention`` takes none, so int4ify sets
its ``attention_fn`` to an `Int4NnxAttention`, which holds the two hooks
(``attention_fn.qk_product`` / ``.pv_product``) and computes what
``nnx.dot_product_attention`` does.
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jint4.config import Int4Config
from jint4.nn.dot_general import Int4NnxDotGeneral
from jint4.nn.dot_general import einsum_dimension_numbers

QK = "qk_product"
PV = "pv_product"


class Int4NnxAttention(nnx.Module):
  """An ``attention_fn`` for ``nnx.MultiHeadAttention`` with INT4 products.

  Same arguments as ``nnx.dot_product_attention``; ``module`` (the
  ``sow_weights`` path) and grouped-query heads are not supported.
  """

  def __init__(self, config: Int4Config = Int4Config(), *,
               name: Optional[str] = None, rngs: Optional[nnx.Rngs] = None):
    name = name or type(self).__name__
    self.name = name
    self.qk_product = Int4NnxDotGeneral(config, name=f"{name}/{QK}", rngs=rngs,
                                        fit_block=True)
    self.pv_product = Int4NnxDotGeneral(config, name=f"{name}/{PV}", rngs=rngs,
                                        fit_block=True)

  def __call__(self, query, key, value, bias=None, mask=None,
               broadcast_dropout: bool = True, dropout_rng=None,
               dropout_rate: float = 0.0, deterministic: bool = False,
               dtype=None, precision=None, module=None,
               promote_dtype=None, is_causal: bool = False, **kwargs):
    del precision  # the products are exact integer GEMMs
    if module is not None:
      raise NotImplementedError(
          f"{self.name}: sow_weights=True is not supported with INT4 attention"
          " products; call without it, or int4ify with"
          " Int4Config(attention_products=False).")
    if kwargs:
      raise TypeError(f"{self.name}: unexpected attention arguments"
                      f" {sorted(kwargs)}.")
    if key.shape[-2] != query.shape[-2]:
      raise ValueError(
          f"{self.name}: INT4 attention products need as many key/value heads"
          f" as query heads; got {key.shape[-2]} and {query.shape[-2]}.")
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    if is_causal:
      causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), jnp.bool_))
      mask = causal if mask is None else jnp.logical_and(mask.astype(jnp.bool_),
                                                         causal)
    return nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask,
        broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
        dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
        qk_attn_weights_einsum=self.qk_product,
        attn_weights_value_einsum=self.pv_product)


def takes_einsum_hooks(attention_fn) -> bool:
  """Whether a Linen ``attention_fn`` accepts the two product hooks (Flax
  passes only the arguments its signature names, so others would drop them)."""
  params = inspect.signature(attention_fn).parameters
  return "qk_attn_weights_einsum" in params and "attn_weights_value_einsum" in params


def product_shape(equation: str, lhs, rhs) -> Tuple[int, int]:
  """(contraction size, rhs's free size) of one head's attention product."""
  ((contract, rhs_contract), (_, rhs_batch)), _ = einsum_dimension_numbers(
      equation, lhs, rhs)
  k = int(np.prod([jnp.shape(lhs)[a] for a in contract]))
  free = [d for i, d in enumerate(jnp.shape(rhs))
          if i not in rhs_contract and i not in rhs_batch]
  return k, int(np.prod(free))
