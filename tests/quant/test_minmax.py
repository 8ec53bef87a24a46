"""Tests for the min-max stochastic quantizer baseline (jint4.quant.minmax)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint4.quant.minmax import minmax_quantize
from tests.stats import hoeffding_tol

N_DRAWS = 8000       # noise draws for the unbiasedness test


def grid(g, bits):
  """(min, bin width) of the reference grid min + k * s, k = 0 .. 2^bits-1."""
  lo, hi = float(np.min(g)), float(np.max(g))
  return lo, (hi - lo) / (2 ** bits - 1)


quantize = jax.jit(minmax_quantize, static_argnames="bits")


def make_grad(seed, shape=(256,), dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  g = rng.normal(0.003, 0.02, shape)          # asymmetric range
  return jnp.asarray(g, dtype)


def noise(seed, shape):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape)


@partial(jax.jit, static_argnames="n")
def draws(g, key, n):
  u = jax.random.uniform(key, (n,) + g.shape)
  q = jax.vmap(minmax_quantize, in_axes=(None, 0))(g, u)
  return q.astype(jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unbiased(dtype):
  g = make_grad(0, dtype=dtype)
  q = np.asarray(draws(g, jax.random.PRNGKey(1), N_DRAWS), np.float64)
  g64 = np.asarray(g.astype(jnp.float32), dtype=np.float64)
  gmin, s = grid(g64, 4)

  # Grid points lo + k*s are rounded to the output dtype: relative error
  # <= 2^-24 (float32) or 2^-9 (bfloat16). That rounding is a small bias of
  # its own, absorbed by `eps` (a 2x margin over the bfloat16 bound).
  rel = 4 * 2.0 ** -24 if dtype == jnp.float32 else 2.0 ** -8
  eps = rel * np.max(np.abs(g64))
  v = (g64 - gmin) / s
  lo = gmin + np.floor(v) * s
  on_grid = (np.abs(q - lo) <= eps) | (np.abs(q - (lo + s)) <= eps)
  assert on_grid.all()

  tol = hoeffding_tol(s, N_DRAWS, g.size) + eps
  err = np.abs(q.mean(axis=0) - g64)
  assert (err <= tol).all(), np.max(err / tol)


def test_tolerance_detects_bias():
  """The same check rejects a biased quantizer (round to nearest: u = 0.5)."""
  g = make_grad(0)
  g64 = np.asarray(g, dtype=np.float64)
  _, s = grid(g64, 4)
  nearest = np.asarray(quantize(g, jnp.full(g.shape, 0.5)), np.float64)
  tol = hoeffding_tol(s, N_DRAWS, g.size)
  assert tol <= 0.05 * s                  # any bias above 5% of a bin shows
  assert np.mean(np.abs(nearest - g64) > tol) > 0.8


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_levels_fit_in_bits(bits):
  g = make_grad(2)
  q = np.asarray(quantize(g, noise(3, g.shape), bits=bits), np.float64)
  assert len(np.unique(q)) <= 2 ** bits
  gmin, s = grid(np.asarray(g, np.float64), bits)
  k = (q - gmin) / s
  np.testing.assert_allclose(k, np.round(k), atol=1e-4)
  assert k.min() > -1e-4 and k.max() < 2 ** bits - 1 + 1e-4


def test_extremes_representable():
  g = make_grad(4)
  for uu in (0.0, 0.5, 0.999999):
    q = quantize(g, jnp.full(g.shape, uu))
    assert q[jnp.argmin(g)] == jnp.min(g)
    np.testing.assert_allclose(q[jnp.argmax(g)], jnp.max(g), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("value", [0.0, -1.25])
def test_constant_input(dtype, value):
  g = jnp.full((256,), value, dtype)
  q = quantize(g, noise(6, g.shape))
  assert q.dtype == dtype
  assert not jnp.isnan(q).any()
  assert (q == value).all()


def test_huge_finite_range():
  g = jnp.array([-3e38, 0.0, 1e38, 3e38], jnp.float32)
  q = quantize(g, jnp.zeros(g.shape))
  assert jnp.isfinite(q).all()
  assert q[0] == g[0]


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
  np.testing.assert_allclose(np.asarray(minmax_quantize(g, u)),
                             np.asarray(quantize(g, u)), rtol=1e-6, atol=1e-9)


def test_rejects_bad_args():
  g = jnp.ones((4,))
  with pytest.raises(ValueError):
    minmax_quantize(g, jnp.zeros((4,)), bits=0)
  with pytest.raises(ValueError):
    minmax_quantize(g, jnp.zeros((5,)))
