"""LSQ on embedding outputs: `lsq_embed_output` (linen) and `LsqEmbed` (nnx)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jint4 import Int4Config
from jint4.nn.embed import LsqEmbed
from jint4.nn.embed import lsq_embed_output
from jint4.quant import lsq
from tests.nn import training

V, D = 11, 8
CFG = Int4Config()
TOKENS = jax.random.randint(jax.random.key(0), (2, 6), 0, V)
TARGETS = (TOKENS * 3 + 1) % V


def _lsq_embeds(cfg=CFG):
  """Runs `lsq_embed_output` after every `nn.Embed.__call__` (not attend)."""
  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
      return lsq_embed_output(context.module, next_fun(*args, **kwargs), config=cfg)
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(intercept)


class Lookup(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return nn.Embed(V, D, name="embed")(tokens)


class TiedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(V, D, name="embed")
    h = nn.Dense(D, name="mix")(embed(tokens))
    return embed.attend(h)


def _codes(out, step):
  """out / step, checked to be integers in [-qn, qp]."""
  v = np.asarray(out, np.float64) / float(step)
  np.testing.assert_allclose(v, np.round(v), atol=1e-4)
  assert np.all(np.round(v) >= -CFG.qn) and np.all(np.round(v) <= CFG.qp)
  return np.round(v)


# ---------------------------------------------------------------- linen


def test_linen_params_are_float_tree_plus_step_size():
  float_params = TiedLM().init(jax.random.key(1), TOKENS)["params"]
  with _lsq_embeds():
    params = TiedLM().init(jax.random.key(1), TOKENS)["params"]
  assert set(params["embed"]) == {"embedding", "step_size"}
  step = params["embed"]["step_size"]
  assert step.shape == () and step.dtype == jnp.float32
  rest = {**params, "embed": {"embedding": params["embed"]["embedding"]}}
  assert jax.tree.structure(rest) == jax.tree.structure(float_params)
  jax.tree.map(np.testing.assert_array_equal, rest, float_params)


def test_linen_output_is_lsq_with_init_step():
  with _lsq_embeds():
    variables = Lookup().init(jax.random.key(1), TOKENS)
    out = Lookup().apply(variables, TOKENS)
  table = variables["params"]["embed"]["embedding"]
  ref = table[TOKENS]
  step = variables["params"]["embed"]["step_size"]
  expected = lsq.mse_step_size(ref, qn=CFG.qn, qp=CFG.qp)   # the default step_init
  np.testing.assert_allclose(step, expected, rtol=1e-6)
  codes = _codes(out, step)
  assert len(np.unique(codes)) <= CFG.qn + CFG.qp + 1
  assert len(np.unique(codes)) > 3
  np.testing.assert_allclose(
      out, step * jnp.clip(jnp.round(ref / step), -CFG.qn, CFG.qp), rtol=1e-6)
  assert out.dtype == ref.dtype


def test_linen_gradients_match_hand_computation():
  with _lsq_embeds():
    variables = Lookup().init(jax.random.key(1), TOKENS)
  table = variables["params"]["embed"]["embedding"]
  # A smaller step than the init, so that some entries clip.
  step = 0.4 * variables["params"]["embed"]["step_size"]
  params = {"embed": {"embedding": table, "step_size": step}}
  w = jax.random.normal(jax.random.key(2), TOKENS.shape + (D,))

  def loss(p):
    with _lsq_embeds():
      return jnp.sum(w * Lookup().apply({"params": p}, TOKENS))

  grads = jax.grad(loss)(params)["embed"]
  v = np.asarray(table[TOKENS], np.float64) / float(step)
  inside = (v >= -CFG.qn) & (v <= CFG.qp)
  assert inside.any() and not inside.all()
  w64 = np.asarray(w, np.float64)
  expected = np.zeros((V, D))
  np.add.at(expected, np.asarray(TOKENS), np.where(inside, w64, 0.0))
  np.testing.assert_allclose(grads["embedding"], expected, rtol=1e-5, atol=1e-6)
  delta = np.where(v < -CFG.qn, -CFG.qn,
                   np.where(v > CFG.qp, CFG.qp, np.round(v) - v))
  step_grad = np.sum(w64 * delta) / np.sqrt(CFG.qp * v.size)
  assert abs(float(grads["step_size"])) > 0
  np.testing.assert_allclose(grads["step_size"], step_grad, rtol=1e-4)


def test_linen_trains_under_jit():
  model = TiedLM()
  with _lsq_embeds():
    params = model.init(jax.random.key(1), TOKENS)["params"]
  tx = optax.adam(5e-2)

  def loss_fn(p):
    with _lsq_embeds():
      logits = model.apply({"params": p}, TOKENS)
    return optax.softmax_cross_entropy_with_integer_labels(logits, TARGETS).mean()

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  first_step = float(params["embed"]["step_size"])
  opt_state = tx.init(params)
  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  assert float(params["embed"]["step_size"]) != first_step


def test_linen_attend_stays_float():
  with _lsq_embeds():
    params = Lookup().init(jax.random.key(1), TOKENS)["params"]["embed"]
    q = jax.random.normal(jax.random.key(3), (3, D))
    logits = nn.Embed(V, D).apply({"params": params}, q, method="attend")
  np.testing.assert_allclose(logits, q @ params["embedding"].T, rtol=1e-6)


def test_linen_shared_embed_called_twice():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(V, D, name="embed")
      return embed(tokens) + embed(tokens[:, ::-1])

  with _lsq_embeds():
    variables = Twice().init(jax.random.key(1), TOKENS)
    out = Twice().apply(variables, TOKENS)
  assert set(variables["params"]["embed"]) == {"embedding", "step_size"}
  assert np.all(np.isfinite(out))


def test_linen_forward_none_is_float():
  cfg = Int4Config(forward="none", backward="exact")
  with _lsq_embeds(cfg):
    variables = Lookup().init(jax.random.key(1), TOKENS)
    out = Lookup().apply(variables, TOKENS)
  assert set(variables["params"]["embed"]) == {"embedding"}
  np.testing.assert_array_equal(out, variables["params"]["embed"]["embedding"][TOKENS])


def test_linen_nan_stays_visible():
  with _lsq_embeds():
    params = Lookup().init(jax.random.key(1), TOKENS)["params"]
  table = params["embed"]["embedding"].at[int(TOKENS[0, 0])].set(jnp.nan)
  bad = {"embed": {"embedding": table, "step_size": params["embed"]["step_size"]}}
  with _lsq_embeds():
    out = Lookup().apply({"params": bad}, TOKENS)
    # The init rule on a NaN batch gives a NaN step (and so NaN everywhere).
    nan_init = nn.Embed(V, D, embedding_init=lambda *_: table).init(
        jax.random.key(1), TOKENS)
  hit = np.asarray(TOKENS == TOKENS[0, 0])
  assert np.all(np.isnan(out[hit])) and np.all(np.isfinite(out[~hit]))
  assert np.isnan(nan_init["params"]["step_size"])


def test_linen_errors_name_the_layer():
  class IntEmbed(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return nn.Embed(V, D, param_dtype=jnp.int32, name="embed",
                      embedding_init=lambda k, s, d: jnp.ones(s, d))(tokens)

  with _lsq_embeds(), pytest.raises(TypeError, match=r"^embed: .*float"):
    IntEmbed().init(jax.random.key(1), TOKENS)


# ---------------------------------------------------------------- nnx


class Net(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.mix = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, tokens):
    return self.embed.attend(self.mix(self.embed(tokens)))




def _params(module):
  state = nnx.state(module, nnx.Param)
  if hasattr(nnx, "to_pure_dict"):
    return nnx.to_pure_dict(state)
  return state.to_pure_dict()  # older flax


def _lsq_net(cfg=CFG):
  net = Net(nnx.Rngs(0))
  float_embed = net.embed
  net.embed = LsqEmbed(float_embed, config=cfg, name="embed")
  return net, float_embed


def test_nnx_takes_over_the_embedding_param():
  net = Net(nnx.Rngs(0))
  before = _params(net)
  embedding = net.embed.embedding
  net.embed = LsqEmbed(net.embed, config=CFG, name="embed")
  assert net.embed.embedding is embedding
  after = _params(net)
  assert set(after["embed"]) == {"embedding", "step_size"}
  np.testing.assert_array_equal(after["embed"]["embedding"],
                                before["embed"]["embedding"])
  assert after["embed"]["embedding"].shape == (V, D)
  assert (net.embed.num_embeddings, net.embed.features) == (V, D)
  assert int(net.embed.calibrated[...]) == 0


def test_nnx_first_call_sets_step_and_quantizes():
  net, float_embed = _lsq_net()
  out = net.embed(TOKENS)
  ref = float_embed(TOKENS)
  step = net.embed.step_size[...]
  np.testing.assert_allclose(step, lsq.step_size_rule(ref, CFG.step_init, qn=CFG.qn, qp=CFG.qp), rtol=1e-6)
  assert int(net.embed.calibrated[...]) == 1
  codes = _codes(out, step)
  assert len(np.unique(codes)) <= CFG.qn + CFG.qp + 1
  np.testing.assert_allclose(
      out, step * jnp.clip(jnp.round(ref / step), -CFG.qn, CFG.qp), rtol=1e-6)
  # later calls keep the stored step
  net.embed(TOKENS[:, :2])
  np.testing.assert_array_equal(net.embed.step_size[...], step)


def test_nnx_first_jitted_step_learns_step_size():
  net, float_embed = _lsq_net()
  init = lsq.step_size_rule(float_embed(TOKENS), CFG.step_init, qn=CFG.qn, qp=CFG.qp)
  lr = 5e-2
  opt = training.optimizer(net, optax.sgd(lr))

  @nnx.jit
  def step(m, opt):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(
          m(TOKENS), TARGETS).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    training.update(opt, m, grads)
    return loss, grads

  loss0, grads = step(net, opt)
  g = float(grads["embed"]["step_size"][...])
  assert int(net.embed.calibrated[...]) == 1
  assert g != 0
  np.testing.assert_allclose(float(net.embed.step_size[...]),
                             float(init) - lr * g, rtol=1e-5)
  losses = [float(loss0)] + [float(step(net, opt)[0]) for _ in range(20)]
  assert losses[-1] < losses[0], losses


def test_nnx_attend_is_float():
  net, float_embed = _lsq_net()
  q = jax.random.normal(jax.random.key(3), (3, D))
  np.testing.assert_array_equal(net.embed.attend(q), float_embed.attend(q))
  assert int(net.embed.calibrated[...]) == 0


def test_nnx_nan_stays_visible():
  net, _ = _lsq_net()
  net.embed(TOKENS)
  # An index past the table: nnx.Embed's take fills NaN.
  bad = TOKENS.at[0, 0].set(V)
  out = net.embed(bad)
  assert np.all(np.isnan(out[0, 0])) and np.all(np.isfinite(out[1]))


def test_nnx_forward_none_is_float():
  net, float_embed = _lsq_net(Int4Config(forward="none", backward="exact"))
  np.testing.assert_array_equal(net.embed(TOKENS), float_embed(TOKENS))
  assert set(_params(net.embed)) == {"embedding"}


def test_nnx_errors_name_the_layer():
  net, _ = _lsq_net()
  with pytest.raises(ValueError, match=r"^embed: .*integer"):
    net.embed(jnp.zeros((2,), jnp.float32))
