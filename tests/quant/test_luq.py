"""Tests for the LUQ gradient-quantizer baseline (jint4.quant.luq)."""

from functools import partial
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint4.quant.luq import luq_quantize
from tests.stats import hoeffding_tol

N_DRAWS = 8000       # noise draws for the unbiasedness test


def reference_levels(g, bits):
  """Magnitude levels {0} U {alpha 2^k, k < n}, alpha = max|g| / 2^(n-1)."""
  n = 2 ** (bits - 1) - 1
  amax = float(np.max(np.abs(g)))
  alpha = amax / 2.0 ** (n - 1)
  return np.concatenate([[0.0], alpha * 2.0 ** np.arange(n)])


def neighbours(g, bits):
  """Levels lo <= |g| <= hi around each element (float64 reference)."""
  levels = reference_levels(g, bits)
  a = np.abs(g)
  idx = np.clip(np.searchsorted(levels, a, side="right") - 1, 0,
                len(levels) - 1)
  lo = levels[idx]
  hi = np.where(lo == a, a, levels[np.minimum(idx + 1, len(levels) - 1)])
  return lo, hi


quantize = jax.jit(luq_quantize, static_argnames="bits")


def make_grad(seed, shape=(256,), dtype=jnp.float32):
  """Log-uniform magnitudes over 5 decades (covers underflow and all octaves),
  random signs, some exact zeros."""
  rng = np.random.default_rng(seed)
  mag = 3.0 * np.exp(rng.uniform(math.log(1e-5), 0.0, shape))
  g = np.where(rng.random(shape) < 0.5, -mag, mag).reshape(-1)
  g[:4] = 0.0
  return jnp.asarray(g.reshape(shape), dtype)


def noise(seed, shape):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape)


@partial(jax.jit, static_argnames="n")
def draws(g, key, n):
  u = jax.random.uniform(key, (n,) + g.shape)
  q = jax.vmap(luq_quantize, in_axes=(None, 0))(g, u)
  return q.astype(jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unbiased(dtype):
  g = make_grad(0, dtype=dtype)
  q = np.asarray(draws(g, jax.random.PRNGKey(1), N_DRAWS), np.float64)
  g64 = np.asarray(g.astype(jnp.float32), dtype=np.float64)
  lo, hi = neighbours(g64, 4)

  # Every sample is sign(g) * (lo or hi).
  mag = np.abs(q)
  rel = 1e-6 * np.max(np.abs(g64))
  on_grid = (np.abs(mag - lo) <= rel) | (np.abs(mag - hi) <= rel)
  assert on_grid.all()
  assert (np.sign(q) * np.sign(g64) >= 0).all()

  tol = hoeffding_tol(hi - lo, N_DRAWS, g.size) + rel
  err = np.abs(q.mean(axis=0) - g64)
  assert (err <= tol).all(), np.max(err / tol)


def test_tolerance_detects_bias():
  """The same check rejects a biased quantizer (round to nearest: u = 0.5)."""
  g = make_grad(0)
  g64 = np.asarray(g, dtype=np.float64)
  lo, hi = neighbours(g64, 4)
  nearest = np.asarray(quantize(g, jnp.full(g.shape, 0.5)), np.float64)
  tol = hoeffding_tol(hi - lo, N_DRAWS, g.size)
  # Any bias above 5% of the local level gap is detectable ...
  assert (tol <= 0.05 * (hi - lo)).all()
  # ... and nearest rounding is rejected (its bias is 0 only where |g| sits
  # on a level, and small for the many tiny values below alpha).
  err = np.abs(nearest - g64)
  assert np.mean(err > tol) > 0.3


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_levels_fit_in_bits(bits):
  g = make_grad(2)
  q = np.asarray(quantize(g, noise(3, g.shape), bits=bits), np.float64)
  mags = np.unique(np.abs(q))
  assert len(mags) <= 2 ** (bits - 1)      # + sign bit => `bits` bits
  levels = reference_levels(np.asarray(g, np.float64), bits)
  assert np.isin(mags, levels.astype(np.float32)).all()


def test_level_set_4bit_and_max_representable():
  g = make_grad(4)
  amax = float(jnp.max(jnp.abs(g)))
  expected = np.float32(amax) * np.float32(2.0) ** np.arange(-6, 1)
  q = np.asarray(quantize(g, noise(5, g.shape)))
  assert set(np.unique(np.abs(q))) <= {np.float32(0)} | set(expected)
  i = int(jnp.argmax(jnp.abs(g)))
  for uu in (0.0, 0.5, 0.999999):           # max|g| is kept exactly
    qi = quantize(g, jnp.full(g.shape, uu))[i]
    assert qi == g[i]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zeros(dtype):
  g = jnp.zeros((256,), dtype)
  q = quantize(g, noise(6, g.shape))
  assert q.dtype == dtype
  assert not jnp.isnan(q).any()
  assert (q == 0).all()


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nonfinite_gives_nan(bad, dtype):
  g = make_grad(7, dtype=dtype).at[10].set(bad)
  q = quantize(g, noise(8, g.shape))
  assert jnp.isnan(q).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_and_shape(dtype):
  g = make_grad(9, (3, 4, 32), dtype)
  q = quantize(g, noise(10, g.shape))
  assert q.dtype == dtype and q.shape == g.shape


def test_jit_matches_eager():
  g = make_grad(11)
  u = noise(12, g.shape)
  np.testing.assert_array_equal(np.asarray(luq_quantize(g, u)),
                                np.asarray(quantize(g, u)))


def test_rejects_bad_args():
  g = jnp.ones((4,))
  with pytest.raises(ValueError):
    luq_quantize(g, jnp.zeros((4,)), bits=1)
  with pytest.raises(ValueError):
    luq_quantize(g, jnp.zeros((5,)))
