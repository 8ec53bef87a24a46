"""Flax partitioning metadata survives INT4 conversion.

The kernel's and bias's (and embedding's) sharding annotations of a float
layer are exactly those of the INT4 layer it becomes (`jint4.int4ify`, the
hand-written `Int4Dense` / `Int4Linear`, the product hooks), and the new
quantizer variables (step sizes, QuantState flags) carry no annotation, so
`nn.get_partition_spec` / `nnx.get_partition_spec` give them
``PartitionSpec()`` (replicated) and existing logical-axis rules apply
unchanged.
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import meta
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jint4
from jint4 import Int4Config
from jint4.nn.embed import LsqEmbed
from jint4.nn.patch_conv import Int4PatchConv

KEY = jax.random.key(0)
# Logical names -> the axes of a ("data", "model") mesh.
RULES = (("batch", "data"), ("vocab", None), ("embed", None), ("mlp", "model"),
         ("heads", "model"), ("kv", None))
QUANT_NAMES = ("step_size", "step_size_x", "step_size_w", "calibrated",
               "hadamard_log2_block")

lecun = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros_init()


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ("data", "model"))


def _is_box(x):
  return isinstance(x, meta.AxisMetadata)


def _flat(tree, is_leaf):
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _is_quant_path(path: str) -> bool:
  return any(f"'{name}'" in path for name in QUANT_NAMES)


# ---------------------------------------------------------------- Linen ----


def _check_linen(float_model, int4_model, *args):
  """Inits both; returns the INT4 model's variables after checking that
  every float variable keeps its box (type and metadata) and its partition
  spec, and that every added variable is a plain, replicated quantizer
  variable."""
  float_vars = float_model.init(KEY, *args)
  int4_vars = int4_model.init(KEY, *args)
  float_boxes, int4_boxes = (_flat(v, _is_box) for v in (float_vars, int4_vars))
  assert any(_is_box(b) for b in float_boxes.values())  # the test annotates
  for path, box in float_boxes.items():
    assert path in int4_boxes, path
    assert type(int4_boxes[path]) is type(box), path
    if _is_box(box):
      assert int4_boxes[path].replace_boxed(None) == box.replace_boxed(None), path
      assert jnp.shape(int4_boxes[path].unbox()) == jnp.shape(box.unbox()), path
  float_specs = _flat(nn.get_partition_spec(float_vars), lambda x: isinstance(x, P))
  int4_specs = _flat(nn.get_partition_spec(int4_vars), lambda x: isinstance(x, P))
  for path, spec in float_specs.items():
    assert int4_specs[path] == spec, path
  added = set(int4_specs) - set(float_specs)
  assert any("step_size" in path for path in added), sorted(int4_specs)
  for path in added:
    assert _is_quant_path(path), path
    assert not _is_box(int4_boxes[path]), path
    assert int4_specs[path] == P(), path
  return int4_vars


def _part(logical: bool):
  return nn.with_logical_partitioning if logical else nn.with_partitioning


class LinenMLP(nn.Module):
  logical: bool = True
  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    part = _part(self.logical)
    names = (("embed", "mlp"), ("mlp",), ("mlp", "embed"), ("embed",))
    if not self.logical:  # mesh axes
      names = (("data", "model"), ("model",), ("model", "data"), ("data",))
    h = self.dense(64, kernel_init=part(lecun, names[0]),
                   bias_init=part(zeros, names[1]), name="fc1")(x)
    return self.dense(32, kernel_init=part(lecun, names[2]),
                      bias_init=part(zeros, names[3]), name="fc2")(nn.gelu(h))


X = jax.random.normal(jax.random.key(1), (4, 8, 32))


@pytest.mark.parametrize("logical", [False, True], ids=["mesh", "logical"])
def test_linen_dense_int4ified_keeps_partitioning(logical):
  model = LinenMLP(logical=logical)
  _check_linen(model, jint4.int4ify(model), X)


def test_linen_int4dense_keeps_partitioning():
  _check_linen(LinenMLP(dense=nn.Dense), LinenMLP(dense=jint4.Int4Dense), X)
  _check_linen(LinenMLP(logical=False, dense=nn.Dense),
               LinenMLP(logical=False, dense=jint4.Int4Dense), X)


def test_linen_hooks_keep_partitioning():
  """nn.Dense / nn.DenseGeneral with `Int4DotGeneral` as dot_general_cls."""
  hooked = functools.partial(nn.Dense, dot_general_cls=jint4.Int4DotGeneral)
  _check_linen(LinenMLP(), LinenMLP(dense=hooked), X)

  class General(nn.Module):
    dot_general_cls: object = None

    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(
          (2, 16), kernel_init=nn.with_logical_partitioning(
              lecun, ("embed", "heads", "kv")),
          bias_init=nn.with_logical_partitioning(zeros, ("heads", "kv")),
          dot_general_cls=self.dot_general_cls)(x)

  variables = _check_linen(General(), General(jint4.Int4DotGeneral), X)
  assert "Int4DotGeneral_0" in variables["params"]["DenseGeneral_0"]


class LinenEncoder(nn.Module):
  """Embed, patch Conv, attention (DenseGeneral), Einsum, Dense: all with
  logical partitioning."""

  @nn.compact
  def __call__(self, tokens, images):
    part = nn.with_logical_partitioning
    b = tokens.shape[0]
    h = nn.Embed(64, 32, embedding_init=part(nn.initializers.normal(0.02),
                                              ("vocab", "embed")))(tokens)
    patches = nn.Conv(32, (4, 4), strides=(4, 4), padding="VALID",
                      kernel_init=part(lecun, (None, None, None, "embed")),
                      bias_init=part(zeros, ("embed",)))(images)
    h = h + patches.reshape(b, -1, 32)
    h = h + nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=32,
        kernel_init=part(lecun, ("embed", "heads", "kv")),
        bias_init=part(zeros, ("heads", "kv")),
        out_kernel_init=part(lecun, ("heads", "kv", "embed")),
        out_bias_init=part(zeros, ("embed",)))(h)
    heads = nn.Einsum((32, 2, 16), "btd,dnh->btnh",
                      kernel_init=part(lecun, ("embed", "heads", "kv")),
                      bias_init=part(zeros, ("heads", "kv")))(h)
    h = h + heads.reshape(h.shape)
    return nn.Dense(8, kernel_init=part(lecun, ("embed", "mlp")),
                    bias_init=part(zeros, ("mlp",)))(h)


TOKENS = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
IMAGES = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))


@pytest.mark.parametrize("config", [
    Int4Config(embedding_lsq=True),
    Int4Config(embedding_lsq=True, attention_products=True,
               hadamard_block="auto")], ids=["default", "auto_products"])
def test_linen_encoder_int4ified_keeps_partitioning(config):
  model = jint4.int4ify(LinenEncoder(), config)
  variables = _check_linen(LinenEncoder(), model, TOKENS, IMAGES)
  rows = {row.path: row.converted for row in jint4.int4ify_report(model)}
  for path in ("Embed_0", "Conv_0", "MultiHeadDotProductAttention_0/query",
               "MultiHeadDotProductAttention_0/out", "Einsum_0", "Dense_0"):
    assert rows[path], path
  params = variables["params"]
  assert "step_size" in params["Embed_0"]
  assert "step_size_x" in params["Conv_0"]
  assert "step_size_x" in params["Einsum_0"]
  assert "step_size_x" in params["MultiHeadDotProductAttention_0"]["query"][
      "Int4DotGeneral_0"]
  if config.attention_products:
    assert "qk_product" in params["MultiHeadDotProductAttention_0"]
  if config.hadamard_block == "auto":
    assert variables["quant_state"]  # plain, replicated (checked above)


def test_linen_logical_to_mesh_sharding_on_int4ified_tree():
  """`nn.logical_to_mesh_sharding` with the model's rules places the
  int4ified tree (jit init with out_shardings, jit apply with in_shardings);
  the step sizes come out replicated."""
  model = jint4.int4ify(LinenEncoder(), Int4Config(embedding_lsq=True))
  mesh = _mesh()
  abstract = jax.eval_shape(model.init, KEY, TOKENS, IMAGES)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
  flat = _flat(shardings, lambda x: isinstance(x, NamedSharding))
  assert all(isinstance(s, NamedSharding) for s in flat.values())
  assert flat["['params']['Dense_0']['kernel']"].spec == P(None, "model")
  assert flat["['params']['Dense_0']['step_size_x']"].spec == P()
  assert flat["['params']['Embed_0']['step_size']"].spec == P()
  variables = jax.jit(model.init, out_shardings=shardings)(KEY, TOKENS, IMAGES)
  kernel = variables["params"]["Dense_0"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned)
  assert kernel.value.sharding.spec == P(None, "model")
  apply = jax.jit(lambda v, t, i: model.apply(v, t, i, rngs={"quant": KEY}),
                  in_shardings=(shardings, None, None))
  out = apply(variables, TOKENS, IMAGES)
  assert out.shape == (2, 16, 8) and bool(jnp.all(jnp.isfinite(out)))


def test_linen_float_layers_with_boxed_kernels_still_report():
  """Layers int4ify leaves float (a non-patch Conv, a layer type it does not
  convert) may hold boxed kernels too: the report reads their shape."""
  part = nn.with_logical_partitioning

  class Model(nn.Module):
    @nn.compact
    def __call__(self, images):
      h = nn.Conv(8, (3, 3), kernel_init=part(lecun, (None, None, None, "embed")))(
          images)
      return nn.ConvTranspose(8, (2, 2), kernel_init=part(
          lecun, (None, None, None, "embed")))(h)

  model = jint4.int4ify(Model())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # "not converted" types
    variables = model.init(KEY, IMAGES)
  float_vars = Model().init(KEY, IMAGES)
  assert jax.tree.structure(variables) == jax.tree.structure(float_vars)
  rows = {row.path: row for row in jint4.int4ify_report(model)}
  assert rows["Conv_0"].shape == (3, 3, 4, 8) and not rows["Conv_0"].converted
  assert rows["ConvTranspose_0"].shape == (2, 2, 8, 8)


# ------------------------------------------------------------------ NNX ----


@pytest.fixture(params=["metadata", "eager"])
def nnx_sharding(request):
  """How the NNX models are annotated and built. "metadata": logical names
  as metadata only (eager sharding off), mapped by the rules in context when
  specs are read. "eager": flax's default eager sharding, under a 1x1 mesh,
  with the rules in the metadata (``sharding_rules``): the values are placed
  as they are created. Yields the extra metadata for every annotation."""
  if request.param == "metadata":
    with nnx.use_eager_sharding(False):
      yield {}
  else:
    with nnx.use_eager_sharding(True), jax.set_mesh(_mesh()):
      yield {"sharding_rules": RULES}


def _nnx_metadata(model):
  """{path: (variable type, metadata, spec)} of every Variable of ``model``."""
  state = nnx.state(model)
  specs = nnx.get_partition_spec(state)
  out = {}
  for (path, var), (_, spec) in zip(
      nnx.to_flat_state(state), nnx.to_flat_state(specs)):
    out["/".join(map(str, path))] = (type(var), dict(var.get_metadata()),
                                     spec.get_value())
  return out


def _nnx_specs(tree, rules=RULES):
  with nn.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(tree))
  return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}


def _check_nnx(float_meta, float_specs, model):
  """Every float Variable keeps its type, metadata and spec (with and
  without the rules); every added one is a quantizer variable without
  sharding metadata, spec P()."""
  int4_meta = _nnx_metadata(model)
  int4_specs = _nnx_specs(model)
  for path, (kind, metadata, spec) in float_meta.items():
    assert path in int4_meta, path
    assert int4_meta[path][0] is kind, path
    assert int4_meta[path][1] == metadata, path
    assert int4_meta[path][2] == spec, path
    assert int4_specs[path] == float_specs[path], path
  added = set(int4_meta) - set(float_meta)
  assert any(path.endswith("step_size_x") for path in added), sorted(int4_meta)
  for path in added:
    assert path.rsplit("/", 1)[-1] in QUANT_NAMES, path
    assert not int4_meta[path][1].get("out_sharding"), path
    assert int4_meta[path][2] == P(), path
    assert int4_specs[path] == P(), path
  return int4_meta


class NnxEncoder(nnx.Module):
  """Every layer int4ify converts, annotated through each NNX spelling:
  ``with_partitioning`` inits, ``kernel_metadata`` (the Param's own
  ``out_sharding``), ``with_metadata`` with a key of the user's own."""

  def __init__(self, rngs: nnx.Rngs, **kw):
    part = lambda init, names: nnx.with_partitioning(init, names, **kw)
    self.embed = nnx.Embed(64, 32, embedding_init=part(
        nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)
    self.patch = nnx.Conv(4, 32, kernel_size=(4, 4), strides=(4, 4),
                          padding="VALID",
                          kernel_init=part(lecun, (None, None, None, "embed")),
                          bias_init=part(zeros, ("embed",)), rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=2, in_features=32, qkv_features=32, decode=False,
        kernel_init=part(lecun, ("embed", "heads", "kv")),
        bias_init=part(zeros, ("heads", "kv")),
        out_kernel_init=part(lecun, ("heads", "kv", "embed")),
        out_bias_init=part(zeros, ("embed",)), rngs=rngs)
    self.proj = nnx.LinearGeneral(
        32, (2, 16), kernel_init=part(lecun, ("embed", "heads", "kv")),
        bias_init=part(zeros, ("heads", "kv")), rngs=rngs)
    self.mix = nnx.Einsum("btnh,nhd->btd", (2, 16, 32),
                          kernel_init=part(lecun, ("heads", "kv", "embed")),
                          bias_init=part(zeros, ("embed",)), rngs=rngs)
    self.up = nnx.Linear(32, 64, kernel_init=part(lecun, ("embed", "mlp")),
                         bias_init=part(zeros, ("mlp",)), rngs=rngs)
    self.down = nnx.Linear(
        64, 32, kernel_metadata={"out_sharding": ("mlp", "embed"), **kw},
        bias_metadata={"out_sharding": ("embed",), **kw}, rngs=rngs)
    self.head = nnx.Linear(32, 8, use_bias=False, kernel_init=nnx.with_metadata(
        lecun, out_sharding=("embed", None), owner="head", **kw), rngs=rngs)

  def __call__(self, tokens, images):
    h = self.embed(tokens)
    h = h + self.patch(images).reshape(h.shape)
    h = h + self.attn(h)
    h = h + self.mix(self.proj(h))
    h = h + self.down(nnx.gelu(self.up(h)))
    return self.head(h)


@pytest.mark.parametrize("config", [
    Int4Config(embedding_lsq=True),
    Int4Config(embedding_lsq=True, attention_products=True)],
    ids=["default", "products"])
def test_nnx_int4ify_keeps_partitioning(nnx_sharding, config):
  model = NnxEncoder(nnx.Rngs(0), **nnx_sharding)
  float_meta, float_specs = _nnx_metadata(model), _nnx_specs(model)
  assert float_meta["head/kernel"][1]["owner"] == "head"
  assert float_specs["up/kernel"] == P(None, "model")
  assert float_specs["down/kernel"] == P("model", None)
  assert float_specs["attn/query/kernel"] == P(None, "model", None)
  jint4.int4ify(model, config)
  assert isinstance(model.up, jint4.Int4Linear)
  assert isinstance(model.embed, LsqEmbed)
  assert isinstance(model.patch, Int4PatchConv)
  assert isinstance(model.proj.dot_general, jint4.Int4NnxDotGeneral)
  assert isinstance(model.mix.einsum_op, jint4.Int4NnxDotGeneral)
  int4_meta = _check_nnx(float_meta, float_specs, model)
  for path in ("embed/step_size", "patch/step_size_x", "up/step_size_w",
               "up/calibrated", "head/step_size_x", "proj/dot_general/step_size_x",
               "mix/einsum_op/step_size_w", "attn/query/dot_general/step_size_x"):
    assert path in int4_meta, sorted(int4_meta)
  if nnx_sharding:  # eager: the kernels keep their placed values
    assert model.up.kernel[...].sharding.spec == P(None, "model")


def test_nnx_int4ify_jit_and_named_sharding(nnx_sharding):
  """The int4ified model runs under `nnx.jit` (the metadata survives its
  state update) and under `jax.jit` with `nnx.get_named_sharding` shardings
  on a 1x1 mesh."""
  model = NnxEncoder(nnx.Rngs(0), **nnx_sharding)
  float_meta, float_specs = _nnx_metadata(model), _nnx_specs(model)
  jint4.int4ify(model, Int4Config(embedding_lsq=True))
  out = nnx.jit(lambda m, t, i: m(t, i))(model, TOKENS, IMAGES)
  assert out.shape == (2, 16, 8) and bool(jnp.all(jnp.isfinite(out)))
  assert int(model.up.calibrated[...]) == 1
  _check_nnx(float_meta, float_specs, model)

  mesh = _mesh()
  graphdef, state = nnx.split(model)
  with nn.logical_axis_rules(RULES):
    shardings = nnx.get_named_sharding(state, mesh)
  flat = {"/".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(shardings)}
  assert flat["up/kernel"].spec == P(None, "model")
  assert flat["up/step_size_x"].spec == P()
  assert flat["embed/step_size"].spec == P()
  assert flat["proj/dot_general/calibrated"].spec == P()
  state = jax.device_put(state, shardings)

  @functools.partial(jax.jit, in_shardings=(shardings, None, None),
                     out_shardings=(None, shardings))
  def step(state, tokens, images):
    m = nnx.merge(graphdef, state)
    return m(tokens, images), nnx.state(m)

  out2, state2 = step(state, TOKENS, IMAGES)
  assert out2.shape == out.shape and bool(jnp.all(jnp.isfinite(out2)))
  assert state2["up"]["kernel"].get_value().sharding.spec == P(None, "model")
  nnx.update(model, state2)
  _check_nnx(float_meta, float_specs, model)


def test_nnx_int4linear_takes_partitioned_inits(nnx_sharding):
  """The hand-written Int4Linear annotates as nnx.Linear does."""
  def build(cls):
    return cls(32, 64,
               kernel_init=nnx.with_partitioning(lecun, ("embed", "mlp"), **nnx_sharding),
               bias_init=nnx.with_partitioning(zeros, ("mlp",), **nnx_sharding),
               rngs=nnx.Rngs(0))

  linear = build(nnx.Linear)
  float_meta, float_specs = _nnx_metadata(linear), _nnx_specs(linear)
  layer = build(jint4.Int4Linear)
  _check_nnx(float_meta, float_specs, layer)
  assert layer(X).shape == (4, 8, 64)
  _check_nnx(float_meta, float_specs, layer)


def test_nnx_hook_on_a_partitioned_linear(nnx_sharding):
  """`Int4NnxDotGeneral` as a partitioned nnx.Linear's dot_general."""
  def build(**kwargs):
    return nnx.Linear(32, 64, kernel_init=nnx.with_partitioning(
        lecun, ("embed", "mlp"), **nnx_sharding), rngs=nnx.Rngs(0), **kwargs)

  linear = build()
  float_meta, float_specs = _nnx_metadata(linear), _nnx_specs(linear)
  layer = build(dot_general=jint4.Int4NnxDotGeneral(rngs=nnx.Rngs(1)))
  int4_meta = _check_nnx(float_meta, float_specs, layer)
  assert "dot_general/step_size_x" in int4_meta
  assert layer(X).shape == (4, 8, 64)
  _check_nnx(float_meta, float_specs, layer)


def test_nnx_from_linear_takes_over_the_params():
  """`Int4Linear.from_linear` holds the Linear's own Param objects."""
  with nnx.use_eager_sharding(False):
    linear = nnx.Linear(32, 64, kernel_init=nnx.with_partitioning(
        lecun, ("embed", "mlp")), bias_init=nnx.with_partitioning(
            zeros, ("mlp",)), rngs=nnx.Rngs(0))
  layer = jint4.Int4Linear.from_linear(linear, config=Int4Config(), name="up")
  assert layer.kernel is linear.kernel and layer.bias is linear.bias
  assert layer.name == "up" and layer.in_features == 32
  assert layer.out_features == 64 and layer.quant_rngs is None
  np.testing.assert_array_equal(layer(X), layer(X))
  with_stream = jint4.Int4Linear.from_linear(
      linear, rngs=nnx.Rngs(params=0, quant=1))
  assert with_stream.quant_rngs is not None
  no_bias = nnx.Linear(32, 64, use_bias=False, rngs=nnx.Rngs(0))
  assert jint4.Int4Linear.from_linear(no_bias).bias is None
  with pytest.raises(TypeError):
    jint4.Int4Linear.from_linear(nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError):
    jint4.Int4Linear.from_linear(linear, config="hq")
