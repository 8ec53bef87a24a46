"""`jint4.relative_step_sizes`: step-size updates scaled by |s|, everything
else untouched, on Linen and NNX parameter trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jint4


def _linen_params():
  model = jint4.int4ify(nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(32)]),
                        jint4.Int4Config(engine="reference"))
  x = jax.random.normal(jax.random.key(0), (8, 32))
  return jax.jit(model.init)(jax.random.key(1), x)["params"]


def test_step_size_updates_are_scaled_by_their_size_and_the_rest_is_untouched():
  params = _linen_params()
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  base = optax.adam(1e-2)
  plain, _ = base.update(grads, base.init(params), params)
  tx = jint4.relative_step_sizes(optax.adam(1e-2))
  scaled, _ = tx.update(grads, tx.init(params), params)
  seen = 0
  for path, u in jax.tree_util.tree_leaves_with_path(scaled):
    p = _at(params, path)
    ref = _at(plain, path)
    if jint4.optim.is_step_size(path):
      seen += 1
      np.testing.assert_allclose(u, ref * abs(p), rtol=1e-6)
      assert abs(float(u)) < abs(float(ref))  # s < 1: a smaller absolute move
    else:
      np.testing.assert_array_equal(u, ref)
  assert seen == 4  # step_size_x and step_size_w of both layers


def _at(tree, path):
  for entry in path:
    tree = tree[getattr(entry, "key", getattr(entry, "idx", None))]
  return tree


def test_relative_updates_keep_a_step_size_positive_where_adam_crosses_zero():
  # A loss whose gradient pushes s down at every step: Adam moves it by ~lr
  # per step and crosses zero; the relative update shrinks it geometrically.
  params = {"layer": {"step_size_w": jnp.float32(0.05), "kernel": jnp.ones((2, 2))}}
  loss = lambda p: p["layer"]["step_size_w"] + jnp.sum(p["layer"]["kernel"])
  for tx, positive in ((optax.adam(2e-3), False),
                       (jint4.relative_step_sizes(optax.adam(2e-3)), True)):
    p, state = params, tx.init(params)
    for _ in range(100):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    assert (float(p["layer"]["step_size_w"]) > 0) == positive
    np.testing.assert_allclose(p["layer"]["kernel"], 1 - 100 * 2e-3, rtol=1e-3)


def test_nnx_state_paths_are_recognised():
  model = jint4.int4ify(nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0))),
                        jint4.Int4Config(engine="reference"))
  model(jax.random.normal(jax.random.key(0), (8, 32)))  # sets the lazy steps
  state = nnx.state(model, nnx.Param)
  names = [p for p, _ in jax.tree_util.tree_leaves_with_path(state)
           if jint4.optim.is_step_size(p)]
  assert len(names) == 2


def test_update_without_params_is_a_clear_error():
  tx = jint4.relative_step_sizes(optax.adam(1e-3))
  params = {"step_size_x": jnp.float32(1.0)}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
