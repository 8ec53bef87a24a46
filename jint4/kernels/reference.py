"""The reference engine: every integer op of jint4 in pure JAX.

Exact integer arithmetic (int8 operands, int32 accumulation through
`lax.dot_general(..., preferred_element_type=int32)`), so it runs on any
backend and is the oracle the native engine is tested against. Each function
here is one op of the engine boundary; the native engine implements the same
signatures and semantics.

Operand layout: every GEMM takes both operands K-major, ``a[M, K] . b[N, K]^T``
(the "TN" layout integer tensor cores run fastest; see HOPPER_NOTES.md).

Randomness: stochastic rounding draws from `uniform`, a counter-based
generator: element i of a tensor gets hash(i, seed), so the noise of an op is a
pure function of (seed, element index) and a native kernel reproduces it bit
for bit without reading a noise tensor.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jint4.quant import bitsplit as bitsplit_lib
from jint4.quant import hadamard
from jint4.quant import lsq

Block = Union[int, jax.Array]  # static block size, or traced int32 log2(block)

_GOLDEN = np.uint32(0x9E3779B9)


def _mix32(h):
  """lowbias32 (C. Wellons): a fast 32-bit integer hash with good avalanche."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * np.uint32(0x846CA68B)
  return h ^ (h >> 16)


def uniform(seed: jax.Array, shape) -> jax.Array:
  """Counter-based uniform noise in [0, 1) with 24 random bits per element.

  u[i] = (mix(mix(i * golden + seed[0]) ^ seed[1]) >> 8) * 2^-24 for the
  row-major flat index i (mod 2^32) and a uint32[2] seed.
  """
  seed = jnp.asarray(seed, jnp.uint32)
  size = int(np.prod(shape))
  idx = lax.iota(jnp.uint32, size)
  h = _mix32(_mix32(idx * _GOLDEN + seed[0]) ^ seed[1])
  return ((h >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)).reshape(shape)


def seeds_from_key(key: jax.Array, count: int) -> jax.Array:
  """``count`` uint32[2] seeds from a JAX PRNG key (raw or typed)."""
  return jax.random.bits(key, (count, 2), jnp.uint32)


def apply_hadamard(t: jax.Array, block: Block, *, axis: int) -> jax.Array:
  """Hb along ``axis`` in float32 (static block size or traced log2).

  Butterfly stages in a fixed order (stage 0 first, (a + b) * r and
  (a - b) * r with r = float32(1 / sqrt(2))): this fixes the float rounding,
  so the native engine's quantized integers match these bit for bit.
  """
  return hadamard.apply_block_hadamard(t, block, axis=axis, method="butterfly")


class Residual(NamedTuple):
  """What the backward keeps of a quantized activation: 5 or 6 bits/element.

  nibbles: uint8, two 4-bit codes per byte (low nibble first).
  flags:   uint8, one bit per element per flag plane (bit j of byte i is
           element 8 i + j); one plane for qn <= 7, two for qn == 8.
  """
  nibbles: jax.Array
  flags: jax.Array


def hadamard_quantize(x: jax.Array, step: jax.Array, *, block: Block, qn: int,
                      qp: int, seed: jax.Array | None = None):
  """Fused Hb + LSQ quantize along the last (contraction) axis of x[M, K].

  Returns ``(q, residual)``: q int8 [M, K] = clamp(round((x Hb) / step), -qn,
  qp), K-major for the GEMM, and, when ``seed`` is given, the packed
  `Residual` for the backward (else None).
  """
  xh = apply_hadamard(x, block, axis=-1)
  v = xh / step.astype(jnp.float32)
  q = lsq.quantize(v, 1.0, qn=qn, qp=qp)
  q8 = jnp.where(jnp.isfinite(q), q, 0).astype(jnp.int8)
  if seed is None:
    return q8, None
  code, flags = lsq.encode_backward_state(v, uniform(seed, v.shape), qn=qn, qp=qp)
  return q8, pack_residual(code, flags, qn=qn)


def pack_residual(code: jax.Array, flags: jax.Array, *, qn: int) -> Residual:
  """Packs int8 codes in [-8, 7] two per byte and flag bits eight per byte."""
  flat = code.reshape(-1).astype(jnp.uint8) & np.uint8(0xF)
  flat = _pad_to(flat, 2)
  nibbles = flat[0::2] | (flat[1::2] << 4)
  planes = 1 if qn <= 7 else 2
  f = _pad_to(flags.reshape(-1), 8)
  packed = []
  for plane in range(planes):
    bits = ((f >> plane) & 1).reshape(-1, 8)
    packed.append(jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=1,
                          dtype=jnp.uint8))
  return Residual(nibbles, jnp.stack(packed))


def unpack_residual(res: Residual, shape, *, qn: int):
  """Inverse of `pack_residual`: (code int8, flags uint8) of ``shape``."""
  size = int(np.prod(shape))
  lo = (res.nibbles & np.uint8(0xF)).astype(jnp.int8)
  hi = (res.nibbles >> 4).astype(jnp.int8)
  code = jnp.stack([lo, hi], axis=1).reshape(-1)
  code = jnp.where(code > 7, code - 16, code).astype(jnp.int8)[:size]
  flags = jnp.zeros((res.flags.shape[1] * 8,), jnp.uint8)
  for plane in range(res.flags.shape[0]):
    bits = (res.flags[plane][:, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    flags = flags | (bits.reshape(-1) << plane)
  return code.reshape(shape), flags[:size].reshape(shape)


def residual_values(res: Residual, shape, *, qn: int, qp: int) -> jax.Array:
  """The int8 GEMM operand (the quantized activation) held by a residual."""
  code, flags = unpack_residual(res, shape, qn=qn)
  q, _, _ = lsq.decode_backward_state(code, flags, qn=qn, qp=qp)
  return q


def lsq_backward(grad: jax.Array, res: Residual, *, qn: int, qp: int):
  """LSQ's elementwise backward from a residual.

  Args:
    grad: dL/dT_hat in the Hadamard domain, float32 [M, K].
  Returns:
    (dT, delta_sum): dT = 1[in range] * grad and delta_sum = sum(grad *
    delta_hat), the un-scaled step-size gradient.
  """
  code, flags = unpack_residual(res, grad.shape, qn=qn)
  _, inside, delta_hat = lsq.decode_backward_state(code, flags, qn=qn, qp=qp)
  return jnp.where(inside, grad, 0.0), jnp.sum(grad * delta_hat)


def bit_split(g: jax.Array, seed: jax.Array):
  """`jint4.quant.bitsplit.bit_split` with counter-based noise, plus row norms.

  Returns (hi, lo, scale_hi, scale_lo, hi_norm, lo_norm): the halves (int8,
  g's shape [R, C]), their float32 scales, and the float32 [R] Euclidean norms
  of the dequantized rows scale_hi * hi_i and scale_lo * lo_i.
  """
  hi, lo, s_hi, s_lo = bitsplit_lib.bit_split(g, uniform(seed, g.shape))
  return hi, lo, s_hi, s_lo, s_hi * _row_norm(hi), s_lo * _row_norm(lo)


def row_norms(q: jax.Array) -> jax.Array:
  """Float32 Euclidean norms of the rows of an integer matrix."""
  return _row_norm(q)


def int_gemm(a: jax.Array, b: jax.Array, *, scale: jax.Array,
             row_scale: jax.Array | None = None,
             out_dtype=jnp.float32) -> jax.Array:
  """out[M, N] = scale * row_scale[:, None] * (a[M, K] . b[N, K]^T).

  a and b hold integer values (int8); the product accumulates exactly in
  int32; the dequantize epilogue runs in float32 and casts to ``out_dtype``.
  """
  acc = lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.int32)
  out = acc.astype(jnp.float32) * scale.astype(jnp.float32)
  if row_scale is not None:
    out = out * row_scale.astype(jnp.float32)[:, None]
  return out.astype(out_dtype)


def int_gemm_i32(a: jax.Array, b: jax.Array) -> jax.Array:
  """The raw int32 product a[M, K] . b[N, K]^T (for tests and engines)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.int32)


def int_gemm_gather_rows(a: jax.Array, b: jax.Array, b_rows: jax.Array, *,
                         scale: jax.Array, out_dtype=jnp.float32) -> jax.Array:
  """out[M, N] = scale * sum_r a[r, :]^T b[b_rows[r], :], a[R, M], b[T, N].

  The reduction runs over the R kept rows (leverage score sampling): the
  gather of b's rows and both transposes belong to the op, not the caller.
  """
  bg = jnp.take(b, b_rows, axis=0)
  acc = lax.dot_general(a, bg, (((0,), (0,)), ((), ())),
                        preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * scale.astype(jnp.float32)).astype(out_dtype)


def _row_norm(q):
  q = q.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(q * q, axis=-1))


def _pad_to(x, multiple):
  pad = (-x.shape[0]) % multiple
  return jnp.pad(x, (0, pad)) if pad else x
