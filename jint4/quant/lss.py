"""Leverage score sampling (LSS; paper Sec. 5.3) with a fixed kept-row budget.

A product A^T B = sum_i A_i^T B_i over rows i is estimated without bias by
keeping row i with probability p_i and scaling it by 1 / p_i (Horvitz-Thompson).
The variance is smallest for p_i proportional to the leverage score

    weight gradient      dW = G^T X = G2^T X2:   c_i = ||G2_i|| * ||X2_i||
    activation gradient  dX = G W   = [I I] G2 W: c_i = ||G2_i||   (||W|| is common)

where G2 (2N rows) stacks the bit-split halves of G (`jint4.quant.bitsplit`)
and X2 = [X; X]. With a budget of B rows, p_i = min(1, lam * c_i) with lam set
so that sum_i p_i = B (`inclusion_probabilities`: clamp to 1 and re-scale the
rest until max p <= 1).

Under `jax.jit` the kept-row count must be static, so rows are drawn by
systematic probability-proportional-to-size sampling (`systematic_sample`):
with one u ~ U[0, 1), the points u, u + 1, ..., u + B - 1 fall into the
intervals [P_{i-1}, P_i) of the cumulative sums P of p; an interval of length
p_i <= 1 holds at most one point and holds one with probability exactly p_i.
So every row is kept with probability p_i and the kept list has a static
number of slots (B, plus one for fixed-point rounding; slots beyond sum p,
when fewer than B rows have non-zero score, get weight 0). The cumulative
sums are exact int32 in units of 2^-S, so rows with p = 1 are kept with
certainty however long the sum.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def budget_rows(num_tokens: int, fraction: float) -> int:
  """Kept-row count for N tokens (2N bit-split rows): ceil(fraction * N)."""
  rows = math.ceil(fraction * num_tokens - 1e-9)
  return max(1, min(2 * num_tokens, rows))


def inclusion_probabilities(scores: jax.Array, budget: int) -> jax.Array:
  """p_i = min(1, lam c_i) with sum p = min(budget, #{c_i > 0}).

  Rows with score 0 get p = 0 and are never kept (their contribution is 0).
  Closed form (water filling), with no data-dependent loop: with the scores
  sorted in decreasing order c_(0) >= c_(1) >= ..., clamping the k largest
  to 1 leaves lam_k = (budget - k) / sum_{j >= k} c_(j) for the rest; the
  solution takes the smallest k with lam_k c_(k) <= 1 (the largest free
  probability is valid), which is where clamp-and-rescale stops.
  """
  c = jnp.where(jnp.isfinite(scores), scores, 0.0).astype(jnp.float32)
  c = jnp.maximum(c, 0.0)
  rows = c.shape[0]
  desc = -jnp.sort(-c)
  suffix = jnp.cumsum(desc[::-1])[::-1]               # sum_{j >= k} c_(j)
  k = jnp.arange(rows, dtype=jnp.float32)
  free = budget - k
  lam = jnp.where(suffix > 0, free / jnp.where(suffix > 0, suffix, 1.0), jnp.inf)
  ok = (lam * desc <= 1.0) | (desc <= 0)
  first = jnp.argmax(ok)                               # ok[rows-1] may be False
  lam_star = jnp.where(jnp.any(ok), lam[first], jnp.inf)
  p = jnp.where(c > 0, jnp.minimum(1.0, lam_star * c), 0.0)
  return p


def probability_unit(budget: int, rows: int) -> int:
  """Fixed-point resolution 2^S of the cumulative probabilities.

  The largest S <= 24 with (budget + 1) 2^S + rows < 2^31, so the int32
  cumulative sum of the probabilities in units of 2^-S cannot overflow.
  """
  shift = 0
  while shift < 24 and ((budget + 1) << (shift + 1)) + rows < 2 ** 31:
    shift += 1
  return 1 << shift


def num_slots(budget: int, rows: int) -> int:
  """Static length of `systematic_sample`'s output for R = ``rows``.

  ``budget`` plus room for the rounding up of tiny probabilities to one unit
  (at most rows / unit extra points; one slot in practice).
  """
  unit = probability_unit(budget, rows)
  return budget + -(-rows // unit)


def systematic_sample(p: jax.Array, budget: int, u0: jax.Array):
  """Draws row slots, row i kept with probability exactly p_i (fixed point).

  The probabilities are taken in units of 2^-S (`probability_unit`): q_i =
  floor(p_i 2^S), raised to one unit when p_i > 0; the cumulative sums are
  exact int32, and row i holds a point u + j 2^S (u uniform on the integers
  [0, 2^S)) with probability exactly q_i 2^-S, which is also the probability
  its 1 / p weight uses. So the estimator is exactly unbiased; rows with
  p = 1 are always kept.

  Args:
    p: inclusion probabilities in [0, 1], shape (R,).
    budget: the kept-row budget B (sum p <= B).
    u0: one uniform number in [0, 1).
  Returns:
    (index, weight): int32 (`num_slots(B, R)`,) sorted row indices and float32
    weights 1 / p_index, or 0 for an empty slot (then index is row 0).
  """
  rows = p.shape[0]
  unit = probability_unit(budget, rows)
  slots = num_slots(budget, rows)
  p = jnp.clip(p.astype(jnp.float32), 0.0, 1.0)
  units = jnp.floor(p * unit).astype(jnp.int32)
  units = jnp.where(p > 0, jnp.maximum(units, 1), 0)
  cum = jnp.cumsum(units)
  offset = jnp.minimum(jnp.floor(u0 * unit).astype(jnp.int32), unit - 1)
  # Points offset + j * unit strictly below cum_i: ceil((cum_i - offset) / unit).
  below = jnp.maximum(cum - offset + (unit - 1), 0) // unit
  # Row i holds one point (p_i <= 1) exactly when below_i > below_{i-1}; it is
  # point number below_{i-1}. A scatter places the rows in their slots.
  before = jnp.concatenate([jnp.zeros((1,), below.dtype), below[:-1]])
  target = jnp.where(below > before, before, slots)
  index = jnp.zeros((slots,), jnp.int32).at[target].set(
      jnp.arange(rows, dtype=jnp.int32), mode="drop")
  slot = jnp.arange(slots, dtype=jnp.int32)
  valid = slot < below[-1]
  kept_units = units[index]
  weight = jnp.where(valid & (kept_units > 0),
                     unit / jnp.maximum(kept_units, 1).astype(jnp.float32), 0.0)
  return index, weight


def sample_rows(scores: jax.Array, budget: int, u0: jax.Array):
  """`inclusion_probabilities` then `systematic_sample`: (index, weight)."""
  return systematic_sample(inclusion_probabilities(scores, budget), budget, u0)


def pad_slots(index: jax.Array, weight: jax.Array, multiple: int):
  """Appends empty slots (index 0, weight 0) up to a multiple of ``multiple``.

  For kept rows that are a GEMM's reduction dim K, so that the operands' rows
  fit the GEMM's K tile (the engine says which: `Engine.gemm_k_multiple`);
  `num_slots` is B + 1 in practice, an awkward K. Empty slots add nothing to
  the estimate.
  """
  if multiple < 1:
    raise ValueError(f"pad_slots: multiple must be >= 1; got {multiple}")
  pad = (-index.shape[0]) % multiple
  return jnp.pad(index, (0, pad)), jnp.pad(weight, (0, pad))
