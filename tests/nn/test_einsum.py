"""Linen nn.Einsum int4ified: its body runs with an INT4 product in its scope."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jint4
from jint4.nn import int4ify as int4ify_lib
from jint4.nn.einsum import einsum_contraction
from tests.nn import training

EXACT = jint4.Int4Config(forward="none", backward="exact")


class Heads(nn.Module):
  """Einsum projections as Gemma-style models write them."""

  @nn.compact
  def __call__(self, x):
    qkv = nn.Einsum((64, 3, 4, 16), "btd,dsnh->bstnh", name="qkv")(x)
    per_head = nn.Einsum((4, 16, 16), "btnh,nhf->btnf", use_bias=False,
                         name="per_head")(qkv[:, 0])  # n is a batch dim
    return nn.Einsum((4, 16, 64), "btnh,nhd->btd", name="out")(per_head)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _names(tree):
  return {"/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_contraction_of_the_equations():
  assert einsum_contraction("btd,dsnh->bstnh", (64, 3, 4, 16)) == 64
  assert einsum_contraction("btnh,nhd->btd", (4, 16, 64)) == 64
  assert einsum_contraction("btnh,nhf->btnf", (4, 16, 16)) == 16


def test_params_are_nn_einsums_plus_step_sizes_and_rows_say_int4():
  x = jax.random.normal(jax.random.key(0), (2, 8, 64))
  float_params = Heads().init(jax.random.key(1), x)["params"]
  model = jint4.int4ify(Heads())
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  assert _names(params) == _names(float_params) | {
      f"{m}/{s}" for m in ("qkv", "per_head", "out")
      for s in ("step_size_x", "step_size_w")}
  for name, value in float_params.items():  # same init, same values
    for leaf, ref in value.items():
      assert (params[name][leaf] == ref).all(), (name, leaf)
  rows = {r.path: r for r in jint4.int4ify_report(model)}
  assert rows["qkv"].converted and rows["qkv"].block == 32
  assert rows["per_head"].converted and rows["per_head"].block == 16
  assert rows["out"].shape == (4, 16, 64)


def test_forward_equals_float_without_quantization_and_is_close_with_it():
  x = jax.random.normal(jax.random.key(0), (2, 8, 64))
  float_vars = Heads().init(jax.random.key(1), x)
  ref = Heads().apply(float_vars, x)
  exact = jint4.int4ify(Heads(), EXACT)
  y = exact.apply(jax.jit(exact.init)(jax.random.key(1), x), x)
  assert jnp.allclose(y, ref, rtol=1e-5, atol=1e-5)
  model = jint4.int4ify(Heads())
  y = jax.jit(model.apply)(jax.jit(model.init)(jax.random.key(1), x), x)
  # Three chained INT4 products, each ~0.25 off on Gaussian data (as Dense).
  assert y.shape == ref.shape and _rel(y, ref) < 0.6


def test_einsum_trains_under_jit():
  x = jax.random.normal(jax.random.key(0), (8, 8, 64))
  target = jnp.roll(x, 1, axis=-1)
  model = jint4.int4ify(Heads())
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  losses, g = training.train_linen(
      lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2), params, 30)
  assert jax.tree.map(jnp.shape, g) == jax.tree.map(jnp.shape, params)
  assert float(jnp.abs(g["qkv"]["step_size_x"])) > 0
  assert losses[-1] < 0.7 * losses[0], losses


class SumsOneOperand(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((64, 32), "btd,df->bf", name="pool")(x)  # t summed in x alone


def test_einsum_that_is_not_one_dot_general_stays_float_with_a_row():
  x = jnp.ones((2, 8, 64))
  model = jint4.int4ify(SumsOneOperand())
  int4ify_lib._warned_types.discard("Einsum")
  with pytest.warns(RuntimeWarning, match="Einsum layers"):
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  (row,) = jint4.int4ify_report(model)
  assert not row.converted and "cannot sum index 't'" in row.why
  assert set(params["pool"]) == {"kernel", "bias"}


def test_einsum_bad_input_names_the_layer():
  model = jint4.int4ify(Heads())
  with pytest.raises(ValueError, match="^qkv: "):
    jax.jit(model.init)(jax.random.key(0), jnp.ones((2, 8, 48)))
