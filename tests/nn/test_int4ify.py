"""int4ify: a Transformer written with nn.Dense trains in INT4 unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jint4
from jint4.nn import int4ify as int4ify_lib

VOCAB, SEQ, DIM = 32, 16, 64


class Block(nn.Module):
  heads: int = 2

  @nn.compact
  def __call__(self, h):
    b, t, d = h.shape
    x = nn.LayerNorm()(h)
    q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, self.heads, d // self.heads)
               for n in ("query", "key", "value"))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v).reshape(b, t, d)
    h = h + nn.Dense(d, name="out")(out)
    x = nn.LayerNorm()(h)
    return h + nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(2 * d, name="mlp_in")(x)))


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(VOCAB, DIM)(tokens) + self.param(
        "pos", nn.initializers.normal(0.02), (SEQ, DIM))
    for _ in range(2):
      h = Block()(h)
    return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm()(h))


def _batch(key, n=16):
  # A learnable task: each sequence counts up from a random start (mod VOCAB).
  start = jax.random.randint(key, (n, 1), 0, VOCAB)
  seq = (start + jnp.arange(SEQ + 1)) % VOCAB
  return seq[:, :-1], seq[:, 1:]


def _train(model, params, steps=60, lr=3e-3):
  tx = optax.adamw(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    tokens, targets = _batch(key)
    def loss_fn(p):
      logits = model.apply({"params": p}, tokens, rngs={"quant": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.key(100 + i))
    losses.append(float(loss))
  return losses


def _flat_names(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_param_tree_is_the_float_tree_plus_quant_state():
  tokens, _ = _batch(jax.random.key(0))
  float_params = jax.jit(TinyLM().init)(jax.random.key(1), tokens)["params"]
  model = jint4.int4ify(TinyLM(), keep=r"lm_head")
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  float_names, names = _flat_names(float_params), _flat_names(params)
  added = names - float_names
  assert float_names <= names
  assert added and all(n.rsplit("/", 1)[-1] in ("step_size_x", "step_size_w") for n in added)
  # Six Dense layers per block, two blocks; the LM head stays float.
  assert len(added) == 2 * 6 * 2
  assert not any(n.startswith("lm_head/step") for n in added)
  # Same initial weights as the float model.
  for path in float_names:
    a = _get(float_params, path)
    np.testing.assert_array_equal(a, _get(params, path))


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@pytest.mark.parametrize("backward", ["lss", "bitsplit"])
def test_int4ified_transformer_trains_under_jit_and_optax(backward):
  tokens, _ = _batch(jax.random.key(0))
  model = jint4.int4ify(TinyLM(), jint4.Int4Config(backward=backward), keep="lm_head")
  params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
  losses = _train(model, params, steps=30, lr=6e-3)
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert np.all(np.isfinite(losses))
  assert last < 0.5 * first, (first, last)


def test_keep_predicate_and_everything_converted():
  tokens, _ = _batch(jax.random.key(0))
  all_int4 = jax.eval_shape(jint4.int4ify(TinyLM()).init, jax.random.key(1), tokens)["params"]
  assert "step_size_x" in all_int4["lm_head"]
  none = jax.eval_shape(jint4.int4ify(TinyLM(), keep=lambda path: True).init,
                        jax.random.key(1), tokens)["params"]
  assert not any("step_size" in n for n in _flat_names(none))


def test_int4ify_rejects_non_modules():
  with pytest.raises(TypeError, match="flax"):
    jint4.int4ify(lambda x: x)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
    self.blocks = getattr(nnx, "List", list)([nnx.Linear(2 * DIM, 2 * DIM, rngs=rngs)])
    self.head = nnx.Linear(2 * DIM, VOCAB, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.hidden(x))
    for layer in self.blocks:
      x = jax.nn.gelu(layer(x))
    return self.head(x)


def test_nnx_int4ify_swaps_linears_in_place():
  model = NnxMLP(nnx.Rngs(0))
  kernel = model.hidden.kernel[...]
  x = jax.random.normal(jax.random.key(0), (8, DIM))
  y_float = model(x)
  out = jint4.int4ify(model, keep=r"head")
  assert out is model
  assert isinstance(model.hidden, jint4.Int4Linear)
  assert isinstance(model.blocks[0], jint4.Int4Linear)
  assert type(model.head) is nnx.Linear
  np.testing.assert_array_equal(model.hidden.kernel[...], kernel)
  y = model(x)
  rel = float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float))
  assert 0 < rel < 0.5


def _rows(model):
  return {r.path: r for r in jint4.int4ify_report(model)}


def test_report_lists_every_layer_with_why(capsys):
  tokens, _ = _batch(jax.random.key(0))
  model = jint4.int4ify(TinyLM(), keep=r"lm_head", report=True)
  with pytest.raises(ValueError, match="has not run yet"):
    jint4.int4ify_report(model)
  jax.eval_shape(model.init, jax.random.key(1), tokens)
  rows = _rows(model)
  printed = capsys.readouterr().out
  assert "12 of 14 linear-like layers in INT4" in printed
  assert len(rows) == 14  # 12 Dense, the LM head, the embedding
  assert not rows["Embed_0"].converted and "embedding_lsq" in rows["Embed_0"].why
  assert rows["lm_head"].converted is False and "keep" in rows["lm_head"].why
  block = rows["Block_0/query"]
  assert block.converted and block.block == 32 and block.shape == (DIM, DIM)
  assert rows["Block_1/mlp_out"].shape == (2 * DIM, DIM)


class Awkward(nn.Module):
  """First layers of typical widths, side by side."""

  @nn.compact
  def __call__(self, x):
    outs = []
    start = 0
    for width in (784, 48, 4, 7):
      outs.append(nn.Dense(8, name=f"in{width}")(x[:, start:start + width]))
      start += width
    return sum(outs)


def test_awkward_widths_get_a_per_layer_block_or_stay_float():
  x = jax.random.normal(jax.random.key(0), (4, 784 + 48 + 4 + 7))
  model = jint4.int4ify(Awkward())
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  rows = _rows(model)
  assert (rows["in784"].block, rows["in48"].block, rows["in4"].block) == (16, 16, 4)
  assert all(rows[p].converted for p in ("in784", "in48", "in4"))
  assert not rows["in7"].converted and "contraction dim 7" in rows["in7"].why
  assert "step_size_x" not in params["in7"] and "step_size_x" in params["in4"]
  y = jax.jit(model.apply)({"params": params}, x)
  ref = Awkward().apply({"params": {k: {n: v for n, v in p.items() if "step" not in n}
                                    for k, p in params.items()}}, x)
  assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.3


class WithConvAndCustom(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3,), name="conv")(x)
    h = nn.Dense(32, dot_general=jax.lax.dot_general, name="custom")(h)
    return MyDense(32, name="sub")(h)


class MyDense(nn.Dense):
  pass


def test_unknown_layers_warn_and_custom_dot_general_is_kept():
  x = jnp.ones((2, 5, 32))
  model = jint4.int4ify(WithConvAndCustom())
  int4ify_lib._warned_types.discard("Conv")
  with pytest.warns(RuntimeWarning, match="Conv layers .* not converted"):
    jax.eval_shape(model.init, jax.random.key(0), x)
  rows = _rows(model)
  assert not rows["conv"].converted and "not a patch embedding" in rows["conv"].why
  assert not rows["custom"].converted and "dot_general" in rows["custom"].why
  assert rows["sub"].converted and rows["sub"].layer == "MyDense"


def test_int4ify_twice():
  model = jint4.int4ify(TinyLM())
  with pytest.raises(TypeError, match="int4ified already"):
    jint4.int4ify(model)
  nnx_model = NnxMLP(nnx.Rngs(0))
  jint4.int4ify(nnx_model, keep="head")
  with pytest.raises(TypeError, match="int4ified already"):
    jint4.int4ify(nnx_model)
  # Hand-written INT4 layers inside a model are reported as such.
  wrapper = Wrapper(nnx_model)
  jint4.int4ify(wrapper, keep="head")
  rows = _rows(wrapper)
  assert rows["model/hidden"].why == "INT4 already" and rows["model/hidden"].converted
  assert not rows["model/head"].converted


class Wrapper(nnx.Module):
  def __init__(self, model):
    self.model = model


class NnxSub(nnx.Linear):
  pass


def test_nnx_report_subclasses_and_awkward_width():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.first = NnxSub(48, 16, rngs=rngs)
      self.odd = nnx.Linear(7, 16, rngs=rngs)
      self.conv = nnx.Conv(16, 16, (3,), rngs=rngs)

  model = Net(nnx.Rngs(0))
  int4ify_lib._warned_types.discard("Conv")
  with pytest.warns(RuntimeWarning, match="Conv"):
    jint4.int4ify(model)
  rows = _rows(model)
  assert isinstance(model.first, jint4.Int4Linear) and rows["first"].block == 16
  assert type(model.odd) is nnx.Linear and "contraction dim 7" in rows["odd"].why
  assert not rows["conv"].converted
  model.first(jnp.ones((2, 48)))


class Encoder(nn.Module):
  """An unedited Flax encoder block: Flax's own attention, then an MLP."""

  @nn.compact
  def __call__(self, x):
    h = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(nn.LayerNorm()(x))
    h = h + nn.Dense(DIM, name="mlp_out")(nn.gelu(nn.Dense(2 * DIM, name="mlp_in")(
        nn.LayerNorm()(h))))
    return nn.Dense(VOCAB, name="classifier")(h.mean(axis=1))


def test_linen_attention_projections_run_int4():
  x = jax.random.normal(jax.random.key(0), (8, SEQ, DIM))
  labels = jax.random.randint(jax.random.key(1), (8,), 0, VOCAB)
  float_params = jax.jit(Encoder().init)(jax.random.key(2), x)["params"]
  model = jint4.int4ify(Encoder(), keep="classifier")
  params = jax.jit(model.init)(jax.random.key(2), x)["params"]
  rows = _rows(model)
  for proj in ("query", "key", "value", "out"):
    row = rows[f"attn/{proj}"]
    assert row.converted and row.layer == "DenseGeneral" and row.block == 32, row
  assert rows["attn/out"].shape == (4, DIM // 4, DIM)
  assert not rows["classifier"].converted
  assert sum(r.converted for r in rows.values()) == 6
  # The float tree, plus the hooks' step sizes.
  names, float_names = _flat_names(params), _flat_names(float_params)
  assert float_names <= names
  assert {n for n in names - float_names} == {
      f"attn/{p}/Int4DotGeneral_0/{s}" for p in ("query", "key", "value", "out")
      for s in ("step_size_x", "step_size_w")} | {
      f"mlp_{p}/{s}" for p in ("in", "out") for s in ("step_size_x", "step_size_w")}
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    assert_nonzero = g["attn"]["query"]["Int4DotGeneral_0"]["step_size_x"]
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss, assert_nonzero

  opt = tx.init(params)
  losses = []
  for _ in range(25):
    params, opt, loss, g_step = step(params, opt)
    losses.append(float(loss))
  assert float(jnp.abs(g_step)) > 0
  assert losses[-1] < 0.5 * losses[0], losses


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=DIM, decode=False,
                                       rngs=rngs)
    self.proj = nnx.Einsum("btd,df->btf", (DIM, DIM), rngs=rngs)
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, x):
    h = x + self.attn(x)
    return self.head(self.proj(h).mean(axis=1))


def test_nnx_attention_projections_and_einsum_run_int4():
  x = jax.random.normal(jax.random.key(0), (8, SEQ, DIM))
  labels = jax.random.randint(jax.random.key(1), (8,), 0, VOCAB)
  model = NnxBlock(nnx.Rngs(0))
  jint4.int4ify(model, keep="head")
  rows = _rows(model)
  for proj in ("query", "key", "value", "out"):
    row = rows[f"attn/{proj}"]
    assert row.converted and row.layer == "LinearGeneral", row
    assert isinstance(getattr(model.attn, proj).dot_general, jint4.Int4NnxDotGeneral)
  assert rows["proj"].converted and isinstance(model.proj.einsum_op, jint4.Int4NnxDotGeneral)
  assert not rows["head"].converted
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
    loss, g = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(25)]
  assert float(model.attn.query.dot_general.step_size_x[...]) > 0
  assert losses[-1] < 0.5 * losses[0], losses
