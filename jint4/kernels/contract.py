"""What every engine agrees on bit for bit: the counter RNG and the residual.

Both engines (`jint4.kernels.reference`, `jint4.kernels.native`) import this
module; neither owns it.

Randomness: stochastic rounding draws from `uniform`, a counter-based
generator: element i of a tensor gets half of hash(i // 2, seed), so the noise
of an op is a pure function of (seed, element index) and a native kernel
reproduces it bit for bit without reading a noise tensor. The same hash is
spelled in C++ in xla_ffi/common/jint4_math.h.

The residual (`Residual`) is what the backward keeps of a quantized
activation: packed 4-bit codes, packed flag bits and one float32 per row. Its
byte layout is fixed here and decoded by every engine's handlers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_GOLDEN = np.uint32(0x9E3779B9)


_HASH_MUL = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def _mul_fold(x, c: int):
  """The 64-bit product x * c (uint32 x, constant c) folded to 32 bits: its
  low word xor its high word. The high word from 16-bit limbs (uint32
  arithmetic only: no 64-bit types needed)."""
  x = jnp.asarray(x, jnp.uint32)
  cl, ch = np.uint32(c & 0xFFFF), np.uint32(c >> 16)
  xl, xh = x & np.uint32(0xFFFF), x >> 16
  lh, hl = xl * ch, xh * cl
  mid = ((xl * cl) >> 16) + (lh & np.uint32(0xFFFF)) + (hl & np.uint32(0xFFFF))
  high = xh * ch + (lh >> 16) + (hl >> 16) + (mid >> 16)
  return (x * np.uint32(c)) ^ high


def _pair_hash(seed: jax.Array, pair: jax.Array) -> jax.Array:
  """The hash of element pair ``pair`` of a tensor drawn with ``seed``
  (uint32[2]): three `_mul_fold` rounds over the Weyl sequence pair * golden
  + seed[0], with seed[1] xored in after the first."""
  h = _mul_fold(pair * _GOLDEN + seed[0], _HASH_MUL[0]) ^ seed[1]
  return _mul_fold(_mul_fold(h, _HASH_MUL[1]), _HASH_MUL[2])


def uniform(seed: jax.Array, shape) -> jax.Array:
  """Counter-based uniform noise in [0, 1) with 16 random bits per element.

  One hash serves two neighbours: h_j = `_pair_hash`(seed, j) for the pair
  j = i // 2 of the row-major flat index i (mod 2^32), and u[i] = (h_j &
  0xFFFF) * 2^-16 for even i, (h_j >> 16) * 2^-16 for odd i; seed is
  uint32[2]. Stochastic rounding with 16-bit noise is biased by less than
  2^-16 of a step.
  """
  seed = jnp.asarray(seed, jnp.uint32)
  size = int(np.prod(shape))
  idx = lax.iota(jnp.uint32, size)
  h = _pair_hash(seed, idx >> 1)
  bits = jnp.where((idx & 1) == 0, h & np.uint32(0xFFFF), h >> 16)
  return (bits.astype(jnp.float32) * np.float32(2.0 ** -16)).reshape(shape)


def uniform24(seed: jax.Array, count: int) -> jax.Array:
  """``count`` uniform numbers in [0, 1) with 24 random bits each (number j
  from pair j of `uniform`: its low 16 bits, then 8 of its high ones), for
  draws that need more resolution than 2^-16, such as the offsets of
  systematic sampling."""
  u = uniform(seed, (count, 2))
  return u[:, 0] + jnp.floor(u[:, 1] * np.float32(256.0)) * np.float32(2.0 ** -24)


def seeds_from_key(key: jax.Array, count: int) -> jax.Array:
  """``count`` uint32[2] seeds from a JAX PRNG key (raw or typed)."""
  return jax.random.bits(key, (count, 2), jnp.uint32)


class Residual(NamedTuple):
  """What the backward keeps of a quantized activation x[M, K].

  nibbles: uint8, two 4-bit codes per byte (low nibble first).
  flags:   uint8, one bit per element per flag plane (bit j of byte i is
           element 8 i + j); one plane for qn <= 7, two for qn == 8.
  norms:   float32 [M], the Euclidean norm of each row of the integer q
           (leverage scores of the weight gradient), NaN for a row of x that
           holds a NaN or Inf (so such rows stay visible in the output).
  Together 5 (or 6) bits per element plus 4 bytes per row.
  """
  nibbles: jax.Array
  flags: jax.Array
  norms: jax.Array

  @property
  def row_flag(self) -> jax.Array:
    """float32 [M]: 1 for a finite row of x, NaN for a row holding NaN/Inf.

    The forward GEMM's row scale, so that such a row of the output is NaN (a
    NaN input quantizes to a finite code); the counterpart of the kernel's
    ``col_poison``.
    """
    return jnp.where(jnp.isnan(self.norms), jnp.float32(jnp.nan), jnp.float32(1.0))


def pack_residual(code: jax.Array, flags: jax.Array, norms: jax.Array, *,
                  qn: int) -> Residual:
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
  return Residual(nibbles, jnp.stack(packed), norms.astype(jnp.float32))


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


def _pad_to(x, multiple):
  pad = (-x.shape[0]) % multiple
  return jnp.pad(x, (0, pad)) if pad else x
