"""Bit splitting of the output gradient (paper Sec. 5.2).

With M = max|G| (one scale per tensor) and t = 98 G / M, so t in [-98, 98]:

    hi = clamp(round(t / 14), -7, 7)              (round to nearest)
    lo = clamp(stochastic_round(t - 14 hi), -7, 7)  (|t - 14 hi| <= 7 always)
    G ~= s_hi hi + s_lo lo,   s_lo = M / 98,  s_hi = 14 s_lo = M / 7.

(Computed as t * fl(1/14), M * fl(1/98) and M * fl(1/7) in float32: the
native handlers reproduce these roundings exactly.)

Both halves are INT4 values and E[s_hi hi + s_lo lo] = G exactly (the
stochastic rounding of the low half is unbiased, and neither clamp ever binds
since 98 = 7 * 14). Stacked, G2 = [s_hi hi ; s_lo lo] is a 2N x C matrix whose
rows leverage score sampling (`jint4.quant.lss`) draws from. (Clamps of
+-6, as the paper's pseudo-code writes them, would clip the values above
90/98 of the max, a bias; the clamps here are the no-op +-7.)

Special values: an all-zero G gives zero halves and zero scales (no 0/0); a
NaN or Inf anywhere in G makes M, hence both scales, NaN or Inf, so every
product computed from the halves is non-finite too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HI_STEP = 14.0
RANGE = 98.0  # = 7 * 14
INV_HI_STEP = np.float32(1.0 / 14.0)
INV_RANGE = np.float32(1.0 / 98.0)   # s_lo = M / 98
INV_SEVEN = np.float32(1.0 / 7.0)    # s_hi = 14 s_lo = M / 7


def abs_max(g: jax.Array) -> jax.Array:
  """max|G| as a float32 scalar, NaN if any element is NaN (0 for an empty G).

  Spelled out because some XLA CPU reductions drop NaN from max.
  """
  g = g.astype(jnp.float32)
  return jnp.where(jnp.any(jnp.isnan(g)), jnp.nan, jnp.max(jnp.abs(g), initial=0.0))


def bit_split(g: jax.Array, u: jax.Array, m: jax.Array | None = None):
  """Splits G into two INT4 halves.

  Args:
    g: the gradient (any shape, any float dtype).
    u: uniform noise in [0, 1), g's shape, for the stochastic rounding.
    m: `abs_max(g)` when the caller has it (used as given), else None.
  Returns:
    (hi, lo, scale_hi, scale_lo) with hi, lo int8 in [-7, 7] and float32 scalar
    scales such that G ~= scale_hi * hi + scale_lo * lo.
  """
  g = g.astype(jnp.float32)
  m = abs_max(g) if m is None else jnp.asarray(m, jnp.float32).reshape(())
  safe_m = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
  t = g * (RANGE / safe_m)
  # Divisions by constants are written as products with the float32
  # reciprocals (XLA would rewrite them so anyway, and the native handlers
  # must round identically).
  hi = jnp.clip(jnp.round(t * INV_HI_STEP), -7, 7)
  lo = jnp.clip(jnp.floor(t - HI_STEP * hi + u), -7, 7)
  return (_to_int8(hi), _to_int8(lo), m * INV_SEVEN, m * INV_RANGE)


def _to_int8(v):
  # NaN would cast to an unspecified integer; the scales already carry it.
  return jnp.where(jnp.isfinite(v), v, 0).astype(jnp.int8)
