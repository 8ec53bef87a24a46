"""The INT4 op under jax.sharding on 8 CPU devices (tests/conftest.py).

Every layout users train with (data, tensor and FSDP parallel, 2-D) against
one device: the forward bit for bit where no partial sums cross shards, the
deterministic gradients to float rounding, the stochastic ones in
expectation; and the compiled HLO gathers no float activation, gradient or
kernel that the float model does not, while FSDP's kernel gathers move 4-bit
codes (a quarter of the bytes of a bfloat16 gather).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jint4
from jint4 import partition
from jint4.kernels import engine as engine_lib

CPUS = jax.devices("cpu")
MESH = Mesh(np.array(CPUS[:8]).reshape(4, 2), ("data", "model"))
N, D, C = 64, 128, 64
# (x's spec, the kernel's spec, y's expected spec).
LAYOUTS = {
    "data": (P("data", None), P(), P("data", None)),
    "tensor_column": (P("data", None), P(None, "model"), P("data", "model")),
    "tensor_row": (P("data", "model"), P("model", None), P("data", None)),
    "fsdp": (P("data", None), P("data", None), P("data", None)),
    "fsdp_features": (P("data", None), P(None, "data"), P("data", None)),
    "fsdp_tensor": (P("data", None), P("data", "model"), P("data", "model")),
}
ENGINES = ["reference", "native"]

pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason=(
    "needs 8 CPU devices: run under tests/conftest.py, which sets"
    " --xla_force_host_platform_device_count=8 before JAX starts"))


def _engine_or_skip(engine):
  if engine == "native" and not engine_lib.native_status("cpu")[0]:
    pytest.skip("the native CPU handlers are not built")


def _data(seed=0, n=N, d=D, c=C):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, d))
  w = jax.random.normal(kw, (d, c)) / np.sqrt(d)
  ct = jax.random.normal(kg, (n, c)) * jnp.where(jnp.arange(n) < 4, 8.0, 0.5)[:, None]
  return x, w, ct


def _same_spec(array, spec):
  pad = lambda s: tuple(s) + (None,) * (array.ndim - len(s))
  return pad(array.sharding.spec) == pad(spec)


def _put(a, spec):
  return jax.device_put(a, NamedSharding(MESH, spec))


def _grads(config, key):
  def loss(x, w, sx, sw):
    y = jint4.int4_matmul(x, w, sx, sw, key, config=config)
    return jnp.sum(y * _CT), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


_CT = _data()[2]
SX, SW = jnp.float32(0.35), jnp.float32(0.03)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_one_device(layout, engine):
  _engine_or_skip(engine)
  x, w, _ = _data()
  x_spec, w_spec, y_spec = LAYOUTS[layout]
  f = _grads(jint4.Int4Config(backward="exact", engine=engine), jax.random.key(1))
  (_, y1), g1 = f(x, w, SX, SW)
  (_, y), g = f(_put(x, x_spec), _put(w, w_spec), SX, SW)
  assert _same_spec(y, y_spec) and _same_spec(g[1], w_spec)
  assert _same_spec(g[0], x_spec)
  if layout == "tensor_row":   # partial products summed across the shards
    np.testing.assert_allclose(y, y1, rtol=1e-6, atol=1e-6)
  else:                        # the same integer GEMMs: bit for bit
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y1))
  # Float sums over the shards, in another order: equal to rounding (a few
  # tens of float32 ulps of the largest entry).
  for a, b in ((g[0], g1[0]), (g[1], g1[1]), (g[3], g1[3])):      # dx, dw, ds_w
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
  # ds_x reads the residual's stochastic bit, drawn per shard: equal in
  # expectation (test_stochastic_gradients_are_unbiased_when_sharded).


@pytest.mark.parametrize("backward", ["bitsplit", "bitsplit_tensor", "lss", "lss_tensor",
                                     "lss_sampled_dx"])
@pytest.mark.parametrize("layout", ["data", "tensor_row", "fsdp_tensor"])
def test_stochastic_gradients_are_unbiased_when_sharded(layout, backward):
  """Stratified sampling and per-shard rounding: the mean over keys tends to
  the exact-mode gradient at the 1/sqrt(m) rate."""
  x, w, _ = _data(seed=2)
  x_spec, w_spec, _ = LAYOUTS[layout]
  xs, ws = _put(x, x_spec), _put(w, w_spec)
  exact = _grads(jint4.Int4Config(backward="exact"), jax.random.key(0))(x, w, SX, SW)[1]
  # Per-row split scales (a row's max over its shards of C); *_tensor: one
  # scale, the max over every shard.
  # *_sampled_dx: dX sampled too, at lss_budget (the paper's).
  cfg = jint4.Int4Config(
      backward=backward.split("_")[0], lss_budget=0.5,
      lss_dx_budget=0.5 if backward.endswith("_sampled_dx") else 2.0,
      split_scale="tensor" if backward.endswith("_tensor") else "row")

  @jax.jit
  def sample(keys):
    return jax.vmap(lambda k: _grads(cfg, k)(xs, ws, SX, SW)[1])(keys)

  keys = jax.random.split(jax.random.key(3), 400)
  samples = sample(keys)
  for est, ref, name in zip(samples, exact, ("dx", "dw", "dsx", "dsw")):
    est, ref = np.asarray(est), np.asarray(ref)
    if name == "dsx":
      continue  # its one-bit delta: compared with one device's below
    err = np.linalg.norm(est.mean(0) - ref)
    sem = np.sqrt(est.var(0).sum() / est.shape[0])
    assert err <= 5 * sem + 1e-5 * np.linalg.norm(ref), (name, err, sem)
  # ds_x: the same mean as on one device (both draw the delta bit).
  one = jax.jit(jax.vmap(lambda k: _grads(cfg, k)(x, w, SX, SW)[1][2]))(keys)
  a, b = np.asarray(samples[2]), np.asarray(one)
  assert abs(a.mean() - b.mean()) <= 5 * np.sqrt((a.var() + b.var()) / len(keys))


def _gathers(hlo: str):
  """(dtype, shape) of every all-gather's result in compiled HLO text."""
  out = []
  for m in re.finditer(r"=\s*(\w+)\[([0-9,]*)\][^\s]*\s+all-gather(?:-start)?\(", hlo):
    shape = tuple(int(v) for v in m.group(2).split(",") if v)
    out.append((m.group(1), shape))
  return out


def _matrix_gathers(hlo: str):
  """`_gathers` of matrices only (activations, gradients, kernels): vectors
  (a column's NaN flag, per-row scalars) are not counted."""
  return [(t, s) for t, s in _gathers(hlo) if sum(v > 1 for v in s) >= 2]


def _nbytes(dtype, shape):
  return int(np.prod(shape, dtype=np.int64)) * {"f32": 4, "bf16": 2, "f16": 2}.get(
      dtype, 1)


@pytest.mark.parametrize("backward", ["auto", "lss"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hlo_gathers_no_float_tensor_the_float_model_does_not(layout, engine, backward):
  _engine_or_skip(engine)
  x, w, _ = _data()
  x_spec, w_spec, _ = LAYOUTS[layout]
  args = (_put(x, x_spec), _put(w, w_spec), SX, SW)
  int4_cfg = (jint4.Int4Config(engine=engine) if backward == "auto" else
              jint4.Int4Config(engine=engine, backward="lss"))
  hlo = {}
  for name, cfg in (("int4", int4_cfg),
                    ("float", jint4.Int4Config(forward="none", backward="exact"))):
    hlo[name] = _grads(cfg, jax.random.key(1)).lower(*args).compile().as_text()
  int4, ref = _matrix_gathers(hlo["int4"]), _matrix_gathers(hlo["float"])
  float_ref = [g for g in ref if g[0] in ("f32", "bf16", "f16")]
  for dtype, shape in int4:
    if dtype in ("f32", "bf16", "f16"):
      assert (dtype, shape) in float_ref, (layout, dtype, shape, ref)
      float_ref.remove((dtype, shape))
  # What INT4 gathers beyond that: the kernel's 4-bit codes, each gather a
  # quarter of the bytes of the float model's kernel gather in bfloat16; once
  # for the forward and once for the backward (the forward keeps only its own
  # shard, ZeRO-3 style), where the float model keeps its gathered kernel.
  codes = [_nbytes(t, s) for t, s in int4 if t in ("u8", "s8")]
  kernel_bf16 = [_nbytes("bf16", s) for t, s in ref if t in ("f32", "bf16")]
  assert len(codes) <= 2 * len(kernel_bf16), (layout, int4, ref)
  for nbytes in codes:
    assert nbytes <= max(kernel_bf16) / 4, (layout, int4, ref)
  if layout.startswith("fsdp"):
    assert codes and kernel_bf16  # the kernel is gathered: as codes
    assert not any(t in ("f32", "bf16", "f16") for t, _ in int4)


def test_batched_products_shard_over_the_batch():
  """Attention's products (a batched op) with the batch sharded: no gather."""
  lhs = jax.random.normal(jax.random.key(0), (8, 16, 32))
  rhs = jax.random.normal(jax.random.key(1), (8, 32, 16))
  dn = (((2,), (1,)), ((0,), (0,)))
  f = jax.jit(jax.grad(lambda l, r: jnp.sum(jint4.int4_dot_general(
      l, r, dn, 0.4, 0.4, jax.random.key(2)) ** 2), argnums=(0, 1)))
  g1 = f(lhs, rhs)
  args = (_put(lhs, P("data")), _put(rhs, P("data")))
  g = f(*args)
  assert _same_spec(g[0], P("data"))
  for a, b in zip(g, g1):  # bit splitting draws per shard: equal in distribution
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.1
  hlo = f.lower(*args).compile().as_text()
  assert not _gathers(hlo), _gathers(hlo)


def test_block_straddling_a_shard_is_an_error_that_says_how_to_fix_it():
  x, w, _ = _data(d=64)
  f = _grads(jint4.Int4Config(), jax.random.key(0))   # block 32, 64 / 4 = 16 per shard
  # Found when XLA partitions the op (compile time): raised through XLA.
  with pytest.raises(Exception, match="Hadamard block 32 .* straddle shards"):
    f(_put(x, P(None, "data")), _put(w, P("data", None)), SX, SW)
  # hadamard_block=16 fits the 16-element shards.
  (_, y), _ = _grads(jint4.Int4Config(hadamard_block=16), jax.random.key(0))(
      _put(x, P(None, "data")), _put(w, P("data", None)), SX, SW)
  assert y.shape == (N, C)


def test_data_key_is_the_same_on_any_mesh():
  from jint4.nn.linen import data_key
  x, w, _ = _data()
  f = jax.jit(lambda x, w: jax.random.key_data(data_key(x, w, "layer")))
  one = f(x, w)
  for x_spec, w_spec, _ in LAYOUTS.values():
    np.testing.assert_array_equal(f(_put(x, x_spec), _put(w, w_spec)), one)


def test_pack_int4_round_trips():
  q = jax.random.randint(jax.random.key(0), (6, 8), -8, 8).astype(jnp.int8)
  for axis in (0, 1):
    packed = partition.pack_int4(q, axis)
    assert packed.dtype == jnp.uint8 and packed.shape[axis] == q.shape[axis] // 2
    np.testing.assert_array_equal(partition.unpack_int4(packed, axis), q)


def test_nnx_model_trains_sharded_with_its_partitioning_metadata():
  """An NNX MLP with tensor-parallel annotations, int4ified, under nnx.jit on
  the mesh: the kernels keep their shardings and the loss goes down."""
  from flax import nnx
  import optax

  class MLP(nnx.Module):
    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.up = nnx.Linear(D, 2 * D, rngs=rngs,
                           kernel_init=nnx.with_partitioning(init, (None, "model")))
      self.down = nnx.Linear(2 * D, D, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, ("model", None)))

    def __call__(self, x):
      return self.down(nnx.gelu(self.up(x)))

  x, _, _ = _data()
  target = jnp.roll(x, 1, axis=-1)
  with jax.set_mesh(MESH):  # Flax creates the annotated variables sharded
    model = MLP(nnx.Rngs(0))
    jint4.int4ify(model)
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, MESH)))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    xs = _put(x, P("data", None))

    @nnx.jit
    def step(model, opt, x):
      loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
      opt.update(model, g)
      return loss

    losses = [float(step(model, opt, xs)) for _ in range(8)]
  assert losses[-1] < losses[0], losses
  assert _same_spec(model.up.kernel[...], P(None, "model"))
  assert _same_spec(model.down.kernel[...], P("model", None))
  assert float(model.up.step_size_x[...]) > 0
