"""Shared cases for the native-vs-reference tests (CPU here, CUDA in the GPU suite)."""

import jax
import jax.numpy as jnp
import numpy as np

from jint4.kernels import reference
from jint4.quant import bitsplit
from jint4.quant import hadamard

# (M, K) shapes for the quantize ops: ragged sizes included (M*K odd, not a
# multiple of 8, K not a multiple of 16).
QUANT_SHAPES = [(1, 1), (3, 5), (7, 24), (16, 32), (33, 96), (64, 1024), (5, 2048)]
# (D, C) kernel shapes for lsq_weight_backward (Hb down the D rows): ragged C,
# D with few and with many power-of-two blocks.
WEIGHT_SHAPES = [(1, 1), (8, 3), (24, 5), (64, 96), (1024, 40)]
# (M, N, K) for the GEMMs.
GEMM_SHAPES = [(1, 1, 1), (3, 5, 7), (17, 33, 40), (64, 48, 128), (128, 256, 512),
               (200, 136, 1000)]


def activations(shape, seed=0, specials=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32) * 2.0
  if x.size > 4:
    x.flat[::7] *= 6.0                      # values beyond the clip range
    x.flat[1] = 0.5                         # exact tie
    if specials:
      x.flat[2] = np.nan
      x.flat[3] = np.inf
      x.flat[4] = -np.inf
  return jnp.asarray(x)


def int_operand(shape, seed, low=-8, high=7):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(low, high + 1, size=shape).astype(np.int8))


def seed(i=0):
  return jnp.asarray([0x1234567 + i, 0x89ABCDE + 3 * i], jnp.uint32)


def largest_log2(k):
  return hadamard.max_log2_block(k)


def assert_same_ints(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
  mismatch = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
  assert mismatch.size == 0, f"{mismatch.size} mismatches, first at {mismatch[:5]}"


def reference_ops():
  return reference


# Dtypes of the "float" operands (converted to float32 on load, exactly).
FLOAT_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def dtype_id(dtype):
  return jnp.dtype(dtype).name


def random_rows(n, limit, seed=0):
  """n row indices in [0, limit), unsorted, with repeats when n allows."""
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, limit, n)
  if n >= 3:
    rows[1] = rows[0]            # a repeated row
    rows[2] = limit - 1          # the last row
  return jnp.asarray(rows, jnp.int32)


def random_slots(m, s, seed=0):
  """int32 [2, m] slots into s rows: -1 (none) in either, both or neither."""
  rng = np.random.default_rng(seed)
  slots = rng.integers(0, s, (2, m))
  none = rng.random((2, m)) < 0.3
  slots[none] = -1
  if m >= 2:
    slots[:, 0] = -1             # a row with no slot at all (dt row = 0)
    slots[0, 1] = slots[1, 1] = s - 1  # both slots on one row
  return jnp.asarray(slots, jnp.int32)


def assert_same_floats(a, b):
  """Bit-equal floats up to NaN payloads (NaN positions must agree)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
  np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
  np.testing.assert_array_equal(np.where(np.isnan(a), 0, a), np.where(np.isnan(b), 0, b))


def weight_backward_slack(grad, kernel, step, block, qn, qp):
  """How far two correct lsq_weight_backward results may differ.

  v = Hb(kernel) / step is specified with a true division; XLA (jaxlib 0.12
  CPU) rewrites the reference's x / step as x * (1 / step), one rounding
  apart. Where v lies within a few ulps of a half-integer, round(v) - v may
  then jump by 1, so delta_sum may differ by |grad| there. Returns (slack,
  edges): slack = sum of |grad| over such elements (0 for a power-of-two
  step, where both forms are exact), edges = the number of elements within a
  few ulps of the clip edges -qn, qp (where even the STE mask, hence dk, may
  differ; tests choose data without any).
  """
  step = float(step)
  if step > 0 and float(np.log2(step)).is_integer():
    return 0.0, 0
  v = np.asarray(jax.jit(lambda k, s: reference.apply_hadamard(
      k.astype(jnp.float32), int(block), axis=0) / s)(kernel, jnp.float32(step)))
  ulps = 2 * np.spacing(np.abs(v))   # x / s and x * (1 / s) differ by <= 2 ulps
  near_half = np.abs(np.abs(v) % 1.0 - 0.5) <= ulps
  edges = (np.abs(v + qn) <= ulps) | (np.abs(v - qp) <= ulps)
  slack = float(np.sum(np.abs(np.asarray(grad, np.float64))[near_half]))
  return slack, int(np.sum(edges))


def near_limit_operand(shape, axis, seed=0):
  """Small normal values (|x| < 4 with a step of 2^-6), one line along
  ``axis`` near 1, same sign: scaled by 2^126 its +-1 Hadamard sums pass
  float32's max unless the transform pre-scales (the float contract)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 0.05, shape).astype(np.float32)
  line = 0.9 + rng.uniform(0, 0.05, shape[axis]).astype(np.float32)
  if axis == 1:
    x[1, :] = line
  else:
    x[:, 1] = line
  return x


def bit_split_hi_ties():
  """float32 g on every tie of the high digit's rounding t / 14 for M = 1
  (g near (2k + 1) / 14, t = 98 g), with both float32 neighbours."""
  v = (np.arange(-7, 7) * (2 / 14) + 1 / 14).astype(np.float32)
  return np.concatenate([v, np.nextafter(v, np.float32(np.inf)),
                         np.nextafter(v, np.float32(-np.inf))])


def per_row_split_case(shape, dtype, seed=0, specials=False):
  """(g, row_inv) for the per-row split: rows whose sizes span 1e-4 .. 1e2
  (a zero row among them), row_inv = 1 / max|g_i| as the library computes it
  (`bitsplit.row_reciprocals`). With ``specials`` one row holds a NaN and
  another an Inf (their row_inv is 1)."""
  r, c = shape
  g = np.asarray(activations(shape, seed=seed)) * np.logspace(-4, 2, r, dtype=np.float32)[:, None]
  if r >= 3:
    g[r // 2] = 0.0
  if specials and r >= 3 and c >= 2:
    g[0, 1] = np.nan
    g[r - 1, 0] = np.inf
  g = jnp.asarray(g, dtype)
  return g, jax.jit(lambda g: bitsplit.row_reciprocals(bitsplit.row_abs_max(g)))(g)
