"""calibrate: a float checkpoint into an int4ified model, steps from data."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jint4

X = jax.random.normal(jax.random.key(0), (16, 64))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(128, name="up")(x))
    return nn.Dense(64, name="down")(h)


def test_linen_float_checkpoint_gets_steps_from_loaded_kernels():
  float_params = jax.jit(MLP().init)(jax.random.key(1), X)["params"]
  model = jint4.int4ify(MLP())
  calibrate = jax.jit(lambda v, x: jint4.calibrate(model, x, variables=v))
  variables = calibrate({"params": float_params}, X)
  params = variables["params"]
  for name in ("up", "down"):
    np.testing.assert_array_equal(params[name]["kernel"], float_params[name]["kernel"])
  init = jint4.init_step_sizes(X, float_params["up"]["kernel"], jint4.Int4Config())
  # Two compiled programs compute the same rule: XLA may fuse its float
  # reductions differently in each (an ulp apart).
  np.testing.assert_allclose(params["up"]["step_size_x"], init.step_x, rtol=3e-7)
  np.testing.assert_allclose(params["up"]["step_size_w"], init.step_w, rtol=3e-7)
  # The steps come from the loaded kernels, not from a fresh init.
  fresh = jax.jit(model.init)(jax.random.key(7), X)["params"]
  assert float(fresh["up"]["step_size_w"]) != float(params["up"]["step_size_w"])
  # Calibrating again (steps already present) gives the same steps.
  again = calibrate(variables, X)["params"]
  np.testing.assert_array_equal(again["down"]["step_size_x"], params["down"]["step_size_x"])
  y = jax.jit(model.apply)(variables, X)
  ref = MLP().apply({"params": float_params}, X)
  assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.4


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(64, 128, rngs=rngs)
    self.down = nnx.Linear(128, 64, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


def test_nnx_float_model_int4ified_then_calibrated():
  model = NnxMLP(nnx.Rngs(0))
  kernel = model.up.kernel[...]
  jint4.int4ify(model)
  nnx.jit(lambda m, x: m(x))(model, X * 10.0)    # a first call on other data
  nnx.jit(lambda m, x: jint4.calibrate(m, x) and None)(model, X)
  init = jint4.init_step_sizes(X, kernel, jint4.Int4Config())
  np.testing.assert_array_equal(model.up.step_size_x[...], init.step_x)
  np.testing.assert_array_equal(model.up.step_size_w[...], init.step_w)


def test_bad_calls():
  with pytest.raises(ValueError, match="variables"):
    jint4.calibrate(jint4.int4ify(MLP()), X)
  with pytest.raises(ValueError, match="no INT4 layer"):
    jint4.calibrate(MLP(), X, variables={"params": MLP().init(jax.random.key(0), X)["params"]})
  with pytest.raises(ValueError, match="no NNX INT4 layer"):
    jint4.calibrate(NnxMLP(nnx.Rngs(0)), X)


def test_nnx_hooks_are_calibrated_too():
  layer = nnx.Linear(64, 32, dot_general=jint4.Int4NnxDotGeneral(), rngs=nnx.Rngs(0))
  layer(X * 10.0)
  jint4.calibrate(layer, X)
  init = jint4.init_step_sizes(X, layer.kernel[...], jint4.Int4Config())
  np.testing.assert_array_equal(layer.dot_general.step_size_x[...], init.step_x)
