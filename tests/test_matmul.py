"""int4_matmul: forward numerics, gradients, unbiasedness, composition, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jint4
from jint4 import Int4Config, int4_dot_general, int4_matmul
from jint4.quant import hadamard, lsq

KEY = jax.random.key(0)


def _data(n=32, d=64, c=16, seed=0, dtype=jnp.float32):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, d), jnp.float32)
  w = jax.random.normal(kw, (d, c), jnp.float32) / np.sqrt(d)
  sx = lsq.init_step_size(hadamard.hadamard_transform(x, 32), qp=7)
  sw = lsq.init_step_size(hadamard.hadamard_transform(w, 32, axis=0), qp=7)
  return x.astype(dtype), w.astype(dtype), sx, sw


def _fake_quant_reference(x, w, sx, sw, block=32, qn=7, qp=7):
  """Autodiff-able float twin of the forward with LSQ's gradients."""
  xh = hadamard.hadamard_transform(x, block)
  wh = hadamard.hadamard_transform(w, block, axis=0)
  return lsq.fake_quantize(xh, sx, qn=qn, qp=qp) @ lsq.fake_quantize(wh, sw, qn=qn, qp=qp)


@pytest.mark.parametrize("qn,qp", [(7, 7), (8, 7)])
@pytest.mark.parametrize("forward,block", [("hq", 32), ("hq", 8), ("lsq", 1)])
def test_forward_is_the_integer_product(forward, block, qn, qp):
  x, w, sx, sw = _data()
  cfg = Int4Config(forward=forward, hadamard_block=block if forward == "hq" else 32,
                   qn=qn, qp=qp)
  y = int4_matmul(x, w, sx, sw, KEY, config=cfg)
  xh = np.asarray(hadamard.hadamard_transform(x, block))
  wh = np.asarray(hadamard.hadamard_transform(w, block, axis=0))
  qx = np.clip(np.round(xh / float(sx)), -qn, qp).astype(np.int64)
  qw = np.clip(np.round(wh / float(sw)), -qn, qp).astype(np.int64)
  expected = float(sx) * float(sw) * (qx @ qw)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=1e-6)


def test_float_mode_has_true_gradients():
  x, w, sx, sw = _data(n=8, d=32, c=8)
  cfg = Int4Config(forward="none", backward="exact")
  f = lambda x, w: int4_matmul(x, w, sx, sw, KEY, config=cfg)
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32
    check_grads(f, (x, w), order=1, modes=["rev"])
  np.testing.assert_allclose(f(x, w), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-6)


def test_exact_backward_matches_autodiff_of_fake_quant_twin():
  x, w, sx, sw = _data()
  cfg = Int4Config(backward="exact")
  ct = jax.random.normal(jax.random.key(5), (32, 16))
  loss = lambda f: (lambda x, w, sx, sw: jnp.sum(f(x, w, sx, sw) * ct))
  ours = jax.jit(jax.grad(loss(lambda *a: int4_matmul(*a, KEY, config=cfg)),
                         argnums=(0, 1, 2, 3)))
  ref = jax.jit(jax.grad(loss(_fake_quant_reference), argnums=(0, 1, 2, 3)))
  with jax.default_matmul_precision("highest"):  # the twin's matmuls: no TF32
    g, r = ours(x, w, sx, sw), ref(x, w, sx, sw)
  np.testing.assert_allclose(g[0], r[0], rtol=1e-4, atol=1e-5)   # dX
  np.testing.assert_allclose(g[1], r[1], rtol=1e-4, atol=1e-5)   # dW
  np.testing.assert_allclose(g[3], r[3], rtol=1e-4, atol=1e-6)   # ds_w (exact delta)
  # ds_x uses the one-bit unbiased delta encoding: equal in expectation.
  keys = jax.random.split(jax.random.key(9), 2000)
  dsx = jax.jit(jax.vmap(lambda k: jax.grad(
      lambda s: jnp.sum(int4_matmul(x, w, s, sw, k, config=cfg) * ct))(sx)))(keys)
  sem = float(jnp.std(dsx)) / np.sqrt(len(keys))
  assert abs(float(jnp.mean(dsx)) - float(r[2])) < 5 * sem + 1e-6


@pytest.mark.parametrize("backward,split_scale,dx_budget",
                         [("lss", "tensor", 0.5), ("lss", "row", 0.5), ("lss", "row", 2.0),
                          ("bitsplit", "tensor", 2.0), ("bitsplit", "row", 2.0)])
def test_quantized_gradients_are_unbiased(backward, split_scale, dx_budget):
  """Mean over keys -> the exact-mode gradient, at the 1/sqrt(n) rate."""
  x, w, sx, sw = _data(n=32, d=32, c=16, seed=1)
  # Structured gradient: a few large token rows, most small (paper Sec. 5).
  ct = jax.random.normal(jax.random.key(2), (32, 16))
  ct = ct * jnp.where(jnp.arange(32) < 4, 10.0, 0.3)[:, None]
  grads = lambda cfg, k: jax.grad(
      lambda x, w, sw: jnp.sum(int4_matmul(x, w, sx, sw, k, config=cfg) * ct),
      argnums=(0, 1, 2))(x, w, sw)
  exact = jax.jit(grads, static_argnums=0)(Int4Config(backward="exact"), KEY)
  cfg = Int4Config(backward=backward, lss_budget=0.5, lss_dx_budget=dx_budget,
                   split_scale=split_scale)
  keys = jax.random.split(jax.random.key(3), 2000)
  samples = jax.jit(jax.vmap(lambda k: grads(cfg, k)))(keys)
  for est, ref, name in zip(samples, exact, ("dx", "dw", "dsw")):
    est, ref = np.asarray(est), np.asarray(ref)
    errors, sems = [], []
    for m in (125, 500, 2000):
      err = np.linalg.norm(est[:m].mean(0) - ref)
      sem = np.sqrt(est[:m].var(0).sum() / m)
      assert err <= 5 * sem + 1e-5 * np.linalg.norm(ref), (name, m, err, sem)
      errors.append(err)
      sems.append(sem)
    if sem > 1e-6 * np.linalg.norm(ref):
      # The 1/sqrt(n) rate: after 16x the samples the error sits well below
      # the noise level of the first 125 (3 standard errors at m = 2000).
      assert errors[-1] < 0.75 * sems[0], (name, errors, sems)


def test_lss_variance_shrinks_with_budget():
  """Sampling error shrinks as the kept-row budget grows."""
  x, w, sx, sw = _data(n=32, d=32, c=16, seed=4)
  ct = jax.random.normal(jax.random.key(2), (32, 16))
  def dw(cfg, k):
    return jax.grad(lambda w: jnp.sum(int4_matmul(x, w, sx, sw, k, config=cfg) * ct))(w)
  keys = jax.random.split(jax.random.key(4), 150)
  var = {}
  for budget in (0.25, 1.0, 2.0):
    s = jax.jit(jax.vmap(lambda k: dw(Int4Config(backward="lss", lss_budget=budget), k)))(keys)
    var[budget] = float(jnp.var(s, axis=0).sum())
  assert var[0.25] > var[1.0] > var[2.0]


def _samples_by_split_scale(backward, data_seed, ct, key, **config):
  """The exact (dX, dW) of one product and, per split scale, 200 draws."""
  x, w, sx, sw = _data(n=ct.shape[0], d=32, c=ct.shape[1], seed=data_seed)

  def grads(cfg, k):
    return jax.grad(lambda x, w: jnp.sum(int4_matmul(x, w, sx, sw, k, config=cfg) * ct),
                    argnums=(0, 1))(x, w)

  keys = jax.random.split(key, 200)
  draws = {scale: jax.jit(jax.vmap(lambda k: grads(
      Int4Config(backward=backward, split_scale=scale, **config), k)))(keys)
      for scale in ("tensor", "row")}
  return grads(Int4Config(backward="exact"), KEY), draws


def _relative_mse(samples, exact, rows=slice(None)):
  """E||est - exact||^2 / ||exact||^2 over the draws, on some rows."""
  return (float(jnp.mean(jnp.sum((samples - exact)[:, rows] ** 2, axis=(1, 2))))
          / float(jnp.sum(exact[rows] ** 2)))


def test_row_split_scale_lowers_lss_variance_on_dense_gradients():
  """A dense gradient whose rows differ in size (a language model's): with
  one scale per tensor the low halves weigh about as much as the high ones
  and the sampler keeps half of either; per-row scales let it keep the high
  halves, which lowers the variance of both gradients at the same budget."""
  sizes = 10.0 ** jax.random.uniform(jax.random.key(6), (64,), minval=-2, maxval=0)
  ct = jax.random.normal(jax.random.key(7), (64, 16)) * sizes[:, None]
  exact, draws = _samples_by_split_scale("lss", 5, ct, jax.random.key(8),
                                         lss_dx_budget=1.0)
  for which in (0, 1):   # dX, dW
    t, r = (_relative_mse(draws[s][which], exact[which]) for s in ("tensor", "row"))
    assert r < 0.4 * t, (which, t, r)


@pytest.mark.parametrize("split_scale", ["tensor", "row"])
def test_lss_keeping_every_dx_row_is_bit_splittings_dx(split_scale):
  """With lss_dx_budget=2 (the default) only dW is sampled: dX is bit
  splitting's product of the same digits, equal to "bitsplit"'s dX for the
  same key, while dW differs (sampled)."""
  x, w, sx, sw = _data(n=32, d=32, c=16, seed=11)
  ct = jax.random.normal(jax.random.key(12), (32, 16))

  def grads(backward, **kw):
    cfg = Int4Config(backward=backward, split_scale=split_scale, **kw)
    return jax.jit(jax.grad(lambda x, w: jnp.sum(
        int4_matmul(x, w, sx, sw, KEY, config=cfg) * ct), argnums=(0, 1)))(x, w)
  kept, split, sampled = grads("lss"), grads("bitsplit"), grads("lss", lss_dx_budget=1.0)
  np.testing.assert_array_equal(kept[0], split[0])
  assert not np.array_equal(kept[1], split[1])
  assert not np.array_equal(sampled[0], split[0])
  np.testing.assert_array_equal(sampled[1], kept[1])   # dW: the same sample


def test_sampling_dx_adds_the_variance_that_keeping_it_saves():
  """A language model's dense gradient: sampling dX at the paper's budget
  gives a far noisier dX than keeping every bit-split row, and the dX budget
  leaves dW's distribution alone."""
  sizes = 10.0 ** jax.random.uniform(jax.random.key(13), (64,), minval=-1, maxval=0)
  ct = jax.random.normal(jax.random.key(14), (64, 16)) * sizes[:, None]
  exact, sampled = _samples_by_split_scale("lss", 7, ct, jax.random.key(15),
                                           lss_dx_budget=1.0)
  _, kept = _samples_by_split_scale("lss", 7, ct, jax.random.key(15))
  dx = {k: _relative_mse(d["row"][0], exact[0]) for k, d in (("sampled", sampled),
                                                              ("kept", kept))}
  dw = {k: _relative_mse(d["row"][1], exact[1]) for k, d in (("sampled", sampled),
                                                              ("kept", kept))}
  assert dx["kept"] < 0.05 * dx["sampled"], dx
  assert 0.7 < dw["kept"] / dw["sampled"] < 1.4, dw


def test_row_split_scale_keeps_small_rows_of_dx_with_bitsplit():
  """A masked-LM-like gradient (a few large token rows, the rest 100x
  smaller): with one scale per tensor the small rows' dX is mostly the
  stochastic rounding's noise; with one per row each keeps its own 98 levels.
  dW (one scale either way) is unchanged in distribution."""
  big = np.arange(64) < 8
  ct = jax.random.normal(jax.random.key(9), (64, 16)) * jnp.where(big, 1.0, 0.01)[:, None]
  exact, draws = _samples_by_split_scale("bitsplit", 6, ct, jax.random.key(10))
  dx = {s: _relative_mse(draws[s][0], exact[0], ~big) for s in draws}
  dw = {s: _relative_mse(draws[s][1], exact[1]) for s in draws}
  assert dx["tensor"] > 0.1, dx          # the small rows drown in the noise
  assert dx["row"] < 0.01 * dx["tensor"], dx
  assert 0.5 < dw["row"] / dw["tensor"] < 2.0, dw


def test_hq_lowers_forward_error_on_outlier_activations():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(128, 256)).astype(np.float32)
  x[:, [3, 77, 200]] *= 60.0                       # outlier channels
  w = (rng.normal(size=(256, 64)) / 16).astype(np.float32)
  exact = x @ w
  errs = {}
  for forward in ("lsq", "hq"):
    block = 32 if forward == "hq" else 1
    sx = lsq.init_step_size(hadamard.hadamard_transform(x, block), qp=7)
    sw = lsq.init_step_size(hadamard.hadamard_transform(w, block, axis=0), qp=7)
    y = int4_matmul(x, w, sx, sw, KEY, config=Int4Config(forward=forward))
    errs[forward] = float(np.linalg.norm(np.asarray(y) - exact))
  assert errs["hq"] < 0.7 * errs["lsq"], errs


def test_leading_batch_dims_bias_and_dtypes():
  x, w, sx, sw = _data()
  x3 = x.reshape(4, 8, 64)
  b = jnp.arange(16, dtype=jnp.float32)
  y = int4_matmul(x3, w, sx, sw, KEY, bias=b)
  assert y.shape == (4, 8, 16)
  y2 = int4_matmul(x, w, sx, sw, KEY) + b
  np.testing.assert_allclose(y.reshape(32, 16), y2, rtol=1e-6)
  for dtype in (jnp.bfloat16, jnp.float16):
    xd, wd = x3.astype(dtype), w.astype(dtype)
    y = int4_matmul(xd, wd, sx, sw, KEY)
    assert y.dtype == dtype
    gx, gw = jax.grad(lambda a, b: jnp.sum(int4_matmul(a, b, sx, sw, KEY).astype(jnp.float32)),
                      argnums=(0, 1))(xd, wd)
    assert gx.dtype == dtype and gw.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(gx)))


def test_bias_gradient_is_float_row_sum():
  x, w, sx, sw = _data()
  ct = jax.random.normal(jax.random.key(1), (32, 16))
  gb = jax.grad(lambda b: jnp.sum(int4_matmul(x, w, sx, sw, KEY, bias=b) * ct))(jnp.zeros(16))
  np.testing.assert_allclose(gb, ct.sum(0), rtol=1e-6)


def test_saved_residuals_are_compact():
  n, d, c = 256, 128, 64
  x, w, sx, sw = _data(n=n, d=d, c=c)
  for qn, per_elem in ((7, 0.625), (8, 0.75)):
    cfg = Int4Config(qn=qn)
    _, vjp_fn = jax.vjp(lambda x: int4_matmul(x, w, sx, sw, KEY, config=cfg), x)
    leaves = [l for l in jax.tree.leaves(vjp_fn) if hasattr(l, "nbytes")]
    kernel_bytes = w.nbytes
    # The weight side: the kernel by reference and its dX GEMM operand q_w^T,
    # one int8 per weight (quantized in the forward's pass); the op's arrays
    # carry a leading batch dim (1 for a layer).
    weight_codes = [l for l in leaves if l.shape[-2:] == (d, c) and l.dtype == jnp.int8]
    assert len(weight_codes) == 1
    saved = sum(l.nbytes for l in leaves if l.nbytes != kernel_bytes and l.size > 4
                and not (l.shape[-2:] == (d, c) and l.dtype == jnp.int8))
    # Activations: 5 (6) bits per element, plus one float32 row norm per token.
    assert saved <= per_elem * n * d + 4 * n, (saved, per_elem * n * d)
    if qn == 7:
      assert saved < (2 * n * d) / 3        # < 1/3 of a bf16 activation


def test_same_key_same_result_different_key_different_noise():
  x, w, sx, sw = _data()
  f = jax.jit(lambda k: jax.grad(lambda x, w: jnp.sum(int4_matmul(x, w, sx, sw, k) ** 2),
                                 argnums=(0, 1))(x, w))
  a, b, c = f(KEY), f(KEY), f(jax.random.key(1))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[1], c[1])


def test_raw_uint32_keys_work():
  x, w, sx, sw = _data()
  y = int4_matmul(x, w, sx, sw, jax.random.PRNGKey(0))
  assert y.shape == (32, 16)


def test_composes_with_vmap_checkpoint_and_scan():
  x, w, sx, sw = _data(n=16, d=32, c=32)
  xs = jnp.stack([x, 2 * x])
  keys = jax.random.split(KEY, 2)
  f = lambda x, k: int4_matmul(x, w, sx, sw, k)
  yv = jax.jit(jax.vmap(f))(xs, keys)
  np.testing.assert_allclose(yv[1], jax.jit(f)(xs[1], keys[1]), rtol=1e-6)
  gv = jax.jit(jax.vmap(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2))))(xs, keys)
  assert gv.shape == xs.shape and bool(jnp.all(jnp.isfinite(gv)))

  # Scan over a stack of layers, with and without rematerialization.
  ws = jnp.stack([w, w * 0.5, w * 2.0])
  sws = jnp.stack([sw, sw * 0.5, sw * 2.0])
  def net(ws, sws, x, remat):
    def layer(h, params):
      w_i, sw_i, k = params
      body = lambda h: jnp.tanh(int4_matmul(h, w_i, sx, sw_i, k))
      return (jax.checkpoint(body) if remat else body)(h), None
    h, _ = jax.lax.scan(layer, x, (ws, sws, jax.random.split(KEY, 3)))
    return jnp.sum(h ** 2)
  g_plain = jax.jit(jax.grad(functools.partial(net, remat=False)))(ws, sws, x)
  g_remat = jax.jit(jax.grad(functools.partial(net, remat=True)))(ws, sws, x)
  np.testing.assert_allclose(g_plain, g_remat, rtol=1e-5, atol=1e-6)
  assert float(jnp.linalg.norm(g_plain)) > 0


def test_auto_block_matches_static_block():
  x, w, sx, sw = _data()
  log2 = hadamard.search_hadamard_block(x, w)
  b = 2 ** int(log2)
  y_auto = jax.jit(lambda l: int4_matmul(x, w, sx, sw, KEY, config=Int4Config(
      hadamard_block="auto"), hadamard_log2_block=l))(log2)
  y_static = int4_matmul(x, w, sx, sw, KEY, config=Int4Config(hadamard_block=b))
  np.testing.assert_allclose(y_auto, y_static, rtol=1e-5, atol=1e-5)


def test_dot_general_variant():
  x, w, sx, sw = _data()
  y = int4_dot_general(x, w, (((1,), (0,)), ((), ())), sx, sw, KEY)
  np.testing.assert_allclose(y, int4_matmul(x, w, sx, sw, KEY), rtol=1e-6)
  y_t = int4_dot_general(x, w.T, (((1,), (1,)), ((), ())), sx, sw, KEY)
  np.testing.assert_allclose(y_t, y, rtol=1e-6)


def test_nonfinite_values_stay_visible():
  x, w, sx, sw = _data()
  y = int4_matmul(x.at[3, 5].set(jnp.nan), w, sx, sw, KEY)
  assert bool(jnp.all(jnp.isnan(y[3]))) and bool(jnp.all(jnp.isfinite(jnp.delete(y, 3, 0))))
  y = int4_matmul(x, w.at[2, 7].set(jnp.inf), sx, sw, KEY)
  assert bool(jnp.all(jnp.isnan(y[:, 7])))
  for backward, scale, dx_budget in (("lss", "tensor", 2.0), ("lss", "row", 2.0),
                                     ("lss", "tensor", 1.0), ("lss", "row", 1.0),
                                     ("bitsplit", "tensor", 2.0), ("bitsplit", "row", 2.0),
                                     ("exact", "tensor", 2.0)):
    cfg = Int4Config(backward=backward, split_scale=scale, lss_dx_budget=dx_budget)
    ct = jnp.zeros((32, 16)).at[0, 0].set(jnp.nan)
    _, vjp = jax.vjp(lambda x, w: int4_matmul(x, w, sx, sw, KEY, config=cfg), x, w)
    gx, gw = vjp(ct)
    assert bool(jnp.any(jnp.isnan(gx))) and bool(jnp.any(jnp.isnan(gw))), backward
    if backward == "bitsplit":   # per row too, every row's scale turns NaN
      assert bool(jnp.all(jnp.isnan(gx))), (backward, scale)


@pytest.mark.parametrize("backward", ["lss", "bitsplit", "exact", "luq", "minmax"])
def test_zero_gradient_gives_zero_gradients(backward):
  x, w, sx, sw = _data()
  cfg = Int4Config(backward=backward)
  _, vjp = jax.vjp(lambda x, w, sx, sw: int4_matmul(x, w, sx, sw, KEY, config=cfg),
                   x, w, sx, sw)
  for g in vjp(jnp.zeros((32, 16))):
    assert bool(jnp.all(g == 0)), backward


def test_bad_inputs_raise_clear_errors():
  x, w, sx, sw = _data()
  with pytest.raises(TypeError, match="float32/bfloat16/float16 x"):
    int4_matmul(x.astype(jnp.int32), w, sx, sw, KEY)
  with pytest.raises(TypeError, match="Complex"):
    int4_matmul(x.astype(jnp.complex64), w, sx, sw, KEY)
  with pytest.raises(ValueError, match="must equal the kernel's first dim"):
    int4_matmul(x[:, :32], w, sx, sw, KEY)
  with pytest.raises(ValueError, match="2-D"):
    int4_matmul(x, w[None], sx, sw, KEY)
  with pytest.raises(ValueError, match="not a multiple of the Hadamard block"):
    int4_matmul(x[:, :48], w[:48], sx, sw, KEY)
  with pytest.raises(ValueError, match="step_x"):
    int4_matmul(x, w, jnp.ones(3), sw, KEY)
  with pytest.raises(ValueError, match="PRNG key"):
    int4_matmul(x, w, sx, sw, None)
  with pytest.raises(ValueError, match="hadamard_log2_block"):
    int4_matmul(x, w, sx, sw, KEY, config=Int4Config(hadamard_block="auto"))
  with pytest.raises(ValueError, match="bias"):
    int4_matmul(x, w, sx, sw, KEY, bias=jnp.zeros(3))


def test_config_validation():
  with pytest.raises(ValueError, match="backward"):
    Int4Config(backward="sampled")
  with pytest.raises(ValueError, match="power of two"):
    Int4Config(hadamard_block=48)
  with pytest.raises(ValueError, match="qp"):
    Int4Config(qn=7, qp=8)
  with pytest.raises(ValueError, match="qn"):
    Int4Config(qn=9, qp=7)
  with pytest.raises(ValueError, match="lss_budget"):
    Int4Config(lss_budget=0.0)
  for bad in (2.5, 0, "2", True):
    with pytest.raises(ValueError, match=r"lss_dx_budget .* \(0, 2\]"):
      Int4Config(lss_dx_budget=bad)
  with pytest.raises(ValueError, match="split_scale"):
    Int4Config(split_scale="token")
  with pytest.raises(TypeError):
    Int4Config("hq")  # keyword-only
  cfg = Int4Config()
  with pytest.raises(Exception):
    cfg.backward = "exact"  # frozen
  assert hash(cfg) == hash(Int4Config())


def test_auto_backward_resolves_by_tensor_core_kind(monkeypatch):
  """backward="auto" (the default): every bit-split row where INT4 values run
  on INT8 engines (this CPU, Hopper), leverage score sampling on INT4 tensor
  cores; the same gradients as naming the mode."""
  from jint4 import matmul
  from jint4.kernels import engine as engine_lib
  assert Int4Config().backward == "auto"
  x, w, sx, sw = _data()
  ct = jax.random.normal(jax.random.key(5), (32, 16))
  # Not cached across the monkeypatched engine: a fresh jit per call.
  grad = lambda cfg: jax.jit(jax.grad(
      lambda x, w: jnp.sum(int4_matmul(x, w, sx, sw, KEY, config=cfg) * ct),
      argnums=(0, 1)))(x, w)
  try:
    for tensor_cores, mode in ((False, "bitsplit"), (True, "lss")):
      monkeypatch.setattr(engine_lib, "_int4_tensor_cores",
                          lambda platform, t=tensor_cores: t)
      engine_lib._engine.cache_clear()
      assert matmul.backward_mode(Int4Config()) == mode
      assert matmul.backward_mode(Int4Config(backward="exact")) == "exact"
      auto, named = grad(Int4Config()), grad(Int4Config(backward=mode))
      for a, b in zip(auto, named):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  finally:
    monkeypatch.undo()
    engine_lib._engine.cache_clear()
  assert engine_lib.get_engine("auto", "cpu").int4_tensor_cores is False


@pytest.mark.parametrize("backward", ["lss", "bitsplit", "exact", "luq", "minmax"])
def test_empty_batch_is_valid_like_nn_dense(backward):
  cfg = Int4Config(backward=backward)
  x = jnp.zeros((0, 3, 64))
  w = jax.random.normal(jax.random.key(1), (64, 16))
  b = jnp.ones((16,))
  f = lambda x, w, b, sx, sw: int4_matmul(x, w, sx, sw, KEY, config=cfg, bias=b)
  y = jax.jit(f)(x, w, b, 0.5, 0.1)
  assert y.shape == (0, 3, 16)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4)))(
      x, w, b, 0.5, 0.1)
  assert grads[0].shape == x.shape
  for g in grads[1:]:
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  dense = jint4.Int4Dense(16, config=cfg)
  params = dense.init(jax.random.key(0), x)["params"]
  assert float(params["step_size_x"]) == 1.0 and np.isfinite(float(params["step_size_w"]))
  assert dense.apply({"params": params}, x).shape == (0, 3, 16)


def test_old_backward_name_says_the_new_one():
  with pytest.raises(ValueError, match="'bitsplit'"):
    Int4Config(backward="nonzero")


def _custom_calls(text):
  import re
  return set(re.findall(r"(jint4_[a-z_]+)", text))


@pytest.mark.parametrize("engine", ["auto", "native", "reference"])
def test_engine_is_chosen_per_platform_at_lowering(engine):
  """The program lowered for CPU carries the CPU choice, the one lowered for
  CUDA (from this CPU host) the CUDA choice: the platform is decided when XLA
  lowers, not from the default backend at trace time."""
  from jint4.kernels import native
  cfg = Int4Config(engine=engine)
  x, w, sx, sw = _data()
  f = jax.jit(jax.grad(lambda x, w: jnp.sum(int4_matmul(x, w, sx, sw, KEY, config=cfg) ** 2),
                       argnums=(0, 1)))
  traced = f.trace(x, w)
  cpu = _custom_calls(traced.lower(lowering_platforms=("cpu",)).as_text())
  cuda = _custom_calls(traced.lower(lowering_platforms=("cuda",)).as_text())
  assert cpu == (set() if engine == "reference" else
                 {"jint4_lsq_weight_backward"} if engine == "auto" else
                 {"jint4_hadamard_quantize", "jint4_hadamard_quantize_weight",
                  "jint4_int_gemm", "jint4_bit_split_joined", "jint4_residual_values",
                  "jint4_lsq_backward", "jint4_lsq_weight_backward"})
  if engine == "reference" or (engine == "auto" and not native.has_cuda()):
    assert cuda == set()
  else:
    assert {"jint4_hadamard_quantize", "jint4_int_gemm", "jint4_lsq_backward"} <= cuda
  # The CPU program runs, whichever branches were traced.
  np.testing.assert_allclose(
      np.asarray(f(x, w)[1]),
      np.asarray(jax.jit(jax.grad(
          lambda x, w: jnp.sum(int4_matmul(x, w, sx, sw, KEY, config=Int4Config(
              engine="reference")) ** 2), argnums=(0, 1)))(x, w)[1]), rtol=1e-4, atol=1e-5)


# --- int4_dot_general: the general op ----------------------------------------

def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _dg_steps(lhs, rhs, dn, cfg=Int4Config()):
  from jint4.matmul import flatten_dot_general
  init = jint4.init_step_sizes(*flatten_dot_general(lhs, rhs, dn).init_view(), cfg)
  return init.step_x, init.step_w


# lhs [B, T, H, D] contracting (H, D) against rhs [H, D, F] (DenseGeneral
# axis=(-2, -1)); the same with the contracting pairs given in the other
# order and rhs's dims permuted; and a batch dim (G) in the middle of lhs
# (nn.Einsum 'tgd,gdf->gtf'-like).
_DG_CASES = {
    "multi_axis": ((2, 4, 2, 32), (2, 32, 8), (((2, 3), (0, 1)), ((), ()))),
    "permuted": ((2, 4, 2, 32), (8, 32, 2), (((3, 2), (1, 2)), ((), ()))),
    "batch": ((4, 3, 64), (3, 64, 8), (((2,), (1,)), ((1,), (0,)))),
}


@pytest.mark.parametrize("case", sorted(_DG_CASES))
def test_dot_general_matches_lax_dot_general(case):
  ls, rs, dn = _DG_CASES[case]
  lhs = jax.random.normal(jax.random.key(1), ls)
  rhs = jax.random.normal(jax.random.key(2), rs) / np.sqrt(64)
  sx, sw = _dg_steps(lhs, rhs, dn)
  ref = jax.lax.dot_general(lhs, rhs, dn, precision=jax.lax.Precision.HIGHEST)
  ct = jax.random.normal(jax.random.key(3), ref.shape)
  loss = lambda f: lambda a, b: jnp.sum(f(a, b) * ct)
  ours = lambda a, b: int4_dot_general(a, b, dn, sx, sw, KEY)
  y, (gl, gr) = jax.jit(lambda a, b: (ours(a, b), jax.grad(loss(ours), (0, 1))(a, b)))(lhs, rhs)
  with jax.default_matmul_precision("highest"):
    fl, fr = jax.grad(loss(lambda a, b: jax.lax.dot_general(a, b, dn)), (0, 1))(lhs, rhs)
  assert y.shape == ref.shape and y.dtype == ref.dtype
  assert gl.shape == lhs.shape and gr.shape == rhs.shape
  # 4-bit forward, bit-split backward: close to the float product and its
  # gradients, as Int4Dense is to nn.Dense.
  assert _rel(y, ref) < 0.35, _rel(y, ref)
  assert _rel(gl, fl) < 0.3, _rel(gl, fl)
  assert _rel(gr, fr) < 0.3, _rel(gr, fr)


def test_dot_general_is_int4_matmul_where_both_apply():
  ls, rs, dn = _DG_CASES["multi_axis"]
  lhs = jax.random.normal(jax.random.key(1), ls)
  rhs = jax.random.normal(jax.random.key(2), rs) / 8
  b = jax.random.normal(jax.random.key(4), (8,))
  sx, sw = _dg_steps(lhs, rhs, dn)
  ct = jax.random.normal(jax.random.key(3), (2, 4, 8))

  def both(lhs, rhs, b, sx, sw):
    f = lambda *a: int4_dot_general(a[0], a[1], dn, a[3], a[4], KEY, bias=a[2])
    g = lambda *a: int4_matmul(a[0].reshape(2, 4, 64), a[1].reshape(64, 8), a[3], a[4],
                               KEY, bias=a[2])
    return [(h(lhs, rhs, b, sx, sw), jax.grad(lambda *a: jnp.sum(h(*a) * ct),
                                                 argnums=(0, 1, 2, 3, 4))(lhs, rhs, b, sx, sw))
            for h in (f, g)]

  (y, g), (y_ref, g_ref) = jax.jit(both)(lhs, rhs, b, sx, sw)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  for u, v in zip(g, g_ref):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_batched_dot_general_is_per_element_int4_matmul_with_lsq_step_gradient():
  """One int4_matmul per batch element with fold_in(key, b), one step pair
  shared by all, and the step gradients LSQ's over the whole operand:
  sum_b (per-element step gradient) / sqrt(B)."""
  ls, rs, dn = _DG_CASES["batch"]      # lhs [T, G, D] batch dim 1, rhs [G, D, F]
  lhs = jax.random.normal(jax.random.key(1), ls)
  rhs = jax.random.normal(jax.random.key(2), rs) / 8
  bias = jax.random.normal(jax.random.key(4), (8,))
  sx, sw = _dg_steps(lhs, rhs, dn)
  ct = jax.random.normal(jax.random.key(3), (3, 4, 8))
  n_b = 3

  def ours(lhs, rhs, bias, sx, sw):
    f = lambda *a: jnp.sum(int4_dot_general(a[0], a[1], dn, a[3], a[4], KEY, bias=a[2]) * ct)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))(lhs, rhs, bias, sx, sw)

  def per_element(lhs, rhs, bias, sx, sw):
    out = []
    for i in range(n_b):
      f = lambda *a: jnp.sum(int4_matmul(a[0], a[1], a[3], a[4], jax.random.fold_in(KEY, i),
                                         bias=a[2]) * ct[i])
      out.append(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))(
          lhs[:, i], rhs[i], bias, sx, sw))
    return out

  (loss, g), parts = jax.jit(ours)(lhs, rhs, bias, sx, sw), jax.jit(per_element)(
      lhs, rhs, bias, sx, sw)
  np.testing.assert_allclose(loss, sum(p[0] for p in parts), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(g[0]), np.stack([p[1][0] for p in parts], 1))
  np.testing.assert_array_equal(np.asarray(g[1]), np.stack([p[1][1] for p in parts]))
  np.testing.assert_allclose(g[2], sum(p[1][2] for p in parts), rtol=1e-5, atol=1e-5)
  for j in (3, 4):
    expected = sum(float(p[1][j]) for p in parts) / np.sqrt(n_b)
    np.testing.assert_allclose(float(g[j]), expected, rtol=1e-5, atol=1e-7)
  # ... which is LSQ's gradient of one step over all B*M*K elements: with the
  # exact backward, the autodiff of the fake-quantized float twin.
  cfg = Int4Config(backward="exact")
  sw_grad = jax.jit(jax.grad(lambda s: jnp.sum(
      int4_dot_general(lhs, rhs, dn, sx, s, KEY, config=cfg) * ct)))(sw)
  xq = lsq.fake_quantize(hadamard.hadamard_transform(lhs, 32), sx)
  twin = lambda s: jnp.sum(jnp.einsum(
      "tgk,gkf->gtf", xq, lsq.fake_quantize(hadamard.hadamard_transform(rhs, 32, axis=1), s),
      precision="highest") * ct)
  np.testing.assert_allclose(float(sw_grad), float(jax.grad(twin)(sw)), rtol=1e-4, atol=1e-6)


def test_dot_general_keys_bias_dtypes_and_empty_batch():
  lhs = jax.random.normal(jax.random.key(1), (3, 8, 32))
  rhs = jax.random.normal(jax.random.key(2), (3, 32, 4)) / 6
  dn = (((2,), (1,)), ((0,), (0,)))
  sx, sw = _dg_steps(lhs, rhs, dn)
  b = jnp.arange(4, dtype=jnp.float32)
  log2 = hadamard.search_hadamard_block(lhs.reshape(-1, 32),
                                        jnp.moveaxis(rhs, 0, 1).reshape(32, -1))
  auto = Int4Config(hadamard_block="auto")
  static = Int4Config(hadamard_block=2 ** int(log2))
  # Batch elements that are all the same: independent noise per element.
  same = jnp.broadcast_to(lhs[:1], lhs.shape), jnp.broadcast_to(rhs[:1], rhs.shape)

  @jax.jit
  def run(lhs, rhs, log2):
    dg = functools.partial(int4_dot_general, dimension_numbers=dn, step_lhs=sx,
                           step_rhs=sw, key=KEY)
    return dict(
        y=dg(lhs, rhs), again=dg(lhs, rhs),
        biased=dg(lhs, rhs, bias=b, preferred_element_type=jnp.bfloat16),
        half=dg(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)),
        auto=dg(lhs, rhs, config=auto, hadamard_log2_block=log2),
        static=dg(lhs, rhs, config=static),
        same=jax.grad(lambda l: jnp.sum(dg(l, same[1]) ** 2))(same[0]),
        empty=jax.grad(lambda l, r: jnp.sum(dg(l, r)), (0, 1))(lhs[:0], rhs[:0]),
        empty_y=dg(lhs[:0], rhs[:0]))

  out = run(lhs, rhs, log2)
  np.testing.assert_array_equal(np.asarray(out["y"]), np.asarray(out["again"]))
  assert not np.array_equal(np.asarray(out["same"][0]), np.asarray(out["same"][1]))
  # bias over rhs's free dims, broadcast over the batch; preferred_element_type.
  assert out["biased"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["biased"], np.float32),
                             np.asarray((out["y"] + b).astype(jnp.bfloat16), np.float32),
                             rtol=1e-2)
  assert out["half"].dtype == jnp.bfloat16 and out["half"].shape == (3, 8, 4)
  np.testing.assert_allclose(out["auto"], out["static"], rtol=1e-5, atol=1e-5)
  # An empty batch: the empty product, empty gradients.
  assert out["empty_y"].shape == (0, 8, 4)
  assert out["empty"][0].shape == (0, 8, 32) and out["empty"][1].shape == (0, 32, 4)


def test_dot_general_bad_inputs_raise_clear_errors():
  lhs = jnp.ones((2, 4, 64))
  rhs = jnp.ones((64, 8))
  dn = (((2,), (0,)), ((), ()))
  s = jnp.float32(0.1)
  with pytest.raises(TypeError, match="float32/bfloat16/float16 lhs"):
    int4_dot_general(lhs.astype(jnp.int32), rhs, dn, s, s, KEY)
  with pytest.raises(TypeError, match="Complex"):
    int4_dot_general(lhs, rhs.astype(jnp.complex64), dn, s, s, KEY)
  with pytest.raises(ValueError, match="contracting dims differ in size"):
    int4_dot_general(lhs, jnp.ones((32, 8)), dn, s, s, KEY)
  with pytest.raises(ValueError, match="contracting dims differ in size"):
    # equal products, different sizes pairwise
    int4_dot_general(jnp.ones((4, 2, 32)), jnp.ones((32, 2, 8)),
                     (((1, 2), (0, 1)), ((), ())), s, s, KEY)
  with pytest.raises(ValueError, match="batch dims differ in size"):
    int4_dot_general(jnp.ones((2, 4, 64)), jnp.ones((3, 64, 8)),
                     (((2,), (1,)), ((0,), (0,))), s, s, KEY)
  with pytest.raises(ValueError, match="as many contracting dims"):
    int4_dot_general(lhs, rhs, (((2,), ()), ((), ())), s, s, KEY)
  with pytest.raises(ValueError, match="distinct"):
    int4_dot_general(lhs, jnp.ones((2, 64, 8)), (((0,), (0,)), ((0,), (0,))), s, s, KEY)
  with pytest.raises(ValueError, match="out of range"):
    int4_dot_general(lhs, rhs, (((3,), (0,)), ((), ())), s, s, KEY)
  with pytest.raises(ValueError, match="dimension_numbers must be"):
    int4_dot_general(lhs, rhs, ((2, 0),), s, s, KEY)
  with pytest.raises(ValueError, match="dimension_numbers must be"):
    int4_dot_general(lhs, rhs, (((2.0,), (0,)), ((), ())), s, s, KEY)
  with pytest.raises(ValueError, match="not a multiple of the Hadamard block"):
    int4_dot_general(jnp.ones((4, 2, 24)), jnp.ones((2, 24, 8)),
                     (((1, 2), (0, 1)), ((), ())), s, s, KEY)
  with pytest.raises(ValueError, match="bias must have the shape"):
    int4_dot_general(lhs, rhs, dn, s, s, KEY, bias=jnp.ones(3))
  with pytest.raises(ValueError, match="PRNG key"):
    int4_dot_general(lhs, rhs, dn, s, s, None)
  with pytest.raises(ValueError, match="step_x"):
    int4_dot_general(lhs[None], rhs[None], (((3,), (1,)), ((0,), (0,))), jnp.ones(2), s, KEY)
