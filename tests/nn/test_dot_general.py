"""The INT4 dot_general hooks inside Flax's own layers (Linen and NNX)."""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jint4
from jint4 import Int4Config, Int4DotGeneral, Int4NnxDotGeneral
from jint4.matmul import flatten_dot_general
from jint4.nn.dot_general import einsum_dimension_numbers

X = jax.random.normal(jax.random.key(0), (2, 8, 64))
HOOK = "Int4DotGeneral_0"


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _init_steps(lhs, rhs, dimension_numbers, config=Int4Config()):
  return jint4.init_step_sizes(
      *flatten_dot_general(lhs, rhs, dimension_numbers).init_view(), config)


# --- Linen ---------------------------------------------------------------------

# (layer with the hook, input, the dimension numbers Flax passes)
_LINEN = {
    "Dense": (lambda dg: nn.Dense(16, dot_general_cls=dg), X,
              (((2,), (0,)), ((), ()))),
    # attention-style output projection: contract (heads, head_dim)
    "DenseGeneral_axes": (
        lambda dg: nn.DenseGeneral((4, 8), axis=(-2, -1), dot_general_cls=dg),
        X.reshape(2, 8, 2, 32), (((2, 3), (0, 1)), ((), ()))),
    # a kernel per batch element: a batched product
    "DenseGeneral_batch": (
        lambda dg: nn.DenseGeneral(8, batch_dims=(0,), dot_general_cls=dg), X,
        (((2,), (1,)), ((0,), (0,)))),
}


@pytest.mark.parametrize("name", sorted(_LINEN))
def test_linen_params_are_the_float_layers_plus_step_sizes(name):
  make, x, dn = _LINEN[name]
  ours, ref = make(Int4DotGeneral), make(None)
  v = jax.jit(ours.init)(jax.random.key(1), x)
  v_ref = ref.init(jax.random.key(1), x)
  # Flax builds dot_general_cls() inside the layer: a submodule of it.
  assert set(v) == {"params"}
  assert set(v["params"]) == set(v_ref["params"]) | {HOOK}
  assert set(v["params"][HOOK]) == {"step_size_x", "step_size_w"}
  for k in v_ref["params"]:
    np.testing.assert_array_equal(v["params"][k], v_ref["params"][k])
  init = _init_steps(x, v["params"]["kernel"], dn)
  np.testing.assert_allclose(v["params"][HOOK]["step_size_x"], init.step_x, rtol=1e-6)
  np.testing.assert_allclose(v["params"][HOOK]["step_size_w"], init.step_w, rtol=1e-6)
  y = jax.jit(ours.apply)(v, x, rngs={"quant": jax.random.key(2)})
  y_ref = ref.apply(v_ref, x)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
  assert _rel(y, y_ref) < 0.35, _rel(y, y_ref)


def test_linen_einsum_takes_no_hook():
  """Linen's nn.Einsum (this Flax) calls jnp.einsum itself and has neither
  dot_general nor dot_general_cls, so the hook cannot go in: int4ify runs
  its body with an INT4 product instead (tests/nn/test_einsum.py)."""
  fields = nn.Einsum.__dataclass_fields__
  assert "dot_general_cls" not in fields and "dot_general" not in fields
  with pytest.raises(TypeError):
    nn.Einsum((64, 8), "btd,df->btf", dot_general_cls=Int4DotGeneral)


class _Attention(nn.Module):
  """Head projection and output projection (DenseGeneral), an MLP (Dense)."""
  dot_general_cls: object

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 32), dot_general_cls=self.dot_general_cls)(x)
    h = nn.DenseGeneral(64, axis=(-2, -1), dot_general_cls=self.dot_general_cls)(
        jnp.tanh(h))
    return nn.Dense(8, dot_general_cls=self.dot_general_cls)(x + h)


def test_linen_trains_under_jit_with_optax():
  model = _Attention(functools.partial(Int4DotGeneral, config=Int4Config(
      hadamard_block=16)))
  target = jnp.tanh(X[..., :8])
  params = jax.jit(model.init)(jax.random.key(1), X)["params"]
  assert {k for k in params} == {"DenseGeneral_0", "DenseGeneral_1", "Dense_0"}
  assert all(set(params[k][HOOK]) == {"step_size_x", "step_size_w"} for k in params)
  tx = optax.adam(3e-2)

  @jax.jit
  def step(params, opt_state, i):
    def loss_fn(p):
      y = model.apply({"params": p}, X, rngs={"quant": jax.random.fold_in(jax.random.key(3), i)})
      return jnp.mean((y - target) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = tx.init(params)
  losses = []
  for i in range(30):
    params, opt_state, loss, grads = step(params, opt_state, i)
    losses.append(float(loss))
    if i == 0:
      for k in grads:
        assert float(jnp.abs(grads[k][HOOK]["step_size_x"])) > 0, k
        assert float(jnp.abs(grads[k][HOOK]["step_size_w"])) > 0, k
  assert losses[-1] < 0.6 * losses[0], losses


def test_linen_quant_state_nesting_auto_block_and_warmup():
  cfg = Int4Config(hadamard_block="auto", warmup_steps=2)
  model = nn.Dense(16, dot_general_cls=functools.partial(Int4DotGeneral, config=cfg))
  v = jax.jit(model.init)(jax.random.key(1), X)
  state = v["quant_state"][HOOK]
  assert set(state) == {"hadamard_log2_block", "step", "step_ratio_x", "step_ratio_w"}
  assert state["hadamard_log2_block"].dtype == jnp.int32
  assert 0 <= int(state["hadamard_log2_block"]) <= 6
  y, updated = jax.jit(functools.partial(model.apply, mutable=["quant_state"]))(v, X)
  assert int(updated["quant_state"][HOOK]["step"]) == 1
  assert y.shape == (2, 8, 16)


def test_linen_calibrate_and_errors_name_the_layer():
  # A float nn.Dense checkpoint loads into the hooked layer; calibrate adds
  # the step sizes from the loaded kernel.
  float_params = nn.Dense(16).init(jax.random.key(7), X)
  hooked = nn.Dense(16, dot_general_cls=Int4DotGeneral)
  out = jint4.calibrate(hooked, X, variables=float_params)
  init = _init_steps(X, float_params["params"]["kernel"], (((2,), (0,)), ((), ())))
  np.testing.assert_allclose(out["params"][HOOK]["step_size_w"], init.step_w, rtol=1e-6)
  np.testing.assert_allclose(out["params"][HOOK]["step_size_x"], init.step_x, rtol=1e-6)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, dot_general_cls=Int4DotGeneral)(x)

  with pytest.raises(ValueError, match=r"^Dense_0/Int4DotGeneral_0: .*D=48"):
    Net().init(jax.random.key(0), jnp.ones((2, 48)))


# --- NNX -----------------------------------------------------------------------

def _hook(**kw):
  return Int4NnxDotGeneral(rngs=nnx.Rngs(quant=1), **kw)


# (layer, float twin, input, the attribute holding the hook, dimension numbers)
def _nnx_cases():
  rngs = lambda: nnx.Rngs(0)
  x4 = X.reshape(2, 8, 2, 32)
  return {
      "Linear": (nnx.Linear(64, 16, dot_general=_hook(), rngs=rngs()),
                 nnx.Linear(64, 16, rngs=rngs()), X, "dot_general",
                 (((2,), (0,)), ((), ()))),
      "LinearGeneral": (
          nnx.LinearGeneral((2, 32), 16, axis=(-2, -1), dot_general=_hook(), rngs=rngs()),
          nnx.LinearGeneral((2, 32), 16, axis=(-2, -1), rngs=rngs()), x4, "dot_general",
          (((2, 3), (0, 1)), ((), ()))),
      "Einsum": (
          nnx.Einsum("btd,dnh->btnh", (64, 2, 8), (2, 8), einsum_op=_hook(), rngs=rngs()),
          nnx.Einsum("btd,dnh->btnh", (64, 2, 8), (2, 8), rngs=rngs()), X, "einsum_op",
          (((2,), (0,)), ((), ()))),
  }


def _paths(module, kind):
  return {tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module, kind))}


@pytest.mark.parametrize("name", ["Linear", "LinearGeneral", "Einsum"])
def test_nnx_layers_keep_their_params_plus_the_hooks_state(name):
  ours, ref, x, attr, dn = _nnx_cases()[name]
  assert isinstance(getattr(ours, attr), Int4NnxDotGeneral)
  assert _paths(ours, nnx.Param) == _paths(ref, nnx.Param) | {
      (attr, "step_size_x"), (attr, "step_size_w")}
  assert _paths(ours, jint4.QuantState) == {(attr, "calibrated"),
                                            (attr, "hadamard_log2_block")}
  np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
  hook = getattr(ours, attr)
  assert int(hook.calibrated[...]) == 0 and float(hook.step_size_x[...]) == 0.0
  y = nnx.jit(lambda m, x: m(x))(ours, x)          # the first call, traced
  assert int(hook.calibrated[...]) == 1
  init = _init_steps(x, ours.kernel[...], dn)
  np.testing.assert_allclose(hook.step_size_x[...], init.step_x, rtol=1e-6)
  np.testing.assert_allclose(hook.step_size_w[...], init.step_w, rtol=1e-6)
  y_ref = ref(x)
  assert y.shape == y_ref.shape and _rel(y, y_ref) < 0.35, _rel(y, y_ref)


def test_nnx_hook_slots_of_the_installed_flax():
  """nnx.Linear and nnx.LinearGeneral take a dot_general callable and keep it
  as an attribute; nnx.Einsum takes none, but an einsum_op (called as
  jnp.einsum), which the same hook serves. LinearGeneral's dot_general_cls is
  built anew on every call, so it could hold no step sizes: not supported."""
  params = lambda cls: inspect.signature(cls.__init__).parameters
  assert "dot_general" in params(nnx.Linear) and "dot_general" in params(nnx.LinearGeneral)
  assert "dot_general" not in params(nnx.Einsum) and "einsum_op" in params(nnx.Einsum)


class _NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.heads = nnx.Einsum("btd,dnh->btnh", (64, 2, 32), (2, 32),
                            einsum_op=_hook(config=Int4Config(hadamard_block=16)),
                            rngs=rngs)
    self.out = nnx.LinearGeneral((2, 32), 64, axis=(-2, -1),
                                 dot_general=_hook(config=Int4Config(hadamard_block=16)),
                                 rngs=rngs)
    self.head = nnx.Linear(64, 8, dot_general=_hook(), rngs=rngs)

  def __call__(self, x):
    return self.head(x + self.out(jnp.tanh(self.heads(x))))


def test_nnx_trains_under_nnx_jit_with_a_traced_first_call():
  model = _NnxNet(nnx.Rngs(0))
  hooks = (model.heads.einsum_op, model.out.dot_general, model.head.dot_general)
  try:
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
  except TypeError:  # older flax
    opt = nnx.Optimizer(model, optax.adam(3e-2))
  target = jnp.tanh(X[..., :8])

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - target) ** 2))(m)
    try:
      opt.update(m, grads)
    except TypeError:  # older flax
      opt.update(grads)
    return loss, grads

  loss, grads = step(model, opt)                   # no eager call before
  losses = [float(loss)]
  assert all(int(h.calibrated[...]) == 1 for h in hooks)
  for g in (grads["heads"]["einsum_op"], grads["out"]["dot_general"],
            grads["head"]["dot_general"]):
    assert float(jnp.abs(g["step_size_x"][...])) > 0
    assert float(jnp.abs(g["step_size_w"][...])) > 0
  first = [float(h.step_size_x[...]) for h in hooks]
  assert all(s > 0 for s in first)
  losses += [float(step(model, opt)[0]) for _ in range(29)]
  assert losses[-1] < 0.6 * losses[0], losses
  assert [float(h.step_size_x[...]) for h in hooks] != first


def test_nnx_hook_errors():
  with pytest.raises(ValueError, match="warmup"):
    Int4NnxDotGeneral(Int4Config(warmup_steps=2))
  with pytest.raises(TypeError, match="Int4Config"):
    Int4NnxDotGeneral("hq")
  layer = nnx.Linear(48, 8, dot_general=Int4NnxDotGeneral(name="encoder/proj"),
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^encoder/proj: .*D=48"):
    layer(jnp.ones((2, 48)))
  hook = Int4NnxDotGeneral(name="h")
  dn = (((1,), (0,)), ((), ()))
  with pytest.raises(ValueError, match=r"^h: .*out_sharding"):
    hook(jnp.ones((2, 64)), jnp.ones((64, 8)), dn, out_sharding=object())
  with pytest.raises(ValueError, match=r"^h: .*sum index 'c'"):
    hook("abc,bd->ad", jnp.ones((2, 32, 3)), jnp.ones((32, 8)))


@pytest.mark.parametrize("equation,ls,rs", [
    ("btd,dnh->btnh", (2, 3, 8), (8, 4, 5)),
    ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 6)),
    ("bd,bdf->bf", (3, 8), (3, 8, 4)),        # a batch dim
    ("tgd,gdf->ftg", (2, 3, 8), (3, 8, 4)),   # batch dim, output permuted
    ("...d,df->...f", (2, 3, 8), (8, 4)),     # ellipsis
])
def test_einsum_equations_as_dot_general(equation, ls, rs):
  lhs = jax.random.normal(jax.random.key(1), ls)
  rhs = jax.random.normal(jax.random.key(2), rs)
  dn, perm = einsum_dimension_numbers(equation, lhs, rhs)
  got = jnp.transpose(jax.lax.dot_general(lhs, rhs, dn, precision="highest"), perm)
  np.testing.assert_allclose(got, jnp.einsum(equation, lhs, rhs, precision="highest"),
                             rtol=1e-5, atol=1e-5)
