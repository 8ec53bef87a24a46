"""init_step_sizes: the one init rule of every INT4 layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jint4
from jint4 import Int4Config
from jint4.quant import hadamard, lsq

X = jax.random.normal(jax.random.key(0), (4, 8, 64)) * 2.0
W = jax.random.normal(jax.random.key(1), (64, 16)) * 0.1


@pytest.mark.parametrize("forward,block", [("hq", 32), ("hq", 1), ("lsq", 32)])
def test_rule_is_two_mean_abs_of_the_transform_over_sqrt_qp(forward, block):
  cfg = Int4Config(forward=forward, hadamard_block=block, qp=7, step_init="lsq")
  init = jint4.init_step_sizes(X, W, cfg)
  b = block if forward == "hq" else 1
  want_x = 2 * np.mean(np.abs(np.asarray(hadamard.hadamard_transform(X, b)))) / np.sqrt(7)
  want_w = 2 * np.mean(np.abs(np.asarray(hadamard.hadamard_transform(W, b, axis=0)))) / np.sqrt(7)
  np.testing.assert_allclose(init.step_x, want_x, rtol=1e-5)
  np.testing.assert_allclose(init.step_w, want_w, rtol=1e-5)
  assert int(init.log2_block) == b.bit_length() - 1


def test_auto_block_is_the_search_and_traceable():
  cfg = Int4Config(hadamard_block="auto", step_init="lsq")
  init = jax.jit(lambda x, w: jint4.init_step_sizes(x, w, cfg))(X, W)
  assert int(init.log2_block) == int(hadamard.search_hadamard_block(X, W))
  b = 2 ** int(init.log2_block)
  np.testing.assert_allclose(
      init.step_x, lsq.init_step_size(hadamard.hadamard_transform(X, b), qp=7), rtol=1e-5)


def test_every_layer_uses_it():
  """Int4Dense (Linen), Int4Linear (NNX) and int4ify set the same steps."""
  cfg = Int4Config()
  init = jint4.init_step_sizes(X, W, cfg)
  dense = jint4.Int4Dense(16, kernel_init=lambda *_: W, config=cfg)
  p = dense.init(jax.random.key(0), X)["params"]
  linear = jint4.Int4Linear(64, 16, kernel_init=lambda *_: W, config=cfg, rngs=nnx.Rngs(0))
  linear(X)
  converted = jint4.int4ify(nn.Dense(16, kernel_init=lambda *_: W), cfg)
  q = converted.init(jax.random.key(0), X)["params"]
  for steps in ((p["step_size_x"], p["step_size_w"]),
                (linear.step_size_x[...], linear.step_size_w[...]),
                (q["step_size_x"], q["step_size_w"])):
    np.testing.assert_array_equal(np.asarray(steps[0]), np.asarray(init.step_x))
    np.testing.assert_array_equal(np.asarray(steps[1]), np.asarray(init.step_w))


def test_empty_batch_gives_step_one_and_nan_stays_visible():
  cfg = Int4Config(hadamard_block="auto")
  init = jint4.init_step_sizes(jnp.zeros((0, 64)), W, cfg)
  assert float(init.step_x) == 1.0 and np.isfinite(float(init.step_w))
  bad = X.at[0, 0, 0].set(jnp.nan)
  assert np.isnan(float(jint4.init_step_sizes(bad, W, Int4Config()).step_x))


def test_float_forward_has_unit_steps():
  init = jint4.init_step_sizes(X, W, Int4Config(forward="none"))
  assert float(init.step_x) == float(init.step_w) == 1.0


@pytest.mark.parametrize("block", [32, 1024])
def test_finite_inputs_near_the_float_limit_give_finite_steps(block):
  x = jax.random.normal(jax.random.key(2), (8, 1024))
  w = jax.random.normal(jax.random.key(3), (1024, 16))
  cfg = Int4Config(hadamard_block=block)
  small = jint4.init_step_sizes(x, w, cfg)
  big = jint4.init_step_sizes(x * 2.0 ** 120, w * 2.0 ** 120, cfg)
  for a, b in ((small.step_x, big.step_x), (small.step_w, big.step_w)):
    assert np.isfinite(float(b))
    np.testing.assert_allclose(float(b), float(a) * 2.0 ** 120, rtol=1e-6)


def test_mse_rule_searches_around_the_lsq_rule_on_the_transform():
  for forward in ("hq", "lsq"):
    lsq_init = jint4.init_step_sizes(X, W, Int4Config(forward=forward, step_init="lsq"))
    mse_init = jint4.init_step_sizes(X, W, Int4Config(forward=forward, step_init="mse"))
    b = 32 if forward == "hq" else 1
    xh = hadamard.hadamard_transform(X, b).reshape(-1, 64)
    np.testing.assert_allclose(mse_init.step_x, lsq.mse_step_size(xh, qn=7, qp=7), rtol=1e-5)
    for s_mse, s_lsq in ((mse_init.step_x, lsq_init.step_x), (mse_init.step_w, lsq_init.step_w)):
      assert 0.1 <= float(s_mse / s_lsq) < 1.0  # Gaussian data: finer than LSQ's rule
  with pytest.raises(ValueError, match="step_init"):
    Int4Config(step_init="minmax")
  assert Int4Config().step_init == "mse"
  # Every layer type reads it: an int4ified Dense starts from the MSE step.
  model = jint4.int4ify(nn.Dense(16), Int4Config(step_init="mse"))
  params = model.init(jax.random.key(0), X)["params"]
  want = jint4.init_step_sizes(X, params["kernel"], Int4Config(step_init="mse"))
  np.testing.assert_allclose(params["step_size_x"], want.step_x, rtol=1e-5)
