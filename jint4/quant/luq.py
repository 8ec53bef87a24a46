"""LUQ: logarithmic unbiased gradient quantizer (baseline).

Xi et al., "Training Transformers with 4-bit Integers" (NeurIPS 2023), Sec. 6,
compare their gradient quantizer against LUQ from Chmiel et al., "Accurate
Neural Training with 4-bit Matrix Multiplications at Standard Formats"
(arXiv:2112.10769). LUQ keeps a sign and a power-of-two magnitude per element.

With b = `bits`, n = 2**(b-1) - 1 non-zero magnitudes and M = max|g|:

    alpha  = M / 2**(n - 1)                      (underflow threshold)
    levels = {0} U {alpha * 2**k : k = 0 .. n-1} (top level alpha*2**(n-1) = M)

so there are 2**(b-1) magnitudes including zero, and sign + magnitude fit in b
bits. For b = 4: alpha = M / 64 and the magnitudes are
{0, M/64, M/32, M/16, M/8, M/4, M/2, M}.

Every |g| lies in [0, M] and is stochastically rounded to one of its two
neighbouring levels lo <= |g| <= hi, taking hi with probability
(|g| - lo) / (hi - lo):

    |g| <  alpha:  lo = 0,           hi = alpha   (stochastic underflow)
    |g| >= alpha:  lo = alpha*2**k,  hi = 2*lo    with k = floor(log2(|g|/alpha))

so E[q] = g for every element. With uniform noise u in [0, 1) the upper level
is taken iff floor(p + u) = 1, p = (|g| - lo) / (hi - lo).

Choice of the level set: the LUQ reference code uses alpha = M / 2**(2**(b-1)-1)
(M/128 for 4 bits), i.e. 2**(b-1) non-zero powers of two plus zero, one
magnitude more than b bits hold. Here one power of two is dropped at the bottom
(alpha = M/64 for 4 bits) so that the code is exactly b bits and M is still
representable (no clipping, so no clipping bias).

Non-finite input (NaN or +-Inf anywhere) makes the whole output NaN: the scale
M is then meaningless. An all-zero input maps to all zeros. Internals are
float32; the result has g's dtype. For float32/bfloat16 (8 exponent bits) the
levels are exact in the output dtype unless they fall below the normal range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def luq_quantize(g: jax.Array, u: jax.Array, *, bits: int = 4) -> jax.Array:
  """Stochastic logarithmic quantize-dequantize of g (see module docstring).

  Args:
    g: array to quantize (typically a gradient).
    u: uniform noise in [0, 1), same shape as g.
    bits: total bits per element (sign included), >= 2. Static under jit.

  Returns:
    Dequantized values, same shape and dtype as g; E_u[result] = g.
  """
  if bits < 2:
    raise ValueError(f"bits must be >= 2, got {bits}")
  if u.shape != g.shape:
    raise ValueError(f"u.shape {u.shape} != g.shape {g.shape}")
  top = 2.0 ** (2 ** (bits - 1) - 2)      # top level in units of alpha

  x = g.astype(jnp.float32)
  a = jnp.abs(x)
  amax = jnp.max(a)
  finite = jnp.isfinite(amax)
  safe_amax = jnp.where(finite & (amax > 0), amax, 1.0)

  # r = |g| / alpha in [0, top]; computed as (|g|/M) * top so that a tiny M
  # cannot underflow alpha to zero.
  r = (a / safe_amax) * top
  # The division may be inexact (XLA can use a reciprocal); pin the maximum to
  # the top level so that max|g| is reproduced exactly.
  r = jnp.where(a >= amax, top, r)
  # Lower neighbour: 0 below alpha, else the power of two 2**floor(log2 r).
  # frexp gives r = m * 2**e with m in [0.5, 1), so 2**(e-1) is exact.
  _, e = jnp.frexp(r)
  lo = jnp.where(r < 1.0, 0.0, jnp.ldexp(jnp.ones_like(r), e - 1))
  lo = jnp.minimum(lo, top)
  hi = jnp.where(r < 1.0, 1.0, 2.0 * lo)
  p = jnp.clip((r - lo) / (hi - lo), 0.0, 1.0)   # 0 at the top level
  up = jnp.floor(p + u.astype(jnp.float32)) >= 1.0
  q = jnp.where(up, hi, lo)

  out = jnp.sign(x) * (q / top) * safe_amax
  out = jnp.where(finite, out, jnp.nan)
  return out.astype(g.dtype)
