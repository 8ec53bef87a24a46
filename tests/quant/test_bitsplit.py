"""Tests for bit splitting of the output gradient (jint4.quant.bitsplit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint4.quant import bitsplit
from tests.stats import hoeffding_tol

N_DRAWS = 6000       # noise draws for the unbiasedness test

split = jax.jit(bitsplit.bit_split)


def f64(a):
  return np.asarray(a, np.float64)


def make_grad(seed, shape=(32, 24), dtype=jnp.float32):
  """A gradient with a few large rows (the structure bit splitting targets)."""
  rng = np.random.default_rng(seed)
  g = rng.normal(0, 1e-3, shape).reshape(-1, shape[-1])
  g[rng.choice(g.shape[0], 3, replace=False)] *= 50.0
  return jnp.asarray(g.reshape(shape), dtype)


def noise(seed, shape):
  """Uniform [0, 1) float32 noise (numpy: no PRNG compile on the CPU)."""
  return jnp.asarray(np.random.default_rng(seed).random(shape, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_halves_scales_and_error_bound(dtype):
  g = make_grad(0, dtype=dtype)
  hi, lo, s_hi, s_lo = split(g, noise(1, g.shape))
  assert hi.dtype == lo.dtype == jnp.int8
  assert hi.shape == lo.shape == g.shape
  assert s_hi.dtype == s_lo.dtype == jnp.float32
  assert s_hi.shape == s_lo.shape == ()
  hi, lo, s_hi, s_lo = f64(hi), f64(lo), float(s_hi), float(s_lo)
  assert np.abs(hi).max() <= 7 and np.abs(lo).max() <= 7
  assert np.abs(hi).max() == 7            # the max element uses the top code
  g64 = f64(g)                            # bf16 -> f32 is exact
  m = np.max(np.abs(g64))
  np.testing.assert_allclose(s_hi, m / 7, rtol=1e-6)
  np.testing.assert_allclose(s_hi, 14 * s_lo, rtol=1e-6)
  np.testing.assert_allclose(s_lo, m / 98, rtol=1e-6)
  # Within one low step of G, elementwise.
  err = np.abs(s_hi * hi + s_lo * lo - g64)
  assert (err <= s_lo * (1 + 1e-5)).all(), err.max() / s_lo


def test_hi_rounds_to_nearest_and_lo_rounds_the_remainder():
  g = make_grad(2)
  u = noise(3, g.shape)
  hi, lo, s_hi, s_lo = map(f64, split(g, u))
  t = 98 * f64(g) / np.max(np.abs(f64(g)))
  # hi = round(t / 14): |t - 14 hi| <= 7, and hi is the nearest integer to
  # t / 14 (exact comparison except within float noise of a .5 tie).
  assert (np.abs(t - 14 * hi) <= 7 + 1e-4).all()
  frac = np.abs(t / 14 - np.round(t / 14))
  clear = np.abs(frac - 0.5) > 1e-5
  np.testing.assert_array_equal(hi[clear], np.round(t / 14)[clear])
  # lo is floor or ceil of the remainder r = t - 14 hi, picked by the noise:
  # lo = floor(r + u).
  r = t - 14 * hi
  assert ((lo == np.floor(r)) | (lo == np.ceil(r))
          | (np.abs(r - np.round(r)) < 1e-4)).all()
  exp = np.floor(r + f64(u))
  clear = np.abs((r + f64(u)) - np.round(r + f64(u))) > 1e-4
  np.testing.assert_array_equal(lo[clear], exp[clear])
  # Both roundings of the low half occur.
  assert (lo == np.floor(r)).any() and (lo == np.ceil(r)).any()


def test_constant_max_keeps_both_roundings():
  """With M a compile-time constant, hi is still round(fl(fl(g 98 / M) / 14))
  (the native handlers' arithmetic), not g (98 / M / 14) in one rounding:
  g = fl((2k + 1) / 14) and its neighbours sit on the ties of t / 14."""
  g = np.arange(-7, 7) * (2 / 14) + 1 / 14
  g = np.concatenate([g, np.nextafter(g.astype(np.float32), 2), np.nextafter(
      g.astype(np.float32), -2)]).astype(np.float32)
  hi = np.asarray(jax.jit(lambda g: bitsplit.bit_split(g, jnp.zeros_like(g), 1.0)[0])(g))
  t = g * np.float32(98.0)
  np.testing.assert_array_equal(hi, np.clip(np.round(t * bitsplit.INV_HI_STEP), -7, 7))


def test_extreme_noise_gives_floor_and_ceil():
  g = make_grad(4)
  t = 98 * f64(g) / np.max(np.abs(f64(g)))
  hi = np.round(t / 14)
  r = t - 14 * hi
  clear = np.abs(r - np.round(r)) > 1e-4
  _, lo0, _, _ = map(f64, split(g, jnp.zeros(g.shape)))
  _, lo1, _, _ = map(f64, split(g, jnp.full(g.shape, 0.9999999)))
  np.testing.assert_array_equal(lo0[clear], np.floor(r)[clear])
  np.testing.assert_array_equal(lo1[clear], np.ceil(r)[clear])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unbiased(dtype):
  g = make_grad(5, shape=(16, 16), dtype=dtype)

  @jax.jit
  def mean_recon(g, u):
    hi, lo, s_hi, s_lo = jax.vmap(lambda u: bitsplit.bit_split(g, u))(u)
    rec = (s_hi[:, None, None] * hi.astype(jnp.float32)
           + s_lo[:, None, None] * lo.astype(jnp.float32))
    return jnp.mean(rec, axis=0), s_lo[0]

  m, s_lo = mean_recon(g, noise(6, (N_DRAWS,) + g.shape))
  g64 = f64(g)
  # Each draw is one of two adjacent levels, s_lo apart.
  tol = hoeffding_tol(float(s_lo), N_DRAWS, g.size) + 1e-5 * float(s_lo)
  assert tol < 0.05 * float(s_lo)   # any bias above 5% of a step shows
  err = np.abs(f64(m) - g64)
  assert (err <= tol).all(), np.max(err) / tol


def test_unbiasedness_check_detects_bias():
  # Rounding the low half to nearest (u = 1/2) is biased by up to s_lo / 2:
  # the same tolerance rejects it for most elements.
  g = make_grad(5, shape=(16, 16))
  hi, lo, s_hi, s_lo = map(f64, split(g, jnp.full(g.shape, 0.5)))
  err = np.abs(s_hi * hi + s_lo * lo - f64(g))
  tol = hoeffding_tol(s_lo, N_DRAWS, g.size)
  assert np.mean(err > tol) > 0.8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_zero_gradient(dtype):
  g = jnp.zeros((8, 4), dtype)
  hi, lo, s_hi, s_lo = split(g, noise(7, g.shape))
  assert not np.asarray(hi).any() and not np.asarray(lo).any()
  assert float(s_hi) == 0.0 and float(s_lo) == 0.0   # finite, no 0/0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_gradient_gives_non_finite_scales(bad, dtype):
  g = make_grad(8, shape=(8, 4), dtype=dtype).at[3, 2].set(bad)
  hi, lo, s_hi, s_lo = split(g, noise(9, g.shape))
  assert not np.isfinite(float(s_hi)) and not np.isfinite(float(s_lo))
  assert hi.dtype == lo.dtype == jnp.int8
  assert (np.abs(f64(hi)) <= 7).all() and (np.abs(f64(lo)) <= 7).all()
  # Every dequantized value is non-finite too (0 * inf and nan propagate).
  with np.errstate(invalid="ignore"):
    rec = float(s_hi) * f64(hi) + float(s_lo) * f64(lo)
  assert not np.isfinite(rec).any()


def test_eager_matches_jit_and_any_shape():
  g = make_grad(10, shape=(2, 3, 16))
  u = noise(11, g.shape)
  eager = bitsplit.bit_split(g, u)
  jitted = split(g, u)
  for a, b in zip(eager, jitted):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert eager[0].shape == g.shape


# --- one scale per row ----------------------------------------------------------

split_rows = jax.jit(bitsplit.bit_split_rows)


def rows_of_many_sizes(seed, shape=(16, 24)):
  """Dense rows whose sizes span four decades (a language model's gradient)."""
  rng = np.random.default_rng(seed)
  sizes = 10.0 ** rng.uniform(-4, 0, shape[0])
  return jnp.asarray(rng.normal(size=shape) * sizes[:, None], jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_split_is_each_rows_own_split(dtype):
  g = rows_of_many_sizes(20).astype(dtype)
  u = noise(21, g.shape)
  hi, lo, s_hi, s_lo = split_rows(g, u)
  assert s_hi.shape == s_lo.shape == (g.shape[0],)
  m = np.max(np.abs(f64(g)), axis=1)
  np.testing.assert_allclose(f64(s_lo), m / 98, rtol=1e-6)
  np.testing.assert_allclose(f64(s_hi), m / 7, rtol=1e-6)
  # The largest entry of every row gets the top high digit, however small
  # the row: the high half carries the row.
  assert (np.max(np.abs(f64(hi)), axis=1) == 7).all()
  # Within one low step of its own row, not of the tensor's max.
  err = np.abs(f64(s_hi)[:, None] * f64(hi) + f64(s_lo)[:, None] * f64(lo) - f64(g))
  assert (err <= f64(s_lo)[:, None] * (1 + 1e-5)).all()
  # Exactly the per-tensor split of the row times its reciprocal.
  inv = bitsplit.row_reciprocals(bitsplit.row_abs_max(g))
  for i in (0, 7):
    h1, l1, _, _ = split(g[i:i + 1].astype(jnp.float32) * inv[i], u[i:i + 1], 1.0)
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(hi[i:i + 1]))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(lo[i:i + 1]))


def test_row_reciprocals_are_the_truncated_reciprocal():
  rng = np.random.default_rng(27)
  m = np.concatenate([10.0 ** rng.uniform(-37, 37, 2000), [1.0, 0.5, 3.0, 2.0 ** -126,
                                                           2.0 ** 125, 7.0]]).astype(np.float32)
  inv = np.asarray(bitsplit.row_reciprocals(jnp.asarray(m)), np.float64)
  exact = 1.0 / m.astype(np.float64)
  # Never above 1 / M (so |G / M| <= 1 survives rounding), at most one ulp
  # of float32 below it.
  assert (inv <= exact).all()
  assert (exact - inv <= np.spacing(exact.astype(np.float32)).astype(np.float64)).all()
  assert (np.asarray(jnp.asarray(m) * jnp.asarray(inv, jnp.float32)) <= 1.0).all()
  special = np.asarray(bitsplit.row_reciprocals(
      jnp.asarray([0.0, 1e-40, np.inf, np.nan], jnp.float32)))
  np.testing.assert_array_equal(special, [1.0, 1.0, 1.0, 1.0])


def test_row_split_unbiased():
  g = rows_of_many_sizes(22, shape=(8, 16))

  @jax.jit
  def mean_recon(u):
    hi, lo, s_hi, s_lo = jax.vmap(lambda u: bitsplit.bit_split_rows(g, u))(u)
    rec = (s_hi[..., None] * hi.astype(jnp.float32)
           + s_lo[..., None] * lo.astype(jnp.float32))
    return jnp.mean(rec, axis=0), s_lo[0]

  m, s_lo = mean_recon(noise(23, (N_DRAWS,) + g.shape))
  s_lo = f64(s_lo)[:, None]
  tol = hoeffding_tol(1.0, N_DRAWS, g.size) * s_lo + 1e-5 * s_lo
  assert (np.abs(f64(m) - f64(g)) <= tol).all()


def test_row_split_zero_rows_and_non_finite():
  g = rows_of_many_sizes(24, shape=(6, 8)).at[2].set(0.0)
  hi, lo, s_hi, s_lo = split_rows(g, noise(25, g.shape))
  assert not f64(hi[2]).any() and not f64(lo[2]).any()
  assert float(s_hi[2]) == 0.0 and np.isfinite(f64(s_hi)).all()
  # One NaN or Inf anywhere: every row's scales are NaN, not only its own.
  for bad in (np.nan, np.inf):
    _, _, s_hi, s_lo = split_rows(g.at[4, 1].set(bad), noise(25, g.shape))
    assert np.isnan(f64(s_hi)).all() and np.isnan(f64(s_lo)).all()


def test_unit_rows_never_exceed_one():
  g = rows_of_many_sizes(26, shape=(64, 33))
  for dtype in (jnp.float32, jnp.bfloat16):
    gd = g.astype(dtype)
    unit = bitsplit.unit_rows(gd, bitsplit.row_reciprocals(bitsplit.row_abs_max(gd)))
    assert unit.dtype == jnp.float32
    top = np.max(np.abs(np.asarray(unit)), axis=1)
    assert (top > 1 - 1e-6).all() and (top <= 1.0).all()


def test_as_float32_is_exact_for_every_narrow_float():
  """Every float16 (subnormals too: reduce_precision alone flushes them) and
  a sweep of bfloat16 values widen to their exact value."""
  f16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
  finite = f16[np.isfinite(f16)].astype(np.float64)
  bf16 = np.concatenate([finite * 2.0 ** s for s in (-130, -60, 0, 60)] + [[np.inf, np.nan]])
  for x in (jnp.asarray(f16), jnp.asarray(bf16, jnp.bfloat16)):
    got = np.asarray(jax.jit(bitsplit.as_float32)(x))
    want = np.asarray(x).astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_per_row_split_keeps_float16_subnormal_rows():
  # A float16 row below 2^-14 (all subnormal): its own scale, not zeros.
  g = jnp.asarray([[3e-5, -1e-6, 5e-7, 6e-5], [1.0, -0.5, 0.25, 0.0]], jnp.float16)
  hi, lo, s_hi, s_lo = jax.jit(bitsplit.bit_split_rows)(g, noise(27, g.shape))
  approx = f64(s_hi)[:, None] * f64(hi) + f64(s_lo)[:, None] * f64(lo)
  exact = f64(g.astype(jnp.float32))
  assert np.abs(f64(hi[0])).max() == 7
  np.testing.assert_allclose(approx, exact, atol=f64(s_lo)[:, None].max(axis=1).max())
