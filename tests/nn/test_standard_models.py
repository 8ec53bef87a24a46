"""Standard Flax ViT and BERT-style encoders, int4ified without edits.

The models are written as a user writes them, with Flax's own layers only
(patch-embedding ``Conv``, ``MultiHeadDotProductAttention`` /
``MultiHeadAttention``, ``Dense`` / ``Linear`` MLPs, ``Embed`` with a tied
MLM head through ``attend``): `int4ify` must run every projection in INT4,
list every layer in its table, keep the float param tree (plus the quantizer
state) and train under ``jax.jit`` / ``nnx.jit``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jint4
from jint4.nn import dot_general as dot_general_lib
from tests.nn import training

HIDDEN, HEADS, MLP, CLASSES = 32, 2, 64, 4
DEPTH = 1  # one block each: the layer types, not the depth, are under test
PAPER = jint4.Int4Config(embedding_lsq=True, attention_products=True)


class MlpBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1], name="fc2")(nn.gelu(nn.Dense(MLP, name="fc1")(x)))


class EncoderBlock(nn.Module):
  """Pre-LN (ViT) or post-LN (BERT) Transformer block."""
  pre_ln: bool = True

  @nn.compact
  def __call__(self, x, mask=None):
    attend = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")
    if self.pre_ln:
      x = x + attend(nn.LayerNorm()(x), mask=mask)
      return x + MlpBlock(name="mlp")(nn.LayerNorm()(x))
    x = nn.LayerNorm()(x + attend(x, mask=mask))
    return nn.LayerNorm()(x + MlpBlock(name="mlp")(x))


class ViT(nn.Module):
  """google-research/vision_transformer's layout at toy size."""
  patch: int = 4

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(HIDDEN, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", name="embedding")(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = jnp.tile(self.param("cls", nn.initializers.zeros, (1, 1, c)), (b, 1, 1))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(DEPTH):
      x = EncoderBlock(name=f"encoderblock_{i}")(x)
    return nn.Dense(CLASSES, name="head")(nn.LayerNorm()(x)[:, 0])


class Bert(nn.Module):
  """BERT's layout at toy size: embeddings, post-LN blocks, pooler, a
  classifier and the MLM head tied to the word embeddings."""
  vocab: int = 64

  @nn.compact
  def __call__(self, tokens, padding):
    words = nn.Embed(self.vocab, HIDDEN, name="word_embeddings")
    x = words(tokens)
    x = x + nn.Embed(tokens.shape[1], HIDDEN, name="position_embeddings")(
        jnp.arange(tokens.shape[1])[None])
    x = nn.LayerNorm()(x + nn.Embed(2, HIDDEN, name="token_type_embeddings")(
        jnp.zeros_like(tokens)))
    mask = nn.make_attention_mask(padding, padding)
    for i in range(DEPTH):
      x = EncoderBlock(pre_ln=False, name=f"layer_{i}")(x, mask)
    pooled = jnp.tanh(nn.Dense(HIDDEN, name="pooler")(x[:, 0]))
    mlm = words.attend(nn.LayerNorm()(nn.gelu(nn.Dense(HIDDEN, name="transform")(x))))
    return nn.Dense(CLASSES, name="classifier")(pooled), mlm


def _flat(tree):
  return {"/".join(str(k.key) for k in path): jnp.shape(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _vit_data():
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 2))
  labels = jax.random.randint(jax.random.key(1), (8,), 0, CLASSES)
  return images, labels


def test_linen_vit_runs_every_projection_in_int4():
  images, labels = _vit_data()
  float_params = ViT().init(jax.random.key(2), images)["params"]
  model = jint4.int4ify(ViT(), PAPER, keep="head")
  dot_general_lib._warned_float.clear()
  with pytest.warns(RuntimeWarning, match="pv_product: no Hadamard block"):
    params = jax.jit(model.init)(jax.random.key(2), images)["params"]
  rows = {r.path: r for r in jint4.int4ify_report(model)}
  projections = [p for p, r in rows.items() if "product" not in p and p != "head"]
  assert len(projections) == 1 + DEPTH * 6  # patch embedding, q k v out fc1 fc2
  for path in projections:
    assert rows[path].converted, rows[path]
  assert rows["embedding"].layer == "Conv" and rows["embedding"].block == 32
  # 17 tokens (16 patches + class token): Q K^T runs INT4, P V has no block.
  assert rows["encoderblock_0/attention/qk_product"].converted
  assert not rows["encoderblock_0/attention/pv_product"].converted
  assert not rows["head"].converted
  # The float tree plus quantizer state only, same shapes.
  flat, float_flat = _flat(params), _flat(float_params)
  assert {k: v for k, v in flat.items() if k in float_flat} == float_flat
  assert all("step_size" in k for k in set(flat) - set(float_flat))

  def loss_of(p):
    logits = model.apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  losses, g = training.train_linen(loss_of, params, 10)
  assert _flat(g) == _flat(params)
  assert float(jnp.abs(g["embedding"]["step_size_w"])) > 0
  assert losses[-1] < 0.5 * losses[0], losses


def _bert_data(vocab=64, seq=16):
  tokens = jax.random.randint(jax.random.key(0), (8, seq), 0, vocab)
  padding = jnp.arange(seq)[None] < jnp.array([16, 12, 16, 9, 16, 16, 14, 16])[:, None]
  labels = jax.random.randint(jax.random.key(1), (8,), 0, CLASSES)
  return tokens, padding, labels


def test_linen_bert_runs_every_projection_and_product_in_int4(capsys):
  tokens, padding, labels = _bert_data()
  float_params = Bert().init(jax.random.key(2), tokens, padding)["params"]
  model = jint4.int4ify(Bert(), PAPER, keep="classifier", report=True)
  params = jax.jit(model.init)(jax.random.key(2), tokens, padding)["params"]
  table = capsys.readouterr().out
  rows = {r.path: r for r in jint4.int4ify_report(model)}
  for i in range(DEPTH):
    for proj in ("query", "key", "value", "out"):
      assert rows[f"layer_{i}/attention/{proj}"].converted
    for product in ("qk_product", "pv_product"):
      assert rows[f"layer_{i}/attention/{product}"].converted  # 16 tokens
    for fc in ("fc1", "fc2"):
      assert rows[f"layer_{i}/mlp/{fc}"].converted
  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    assert rows[name].converted and "LSQ" in rows[name].why
  assert rows["pooler"].converted and rows["transform"].converted
  assert not rows["classifier"].converted and rows["classifier"].why == "kept by keep="
  assert not rows["word_embeddings.attend"].converted  # the tied MLM head
  assert f"{5 + 8 * DEPTH} of {7 + 8 * DEPTH}" in table and "word_embeddings.attend" in table
  flat, float_flat = _flat(params), _flat(float_params)
  assert {k: v for k, v in flat.items() if k in float_flat} == float_flat
  assert "word_embeddings/step_size" in flat
  # Fine-tuning a float checkpoint: calibrate gives the whole INT4 tree.
  calibrated = jint4.calibrate(model, tokens, padding, variables={"params": float_params})
  assert _flat(calibrated["params"]) == flat

  def loss_of(p):
    logits, mlm = model.apply({"params": p}, tokens, padding)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(mlm, tokens).mean())

  losses, g = training.train_linen(loss_of, params, 10)
  assert _flat(g) == _flat(params)
  assert float(jnp.abs(g["layer_0"]["attention"]["pv_product"]["step_size_x"])) > 0
  assert float(jnp.abs(g["word_embeddings"]["step_size"])) > 0
  assert losses[-1] < 0.7 * losses[0], losses


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.attention = nnx.MultiHeadAttention(num_heads=HEADS, in_features=HIDDEN,
                                            decode=False, rngs=rngs)
    self.fc1 = nnx.Linear(HIDDEN, MLP, rngs=rngs)
    self.fc2 = nnx.Linear(MLP, HIDDEN, rngs=rngs)
    self.ln1 = nnx.LayerNorm(HIDDEN, rngs=rngs)
    self.ln2 = nnx.LayerNorm(HIDDEN, rngs=rngs)

  def __call__(self, x, mask=None):
    x = x + self.attention(self.ln1(x), mask=mask)
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class NnxViT(nnx.Module):
  def __init__(self, rngs, patch=4, channels=2):
    self.embedding = nnx.Conv(channels, HIDDEN, (patch, patch), strides=(patch, patch),
                              padding="VALID", rngs=rngs)
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(DEPTH)]) if hasattr(
        nnx, "List") else [NnxBlock(rngs) for _ in range(DEPTH)]
    self.head = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, images):
    x = self.embedding(images)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=1))


class NnxBert(nnx.Module):
  def __init__(self, rngs, vocab=64, seq=16):
    self.word_embeddings = nnx.Embed(vocab, HIDDEN, rngs=rngs)
    self.position_embeddings = nnx.Embed(seq, HIDDEN, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(DEPTH)]) if hasattr(
        nnx, "List") else [NnxBlock(rngs) for _ in range(DEPTH)]
    self.classifier = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, tokens, padding):
    x = self.word_embeddings(tokens) + self.position_embeddings(
        jnp.arange(tokens.shape[1])[None])
    mask = nnx.make_attention_mask(padding, padding)
    for block in self.blocks:
      x = block(x, mask)
    return self.classifier(x[:, 0]), self.word_embeddings.attend(x)


def _train_nnx(model, loss_of, steps=10):
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(loss_of)(model)
    opt.update(model, g)
    return loss

  return [float(step(model, opt)) for _ in range(steps)]


def _param_shapes(model):
  return {"/".join(map(str, path)): v[...].shape
          for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def test_nnx_vit_and_bert_run_every_projection_in_int4():
  images, labels = _vit_data()
  vit = NnxViT(nnx.Rngs(0))
  float_shapes = _param_shapes(vit)
  jint4.int4ify(vit, PAPER, keep="head")
  rows = {r.path: r for r in jint4.int4ify_report(vit)}
  assert rows["embedding"].converted and isinstance(vit.embedding, jint4.nn.patch_conv.Int4PatchConv)
  for i in range(DEPTH):
    for proj in ("query", "key", "value", "out"):
      assert rows[f"blocks/{i}/attention/{proj}"].converted
    assert rows[f"blocks/{i}/attention/attention_fn"].converted
    assert rows[f"blocks/{i}/fc1"].converted and rows[f"blocks/{i}/fc2"].converted
  shapes = _param_shapes(vit)
  assert {k: v for k, v in shapes.items() if k in float_shapes} == float_shapes
  losses = _train_nnx(vit, lambda m: optax.softmax_cross_entropy_with_integer_labels(
      m(images), labels).mean())
  assert losses[-1] < 0.5 * losses[0], losses

  tokens, padding, labels = _bert_data()
  bert = NnxBert(nnx.Rngs(1))
  jint4.int4ify(bert, PAPER, keep="classifier")
  rows = {r.path: r for r in jint4.int4ify_report(bert)}
  assert rows["word_embeddings"].converted and rows["position_embeddings"].converted
  assert not rows["classifier"].converted

  def loss_of(m):
    logits, mlm = m(tokens, padding)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(mlm, tokens).mean())

  losses = _train_nnx(bert, loss_of)
  assert float(bert.word_embeddings.step_size[...]) > 0
  assert losses[-1] < 0.7 * losses[0], losses
