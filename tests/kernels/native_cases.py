"""Shared cases for the native-vs-reference tests (CPU here, CUDA in the GPU suite)."""

import jax
import jax.numpy as jnp
import numpy as np

from jint4.kernels import reference
from jint4.quant import hadamard

# (M, K) shapes for the quantize ops: ragged sizes included (M*K odd, not a
# multiple of 8, K not a multiple of 16).
QUANT_SHAPES = [(1, 1), (3, 5), (7, 24), (16, 32), (33, 96), (64, 1024), (5, 2048)]
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
