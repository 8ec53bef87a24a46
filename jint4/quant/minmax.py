"""Min-max uniform stochastic quantizer (per-tensor gradient baseline).

Used in jint4 as a baseline gradient quantizer for the comparisons of Xi et
al., "Training Transformers with 4-bit Integers" (NeurIPS 2023), Sec. 6: the
plain per-tensor unbiased INT4 quantizer, next to LUQ (Chmiel et al.,
arXiv:2112.10769; see `jint4.quant.luq`).

With b = `bits`, L = 2**b - 1 steps, lo = min(g), hi = max(g):

    s = (hi - lo) / L                   (bin width)
    v = (g - lo) / s                    in [0, L]
    q = clip(floor(v + u), 0, L)        u ~ U[0, 1): rounds up w.p. v - floor(v)
    result = lo + q * s

so q is one of 2**b integer codes and E[result] = g elementwise (the clip only
matters when v + u rounds up to L + 1 in float32, an ulp-level effect). Both
lo and hi are representable, so nothing is clipped.

The range is formed from halves (hi/2 - lo/2) so that finite extremes of
opposite sign cannot overflow. A constant (e.g. all-zero) input is returned
unchanged (s = 0, no 0/0). Non-finite input (NaN or +-Inf anywhere) makes the
whole output NaN. Internals are float32; the result has g's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def minmax_quantize(g: jax.Array, u: jax.Array, *, bits: int = 4) -> jax.Array:
  """Stochastic min-max uniform quantize-dequantize of g.

  Args:
    g: array to quantize (typically a gradient).
    u: uniform noise in [0, 1), same shape as g.
    bits: bits per element (2**bits codes), >= 1. Static under jit.

  Returns:
    Dequantized values, same shape and dtype as g; E_u[result] = g.
  """
  if bits < 1:
    raise ValueError(f"bits must be >= 1, got {bits}")
  if u.shape != g.shape:
    raise ValueError(f"u.shape {u.shape} != g.shape {g.shape}")
  steps = float(2 ** bits - 1)

  x = g.astype(jnp.float32)
  lo = jnp.min(x)
  hi = jnp.max(x)
  finite = jnp.isfinite(lo) & jnp.isfinite(hi)
  half_range = hi * 0.5 - lo * 0.5
  safe_half = jnp.where(finite & (half_range > 0), half_range, 1.0)

  v = (x * 0.5 - lo * 0.5) / safe_half * steps
  q = jnp.clip(jnp.floor(v + u.astype(jnp.float32)), 0.0, steps)
  # For a constant input v = 0, so q = 0 and the result is lo.
  out = lo + q * (safe_half * (2.0 / steps))
  out = jnp.where(finite, out, jnp.nan)
  return out.astype(g.dtype)
