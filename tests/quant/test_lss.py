"""Leverage score sampling: valid probabilities, exact inclusion, unbiasedness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint4.quant import lss

# Jitted once for the module: eager op-by-op dispatch dominated these tests.
_sample_rows = jax.jit(lss.sample_rows, static_argnums=1)
_systematic_sample = jax.jit(lss.systematic_sample, static_argnums=1)
_probabilities = jax.jit(lss.inclusion_probabilities, static_argnums=1)

def _scores(n=64, seed=0):
  rng = np.random.default_rng(seed)
  c = rng.lognormal(size=n).astype(np.float32)
  c[rng.random(n) < 0.2] = 0.0      # structurally zero rows
  c[:3] *= 50.0                     # a few dominant rows
  return jnp.asarray(c)


@pytest.mark.parametrize("budget", [1, 8, 30, 64])
def test_probabilities_are_valid(budget):
  c = _scores()
  p = np.asarray(_probabilities(c, budget))
  assert np.all(p >= 0) and np.all(p <= 1)
  assert np.all(p[np.asarray(c) == 0] == 0)
  nonzero = int(np.sum(np.asarray(c) > 0))
  np.testing.assert_allclose(p.sum(), min(budget, nonzero), rtol=1e-5)
  # Unclamped rows are proportional to their scores.
  free = (p < 1) & (p > 0)
  if free.sum() > 1:
    ratio = p[free] / np.asarray(c)[free]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_kept_count_is_static_and_indices_sorted():
  c = _scores()
  index, weight = _sample_rows(c, 16, jnp.float32(0.3))
  slots = lss.num_slots(16, c.shape[0])
  assert 16 <= slots <= 17
  assert index.shape == (slots,) and weight.shape == (slots,)
  assert int(jnp.sum(weight > 0)) <= 16
  kept = np.asarray(index)[np.asarray(weight) > 0]
  assert np.all(np.diff(kept) > 0)  # each row at most once


def test_inclusion_frequency_matches_probability():
  c = _scores(n=40, seed=1)
  budget = 10
  p = np.asarray(_probabilities(c, budget))
  draws = 20000
  us = jax.random.uniform(jax.random.key(0), (draws,))
  sample = jax.jit(jax.vmap(lambda u: lss.systematic_sample(jnp.asarray(p), budget, u)))
  index, weight = sample(us)
  counts = np.zeros_like(p)
  np.add.at(counts, np.asarray(index)[np.asarray(weight) > 0], 1)
  freq = counts / draws
  unit = lss.probability_unit(budget, p.shape[0])
  p = np.where(p > 0, np.maximum(np.floor(p * unit), 1) / unit, 0)  # fixed point
  tol = 5 * np.sqrt(p * (1 - p) / draws) + 1e-6
  assert np.all(np.abs(freq - p) <= tol)
  assert np.all(freq[p == 1] == 1.0)


def test_probability_one_rows_always_kept_in_long_sums():
  n = 50000
  p = np.full(n, 0.3, np.float32)
  p[::7] = 1.0
  budget = int(round(p.sum()))
  p = jnp.asarray(p * (budget / p.sum()))
  p = jnp.minimum(p, 1.0)
  for u in (0.0, 0.5, 0.999999):
    index, weight = _systematic_sample(p, budget, jnp.float32(u))
    kept = set(np.asarray(index)[np.asarray(weight) > 0].tolist())
    ones = set(np.flatnonzero(np.asarray(p) == 1.0).tolist())
    assert ones <= kept


def _estimate(a, b, key, budget):
  """Horvitz-Thompson estimate of a^T b from sampled rows."""
  scores = jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1)
  index, weight = lss.sample_rows(scores, budget, jax.random.uniform(key))
  return jnp.einsum("r,ri,rj->ij", weight, a[index], b[index])


def _uniform_estimate(a, b, key, budget):
  n = a.shape[0]
  index = jax.random.choice(key, n, (budget,), replace=False)
  return (n / budget) * a[index].T @ b[index]


def test_unbiased_at_sqrt_n_rate_and_beats_uniform():
  rng = np.random.default_rng(3)
  n, budget = 64, 16
  row_scale = rng.lognormal(sigma=1.5, size=(n, 1)).astype(np.float32)
  a = jnp.asarray(rng.normal(size=(n, 5)).astype(np.float32) * row_scale)
  b = jnp.asarray(rng.normal(size=(n, 4)).astype(np.float32))
  exact = np.asarray(a.T @ b)
  keys = jax.random.split(jax.random.key(1), 8000)
  est = np.asarray(jax.jit(jax.vmap(lambda k: _estimate(a, b, k, budget)))(keys))
  uni = np.asarray(jax.jit(jax.vmap(lambda k: _uniform_estimate(a, b, k, budget)))(keys))
  scale = np.linalg.norm(exact)
  errs = []
  for m in (500, 2000, 8000):
    err = np.linalg.norm(est[:m].mean(0) - exact)
    sem = np.sqrt(est[:m].var(0).sum() / m)
    assert err <= 5 * sem + 1e-4 * scale, (m, err, sem)
    errs.append(err)
  assert errs[-1] < errs[0]
  # Leverage-score sampling has lower total variance than uniform sampling.
  assert est.var(0).sum() < 0.5 * uni.var(0).sum()


def test_fewer_nonzero_rows_than_budget():
  c = jnp.asarray([0.0, 2.0, 0.0, 1.0], jnp.float32)
  index, weight = _sample_rows(c, 3, jnp.float32(0.4))
  kept = sorted(np.asarray(index)[np.asarray(weight) > 0].tolist())
  assert kept == [1, 3]
  np.testing.assert_array_equal(np.asarray(weight)[np.asarray(weight) > 0], 1.0)


def test_all_zero_scores_keep_nothing():
  index, weight = _sample_rows(jnp.zeros(8), 4, jnp.float32(0.2))
  assert np.all(np.asarray(weight) == 0)
  assert np.all((np.asarray(index) >= 0) & (np.asarray(index) < 8))


def test_budget_rows():
  assert lss.budget_rows(100, 1.0) == 100
  assert lss.budget_rows(100, 0.25) == 25
  assert lss.budget_rows(3, 0.1) == 1
  assert lss.budget_rows(10, 2.0) == 20


def test_pad_slots_appends_empty_slots_that_change_nothing():
  c = _scores()
  index, weight = _sample_rows(c, 16, jnp.float32(0.3))
  a = jnp.asarray(np.random.default_rng(0).normal(size=(c.shape[0], 3)), jnp.float32)
  padded_index, padded_weight = lss.pad_slots(index, weight, 128)
  assert padded_index.shape[0] % 128 == 0 and padded_index.shape[0] >= index.shape[0]
  assert padded_index.shape == padded_weight.shape
  np.testing.assert_array_equal(padded_index[:index.shape[0]], index)
  np.testing.assert_array_equal(padded_weight[index.shape[0]:], 0.0)
  np.testing.assert_array_equal(np.einsum("r,ri->i", padded_weight, a[padded_index]),
                                np.einsum("r,ri->i", weight, a[index]))
  assert lss.pad_slots(padded_index, padded_weight, 128)[0].shape == padded_index.shape
  assert lss.pad_slots(index, weight, 16)[0].shape == (-(-index.shape[0] // 16) * 16,)
  with pytest.raises(ValueError, match="multiple must be >= 1"):
    lss.pad_slots(index, weight, 0)
