"""Block-diagonal Hadamard transform (paper Sec. 4.2, the "H" of HQ).

Sylvester's construction, orthonormal:

    H_0 = [1],   H_k = 1/sqrt(2) [[H_{k-1},  H_{k-1}],
                                  [H_{k-1}, -H_{k-1}]],

so H_k is symmetric and its own inverse, and H_k[i, j] = (-1)^popcount(i & j) /
sqrt(2^k). The block-diagonal Hb = BlockDiag(H_k, ..., H_k) acts on the
contraction dimension D of both operands of a linear layer:

    Y = X W^T = (X Hb) (W Hb)^T,

and spreads an outlier entry evenly over its block of 2^k entries before the
4-bit quantizer sees it. Both implementations below are exact up to float
rounding: a (b x b) matmul per block (``method="matmul"``) or log2(b) butterfly
stages, O(n log b) (``method="butterfly"``). `hadamard_transform_dynamic` takes
the block size as a traced value, which the per-layer block search (the
reference code's rule: minimise ||X_bar - X||_F ||W_bar - W||_F on the first
batch) needs under `jax.jit`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jint4.quant import lsq

MAX_LOG2_BLOCK = 10  # blocks up to 1024, the reference code's search range


def hadamard_matrix(block: int, dtype=jnp.float32) -> jax.Array:
  """The orthonormal Sylvester Hadamard matrix H_k of size block = 2^k."""
  _check_block(block)
  idx = np.arange(block)
  parity = (np.bitwise_count(idx[:, None] & idx[None, :]) & 1).astype(np.int64)
  return jnp.asarray((1 - 2 * parity) / math.sqrt(block), dtype=dtype)


def hadamard_transform(x: jax.Array, block: int, *, axis: int = -1,
                       method: str = "matmul", normalized: bool = True
                       ) -> jax.Array:
  """Applies Hb (block size ``block``) along ``axis``; returns float32.

  Hb is symmetric and orthogonal, so the same call also applies Hb^T and the
  inverse transform. ``normalized=False`` (butterfly only) applies the +-1
  matrix sqrt(block) Hb instead: stages (a + b, a - b), no rounding of the
  1/sqrt(2) factors (the native engine's contract; see `hadamard_scale`).
  """
  _check_block(block)
  if not normalized and method != "butterfly":
    raise ValueError("normalized=False needs method='butterfly'.")
  axis = axis % x.ndim
  size = x.shape[axis]
  if size % block:
    raise ValueError(
        f"Hadamard block {block} does not divide the contraction dim {size}."
        " Use a block that divides it (Int4Config(hadamard_block=...)), or pad"
        " the features to a multiple of the block.")
  x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  lead = x.shape[:-1]
  if block == 1:
    y = x
  elif method == "matmul":
    xb = x.reshape(*lead, size // block, block)
    y = jnp.matmul(xb, hadamard_matrix(block),
                   precision=jax.lax.Precision.HIGHEST).reshape(x.shape)
  elif method == "butterfly":
    y = x
    for stage in range(int(math.log2(block))):
      y = _butterfly_stage(y, stage, normalized)
  else:
    raise ValueError(f"method must be 'matmul' or 'butterfly'; got {method!r}.")

  return jnp.moveaxis(y, -1, axis)


def max_log2_block(size: int) -> int:
  """Largest k <= 10 with 2^k dividing ``size``: the usable blocks of a dim."""
  k = 0
  while k < MAX_LOG2_BLOCK and size % (2 ** (k + 1)) == 0:
    k += 1
  return k


def hadamard_transform_dynamic(x: jax.Array, log2_block: jax.Array, *,
                               axis: int = -1, normalized: bool = True
                               ) -> jax.Array:
  """Like `hadamard_transform` with a traced block size 2^log2_block.

  Applies butterfly stage j only where j < log2_block; stages commute (H_k is
  the k-fold Kronecker power of H_1), so this is exactly H_k per block. Blocks
  larger than the largest power of two dividing the dim are not reachable.
  """
  axis = axis % x.ndim
  x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  log2_block = jnp.asarray(log2_block, jnp.int32)
  y = x
  for stage in range(max_log2_block(x.shape[-1])):
    y = jnp.where(stage < log2_block, _butterfly_stage(y, stage, normalized), y)
  return jnp.moveaxis(y, -1, axis)


def apply_block_hadamard(t: jax.Array, block, *, axis: int = -1,
                         method: str = "matmul", normalized: bool = True
                         ) -> jax.Array:
  """Hb along ``axis`` for a static block size (int) or a traced log2 block.

  Dispatches to `hadamard_transform` (``method`` applies) or to
  `hadamard_transform_dynamic`; returns float32.
  """
  if isinstance(block, (int, np.integer)):
    return hadamard_transform(t, int(block), axis=axis, method=method,
                              normalized=normalized)
  return hadamard_transform_dynamic(t, block, axis=axis, normalized=normalized)


def hadamard_scale(block, size: int) -> jax.Array:
  """2^(-L/2) in float32 for block 2^L: Hb = hadamard_scale * (+-1 matrix).

  1 or float32(1/sqrt(2)) times 2^-floor(L/2), an exact power of two, so
  every engine rounds it alike (native: `HadamardScale`). ``block`` is a
  static size or a traced log2 (clamped to [0, max_log2_block(size)], as the
  transform's reachable stages).
  """
  if isinstance(block, (int, np.integer)):
    _check_block(int(block))
    if block > 2 ** MAX_LOG2_BLOCK:
      raise ValueError(f"Hadamard block must be <= {2 ** MAX_LOG2_BLOCK}; got {block}.")
    return jnp.float32(_HADAMARD_SCALES[int(block).bit_length() - 1])
  log2 = jnp.clip(jnp.asarray(block, jnp.int32), 0, max_log2_block(size))
  return jnp.asarray(_HADAMARD_SCALES)[log2]


_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))
# hadamard_scale for L = 0 .. MAX_LOG2_BLOCK.
_HADAMARD_SCALES = np.array(
    [_INV_SQRT2 * np.float32(2.0 ** -(k // 2)) if k & 1 else np.float32(2.0 ** -(k // 2))
     for k in range(MAX_LOG2_BLOCK + 1)], np.float32)


def _butterfly_stage(x: jax.Array, stage: int, normalized: bool = True) -> jax.Array:
  """(a, b) -> (a + b, a - b), times float32(1/sqrt(2)) when ``normalized``,
  on pairs at distance 2^stage."""
  half = 2 ** stage
  lead, size = x.shape[:-1], x.shape[-1]
  x = x.reshape(*lead, size // (2 * half), 2, half)
  a, b = x[..., 0, :], x[..., 1, :]
  if not normalized:
    return jnp.stack([a + b, a - b], axis=-2).reshape(*lead, size)
  return jnp.stack([(a + b) * _INV_SQRT2, (a - b) * _INV_SQRT2],
                   axis=-2).reshape(*lead, size)


def search_hadamard_block(x: jax.Array, w: jax.Array, *, qn: int = 7,
                          qp: int = 7, max_log2: int = MAX_LOG2_BLOCK
                          ) -> jax.Array:
  """The reference code's per-layer block search; returns log2 of the block.

  For every candidate block 2^k (k = 0 .. max_log2, limited to blocks dividing
  D) quantizes T Hb with the LSQ init step s = 2 mean|T Hb| / sqrt(qp) and
  measures T_bar = s int_s(T Hb) Hb^T; picks the k minimising
  ||X_bar - X||_F * ||W_bar - W||_F. ``x`` is (..., D), ``w`` is (D, C) as a
  Flax kernel. Traceable: returns an int32 scalar.
  """
  d = x.shape[-1]
  if w.shape[0] != d:
    raise ValueError(f"x has {d} features but the kernel has {w.shape[0]} rows.")
  x = x.reshape(-1, d).astype(jnp.float32)
  w = w.astype(jnp.float32)
  errors = []
  for k in range(min(max_log2, max_log2_block(d)) + 1):
    # An empty batch says nothing about x: the kernel alone decides.
    x_error = _roundtrip_error(x, 2 ** k, -1, qn, qp) if x.size else 1.0
    errors.append(x_error * _roundtrip_error(w, 2 ** k, 0, qn, qp))
  return jnp.argmin(jnp.stack(errors)).astype(jnp.int32)


def _roundtrip_error(t, block, axis, qn, qp):
  th = hadamard_transform(t, block, axis=axis)
  s = lsq.init_step_size(th, qp=qp)
  t_bar = hadamard_transform(lsq.fake_quantize_value(th, s, qn=qn, qp=qp),
                             block, axis=axis)
  return jnp.sqrt(jnp.sum(jnp.square(t_bar - t)))


def _check_block(block):
  if not isinstance(block, (int, np.integer)) or block < 1 or block & (block - 1):
    raise ValueError(f"Hadamard block must be a power of two; got {block!r}.")
