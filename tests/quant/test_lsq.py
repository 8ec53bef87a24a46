"""Tests for LSQ and its 5/6-bit backward state (jint4.quant.lsq).

Oracles are float64 numpy. np.round and jnp.round both round half to even.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jint4.quant import lsq
from tests.stats import hoeffding_tol

RANGES = [(7, 7), (8, 7)]
N_DRAWS = 6000       # noise draws for the unbiasedness test


def f64(a):
  return np.asarray(a, np.float64)


def np_quantize(v, qn, qp):
  return np.clip(np.round(v), -qn, qp)


def np_delta(v, qn, qp):
  return np.where(v < -qn, -qn, np.where(v > qp, qp, np.round(v) - v))


def special_values(qn, qp):
  """v = T / s at the edges: boundaries, .5 ties, just inside/outside, far."""
  ints = np.arange(-12, 13, dtype=np.float64)
  return np.concatenate([
      ints, ints + 0.5,                              # exact values and ties
      [-qn, qp, -qn - 0.5, qp + 0.5, -qn + 0.5, qp - 0.5],
      [-qn - 1e-3, -qn + 1e-3, qp - 1e-3, qp + 1e-3],
      [-1e6, 1e6, -1e30, 1e30, -3e38, 3e38],         # far outside
      [0.0, -0.0, 1e-30, -1e-30],
  ]).astype(np.float32)


def test_values_of_v_cover_every_case():
  for qn, qp in RANGES:
    v = f64(special_values(qn, qp))
    assert (v < -qn).any() and (v > qp).any() and ((v >= -qn) & (v <= qp)).any()
    assert (v == -qn).any() and (v == qp).any()
    assert (np.abs(v - np.round(v)) == 0.5).any()


# ---------------------------------------------------------------- quantize --

@pytest.mark.parametrize("qn, qp", RANGES)
def test_quantize_clamps_and_rounds(qn, qp):
  rng = np.random.default_rng(0)
  for s, v in [(0.37, rng.uniform(-15, 15, 2000)),
               (0.25, special_values(qn, qp))]:  # s = 1/4: t / s exact
    s = np.float32(s)
    t = (np.asarray(v, np.float32) * s).astype(np.float32)
    q = f64(lsq.quantize(jnp.asarray(t), jnp.float32(s), qn=qn, qp=qp))
    v = f64(t / s)                       # the float32 quotient jnp sees
    assert (q == np.round(q)).all()                       # integer values
    assert q.min() == -qn and q.max() == qp               # the clamp binds
    np.testing.assert_array_equal(q, np_quantize(v, qn, qp))
    inside = (v >= -qn - 0.5) & (v <= qp + 0.5)
    assert (np.abs(q - v)[inside] <= 0.5).all()           # round to nearest


def test_quantize_dtype_follows_input():
  t = jnp.asarray([0.3, -2.6, 9.0], jnp.bfloat16)
  q = lsq.quantize(t, jnp.float32(1.0), qn=7, qp=7)
  np.testing.assert_array_equal(f64(q), [0.0, -3.0, 7.0])


# ---------------------------------------------------------- init and scale --

def test_init_step_size_matches_formula():
  rng = np.random.default_rng(1)
  t = rng.normal(0.2, 1.5, (64, 48)).astype(np.float32)
  for qp in (7, 3):
    s = lsq.init_step_size(jnp.asarray(t), qp=qp)
    assert s.dtype == jnp.float32 and s.shape == ()
    np.testing.assert_allclose(float(s), 2 * np.mean(np.abs(f64(t))) /
                               math.sqrt(qp), rtol=1e-5)
  tb = jnp.asarray(t, jnp.bfloat16)
  s = lsq.init_step_size(tb, qp=7)
  assert s.dtype == jnp.float32
  np.testing.assert_allclose(float(s), 2 * np.mean(np.abs(f64(tb))) /
                             math.sqrt(7), rtol=1e-5)


def test_init_step_size_of_zeros_is_one():
  for dtype in (jnp.float32, jnp.bfloat16):
    s = lsq.init_step_size(jnp.zeros((3, 5), dtype), qp=7)
    assert s.dtype == jnp.float32 and float(s) == 1.0
  # Under jit too (the zero test is a traced select, not Python control flow).
  s = jax.jit(lambda t: lsq.init_step_size(t, qp=7))(jnp.zeros((4,)))
  assert float(s) == 1.0


def test_grad_scale_formula():
  for numel, qp in [(1, 7), (4096, 7), (12345, 3), (10 ** 8, 7)]:
    g = lsq.grad_scale(numel, qp=qp)
    assert isinstance(g, float)
    assert math.isclose(g, 1.0 / math.sqrt(qp * numel), rel_tol=1e-12)


# ------------------------------------------------------------ fake_quantize --

@pytest.mark.parametrize("qn, qp", RANGES)
def test_fake_quantize_value_and_gradients(qn, qp):
  rng = np.random.default_rng(2)
  s = np.float32(0.25)                      # a power of two: t / s is exact
  v = np.concatenate([rng.uniform(-12, 12, 500),
                      special_values(qn, qp)[:60]]).astype(np.float32)
  t = (v * s).astype(np.float32)
  up = rng.normal(0, 1, t.shape).astype(np.float32)
  @jax.jit
  def value_and_vjp(t, s, up):
    out, vjp = jax.vjp(lambda t, s: lsq.fake_quantize(t, s, qn=qn, qp=qp),
                       t, s)
    return (out,) + vjp(up)

  out, dt, ds = value_and_vjp(jnp.asarray(t), jnp.float32(s), jnp.asarray(up))

  v64 = f64(v)
  np.testing.assert_array_equal(f64(out), s * np_quantize(v64, qn, qp))
  inside = (v64 >= -qn) & (v64 <= qp)
  assert inside.any() and (~inside).any() and (v64 == qp).any()
  # dL/dT: the upstream gradient where -qn <= v <= qp, zero elsewhere.
  assert dt.dtype == jnp.float32 and dt.shape == t.shape
  np.testing.assert_array_equal(f64(dt), np.where(inside, f64(up), 0.0))
  # dL/ds = g * sum(up * delta), g = 1 / sqrt(qp * numel).
  assert ds.dtype == jnp.float32 and ds.shape == ()
  want = np.sum(f64(up) * np_delta(v64, qn, qp)) / math.sqrt(qp * t.size)
  np.testing.assert_allclose(float(ds), want, rtol=1e-5, atol=1e-6)


def test_fake_quantize_grads_under_jit_and_shapes():
  rng = np.random.default_rng(3)
  t = jnp.asarray(rng.normal(0, 1, (4, 6)), jnp.float32)
  s = jnp.full((1,), 0.3, jnp.float32)      # s may carry a shape
  loss = lambda t, s: jnp.sum(jnp.sin(lsq.fake_quantize(t, s)))
  gt, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(t, s)
  assert gt.shape == t.shape and gs.shape == s.shape
  v = f64(t) / 0.3
  up = np.cos(f64(lsq.fake_quantize(t, s)))
  np.testing.assert_allclose(f64(gt), np.where(np.abs(v) <= 7, up, 0.0),
                             rtol=1e-5)
  want = np.sum(up * np_delta(v, 7, 7)) / math.sqrt(7 * t.size)
  np.testing.assert_allclose(f64(gs)[0], want, rtol=1e-4, atol=1e-6)


def test_fake_quantize_bfloat16_keeps_dtype():
  t = jnp.asarray([0.3, -2.6, 9.0, 0.9], jnp.bfloat16)
  s = jnp.float32(0.5)
  out, vjp = jax.vjp(lambda t, s: lsq.fake_quantize(t, s), t, s)
  assert out.dtype == jnp.bfloat16
  dt, ds = vjp(jnp.ones_like(out))
  assert dt.dtype == jnp.bfloat16 and ds.dtype == jnp.float32
  np.testing.assert_array_equal(f64(dt), [1.0, 1.0, 0.0, 1.0])   # 18 > 7


def test_check_grads_in_the_limit_of_fine_steps():
  # With s tiny against T and a range wide enough to hold every T / s,
  # s * int_s(T) ~ T and the STE gradient is the true gradient: finite
  # differences with eps >> s agree up to O(s / eps).
  big = 2 ** 20
  s = jnp.float32(1e-4)
  t = jnp.asarray(np.random.default_rng(4).normal(0, 1, (16,)), jnp.float32)
  assert float(jnp.max(jnp.abs(t))) / 1e-4 < big
  f = jax.jit(lambda t: lsq.fake_quantize(t, s, qn=big, qp=big))
  check_grads(f, (t,), order=1, modes=("rev",), eps=1e-2, atol=2e-2,
              rtol=2e-2)


def test_check_grads_rejects_coarse_steps():
  # The same check is not vacuous: with coarse steps the STE is not the
  # derivative of the staircase and finite differences disagree.
  s = jnp.float32(0.5)
  t = jnp.asarray(np.random.default_rng(4).normal(0, 1, (16,)), jnp.float32)
  f = jax.jit(lambda t: lsq.fake_quantize(t, s, qn=7, qp=7))
  with pytest.raises(AssertionError):
    check_grads(f, (t,), order=1, modes=("rev",), eps=1e-2, atol=2e-2,
                rtol=2e-2)


# ------------------------------------------------------ backward state code --

@functools.partial(jax.jit, static_argnames=("qn", "qp"))
def _encode_decode(v, u, qn, qp):
  code, flags = lsq.encode_backward_state(v, u, qn=qn, qp=qp)
  q, mask, dhat = lsq.decode_backward_state(code, flags, qn=qn, qp=qp)
  return code, flags, q, mask, dhat


def encode_decode(v, u, qn, qp):
  return _encode_decode(jnp.asarray(v), jnp.asarray(u), qn=qn, qp=qp)


@pytest.mark.parametrize("qn, qp", RANGES)
def test_encode_decode_exact_parts(qn, qp):
  rng = np.random.default_rng(5)
  v = np.concatenate([rng.uniform(-20, 20, 3000),
                      special_values(qn, qp)]).astype(np.float32)
  v64 = f64(v)
  for u in (rng.uniform(0, 1, v.shape), np.zeros(v.shape),
            np.full(v.shape, np.nextafter(np.float32(1), np.float32(0)))):
    u = u.astype(np.float32)
    code, flags, q, mask, dhat = encode_decode(v, u, qn, qp)
    assert code.dtype == jnp.int8 and flags.dtype == jnp.uint8
    assert q.dtype == jnp.int8 and mask.dtype == jnp.bool_
    assert dhat.dtype == jnp.float32
    code, flags = f64(code), np.asarray(flags)
    assert ((code >= -8) & (code <= 7)).all()
    assert flags.max() <= (1 if qn <= 7 else 3)
    # q is int_s(T) for every element, the mask the STE mask.
    np.testing.assert_array_equal(f64(q), np_quantize(v64, qn, qp))
    inside = (v64 >= -qn) & (v64 <= qp)
    np.testing.assert_array_equal(np.asarray(mask), inside)
    np.testing.assert_array_equal(np.asarray(mask),
                                  np.asarray(lsq.in_range(jnp.asarray(v),
                                                          qn=qn, qp=qp)))
    dhat = f64(dhat)
    # Clipped: delta_hat is delta exactly (-qn or qp).
    np.testing.assert_array_equal(dhat[~inside], np_delta(v64, qn, qp)[~inside])
    # Inside: one bit, +-1/2; deterministic where delta is +-1/2 (ties).
    assert np.isin(dhat[inside], [-0.5, 0.5]).all()
    d = np_delta(v64, qn, qp)
    tie = inside & (np.abs(d) == 0.5)
    assert tie.any()
    np.testing.assert_array_equal(dhat[tie], d[tie])
    if qn <= 7:   # the spare code -8 marks the clip
      np.testing.assert_array_equal(code == lsq.CLIP_CODE, ~inside)
    else:         # bit 1 marks it
      np.testing.assert_array_equal((flags >> 1) & 1, ~inside)


def test_encode_with_extreme_noise_rounds_delta_down_or_up():
  # u = 0: the bit is 1 iff delta > -1/2 (P = delta + 1/2 > 0); u -> 1: iff
  # delta >= 1/2 - 2^-24: delta_hat brackets delta from the two sides.
  v = np.float32([0.1, 0.4, -0.3, 3.75, -6.2])
  d = np_delta(f64(v), 7, 7)
  lo = f64(encode_decode(v, np.zeros(5, np.float32), 7, 7)[4])
  hi = f64(encode_decode(v, np.full(5, 0.9999999, np.float32), 7, 7)[4])
  np.testing.assert_array_equal(lo, np.full(5, 0.5))
  np.testing.assert_array_equal(hi, np.full(5, -0.5))
  assert (lo >= d).all() and (hi <= d).all()


@pytest.mark.parametrize("qn, qp", RANGES)
def test_delta_hat_is_unbiased(qn, qp):
  rng = np.random.default_rng(6)
  v = np.concatenate([rng.uniform(-qn - 2, qp + 2, 200),
                      [0.5, -0.5, 2.5, 0.25, -0.25, 0.49, -0.49]]
                     ).astype(np.float32)

  @jax.jit
  def mean_dhat(v, u):
    dhat = jax.vmap(lambda u: encode_decode_traced(v, u, qn, qp))(u)
    return jnp.mean(dhat, axis=0)

  u = np.random.default_rng(7).random((N_DRAWS,) + v.shape, np.float32)
  m = f64(mean_dhat(jnp.asarray(v), jnp.asarray(u)))
  d = np_delta(f64(v), qn, qp)
  tol = hoeffding_tol(1.0, N_DRAWS, v.size)
  assert tol < 0.05             # a bias of 0.05 (10% of the range) would show
  err = np.abs(m - d)
  assert (err <= tol).all(), (np.max(err), tol)
  outside = (f64(v) < -qn) | (f64(v) > qp)
  assert outside.any()
  np.testing.assert_array_equal(m[outside], d[outside])   # exact, no noise


def encode_decode_traced(v, u, qn, qp):
  code, flags = lsq.encode_backward_state(v, u, qn=qn, qp=qp)
  return lsq.decode_backward_state(code, flags, qn=qn, qp=qp)[2]


def test_unbiasedness_check_detects_bias():
  # A biased estimator (delta_hat = sign(delta) / 2, i.e. deterministic)
  # fails the same tolerance for most elements.
  rng = np.random.default_rng(8)
  v = rng.uniform(-7, 7, 200)
  d = np_delta(v, 7, 7)
  biased = 0.5 * np.sign(d)
  tol = hoeffding_tol(1.0, N_DRAWS, v.size)
  assert np.mean(np.abs(biased - d) > tol) > 0.8


def test_init_step_size_keeps_nan_visible():
  s = lsq.init_step_size(jnp.asarray([1.0, jnp.nan]), qp=7)
  assert bool(jnp.isnan(s))


def _relative_error(t, s, qn=7, qp=7):
  return float(jnp.linalg.norm(lsq.fake_quantize_value(t, s, qn=qn, qp=qp) - t)
               / jnp.linalg.norm(t))


def test_mse_step_size_of_a_gaussian_is_about_0_34_sigma_with_less_error():
  t = jax.random.normal(jax.random.key(3), (4096, 64)) * 3.0
  rule, best = lsq.init_step_size(t, qp=7), lsq.mse_step_size(t, qn=7, qp=7)
  # LSQ's rule: 2 E|T| / sqrt(7) = 0.603 sigma; the error minimum of a
  # 15-level uniform quantizer of a Gaussian: about 0.34 sigma.
  assert 0.58 * 3.0 < float(rule) < 0.62 * 3.0
  assert 0.32 * 3.0 < float(best) < 0.37 * 3.0
  assert _relative_error(t, best) < 0.7 * _relative_error(t, rule)
  # No other step of the search does better.
  for factor in lsq.MSE_SEARCH_FACTORS:
    assert _relative_error(t, best) <= _relative_error(t, rule * factor) + 1e-6


def test_mse_step_size_follows_the_range_of_the_tensor():
  """A uniform tensor is best quantized with bins spanning its range, larger
  than the Gaussian's factor of the LSQ rule."""
  t = jax.random.uniform(jax.random.key(4), (8192,), minval=-1.0, maxval=1.0)
  best = float(lsq.mse_step_size(t, qn=7, qp=7))
  assert 0.12 < best < 0.16   # about 2 / 15: the range in 15 bins


def test_mse_step_size_edge_cases():
  assert float(lsq.mse_step_size(jnp.zeros((4, 4)), qn=7, qp=7)) == 1.0
  assert float(lsq.mse_step_size(jnp.zeros((0,)), qn=7, qp=7)) == 1.0
  assert math.isnan(float(lsq.mse_step_size(jnp.array([1.0, jnp.nan]), qn=7, qp=7)))
  assert math.isinf(float(lsq.mse_step_size(jnp.array([1.0, jnp.inf]), qn=7, qp=7)))
  t = jax.random.normal(jax.random.key(5), (64, 32))
  np.testing.assert_allclose(jax.jit(functools.partial(lsq.mse_step_size, qn=7, qp=7))(t),
                             lsq.mse_step_size(t, qn=7, qp=7), rtol=1e-6)
  assert lsq.step_size_rule(t, "lsq", qn=7, qp=7) == lsq.init_step_size(t, qp=7)
