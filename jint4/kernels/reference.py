"""The reference engine: every integer op of jint4 in pure JAX.

Exact integer arithmetic (int8 operands, int32 accumulation through
`lax.dot_general(..., preferred_element_type=int32)`), so it runs on any
backend and is the oracle the native engine is tested against. Each function
here is one op of the engine boundary; the native engine implements the same
signatures and semantics.

Operand layout: every GEMM takes both operands K-major, ``a[M, K] . b[N, K]^T``
(the "TN" layout integer tensor cores run fastest; see docs/HOPPER.md).

Randomness and the residual format come from `jint4.kernels.contract`, which
the native engine shares.

Float contract (what the native kernels reproduce bit for bit, chosen to be
cheap per element): the Hadamard runs as +-1 butterflies, (a + b, a - b) per
stage, and its 2^(-L/2) is applied once at the end (`hadamard_scale`); the
LSQ quantizer multiplies by one per-tensor factor fl(2^(-L/2) / step) instead
of dividing every element. The butterflies run on the input times 2^-L and
their result is scaled back by 2^L last (`hadamard_prescale`, both exact
powers of two), so that their sums, up to 2^L times the largest input, stay
finite for every finite input: v = (butterflies(x 2^-L) fl(2^(-L/2) / step))
2^L, and a transformed gradient is (butterflies(g 2^-L) 2^(-L/2)) 2^L. Where
no intermediate overflows or goes subnormal this is the same float as
without the 2^-L (scaling by a power of two commutes with rounding).
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
from jax import lax

from jint4.kernels.contract import Residual
from jint4.kernels.contract import pack_residual
from jint4.kernels.contract import uniform
from jint4.kernels.contract import unpack_residual
from jint4.quant import bitsplit as bitsplit_lib
from jint4.quant import hadamard
from jint4.quant import lsq

Block = Union[int, jax.Array]  # static block size, or traced int32 log2(block)


def apply_hadamard(t: jax.Array, block: Block, *, axis: int) -> jax.Array:
  """The +-1 transform sqrt(2^L) Hb along ``axis`` in float32 (static block
  size or traced log2 L).

  Butterfly stages in a fixed order (stage 0 first, a + b and a - b, no
  scaling): this fixes the float rounding, so the native engine's quantized
  integers match these bit for bit. Times `hadamard_scale` it is Hb.
  """
  return hadamard.apply_block_hadamard(t, block, axis=axis, method="butterfly",
                                       normalized=False)


def hadamard_scale(block: Block, size: int) -> jax.Array:
  """2^(-L/2) (float32) of `apply_hadamard` over a dim of ``size``."""
  return hadamard.hadamard_scale(block, size)


def quant_factor(block: Block, size: int, step: jax.Array) -> jax.Array:
  """fl(2^(-L/2) / step): v = apply_hadamard(x) * quant_factor = T / step."""
  return hadamard_scale(block, size) / step.astype(jnp.float32)


def hadamard_prescale(block: Block, size: int) -> tuple[jax.Array, jax.Array]:
  """(2^-L, 2^L) in float32 (exact) for `apply_hadamard` over a dim of ``size``.

  The float contract's overflow guard: the butterflies run on t * 2^-L, and
  their result times `quant_factor` (or `hadamard_scale`) is multiplied by 2^L
  (native: `Pow2(-L)`, `Pow2(L)`). L as in `hadamard_scale` (a traced log2 is
  clamped to the reachable stages).
  """
  if isinstance(block, (int, jnp.integer)):   # a static size, as apply_hadamard
    log2 = int(block).bit_length() - 1
    return jnp.float32(2.0 ** -log2), jnp.float32(2.0 ** log2)
  log2 = jnp.clip(jnp.asarray(block, jnp.int32), 0, hadamard.max_log2_block(size))
  return (lax.bitcast_convert_type((127 - log2) << 23, jnp.float32),
          lax.bitcast_convert_type((127 + log2) << 23, jnp.float32))


def hadamard_quantize(x: jax.Array, step: jax.Array, *, block: Block, qn: int,
                      qp: int, seed: jax.Array | None = None, axis: int = 1,
                      transpose: bool = False):
  """Fused Hb + LSQ quantize of x[R, S] (float32 / bfloat16 / float16).

  Hb runs along ``axis`` (1: the rows, as for activations x[M, K]; 0: the
  columns, as for a Flax kernel[D, C] whose contraction dim comes first), then
  q = clamp(round(v), -qn, qp) as int8 (a NaN v gives -qn) with v = (x Hb) / step, computed as
  (apply_hadamard(x * 2^-L) * fl(2^(-L/2) / step)) * 2^L (the float contract
  above), written as [R, S] or, with ``transpose``, as [S, R]. So a kernel[D, C] gives the forward GEMM operand
  [C, D] (axis=0, transpose) and the dX GEMM operand [D, C] (axis=0), both
  K-major, without a transpose kernel.

  Returns ``(q, residual)``: with ``seed`` (only for axis=1, no transpose) the
  packed `Residual` the backward needs, else None.
  """
  axis = axis % 2
  if seed is not None and (axis != 1 or transpose):
    raise ValueError("hadamard_quantize keeps a residual only for axis=1"
                     " without transpose (activations).")
  down, up = hadamard_prescale(block, x.shape[axis])
  xh = apply_hadamard(x.astype(jnp.float32) * down, block, axis=axis)
  v = (xh * quant_factor(block, x.shape[axis], step)) * up
  q = lsq.quantize(v, 1.0, qn=qn, qp=qp)
  q8 = jnp.where(jnp.isnan(q), -qn, q).astype(jnp.int8)  # NaN: the clamp's low end
  if seed is None:
    return (q8.T if transpose else q8), None
  code, flags = lsq.encode_backward_state(v, uniform(seed, v.shape), qn=qn, qp=qp)
  finite = jnp.all(jnp.isfinite(x), axis=1)
  norms = jnp.where(finite, _row_norm(q8), jnp.nan)
  return q8, pack_residual(code, flags, norms, qn=qn)


def hadamard_quantize_weight(kernel: jax.Array, step: jax.Array, *, block: Block,
                             qn: int, qp: int):
  """A kernel[D, C]'s two GEMM operands from one quantization (Hb along D).

  Returns ``(q_t, q, col_poison)``: q_t[C, D] is the forward GEMM's operand
  and q[D, C] the dX GEMM's, both K-major; the same codes as
  `hadamard_quantize` with axis=0 and transpose True / False. The forward
  computes both, so the backward does not quantize the kernel again.
  col_poison[C] (float32) is NaN for the columns of the kernel holding a NaN
  or Inf, else 0: the forward GEMM's column bias, so that such a column of
  the output is NaN (a NaN quantizes to a finite code).
  """
  q, _ = hadamard_quantize(kernel, step, block=block, qn=qn, qp=qp, axis=0)
  col_poison = jnp.where(jnp.all(jnp.isfinite(kernel), axis=0), 0.0, jnp.nan)
  return q.T, q, col_poison.astype(jnp.float32)


def residual_values(res: Residual, shape, *, qn: int, qp: int,
                    rows: jax.Array | None = None,
                    transpose: bool = False) -> jax.Array:
  """The quantized activation q[M, K] (int8) held by a residual.

  With ``rows`` (int32 [T], each in [0, M)) only those rows, in that order:
  [T, K]; with ``transpose`` written K-major for a GEMM that reduces over the
  rows: [K, T] (the dW GEMM over the kept tokens of leverage score sampling).
  """
  code, flags = unpack_residual(res, shape, qn=qn)
  q, _, _ = lsq.decode_backward_state(code, flags, qn=qn, qp=qp)
  if rows is not None:
    q = jnp.take(q, rows, axis=0)
  return q.T if transpose else q


def lsq_backward(grad: jax.Array, res: Residual, *, qn: int, qp: int,
                 slots: jax.Array | None = None, block: Block = 1,
                 out_dtype=jnp.float32):
  """LSQ's elementwise backward from a residual, then Hb^T.

  Args:
    grad: dL/dT_hat in the Hadamard domain (float32, bfloat16 or float16,
      computed in float32): [M, K], or with
      ``slots`` the rows of a sampled product, [S, K].
    res: the residual of T[M, K].
    slots: optional int32 [2, M]: row t of dT_hat is grad[slots[0, t]] +
      grad[slots[1, t]] (in that order), a negative slot adding nothing (the
      hi and lo bit-split rows of token t kept by leverage score sampling).
    block: the Hadamard block (static size or traced log2); Hb^T = Hb.
  Returns:
    (dT, delta_sum): dT = (1[in range] * dT_hat) Hb^T in ``out_dtype`` and
    delta_sum = sum(dT_hat * delta_hat), the un-scaled step-size gradient.
  """
  grad = grad.astype(jnp.float32)
  if slots is not None:
    grad = _slot_sum(grad, slots)
  code, flags = unpack_residual(res, grad.shape, qn=qn)
  _, inside, delta_hat = lsq.decode_backward_state(code, flags, qn=qn, qp=qp)
  down, up = hadamard_prescale(block, grad.shape[-1])
  dt = (apply_hadamard(jnp.where(inside, grad, 0.0) * down, block, axis=-1)
        * hadamard_scale(block, grad.shape[-1])) * up
  return dt.astype(out_dtype), jnp.sum(grad * delta_hat)


def lsq_weight_backward(grad: jax.Array, kernel: jax.Array, step: jax.Array, *,
                        block: Block, qn: int, qp: int, out_dtype=None):
  """LSQ's backward for a kernel[D, C] quantized with Hb along axis 0.

  The kernel is a parameter, kept by the backward, so its STE mask and delta
  are exact: with v = (kernel Hb) / step (Hb down each column, computed as
  `hadamard_quantize(axis=0)`) and grad = dL/dW_hat in the Hadamard domain
  [D, C] (float32 or bfloat16, widened to float32):
  Returns (dK, delta_sum): dK = Hb^T (1[in range] * grad) along axis 0, in
  ``out_dtype`` (default: the kernel's dtype), and delta_sum = sum(grad *
  delta(v)), the un-scaled step-size gradient.
  """
  d = kernel.shape[0]
  down, up = hadamard_prescale(block, d)
  v = (apply_hadamard(kernel.astype(jnp.float32) * down, block, axis=0)
       * quant_factor(block, d, step)) * up
  grad = grad.astype(jnp.float32)
  masked = jnp.where(lsq.in_range(v, qn=qn, qp=qp), grad, 0.0)
  delta_sum = jnp.sum(grad * lsq.delta(v, qn=qn, qp=qp))
  dk = (apply_hadamard(masked * down, block, axis=0) * hadamard_scale(block, d)) * up
  return dk.astype(out_dtype or kernel.dtype), delta_sum


def _slot_sum(rows: jax.Array, slots: jax.Array) -> jax.Array:
  def pick(s):
    return jnp.where((s >= 0)[:, None],
                     jnp.take(rows, jnp.maximum(s, 0), axis=0), 0.0)
  return pick(slots[0]) + pick(slots[1])


def bit_split(g: jax.Array, seed: jax.Array, abs_max: jax.Array | None = None,
              row_inv: jax.Array | None = None):
  """Bit splitting (`jint4.quant.bitsplit`) with counter noise, rows stacked.

  Returns (g2, scale_hi, scale_lo, norms): g2 int8 [2R, C] holds hi (rows
  0..R-1) over lo (rows R..2R-1) of g[R, C] (any float dtype, computed in
  float32); norms float32 [2R] are the Euclidean norms of the dequantized
  rows (scale_hi * hi_i, then scale_lo * lo_i): leverage scores.
  ``abs_max``: max|g| (`quant.bitsplit.abs_max`) when the caller has it (e.g.
  max|G| all-reduced over the shards of a sharded G, so that every shard
  splits with the same scale); used as given. None: computed here.
  ``row_inv``: float32 [R] for the per-row split: the rows g_i * row_inv_i
  (one float32 product each, `quant.bitsplit.unit_rows`) are split in g's
  place, ``abs_max`` being their max. With row_inv_i = 1 / M_i
  (`quant.bitsplit.row_reciprocals`) and abs_max = 1 the scales are the
  constants fl(1/7), fl(1/98) and the caller multiplies in M_i; one read of
  g instead of a materialized float32 copy of the unit rows.
  """
  if row_inv is not None:
    g = bitsplit_lib.unit_rows(g, row_inv)
  hi, lo, s_hi, s_lo = bitsplit_lib.bit_split(
      g.astype(jnp.float32), uniform(seed, g.shape), abs_max)
  norms = jnp.concatenate([s_hi * _row_norm(hi), s_lo * _row_norm(lo)])
  return jnp.concatenate([hi, lo]), s_hi, s_lo, norms


def bit_split_joined(g: jax.Array, seed: jax.Array, abs_max: jax.Array | None = None,
                     row_inv: jax.Array | None = None):
  """Bit splitting with the halves joined for one GEMM: v = 14 hi + lo.

  s_hi (hi A) + s_lo (lo A) = s_lo (v A) up to float rounding, with v in
  [-98, 98] the exact integer sum of the two INT4 digits (14 hi + lo is the
  stochastic rounding of 98 g / max|g|): a GEMM on v computes the pair of
  INT4 GEMMs of bit splitting in one pass, bit-identical in its int32
  accumulator. Returns (v [R, C], v^T [C, R], scale_hi, scale_lo), int8:
  v^T is the K-major operand of the GEMM that reduces over the rows.
  ``abs_max``: max|g| (`quant.bitsplit.abs_max`) when the caller has it, so
  that XLA may compute it inside the fusion that produces g; used as given.
  ``row_inv``: float32 [R], 1 / M_i (`quant.bitsplit.row_reciprocals`): v
  is then the split of the unit rows g_i * row_inv_i with M = 1 (scale
  fl(1/98) times the caller's M_i: the operand of a GEMM that keeps the
  rows), while v^T stays the split of g with one scale (the operand of the
  GEMM that reduces over the rows, where a per-row factor cannot leave the
  sum). Both use the same noise; the scales returned are v^T's. One read of
  g gives both operands.
  """
  u = uniform(seed, g.shape)
  hi, lo, s_hi, s_lo = bitsplit_lib.bit_split(g.astype(jnp.float32), u, abs_max)
  v = bitsplit_lib.join_halves(hi, lo)
  vt = v.T
  if row_inv is not None:   # v from the unit rows, the same noise
    hi, lo, _, _ = bitsplit_lib.bit_split(bitsplit_lib.unit_rows(g, row_inv), u, 1.0)
    v = bitsplit_lib.join_halves(hi, lo)
  return v, vt, s_hi, s_lo


def resplit_rows(g2: jax.Array, rows: jax.Array, row_scale: jax.Array,
                 seed: jax.Array):
  """Joined bit splitting of weighted gathered rows, transposed.

  T[j, :] = float32(g2[rows[j], :]) * row_scale[j] (the kept rows of
  leverage score sampling times s_half / p), then `bit_split_joined(T)`.
  Returns (v^T int8 [C, J], scale_hi, scale_lo).
  """
  t = jnp.take(g2, rows, axis=0).astype(jnp.float32) * row_scale[:, None]
  _, vt, s_hi, s_lo = bit_split_joined(t, seed)
  return vt, s_hi, s_lo


def row_norms(q: jax.Array) -> jax.Array:
  """Float32 Euclidean norms of the rows of an integer matrix."""
  return _row_norm(q)


def int_gemm(a: jax.Array, b: jax.Array, *, scale: jax.Array,
             row_scale: jax.Array | None = None,
             col_bias: jax.Array | None = None, out_dtype=jnp.float32,
             int4: bool = True) -> jax.Array:
  """out[M, N] = scale * row_scale[:, None] * (a[M, K] . b[N, K]^T) + col_bias.

  a and b hold integer values in int8 (INT4 values in [-8, 7] when ``int4``,
  else any int8, e.g. joined bit-split digits); the product accumulates
  exactly in int32; the dequantize epilogue runs in float32 (times scale,
  then times row_scale[m], then plus col_bias[n]) and casts to ``out_dtype``.
  """
  del int4  # tells native engines which tensor cores may run it
  acc = lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.int32)
  out = acc.astype(jnp.float32) * scale.astype(jnp.float32)
  if row_scale is not None:
    out = out * row_scale.astype(jnp.float32)[:, None]
  if col_bias is not None:
    out = out + col_bias.astype(jnp.float32)[None, :]
  return out.astype(out_dtype)


def int_gemm_i32(a: jax.Array, b: jax.Array) -> jax.Array:
  """The raw int32 product a[M, K] . b[N, K]^T (for tests and engines)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.int32)


def _row_norm(q):
  q = q.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(q * q, axis=-1))
