"""Int4Linear (flax.nnx): parameters, lazy step-size init, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jint4
from jint4 import Int4Config, Int4Linear
from jint4.quant import hadamard, lsq
from tests.nn import training

X = jax.random.normal(jax.random.key(0), (4, 16, 64))




def _regression_step():
  """A jitted optimizer step fitting tanh(x[..., :8]); returns (loss, grads)."""
  target = jnp.tanh(X[..., :8])

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - target) ** 2))(m)
    training.update(opt, m, grads)
    return loss, grads

  return step


def test_params_match_nnx_linear_plus_step_sizes():
  ours = Int4Linear(64, 32, rngs=nnx.Rngs(0))
  ref = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
  np.testing.assert_array_equal(ours.bias[...], ref.bias[...])
  params = nnx.state(ours, nnx.Param)
  names = {str(path[-1]) for path, _ in nnx.to_flat_state(params)} if hasattr(
      nnx, "to_flat_state") else set(params.to_pure_dict())
  assert {"kernel", "bias", "step_size_x", "step_size_w"} <= names


def test_first_call_sets_step_size_from_batch():
  m = Int4Linear(64, 32, rngs=nnx.Rngs(0))
  assert float(m.step_size_x[...]) == 0.0
  y = m(X)
  assert y.shape == (4, 16, 32)
  expected = lsq.mse_step_size(hadamard.hadamard_transform(X, 32), qn=7, qp=7)  # default rule
  np.testing.assert_allclose(m.step_size_x[...], expected, rtol=1e-6)
  ref = X @ m.kernel[...] + m.bias[...]
  assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.35


@pytest.mark.parametrize("block", [32, "auto"])
def test_trains_under_nnx_jit(block):
  m = Int4Linear(64, 8, rngs=nnx.Rngs(0, quant=1), config=Int4Config(hadamard_block=block))
  m.calibrate(X)
  if block == "auto":
    assert int(m.hadamard_log2_block[...]) >= 0
  opt = training.optimizer(m, optax.adam(3e-2))
  step = _regression_step()
  losses = [float(step(m, opt)[0]) for _ in range(30)]
  assert losses[-1] < 0.6 * losses[0], losses


def test_rejects_warmup():
  with pytest.raises(ValueError, match="warmup"):
    Int4Linear(8, 8, rngs=nnx.Rngs(0), config=Int4Config(warmup_steps=3))


def test_traced_first_call_learns_step_size_x():
  """No eager call before training: the first jitted step initialises the
  step sizes from its batch, passes their gradient on, and later steps keep
  learning them (they used to stay 0.0 with zero gradient)."""
  m = Int4Linear(64, 8, rngs=nnx.Rngs(0, quant=1))
  opt = training.optimizer(m, optax.sgd(1e-2))
  step = _regression_step()
  _, grads = step(m, opt)
  init = jint4.init_step_sizes(X, m.kernel[...], m.config)
  assert int(m.calibrated[...]) == 1
  assert float(jnp.abs(grads["step_size_x"][...])) > 0
  first = float(m.step_size_x[...])
  # the init value, moved by one SGD step of its (non-zero) gradient
  np.testing.assert_allclose(first, float(init.step_x) - 1e-2 * float(grads["step_size_x"][...]),
                             rtol=1e-5)
  for _ in range(3):
    step(m, opt)
  assert float(m.step_size_x[...]) != first


def test_calibrate_sets_steps_from_current_kernel():
  m = Int4Linear(64, 8, rngs=nnx.Rngs(0))
  m(X)
  m.kernel[...] = m.kernel[...] * 3.0          # e.g. a loaded checkpoint
  m.calibrate(X)
  init = jint4.init_step_sizes(X, m.kernel[...], m.config)
  np.testing.assert_allclose(m.step_size_w[...], init.step_w, rtol=1e-6)
  np.testing.assert_allclose(m.step_size_x[...], init.step_x, rtol=1e-6)


def test_errors_name_the_layer():
  m = Int4Linear(48, 8, config=Int4Config(hadamard_block=32), name="encoder/proj",
                 rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^encoder/proj: .*D=48"):
    m(jnp.ones((2, 48)))
