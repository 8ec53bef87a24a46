"""Attention's Q K^T and P V as INT4 products (Int4Config.attention_products)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jint4
from jint4.nn import dot_general as dot_general_lib
from jint4.nn.attention import Int4NnxAttention
from tests.nn import training

ON = jint4.Int4Config(attention_products=True)
EXACT_ON = jint4.Int4Config(forward="none", backward="exact", attention_products=True)


class SelfAttend(nn.Module):
  @nn.compact
  def __call__(self, x, mask=None):
    return nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(x, mask=mask)


def _rows(model):
  return {r.path: r for r in jint4.int4ify_report(model)}


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_products_off_by_default_and_listed():
  x = jnp.ones((2, 16, 64))
  model = jint4.int4ify(SelfAttend())
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  rows = _rows(model)
  for name in ("qk_product", "pv_product"):
    row = rows[f"attn/{name}"]
    assert not row.converted and "attention_products is off" in row.why
  assert "qk_product" not in params["attn"]


def test_linen_products_equal_flax_attention_without_quantization():
  x = jax.random.normal(jax.random.key(0), (2, 16, 64))
  mask = nn.make_causal_mask(jnp.ones((2, 16)))
  variables = SelfAttend().init(jax.random.key(1), x)
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32 dots
    ref = SelfAttend().apply(variables, x, mask)
  model = jint4.int4ify(SelfAttend(), EXACT_ON)
  ours = jax.jit(model.init)(jax.random.key(1), x)
  assert set(ours["params"]["attn"]) == set(variables["params"]["attn"])  # no steps
  np.testing.assert_allclose(model.apply(ours, x, mask), ref, rtol=2e-5, atol=2e-5)


def test_linen_products_run_int4_and_train():
  x = jax.random.normal(jax.random.key(0), (4, 16, 64))
  target = jnp.roll(x, 3, axis=1)
  model = jint4.int4ify(SelfAttend(), ON)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  rows = _rows(model)
  assert rows["attn/qk_product"].converted and rows["attn/qk_product"].shape == (16, 16)
  assert rows["attn/qk_product"].block == 16  # head_dim 16
  assert rows["attn/pv_product"].converted and rows["attn/pv_product"].block == 16
  for name in ("qk_product", "pv_product"):
    assert set(params["attn"][name]) == {"step_size_x", "step_size_w"}
  # Against float products after the same INT4 projections (same keys): two
  # more INT4 products (each ~0.25 off on Gaussian data, as one Dense is)
  # feed the INT4 output projection.
  off = jint4.int4ify(SelfAttend())
  ref = off.apply({"params": {"attn": {
      k: v for k, v in params["attn"].items() if "product" not in k}}}, x)
  y = jax.jit(model.apply)({"params": params}, x)
  assert _rel(y, ref) < 0.6
  losses, g = training.train_linen(
      lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2), params, 25)
  for name in ("qk_product", "pv_product"):
    for s in ("step_size_x", "step_size_w"):
      assert float(jnp.abs(g["attn"][name][s])) > 0, (name, s)
  assert losses[-1] < 0.8 * losses[0], losses


def test_odd_key_length_keeps_pv_float_with_a_row_and_a_warning():
  x = jax.random.normal(jax.random.key(0), (2, 17, 64))
  model = jint4.int4ify(SelfAttend(), ON)
  dot_general_lib._warned_float.clear()
  with pytest.warns(RuntimeWarning, match="contraction size 17"):
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  rows = _rows(model)
  assert rows["attn/qk_product"].converted
  assert not rows["attn/pv_product"].converted
  assert "contraction dim 17" in rows["attn/pv_product"].why
  assert "pv_product" not in params["attn"]


def test_keep_one_product_and_custom_attention_fn():
  x = jnp.ones((2, 16, 64))
  model = jint4.int4ify(SelfAttend(), ON, keep="pv_product")
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  rows = _rows(model)
  assert rows["attn/qk_product"].converted
  assert rows["attn/pv_product"].why == "kept by keep="
  assert "qk_product" in params["attn"] and "pv_product" not in params["attn"]

  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      fn = lambda q, k, v, **kw: nn.dot_product_attention(q, k, v)
      return nn.MultiHeadDotProductAttention(4, attention_fn=fn, name="attn")(x)

  model = jint4.int4ify(Custom(), ON)
  jax.jit(model.init)(jax.random.key(0), x)
  assert "custom attention_fn" in _rows(model)["attn/qk_product"].why


def _nnx_reference(q, k, v, **kw):
  return nnx.dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_nnx_attention_fn_equals_nnx_without_quantization(causal):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(s, (2, 16, 4, 16)) for s in keys)
  mask = jnp.ones((2, 1, 16, 16), bool).at[:, :, :, -3:].set(False)
  fn = Int4NnxAttention(EXACT_ON, name="attn")
  got = fn(q, k, v, mask=mask, deterministic=True, is_causal=causal)
  with jax.default_matmul_precision("highest"):
    ref = _nnx_reference(q, k, v, mask=mask, deterministic=True, is_causal=causal)
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


class NnxAttend(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=64, decode=False,
                                       rngs=rngs)

  def __call__(self, x):
    return self.attn(x)


def test_nnx_products_run_int4_and_train_under_nnx_jit():
  x = jax.random.normal(jax.random.key(0), (4, 16, 64))
  target = jnp.roll(x, 3, axis=1)
  model = NnxAttend(nnx.Rngs(0))
  jint4.int4ify(model, ON)
  row = _rows(model)["attn/attention_fn"]
  assert row.converted
  assert isinstance(model.attn.attention_fn, Int4NnxAttention)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(25)]
  fn = model.attn.attention_fn
  assert float(fn.qk_product.step_size_x[...]) > 0
  assert float(fn.pv_product.step_size_w[...]) > 0
  assert losses[-1] < 0.8 * losses[0], losses


def test_nnx_products_off_and_sow_weights_error():
  model = NnxAttend(nnx.Rngs(0))
  jint4.int4ify(model)
  row = _rows(model)["attn/attention_fn"]
  assert not row.converted and "attention_products is off" in row.why
  assert model.attn.attention_fn is nnx.dot_product_attention
  fn = Int4NnxAttention(ON, name="attn")
  q = jnp.ones((1, 16, 4, 16))
  with pytest.raises(NotImplementedError, match="sow_weights"):
    fn(q, q, q, module=object())
