"""Patch embeddings (Conv with kernel_size == strides) in INT4, Linen and NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jint4 import Int4Config, Int4Linear
from jint4.nn.patch_conv import (Int4PatchConv, int4_patch_conv, patch_contraction,
                                 patch_conv_why, patchify)
from tests.nn import training

FLOAT = Int4Config(forward="none", backward="exact")
INT4 = Int4Config()

# (kernel_size, in_features, input shape): contraction dims of 32.
CASES = {
    "2d": ((4, 4), 2, (3, 8, 12, 2)),
    "2d_remainder": ((4, 4), 2, (2, 10, 9, 2)),
    "2d_unbatched": ((4, 4), 2, (8, 11, 2)),
    "2d_two_batch_dims": ((4, 4), 2, (2, 3, 8, 8, 2)),
    "1d_remainder": ((8,), 4, (3, 34, 4)),
}


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _int4_convs(config):
  """Runs every patch-embedding nn.Conv call as int4_patch_conv."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, nn.Conv)
        and not patch_conv_why(module)):
      return int4_patch_conv(module, *args, config=config, **kwargs)
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(intercept)


def _rel_err(y, ref):
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def test_patchify_layout_matches_kernel_reshape():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  p = patchify(x, (2, 3))
  assert p.shape == (2, 2, 2, 18)
  # patch (1, 0) of image 1, flattened in (kh, kw, c) order
  np.testing.assert_array_equal(p[1, 1, 0], x[1, 2:4, 0:3, :].reshape(-1))
  assert patch_contraction((2, 3), 3) == 18
  assert patch_contraction(8, 4) == 32


@pytest.mark.parametrize("case", sorted(CASES))
def test_linen_matches_nn_conv(case):
  kernel_size, _, shape = CASES[case]
  conv = nn.Conv(8, kernel_size=kernel_size, strides=kernel_size, padding="VALID")
  x = _x(shape)
  params = conv.init(jax.random.key(1), x)
  ref = conv.apply(params, x)

  @jax.jit
  def apply(params, x):
    with _int4_convs(FLOAT):
      return conv.apply(params, x)

  y = apply(params, x)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_nnx_matches_nnx_conv(case):
  kernel_size, c, shape = CASES[case]
  conv = nnx.Conv(c, 8, kernel_size, strides=kernel_size, padding="VALID",
                  rngs=nnx.Rngs(1))
  x = _x(shape)
  ref = conv(x)
  y = Int4PatchConv(conv, config=FLOAT, name="patch")(x)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_nnx_equals_int4_linear_on_the_patches():
  """Same key, same patches, same kernel: bit-identical to Int4Linear."""
  x = _x((2, 8, 8, 2))
  conv = nnx.Conv(2, 8, (4, 4), strides=(4, 4), padding="VALID", rngs=nnx.Rngs(1))
  kernel2d = conv.kernel[...].reshape(32, 8)
  linear = Int4Linear(32, 8, kernel_init=lambda *_: kernel2d,
                      bias_init=lambda *_: conv.bias[...], rngs=nnx.Rngs(0))
  # its own quant stream, overridden by the per-call key
  layer = Int4PatchConv(conv, config=INT4, name="patch", rngs=nnx.Rngs(quant=3))

  @nnx.jit
  def both(layer, linear, x, key):
    return (layer(x, rngs=key), linear(patchify(x, (4, 4)), rngs=key),
            layer(x))

  y, y_linear, y_stream = both(layer, linear, x, jax.random.key(7))
  np.testing.assert_array_equal(y, y_linear)
  assert y_stream.shape == y.shape and bool(jnp.all(jnp.isfinite(y_stream)))
  ref = conv(x)
  assert y.shape == ref.shape
  assert bool(jnp.all(jnp.isfinite(y)))
  assert _rel_err(y, ref) < 0.35  # a 4-bit approximation, as for Int4Linear


def test_linen_params_are_nn_conv_params_plus_step_sizes():
  conv = nn.Conv(8, kernel_size=(4, 4), strides=(4, 4), padding="VALID")
  x = _x((2, 8, 12, 2))
  ref_y, ref = conv.init_with_output(jax.random.key(3), x)
  ref = ref["params"]

  @jax.jit
  def init(x):
    with _int4_convs(INT4):
      return conv.init_with_output(jax.random.key(3), x)

  y, variables = init(x)
  params = variables["params"]
  assert set(params) == set(ref) | {"step_size_x", "step_size_w"}
  for name in ref:
    assert params[name].shape == ref[name].shape
    assert params[name].dtype == ref[name].dtype
    np.testing.assert_array_equal(params[name], ref[name])
  assert params["step_size_x"].shape == params["step_size_w"].shape == ()
  assert float(params["step_size_x"]) > 0 and float(params["step_size_w"]) > 0
  # the output: nn.Conv's shape, a 4-bit approximation of its values
  assert y.shape == ref_y.shape
  assert bool(jnp.all(jnp.isfinite(y)))
  assert _rel_err(y, ref_y) < 0.35  # as for Int4Dense


def test_linen_grads_and_training():
  conv = nn.Conv(8, kernel_size=(4, 4), strides=(4, 4), padding="VALID")
  x = _x((4, 8, 8, 2))
  teacher = nn.Conv(8, kernel_size=(4, 4), strides=(4, 4), padding="VALID")
  target = jnp.tanh(teacher.apply(teacher.init(jax.random.key(9), x), x))

  @jax.jit
  def init():
    with _int4_convs(INT4):
      return conv.init(jax.random.key(0), x)["params"]

  def loss_fn(params):
    with _int4_convs(INT4):
      y = conv.apply({"params": params}, x, rngs={"quant": jax.random.key(5)})
    return jnp.mean((y - target) ** 2)

  tx = optax.sgd(0.1)

  @jax.jit
  def step(params, opt):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, grads

  params = init()
  opt = tx.init(params)
  losses = []
  for i in range(6):
    params, opt, loss, grads = step(params, opt)
    losses.append(float(loss))
    if i == 0:
      assert grads["kernel"].shape == params["kernel"].shape
      for leaf in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0], losses




def _flat_paths(module, kind):
  return {tuple(map(str, path)): value for path, value in
          nnx.to_flat_state(nnx.state(module, kind))}


def test_nnx_keeps_conv_params_and_trains():
  conv = nnx.Conv(2, 8, (4, 4), strides=(4, 4), padding="VALID", rngs=nnx.Rngs(0))
  kernel, bias = conv.kernel[...], conv.bias[...]
  before = _flat_paths(conv, nnx.Param)
  layer = Int4PatchConv(conv, config=INT4, name="patch")
  assert layer.kernel is conv.kernel and layer.bias is conv.bias
  np.testing.assert_array_equal(layer.kernel[...], kernel)
  np.testing.assert_array_equal(layer.bias[...], bias)
  after = _flat_paths(layer, nnx.Param)
  assert set(after) == set(before) | {("step_size_x",), ("step_size_w",)}
  for path, value in before.items():
    assert after[path][...].shape == value[...].shape
  assert float(layer.step_size_x[...]) == 0.0

  x = _x((4, 8, 8, 2))
  teacher = nnx.Conv(2, 8, (4, 4), strides=(4, 4), padding="VALID", rngs=nnx.Rngs(9))
  target = jnp.tanh(teacher(x))
  opt = training.optimizer(layer, optax.sgd(0.1))

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(m)
    training.update(opt, m, grads)
    return loss, grads

  loss0, grads = step(layer, opt)
  assert grads["kernel"][...].shape == kernel.shape
  assert float(layer.step_size_x[...]) > 0 and float(layer.step_size_w[...]) > 0
  losses = [float(loss0)] + [float(step(layer, opt)[0]) for _ in range(5)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0], losses


def _nnx_conv(**kwargs):
  # zeros: no random init to compile for each kernel shape
  return nnx.Conv(4, 8, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0),
                  **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=(4, 4), strides=(4, 4), padding="VALID"),
    dict(kernel_size=4, strides=4, padding=0),
    dict(kernel_size=(4, 4), strides=4, padding=((0, 0), (0, 0))),
    dict(kernel_size=(1, 1), strides=None),  # pointwise, default SAME pads nothing
    dict(kernel_size=(4, 4), strides=(4, 4), padding="valid", kernel_dilation=None),
])
def test_why_accepts_patch_convs(kwargs):
  assert patch_conv_why(nn.Conv(8, **kwargs)) == ""
  assert patch_conv_why(_nnx_conv(**kwargs)) == ""


@pytest.mark.parametrize("kwargs, detail", [
    (dict(kernel_size=(3, 3), strides=1, padding="VALID"), "strides"),
    (dict(kernel_size=(4, 4), strides=(4, 4), padding="SAME"), "padding"),
    (dict(kernel_size=(4, 4), strides=(4, 4), padding=((1, 0), (0, 0))), "padding"),
    (dict(kernel_size=(4, 4), strides=(4, 4), padding="VALID", kernel_dilation=2),
     "kernel_dilation"),
    (dict(kernel_size=(4, 4), strides=(4, 4), padding="VALID", input_dilation=2),
     "input_dilation"),
    (dict(kernel_size=(4, 4), strides=(4, 4), padding="VALID", feature_group_count=2),
     "feature_group_count"),
])
def test_why_rejects_other_convs(kwargs, detail):
  for conv in (nn.Conv(8, **kwargs), _nnx_conv(**kwargs)):
    why = patch_conv_why(conv)
    assert why.startswith("not converted: a Conv that is not a patch embedding")
    assert detail in why


def test_why_other_reasons():
  patch = dict(kernel_size=(2,), strides=(2,), padding="VALID")
  mask = jnp.ones((2, 4, 8))
  assert patch_conv_why(_nnx_conv(mask=mask, **patch)) \
      .startswith("not converted: a masked Conv")
  assert patch_conv_why(nn.Conv(8, mask=mask, **patch)).startswith(
      "not converted: a masked Conv")
  assert "unshared" in patch_conv_why(nn.ConvLocal(8, **patch))
  custom = lambda *a, **k: jax.lax.conv_general_dilated(*a, **k)
  assert patch_conv_why(_nnx_conv(conv_general_dilated=custom, **patch)) == \
      "custom conv_general_dilated (kept as given)"
  assert patch_conv_why(nn.Conv(8, conv_general_dilated=custom, **patch)) == \
      "custom conv_general_dilated (kept as given)"
  assert patch_conv_why(nn.Dense(8)).startswith("not converted: ")


def test_bad_inputs_name_the_layer():
  conv = nnx.Conv(2, 8, (4, 4), strides=(4, 4), padding="VALID", rngs=nnx.Rngs(0))
  layer = Int4PatchConv(conv, config=INT4, name="patch")
  with pytest.raises(ValueError, match=r"^patch: .*3 channels.*in_features=2"):
    layer(_x((2, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"^patch: "):
    layer(_x((8, 2)))
  same = nnx.Conv(2, 8, (4, 4), strides=(4, 4), padding="SAME", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^embed: .*not converted"):
    Int4PatchConv(same, config=INT4, name="embed")
  with pytest.raises(ValueError, match=r"^patchify|lack"):
    patchify(jnp.ones((4, 2)), (2, 2))
