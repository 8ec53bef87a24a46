"""Int4Dense: nn.Dense compatibility, quantizer state, randomness, warm-up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint4 import Int4Config, Int4Dense
from jint4.quant import hadamard, lsq

X = jax.random.normal(jax.random.key(0), (2, 8, 64))


def test_params_are_dense_params_plus_step_sizes():
  dense = nn.Dense(32).init(jax.random.key(1), X)
  ours = Int4Dense(32).init(jax.random.key(1), X)
  assert set(ours["params"]) == set(dense["params"]) | {"step_size_x", "step_size_w"}
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(ours["params"][name], dense["params"][name])
  assert "quant_state" not in ours


def test_step_sizes_follow_the_init_rule():
  v = Int4Dense(32).init(jax.random.key(1), X)
  rule = lambda t: lsq.mse_step_size(t, qn=7, qp=7)   # the default step_init
  sx = rule(hadamard.hadamard_transform(X, 32))
  sw = rule(hadamard.hadamard_transform(v["params"]["kernel"], 32, axis=0))
  np.testing.assert_allclose(v["params"]["step_size_x"], sx, rtol=1e-6)
  np.testing.assert_allclose(v["params"]["step_size_w"], sw, rtol=1e-6)


def test_dense_checkpoint_loads_with_only_quant_state_added():
  dense_params = nn.Dense(32).init(jax.random.key(7), X)["params"]
  fresh = Int4Dense(32).init(jax.random.key(1), X)["params"]
  loaded = {**fresh, **dense_params}
  y = Int4Dense(32).apply({"params": loaded}, X)
  ref = nn.Dense(32).apply({"params": dense_params}, X)
  rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
  assert rel < 0.35, rel  # a 4-bit approximation of the same layer


def test_close_to_float_dense_and_dtype_promotion():
  v = Int4Dense(32, dtype=jnp.bfloat16).init(jax.random.key(1), X)
  y = Int4Dense(32, dtype=jnp.bfloat16).apply(v, X)
  assert y.dtype == jnp.bfloat16
  ref = X @ v["params"]["kernel"] + v["params"]["bias"]
  rel = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert rel < 0.35, rel


def test_rng_stream_and_default_key():
  m = Int4Dense(32)
  v = m.init(jax.random.key(1), X)
  grad = lambda rngs, x=X: jax.grad(
      lambda p: jnp.sum(m.apply({"params": p}, x, rngs=rngs) ** 2))(v["params"])["kernel"]
  k1 = {"quant": jax.random.key(1)}
  np.testing.assert_array_equal(grad(k1), grad(k1))
  assert not np.array_equal(grad(k1), grad({"quant": jax.random.key(2)}))
  # No rngs: deterministic in the inputs, different for different inputs.
  np.testing.assert_array_equal(grad(None), grad(None))
  assert not np.array_equal(grad(None), grad(None, X * 1.01))


def test_use_bias_false_and_kernel_init():
  m = Int4Dense(16, use_bias=False, kernel_init=nn.initializers.ones)
  v = m.init(jax.random.key(0), X)
  assert "bias" not in v["params"]
  np.testing.assert_array_equal(v["params"]["kernel"], 1.0)


def test_auto_block_is_stored_and_used_under_jit():
  m = Int4Dense(32, config=Int4Config(hadamard_block="auto"))
  v = jax.jit(m.init)(jax.random.key(1), X)
  log2 = v["quant_state"]["hadamard_log2_block"]
  assert log2.dtype == jnp.int32 and 0 <= int(log2) <= 6
  y = jax.jit(m.apply)(v, X)
  static = Int4Dense(32, config=Int4Config(hadamard_block=2 ** int(log2)))
  params = dict(v["params"])
  np.testing.assert_allclose(y, static.apply({"params": params}, X), rtol=1e-5, atol=1e-5)


def test_warmup_follows_the_rule_then_learns():
  cfg = Int4Config(warmup_steps=2)
  m = Int4Dense(32, config=cfg)
  v = m.init(jax.random.key(1), X)
  params, state = v["params"], v["quant_state"]
  assert int(state["step"]) == 0

  def step(params, state, x):
    def loss(p):
      y, new = m.apply({"params": p, "quant_state": state}, x, mutable=["quant_state"])
      return jnp.mean(y ** 2), new
    (l, new), g = jax.value_and_grad(loss, has_aux=True)(params)
    return g, new["quant_state"]

  x2 = X * 3.0
  g, state = step(params, state, x2)
  assert float(g["step_size_x"]) == 0.0 and float(g["step_size_w"]) == 0.0
  rule = lsq.mse_step_size(hadamard.hadamard_transform(x2, 32), qn=7, qp=7)
  np.testing.assert_allclose(state["step_ratio_x"] * params["step_size_x"], rule, rtol=1e-5)
  g, state = step(params, state, x2)
  assert int(state["step"]) == 2
  g, state = step(params, state, x2)  # warm-up over: the step size learns
  assert float(g["step_size_x"]) != 0.0
  assert int(state["step"]) == 3


def test_float_forward_mode_has_no_step_sizes():
  v = Int4Dense(32, config=Int4Config(forward="none", backward="exact")).init(
      jax.random.key(1), X)
  assert set(v["params"]) == {"kernel", "bias"}
  y = Int4Dense(32, config=Int4Config(forward="none", backward="exact")).apply(v, X)
  np.testing.assert_allclose(y, X @ v["params"]["kernel"] + v["params"]["bias"],
                             rtol=1e-5, atol=1e-5)


def test_bad_config_type():
  with pytest.raises(TypeError, match="Int4Config"):
    Int4Dense(4, config={"forward": "hq"}).init(jax.random.key(0), X)


def test_warmup_without_mutable_state_warns_once():
  import warnings
  from jint4.nn import linen as linen_lib
  x = jax.random.normal(jax.random.key(0), (8, 64))
  layer = Int4Dense(16, config=Int4Config(warmup_steps=3))
  variables = layer.init(jax.random.key(1), x)
  linen_lib._warned_frozen.clear()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    layer.apply(variables, x)
    layer.apply(variables, x)
    layer.apply(variables, x, mutable=["quant_state"])
  msgs = [str(w.message) for w in caught if "not mutable" in str(w.message)]
  assert len(msgs) == 1 and "mutable=['quant_state']" in msgs[0]


def test_errors_name_the_layer_path():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Int4Dense(8, config=Int4Config(hadamard_block=32), name="proj")(x)

  with pytest.raises(ValueError, match=r"^proj: .*D=48.*hadamard_block=16"):
    Net().init(jax.random.key(0), jnp.ones((2, 48)))


def test_integer_inputs_are_cast_like_nn_dense():
  x = jnp.arange(2 * 64, dtype=jnp.int32).reshape(2, 64) % 5
  layer = Int4Dense(16)
  variables = layer.init(jax.random.key(0), x)
  y = layer.apply(variables, x)
  assert y.dtype == nn.Dense(16).apply({"params": {k: variables["params"][k] for k in
                                                  ("kernel", "bias")}}, x).dtype
  assert bool(jnp.all(jnp.isfinite(y)))
