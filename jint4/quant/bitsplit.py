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

Per-row scales (`bit_split_rows`): the same split of each token row G_i with
its own M_i = max|G_i|, i.e. of the unit rows G_i / M_i with M = 1, whose
scales are then multiplied by M_i (1 / M_i is computed bit for bit alike
on every platform: `row_reciprocals`). With one M per tensor, a
gradient whose rows differ in size by 10x or more gets high digits of 0 or
+-1 on most rows, so a row's low half weighs about as much as its high half
and leverage score sampling cannot prefer either; with M_i every row's high
half carries the row's large entries (its low half is at most M_i / 14 per
entry), and the sampler keeps the high halves and samples the low ones.
Still INT4 halves, still unbiased. A NaN or Inf anywhere in G makes every
row's scales NaN (not only its own row's): the same visibility as one scale
per tensor.
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


def row_abs_max(g: jax.Array) -> jax.Array:
  """max|G_i| over the last axis, float32 [N] (NaN for a row holding a NaN)."""
  g = as_float32(g)
  return jnp.where(jnp.any(jnp.isnan(g), axis=-1), jnp.nan,
                   jnp.max(jnp.abs(g), axis=-1, initial=0.0))


def pow2(e: jax.Array) -> jax.Array:
  """2^e as float32 for int32 e in [-126, 127], built from its bits (exact,
  the same on every platform)."""
  bits = (jnp.asarray(e, jnp.int32) + 127) << 23
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def row_reciprocals(m_rows: jax.Array) -> jax.Array:
  """1 / M_i, float32 [N], truncated to 24 bits and the same on every
  platform: the mantissa's reciprocal is an integer long division (a float
  division is not: a GPU's XLA rounds it within 2 ulp, not to nearest), so
  that a GPU and the CPU scale the rows alike before the split. Never above
  the true 1 / M_i (so |G_ij / M_i| <= 1 holds after rounding), at most one
  unit in the last place below it. 1 for all-zero, subnormal and non-finite
  rows (their scales carry the rest); for rows of 2^126 and above it is too
  large, and their split clips (no gradient of that size is finite for
  long)."""
  m = m_rows.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(m, jnp.int32)
  e = bits >> 23                                   # biased exponent (m >= 0)
  mant = (bits & 0x7FFFFF) | 0x800000              # m = mant 2^(e - 150)
  # q = floor(2^47 / mant), in (2^23, 2^24], six bits per step of int32 long
  # division (rem < mant < 2^24, so rem << 6 fits).
  q = jnp.zeros_like(mant)
  rem = jnp.full_like(mant, 1 << 23)
  for _ in range(4):
    rem = rem << 6
    digit = rem // mant
    rem = rem - digit * mant
    q = (q << 6) + digit
  # 1 / m = (q 2^-24) 2^(127 - e): both factors exact in float32.
  e = jnp.clip(e, 1, 252)
  inv = q.astype(jnp.float32) * np.float32(2.0 ** -24) * pow2(127 - e)
  ok = (bits >= 0x800000) & jnp.isfinite(m)        # normal, non-zero, finite
  return jnp.where(ok, inv, 1.0)


def unit_rows(g: jax.Array, inv_rows: jax.Array) -> jax.Array:
  """G_i / M_i as G_i times `row_reciprocals`, rounded once in float32:
  every entry in [-1, 1]."""
  return as_float32(g) * inv_rows[:, None]


def as_float32(g: jax.Array) -> jax.Array:
  """g in float32, holding exactly g's values: XLA may skip a rounding to a
  narrower float followed by a widening (excess precision, as its GPU
  compiler does), which would give the per-row split other inputs on a GPU
  than on the CPU; reduce_precision keeps the rounding. reduce_precision
  flushes the narrow type's subnormals to zero (float16's below 2^-14, well
  inside float32's normal range): those are rounded to its subnormal grid
  here instead, so that they keep their value as in the native handlers."""
  g32 = g.astype(jnp.float32)
  info = jnp.finfo(g.dtype)
  if info.bits >= 32:
    return g32
  rounded = jax.lax.reduce_precision(g32, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  if info.nexp >= 8:   # bfloat16: its subnormals are float32's
    return rounded
  # k ulp_sub with k = round-half-even(g / ulp_sub): both products exact.
  ulp = float(info.smallest_subnormal)
  sub = jnp.round(g32 * np.float32(1.0 / ulp)) * np.float32(ulp)
  return jnp.where(jnp.abs(g32) < float(info.smallest_normal), sub, rounded)


def nonfinite_poison(count: jax.Array) -> jax.Array:
  """1.0, or NaN when ``count`` (of non-finite row maxima) is positive."""
  return jnp.where(count > 0, jnp.float32(jnp.nan), jnp.float32(1.0))


def bit_split_rows(g: jax.Array, u: jax.Array):
  """`bit_split` of each row of a 2-D G with its own scale M_i = max|G_i|.

  Returns (hi, lo, scale_hi, scale_lo) with hi, lo int8 [N, C] in [-7, 7] and
  float32 [N] scales M_i / 7 and M_i / 98 such that
  G_i ~= scale_hi_i hi_i + scale_lo_i lo_i.
  """
  m = row_abs_max(g)
  hi, lo, s_hi, s_lo = bit_split(unit_rows(g, row_reciprocals(m)), u, m=1.0)
  scale = m * nonfinite_poison(jnp.sum(~jnp.isfinite(m)))
  return hi, lo, s_hi * scale, s_lo * scale


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
  # The barrier keeps f = 98 / M a value: with M a compile-time constant (the
  # row split passes 1.0) some XLA versions fold (g f) / 14 into g (f / 14),
  # which rounds ties of t / 14 differently from the two roundings written
  # here and done by the native handlers.
  f = jax.lax.optimization_barrier(RANGE / safe_m)
  t = g * f
  # Divisions by constants are written as products with the float32
  # reciprocals (XLA would rewrite them so anyway, and the native handlers
  # must round identically).
  hi = jnp.clip(jnp.round(t * INV_HI_STEP), -7, 7)
  lo = jnp.clip(jnp.floor(t - HI_STEP * hi + u), -7, 7)
  return (_to_int8(hi), _to_int8(lo), m * INV_SEVEN, m * INV_RANGE)


def join_halves(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """v = 14 hi + lo, int8 in [-105, 105]: the two halves as one integer.

  s_hi hi + s_lo lo = s_lo v (s_hi = 14 s_lo), so one GEMM on v computes the
  pair of INT4 GEMMs on the halves, exactly in its int32 accumulator (an
  INT8 tensor core runs it in one pass).
  """
  return (hi.astype(jnp.int32) * int(HI_STEP) + lo.astype(jnp.int32)).astype(jnp.int8)


def _to_int8(v):
  # NaN would cast to an unspecified integer; the scales already carry it.
  return jnp.where(jnp.isfinite(v), v, 0).astype(jnp.int8)
