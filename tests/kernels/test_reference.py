"""Tests for the pure-JAX reference engine (jint4.kernels.reference).

Oracles: numpy int64 / float64 arithmetic and the jint4.quant building blocks
the engine is specified by.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint4.kernels import contract
from jint4.kernels import reference as ref
from jint4.quant import bitsplit
from jint4.quant import hadamard
from jint4.quant import lsq
from tests.kernels.native_cases import near_limit_operand
from tests.stats import hoeffding_tol


def f64(a):
  return np.asarray(a, np.float64)


def seed(a, b):
  return jnp.asarray([a, b], jnp.uint32)


# ------------------------------------------------------------------ uniform --

uniform = jax.jit(contract.uniform, static_argnums=1)
SHAPE = (400, 250)    # 10^5 draws


def test_uniform_range_dtype_and_resolution():
  u = uniform(seed(1, 2), SHAPE)
  assert u.shape == SHAPE and u.dtype == jnp.float32
  u = f64(u)
  assert u.min() >= 0.0 and u.max() < 1.0
  k = u * 2 ** 16                 # 16 random bits: multiples of 2^-16
  np.testing.assert_array_equal(k, np.round(k))
  # Neighbours 2j, 2j + 1 share one 32-bit hash: the words are (nearly) all
  # distinct (birthday bound: ~1 collision in 5 10^4 words).
  words = k.astype(np.int64).ravel().reshape(-1, 2) @ np.array([1, 2 ** 16])
  assert len(np.unique(words)) >= words.size - 5
  # ... and every one of the 16 bits is a fair coin (Hoeffding, union bound).
  bits = (k.astype(np.int64).ravel()[:, None] >> np.arange(16)) & 1
  t = hoeffding_tol(1.0, u.size, 16)
  assert np.all(np.abs(bits.mean(axis=0) - 0.5) <= t)


def test_uniform24_resolution_and_range():
  u = f64(jax.jit(contract.uniform24, static_argnums=1)(seed(1, 2), 50_000))
  assert u.shape == (50_000,) and u.min() >= 0.0 and u.max() < 1.0
  k = u * 2 ** 24                 # 24 random bits: multiples of 2^-24
  np.testing.assert_array_equal(k, np.round(k))
  bits = (k.astype(np.int64)[:, None] >> np.arange(24)) & 1
  t = hoeffding_tol(1.0, u.size, 24)
  assert np.all(np.abs(bits.mean(axis=0) - 0.5) <= t)
  # Number j is built from pair j of `uniform` (low half, then 8 high bits).
  pair = f64(uniform(seed(1, 2), (10, 2)))
  np.testing.assert_array_equal(
      u[:10], pair[:, 0] + np.floor(pair[:, 1] * 256) * 2.0 ** -24)


def test_uniform_deterministic_and_seed_dependent():
  a = np.asarray(uniform(seed(1, 2), SHAPE))
  np.testing.assert_array_equal(a, np.asarray(uniform(seed(1, 2), SHAPE)))
  # Eager and jit agree (a pure function of seed and index).
  np.testing.assert_array_equal(a[:3], np.asarray(contract.uniform(seed(1, 2),
                                                              (3, 250))))
  # Changing either seed word changes (nearly) every element.
  for other in (seed(2, 2), seed(1, 3), seed(2, 1)):
    b = np.asarray(uniform(other, SHAPE))
    assert np.mean(a == b) < 1e-3


def test_uniform_is_counter_based():
  # Element i depends on (seed, i) only: a prefix of a bigger draw (row-major
  # flat index) and any reshape give the same values.
  big = np.asarray(uniform(seed(5, 6), (64,)))
  np.testing.assert_array_equal(np.asarray(uniform(seed(5, 6), (8, 8))),
                                big.reshape(8, 8))
  np.testing.assert_array_equal(np.asarray(uniform(seed(5, 6), (10,))),
                                big[:10])


def test_uniform_moments():
  u = f64(uniform(seed(3, 4), SHAPE)).ravel()
  n = u.size
  # Hoeffding: u in [0, 1], (u - 1/2)^2 in [0, 1/4], decile indicators in
  # [0, 1]; a union bound over the 12 checks.
  t = hoeffding_tol(1.0, n, 12)
  assert abs(u.mean() - 0.5) <= t
  assert abs(np.mean((u - 0.5) ** 2) - 1 / 12) <= 0.25 * t
  # Each decile holds ~10%.
  counts = np.histogram(u, bins=10, range=(0, 1))[0] / n
  assert np.all(np.abs(counts - 0.1) <= t)


def test_uniform_neighbours_uncorrelated():
  u = f64(uniform(seed(7, 8), SHAPE))
  z = (u - 0.5) * math.sqrt(12)           # mean 0, variance 1
  flat = z.ravel()
  # Under independence a lag correlation is ~N(0, 1/n): 6 sigma bound.
  for lag in (1, 2, SHAPE[1]):            # next element, next-but-one, row
    c = np.mean(flat[:-lag] * flat[lag:])
    assert abs(c) <= 6 / math.sqrt(flat.size - lag), (lag, c)
  # Nor are the streams of seeds one bit apart, in either word (a hash whose
  # last round is a single multiply fails this for seed words 8 and 9).
  for other in (seed(7, 9), seed(6, 8), seed(7, 8 | 2 ** 31), seed(7 | 2 ** 16, 8)):
    z2 = (f64(uniform(other, SHAPE)) - 0.5) * math.sqrt(12)
    assert abs(np.mean(z * z2)) <= 6 / math.sqrt(z.size), other


def test_seeds_from_key():
  s = contract.seeds_from_key(jax.random.PRNGKey(0), 3)
  assert s.shape == (3, 2) and s.dtype == jnp.uint32
  assert len({tuple(r) for r in np.asarray(s).tolist()}) == 3
  s2 = contract.seeds_from_key(jax.random.key(0), 3)     # typed key
  assert s2.shape == (3, 2) and s2.dtype == jnp.uint32


# ---------------------------------------------------------- pack / unpack --

def planes(qn):
  return 1 if qn <= 7 else 2


@functools.partial(jax.jit, static_argnames=("qn", "shape"))
def _roundtrip(code, flags, qn, shape):
  norms = jnp.arange(shape[0], dtype=jnp.int32)   # carried through, as float32
  res = contract.pack_residual(code, flags, norms, qn=qn)
  return res, contract.unpack_residual(res, shape, qn=qn)


def random_codes(rng, shape, qn):
  code = rng.integers(-8, 8, shape).astype(np.int8)
  flags = rng.integers(0, 2 ** planes(qn), shape).astype(np.uint8)
  return code, flags


SIZES = [(1,), (13,), (3, 5), (4, 250)]   # 1000 = 4 * 250: a multiple of 8


@pytest.mark.parametrize("qn", [7, 8])
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_pack_unpack_roundtrip(qn, shape):
  rng = np.random.default_rng(sum(shape) + qn)
  code, flags = random_codes(rng, shape, qn)
  if code.size >= 64:   # both extreme codes and every flag value occur
    assert code.min() == -8 and code.max() == 7
    assert len(np.unique(flags)) == 2 ** planes(qn)
  res, (code2, flags2) = _roundtrip(jnp.asarray(code), jnp.asarray(flags),
                                    qn=qn, shape=shape)
  assert res.nibbles.dtype == res.flags.dtype == jnp.uint8
  assert code2.dtype == jnp.int8 and flags2.dtype == jnp.uint8
  assert code2.shape == flags2.shape == shape
  assert res.norms.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(res.norms), np.arange(shape[0]))
  np.testing.assert_array_equal(np.asarray(code2), code)
  np.testing.assert_array_equal(np.asarray(flags2), flags)
  n = code.size
  # One flag plane per flag bit, ceil(n / 8) bytes each.
  assert res.flags.shape == (planes(qn), -(-n // 8))
  if n % 8 == 0:   # 4 + 1 (or 2) bits per element, nothing wasted
    assert res.nibbles.shape == (n // 2,)
    assert (res.nibbles.size + res.flags.size) / n == {7: 0.625, 8: 0.75}[qn]


@pytest.mark.parametrize("qn", [7, 8])
@pytest.mark.parametrize("shape", SIZES + [(7,)], ids=str)
def test_packed_nibble_bytes_are_ceil_half(shape, qn):
  n = int(np.prod(shape))
  code, flags = random_codes(np.random.default_rng(0), shape, qn)
  res, (code2, _) = _roundtrip(jnp.asarray(code), jnp.asarray(flags), qn=qn,
                               shape=shape)
  np.testing.assert_array_equal(np.asarray(code2), code)
  assert res.nibbles.shape == (-(-n // 2),)


def test_packed_layout():
  # nibbles: low nibble first; flags: bit j of byte i is element 8 i + j.
  code = np.array([1, -1, 7, -8, 0, 3, -2, 5], np.int8)
  flags = np.array([1, 0, 3, 2, 0, 1, 1, 2], np.uint8)
  res = contract.pack_residual(jnp.asarray(code), jnp.asarray(flags), jnp.zeros((1,)),
                          qn=8)
  nib = np.asarray(res.nibbles)
  np.testing.assert_array_equal(nib & 0xF, code[0::2].astype(np.uint8) & 0xF)
  np.testing.assert_array_equal(nib >> 4, code[1::2].astype(np.uint8) & 0xF)
  fl = np.asarray(res.flags)
  for plane in range(2):
    np.testing.assert_array_equal((fl[plane, 0] >> np.arange(8)) & 1,
                                  (flags >> plane) & 1)


# ---------------------------------------- hadamard_quantize, lsq_backward --

M, K = 16, 64


def make_x(seed_):
  rng = np.random.default_rng(seed_)
  x = rng.normal(0, 1, (M, K))
  x[:, 9] += 30.0                                # one outlier column
  return jnp.asarray(x, jnp.float32)


@functools.partial(jax.jit, static_argnames=("block", "qn", "qp"))
def engine_run(x, grad, s, block, qn, qp):
  """The engine ops and their specification, in one compile per config."""
  out = {}
  xh = hadamard.hadamard_transform(x, block)
  # A step half the init value, so that the clamp binds somewhere.
  step = 0.5 * lsq.init_step_size(xh, qp=qp)
  v = xh / step
  out["v"] = v
  out["want_q"] = lsq.quantize(xh, step, qn=qn, qp=qp)
  out["q"], res = ref.hadamard_quantize(x, step, block=block, qn=qn, qp=qp,
                                        seed=s)
  out["res"] = res
  out["q_res"] = ref.residual_values(res, x.shape, qn=qn, qp=qp)
  # The block size traced (log2, as the block search gives it).
  log2 = jnp.int32(int(math.log2(block))) + 0 * s[0].astype(jnp.int32)
  out["q_dyn"], res_dyn = ref.hadamard_quantize(x, step, block=log2, qn=qn,
                                                qp=qp, seed=s)
  out["q_res_dyn"] = ref.residual_values(res_dyn, x.shape, qn=qn, qp=qp)
  out["q_noseed"], out["none"] = ref.hadamard_quantize(x, step, block=block,
                                                       qn=qn, qp=qp)
  # Backward: lsq_backward and what decode_backward_state implies.
  out["dt"], out["dsum"] = ref.lsq_backward(grad, res, qn=qn, qp=qp)
  code, flags = contract.unpack_residual(res, x.shape, qn=qn)
  _, out["mask"], out["dhat"] = lsq.decode_backward_state(code, flags, qn=qn,
                                                          qp=qp)
  out["in_range"] = lsq.in_range(v, qn=qn, qp=qp)
  out["code"], out["flags"] = code, flags
  out["code_spec"], out["flags_spec"] = lsq.encode_backward_state(
      v, contract.uniform(s, v.shape), qn=qn, qp=qp)
  return out


CONFIGS = [(32, 7, 7), (8, 8, 7), (1, 7, 7)]


@functools.lru_cache(maxsize=None)
def run_config(block, qn, qp):
  x = make_x(block)
  grad = jnp.asarray(np.random.default_rng(block).normal(0, 1, (M, K)),
                     jnp.float32)
  return x, grad, engine_run(x, grad, seed(block, 1), block=block, qn=qn,
                             qp=qp)


@pytest.mark.parametrize("block, qn, qp", CONFIGS)
def test_hadamard_quantize(block, qn, qp):
  x, _, out = run_config(block, qn, qp)
  v = f64(out["v"])
  assert ((v < -qn) | (v > qp)).any() and ((v >= -qn) & (v <= qp)).any()
  want = f64(out["want_q"])
  np.testing.assert_array_equal(want, np.clip(np.round(want), -qn, qp))
  assert out["q"].dtype == jnp.int8 and out["q"].shape == x.shape
  for key in ("q", "q_res", "q_dyn", "q_res_dyn", "q_noseed"):
    np.testing.assert_array_equal(f64(out[key]), want, err_msg=key)
  assert out["none"] is None
  # The residual is 4 bits + 1 (or 2) flag planes.
  n = x.size
  assert out["res"].nibbles.shape == (n // 2,)
  assert out["res"].flags.shape == (1 if qn <= 7 else 2, n // 8)


@pytest.mark.parametrize("block, qn, qp", CONFIGS)
def test_lsq_backward_matches_decoded_state(block, qn, qp):
  _, grad, out = run_config(block, qn, qp)
  mask, dhat = np.asarray(out["mask"]), f64(out["dhat"])
  np.testing.assert_array_equal(np.asarray(out["dt"]),
                                np.where(mask, np.asarray(grad), 0.0))
  np.testing.assert_allclose(float(out["dsum"]), np.sum(f64(grad) * dhat),
                             rtol=1e-5, atol=1e-5)
  # The decoded state is the STE mask of v = (x Hb) / step and the
  # encoding of the engine's own noise uniform(seed).
  np.testing.assert_array_equal(mask, np.asarray(out["in_range"]))
  assert not mask.all() and mask.any()
  np.testing.assert_array_equal(np.asarray(out["code"]),
                                np.asarray(out["code_spec"]))
  np.testing.assert_array_equal(np.asarray(out["flags"]),
                                np.asarray(out["flags_spec"]))
  # Where clipped, delta_hat is LSQ's delta exactly; inside it is +-1/2.
  v = f64(out["v"])
  np.testing.assert_array_equal(dhat[~mask], np.where(v < 0, -qn, qp)[~mask])
  assert np.isin(dhat[mask], [-0.5, 0.5]).all()


@pytest.mark.parametrize("block, qn, qp", CONFIGS)
def test_hadamard_quantize_row_norms(block, qn, qp):
  x, _, out = run_config(block, qn, qp)
  norms = np.asarray(out["res"].norms)
  assert norms.shape == (M,) and norms.dtype == np.float32
  q = np.asarray(out["q"], np.int64)
  np.testing.assert_allclose(norms, np.sqrt(np.sum(q * q, axis=1)), rtol=1e-7)


def test_hadamard_quantize_nonfinite_row_has_nan_norm():
  x = np.array(make_x(3))
  x[2, 5] = np.nan
  x[7, 0] = -np.inf
  q, res = jax.jit(functools.partial(ref.hadamard_quantize, block=16, qn=7, qp=7))(
      jnp.asarray(x), jnp.float32(0.5), seed=seed(1, 2))
  norms = np.asarray(res.norms)
  bad = np.zeros(M, bool)
  bad[[2, 7]] = True
  np.testing.assert_array_equal(np.isnan(norms), bad)
  q = np.asarray(q, np.int64)
  np.testing.assert_allclose(norms[~bad], np.sqrt(np.sum(q * q, axis=1))[~bad])
  # The NaN spreads through its Hadamard block, whose codes become -qn (the
  # clamp's low end, as the GPU's min/max clamp gives; the row is poisoned
  # through its NaN norm anyway).
  assert (q[2, :16] == -7).all()


@pytest.mark.parametrize("block", [1, 4, 16])
def test_hadamard_quantize_axis0_and_transpose(block):
  """axis=0 is the axis=1 transform of the transpose; transpose writes q^T."""
  w = jnp.asarray(np.random.default_rng(block).normal(0, 1, (64, 48)), jnp.float32)
  step = jnp.float32(0.3)
  f = jax.jit(ref.hadamard_quantize, static_argnames=("block", "qn", "qp", "axis",
                                                       "transpose"))
  kw = dict(block=block, qn=7, qp=7)
  q_rows, _ = f(w.T, step, **kw)                              # [48, 64]
  q0, none = f(w, step, axis=0, **kw)
  q0t, _ = f(w, step, axis=0, transpose=True, **kw)
  assert none is None and q0.shape == (64, 48) and q0t.shape == (48, 64)
  np.testing.assert_array_equal(np.asarray(q0), np.asarray(q_rows).T)
  np.testing.assert_array_equal(np.asarray(q0t), np.asarray(q_rows))
  q1, _ = f(w, step, axis=1, **kw)
  q1t, _ = f(w, step, axis=1, transpose=True, **kw)
  np.testing.assert_array_equal(np.asarray(q1t), np.asarray(q1).T)
  # ... and is LSQ of the column transform (matmul form, up to float ties).
  want = lsq.quantize(hadamard.hadamard_transform(w, block, axis=0), step, qn=7, qp=7)
  assert np.mean(np.asarray(q0) == np.asarray(want)) > 0.99
  # A traced block gives the same.
  q_dyn = jax.jit(lambda w, l: ref.hadamard_quantize(w, step, block=l, qn=7, qp=7,
                                                     axis=0, transpose=True)[0])(
      w, jnp.int32(int(math.log2(block))))
  np.testing.assert_array_equal(np.asarray(q_dyn), np.asarray(q0t))


def test_hadamard_quantize_residual_only_for_rows():
  x = make_x(0)
  for kw in (dict(axis=0), dict(transpose=True), dict(axis=0, transpose=True)):
    with pytest.raises(ValueError, match="residual only for axis=1"):
      ref.hadamard_quantize(x, jnp.float32(1.0), block=1, qn=7, qp=7,
                            seed=seed(1, 1), **kw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_hadamard_quantize_half_inputs_are_exact_float32(dtype):
  x = make_x(4).astype(dtype)
  f = jax.jit(functools.partial(ref.hadamard_quantize, block=8, qn=8, qp=7))
  q, res = f(x, jnp.float32(0.4), seed=seed(3, 4))
  q32, res32 = f(x.astype(jnp.float32), jnp.float32(0.4), seed=seed(3, 4))
  for a, b in zip((q, *res), (q32, *res32)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _residual_of(shape, qn, seed_=0):
  x = jnp.asarray(np.random.default_rng(seed_).normal(0, 2, shape), jnp.float32)
  return ref.hadamard_quantize(x, jnp.float32(0.5), block=1, qn=qn, qp=7,
                               seed=seed(seed_, 9))


@pytest.mark.parametrize("qn", [7, 8])
def test_residual_values_rows_and_transpose(qn):
  shape = (9, 12)
  q, res = _residual_of(shape, qn)
  full = np.asarray(ref.residual_values(res, shape, qn=qn, qp=7))
  np.testing.assert_array_equal(full, np.asarray(q))     # the GEMM operand
  rows = np.array([8, 0, 3, 3, 5, 8, 1], np.int32)       # unsorted, repeats
  got = ref.residual_values(res, shape, qn=qn, qp=7, rows=jnp.asarray(rows))
  np.testing.assert_array_equal(np.asarray(got), full[rows])
  got_t = ref.residual_values(res, shape, qn=qn, qp=7, rows=jnp.asarray(rows),
                              transpose=True)
  assert got_t.shape == (12, 7)
  np.testing.assert_array_equal(np.asarray(got_t), full[rows].T)
  np.testing.assert_array_equal(
      np.asarray(ref.residual_values(res, shape, qn=qn, qp=7, transpose=True)), full.T)


@pytest.mark.parametrize("block", [1, 4, 32])
def test_lsq_backward_block_and_dtype(block):
  _, grad, out = run_config(32, 7, 7)
  res, mask = out["res"], np.asarray(out["mask"])
  f = jax.jit(ref.lsq_backward, static_argnames=("qn", "qp", "block", "out_dtype"))
  dt, dsum = f(grad, res, qn=7, qp=7, block=block)
  want = hadamard.hadamard_transform(jnp.where(mask, grad, 0.0), block)   # Hb^T = Hb
  np.testing.assert_allclose(np.asarray(dt), np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(dsum), float(out["dsum"]), rtol=1e-6)
  for dtype in (jnp.bfloat16, jnp.float16):
    dt_h, _ = f(grad, res, qn=7, qp=7, block=block, out_dtype=dtype)
    assert dt_h.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dt_h), np.asarray(dt.astype(dtype)))


def test_lsq_backward_slots():
  """Row t of dT_hat is grad[slots[0, t]] + grad[slots[1, t]], -1 adding nothing."""
  _, res = _residual_of((6, 16), 8, seed_=2)
  grad = np.random.default_rng(3).normal(0, 1, (5, 16)).astype(np.float32)
  slots = np.array([[0, -1, 4, -1, 2, 2],
                    [3, 1, -1, -1, 2, 0]], np.int32)
  summed = np.zeros((6, 16), np.float32)
  for t in range(6):
    for p in range(2):
      if slots[p, t] >= 0:
        summed[t] += grad[slots[p, t]]
  f = jax.jit(ref.lsq_backward, static_argnames=("qn", "qp", "block"))
  dt, dsum = f(jnp.asarray(grad), res, qn=8, qp=7, slots=jnp.asarray(slots), block=4)
  dt2, dsum2 = f(jnp.asarray(summed), res, qn=8, qp=7, block=4)
  np.testing.assert_array_equal(np.asarray(dt), np.asarray(dt2))
  np.testing.assert_array_equal(np.asarray(dsum), np.asarray(dsum2))
  assert not np.asarray(dt)[3].any()                  # no slot: a zero row



# ----------------------------------------------------- lsq_weight_backward --

@pytest.mark.parametrize("block", [1, 4, 32])
def test_lsq_weight_backward_is_lsq_of_the_column_transform(block):
  """dK = Hb (1[in range] grad) and delta_sum = sum grad * delta with
  v = (kernel Hb) / step down the columns: jint4.quant's lsq and hadamard
  (matmul form), up to float rounding."""
  qn, qp = 8, 7
  rng = np.random.default_rng(block)
  kernel = jnp.asarray(rng.normal(0, 1.5, (64, 48)), jnp.float32)
  grad = jnp.asarray(rng.normal(0, 1, (64, 48)), jnp.float32)
  step = jnp.float32(0.3)
  f = jax.jit(ref.lsq_weight_backward, static_argnames=("block", "qn", "qp", "out_dtype"))
  dk, dsum = f(grad, kernel, step, block=block, qn=qn, qp=qp)
  assert dk.dtype == jnp.float32 and dk.shape == kernel.shape and dsum.shape == ()

  @jax.jit
  def spec(grad, kernel, step):
    v = hadamard.hadamard_transform(kernel, block, axis=0, method="matmul") / step
    masked = jnp.where(lsq.in_range(v, qn=qn, qp=qp), grad, 0.0)
    return (v, hadamard.hadamard_transform(masked, block, axis=0, method="matmul"),
            lsq.delta(v, qn=qn, qp=qp))

  v, want_dk, delta = (f64(a) for a in spec(grad, kernel, step))
  assert ((v < -qn) | (v > qp)).any() and ((v >= -qn) & (v <= qp)).any()
  # The two Hadamard forms round differently: no v may sit at a clip edge
  # (the mask would be ambiguous); near a half-integer, round(v) - v may jump
  # by 1, which the delta_sum tolerance allows for.
  tol = 1e-5 * np.maximum(1.0, np.abs(v))
  assert not ((np.abs(v + qn) <= tol) | (np.abs(v - qp) <= tol)).any()
  near_half = np.abs(np.abs(v) % 1.0 - 0.5) <= tol
  np.testing.assert_allclose(f64(dk), want_dk, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(dsum), np.sum(f64(grad) * delta), rtol=1e-5,
                             atol=1e-4 + np.sum(np.abs(f64(grad))[near_half]))
  # A traced log2 block gives the same.
  dk_dyn, dsum_dyn = jax.jit(lambda g, k, s, l: ref.lsq_weight_backward(
      g, k, s, block=l, qn=qn, qp=qp))(grad, kernel, step, jnp.int32(int(math.log2(block))))
  np.testing.assert_array_equal(np.asarray(dk_dyn), np.asarray(dk))
  np.testing.assert_allclose(float(dsum_dyn), float(dsum), rtol=1e-6)
  # A bfloat16 kernel is used at its (exact) float32 value; dK comes back in
  # the kernel's dtype unless out_dtype says otherwise.
  kb = kernel.astype(jnp.bfloat16)
  dk_b, dsum_b = f(grad, kb, step, block=block, qn=qn, qp=qp)
  dk_f, dsum_f = f(grad, kb.astype(jnp.float32), step, block=block, qn=qn, qp=qp)
  assert dk_b.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(dk_b), np.asarray(dk_f.astype(jnp.bfloat16)))
  np.testing.assert_array_equal(np.asarray(dsum_b), np.asarray(dsum_f))
  dk_b32, _ = f(grad, kb, step, block=block, qn=qn, qp=qp, out_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(dk_b32), np.asarray(dk_f))


# ------------------------------------------------------------------- GEMMs --

gemm_i32 = jax.jit(ref.int_gemm_i32)


def rand_int8(rng, shape, lo=-8, hi=7):
  return rng.integers(lo, hi + 1, shape).astype(np.int8)


def test_int_gemm_i32_exact():
  rng = np.random.default_rng(5)
  a, b = rand_int8(rng, (33, 96)), rand_int8(rng, (17, 96))
  out = gemm_i32(jnp.asarray(a), jnp.asarray(b))
  assert out.dtype == jnp.int32 and out.shape == (33, 17)
  np.testing.assert_array_equal(np.asarray(out),
                                a.astype(np.int64) @ b.astype(np.int64).T)


def test_int_gemm_i32_accumulates_in_int32():
  # K = 4096 full-range products: sums up to 4096 * 64 = 2^18, far past
  # int8 / int16 accumulators.
  rng = np.random.default_rng(6)
  k = 4096
  a = rand_int8(rng, (4, k), -128, 127)
  b = rand_int8(rng, (3, k), -128, 127)
  a[0], b[0] = -8, -8                      # 64 * 4096 = 262144
  a[1], b[1] = 127, -128                   # -16256 * 4096
  out = np.asarray(gemm_i32(jnp.asarray(a), jnp.asarray(b)))
  want = a.astype(np.int64) @ b.astype(np.int64).T
  assert want[0, 0] == 64 * k and want[1, 1] == -127 * 128 * k
  assert np.abs(want).max() > 2 ** 15
  np.testing.assert_array_equal(out, want)


def test_int_gemm_scales():
  rng = np.random.default_rng(7)
  a, b = rand_int8(rng, (12, 64)), rand_int8(rng, (9, 64))
  acc = a.astype(np.int64) @ b.astype(np.int64).T
  scale = jnp.float32(0.0123)
  row_scale = jnp.asarray(rng.uniform(0.5, 2.0, 12), jnp.float32)
  out = ref.int_gemm(jnp.asarray(a), jnp.asarray(b), scale=scale,
                     row_scale=row_scale)
  assert out.dtype == jnp.float32 and out.shape == (12, 9)
  want = float(scale) * f64(row_scale)[:, None] * acc
  np.testing.assert_allclose(f64(out), want, rtol=1e-6, atol=1e-6)
  out = ref.int_gemm(jnp.asarray(a), jnp.asarray(b), scale=scale)
  np.testing.assert_allclose(f64(out), float(scale) * acc, rtol=1e-6,
                             atol=1e-6)
  out = ref.int_gemm(jnp.asarray(a), jnp.asarray(b), scale=scale,
                     row_scale=row_scale, out_dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(f64(out), want, rtol=2 ** -8, atol=1e-6)
  # Large K, full int8 range: an int32 accumulator (|sums| up to 2^18 here,
  # exact in the float32 epilogue below 2^24).
  a = rand_int8(rng, (4, 4096), -128, 127)
  b = rand_int8(rng, (3, 4096), -128, 127)
  a[0], b[0] = -8, -8
  out = ref.int_gemm(jnp.asarray(a), jnp.asarray(b), scale=jnp.float32(1.0))
  want = a.astype(np.int64) @ b.astype(np.int64).T
  assert np.abs(want).max() > 2 ** 15
  np.testing.assert_array_equal(f64(out), want)


def test_int_gemm_col_bias_and_joined_digits():
  """int4=False: any int8 operand (joined digits up to +-98), plus col_bias."""
  rng = np.random.default_rng(8)
  a, b = rand_int8(rng, (10, 300), -98, 98), rand_int8(rng, (6, 300))
  acc = a.astype(np.int64) @ b.astype(np.int64).T
  row_scale = rng.uniform(0.5, 2.0, 10).astype(np.float32)
  col_bias = rng.normal(0, 1, 6).astype(np.float32)
  out = ref.int_gemm(jnp.asarray(a), jnp.asarray(b), scale=jnp.float32(0.25),
                     row_scale=jnp.asarray(row_scale), col_bias=jnp.asarray(col_bias),
                     int4=False)
  want = 0.25 * acc * f64(row_scale)[:, None] + f64(col_bias)[None, :]
  np.testing.assert_allclose(f64(out), want, rtol=1e-6, atol=1e-5)
  exact = ref.int_gemm(jnp.asarray(a), jnp.asarray(b), scale=jnp.float32(1.0),
                       int4=False)
  np.testing.assert_array_equal(f64(exact), acc)


# ------------------------------------------------------------- bit_split --

def test_bit_split_row_norms():
  rng = np.random.default_rng(9)
  g = rng.normal(0, 1e-3, (24, 40))
  g[[2, 17]] *= 40.0
  g[5] = 0.0                                     # a zero row has norm 0
  g = jnp.asarray(g, jnp.float32)
  s = seed(13, 14)
  (g2, s_hi, s_lo, norms), want = jax.jit(
      lambda g, s: (ref.bit_split(g, s),
                    bitsplit.bit_split(g, contract.uniform(s, g.shape))))(g, s)
  hi, lo = g2[:24], g2[24:]
  assert g2.shape == (48, 40) and g2.dtype == jnp.int8
  # The halves are bitsplit.bit_split with the engine's counter-based noise.
  for got, w in zip((hi, lo, s_hi, s_lo), want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
  assert norms.shape == (48,) and norms.dtype == jnp.float32
  hi_norm, lo_norm = f64(norms[:24]), f64(norms[24:])
  np.testing.assert_allclose(
      hi_norm, np.linalg.norm(float(s_hi) * f64(hi), axis=1), rtol=1e-6)
  np.testing.assert_allclose(
      lo_norm, np.linalg.norm(float(s_lo) * f64(lo), axis=1), rtol=1e-6)
  assert hi_norm[5] == 0.0 and lo_norm[5] == 0.0
  assert hi_norm[[2, 17]].min() > 10 * np.median(hi_norm)
  np.testing.assert_allclose(f64(ref.row_norms(hi)), np.linalg.norm(f64(hi), axis=1),
                             rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_bit_split_joined_is_14_hi_plus_lo(dtype):
  g = jnp.asarray(np.random.default_rng(10).normal(0, 1e-2, (13, 29)), dtype)
  s = seed(5, 6)
  (g2, s_hi, s_lo, _), (v, vt, t_hi, t_lo) = jax.jit(
      lambda g, s: (ref.bit_split(g, s), ref.bit_split_joined(g, s)))(g, s)
  hi, lo = np.asarray(g2[:13], np.int32), np.asarray(g2[13:], np.int32)
  assert v.dtype == vt.dtype == jnp.int8 and v.shape == (13, 29) and vt.shape == (29, 13)
  np.testing.assert_array_equal(np.asarray(v, np.int32), 14 * hi + lo)
  np.testing.assert_array_equal(np.asarray(vt), np.asarray(v).T)
  assert np.abs(np.asarray(v, np.int32)).max() <= 98
  assert float(t_hi) == float(s_hi) and float(t_lo) == float(s_lo)
  # One GEMM on v is the pair of INT4 GEMMs of the halves: s_lo v = s_hi hi + s_lo lo.
  np.testing.assert_allclose(float(s_lo) * f64(v), float(s_hi) * hi + float(s_lo) * lo,
                             rtol=1e-6, atol=1e-12)
  # The same split as of the float32 values (the conversion is exact).
  v32 = ref.bit_split_joined(g.astype(jnp.float32), s)[0]
  np.testing.assert_array_equal(np.asarray(v), np.asarray(v32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bit_split_with_given_abs_max(dtype):
  """abs_max: the caller's max|g| (e.g. max|G| all-reduced over the shards of
  a sharded G), used as given. The true max gives the split that computes it,
  bit for bit; a larger one sets the scales, and the split stays an unbiased
  estimate of g (each element within one lo step)."""
  rng = np.random.default_rng(12)
  g = jnp.asarray(rng.normal(0, 1e-2, (8, 16)), dtype)
  s = seed(7, 8)
  m = bitsplit.abs_max(g)
  own, given = jax.jit(lambda g, s, m: (ref.bit_split(g, s), ref.bit_split(g, s, m)))(g, s, m)
  for a, b in zip(given, own):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  big = np.float32(2.0) * np.float32(m)                  # 2x the true max
  split = jax.jit(lambda s: ref.bit_split(g, s, abs_max=big))
  g2, s_hi, s_lo, norms = split(s)
  assert float(s_hi) == float(big * np.float32(1 / 7))
  assert float(s_lo) == float(big * np.float32(1 / 98))
  assert float(s_hi) == 2 * float(own[1]) and float(s_lo) == 2 * float(own[2])
  hi, lo = f64(g2[:8]), f64(g2[8:])
  assert np.abs(hi).max() <= 4                           # |t| <= 49: half the range
  np.testing.assert_allclose(f64(norms), np.concatenate(
      [float(s_hi) * np.linalg.norm(hi, axis=1), float(s_lo) * np.linalg.norm(lo, axis=1)]),
      rtol=1e-6)
  decoded = float(s_hi) * hi + float(s_lo) * lo
  assert np.all(np.abs(decoded - f64(g)) <= float(s_lo) * (1 + 1e-5))
  # Unbiased: the mean over seeds of the decoded split is g.
  n = 4000
  seeds = jnp.stack([jnp.arange(n, dtype=jnp.uint32), jnp.full((n,), 9, jnp.uint32)], 1)
  g2s, s_his, s_los, _ = jax.jit(jax.vmap(split))(seeds)
  mean = (f64(s_his)[:, None, None] * f64(g2s[:, :8])
          + f64(s_los)[:, None, None] * f64(g2s[:, 8:])).mean(axis=0)
  tol = hoeffding_tol(float(s_lo), n, g.size)
  assert np.all(np.abs(mean - f64(g)) <= tol + 1e-6 * float(s_lo))
  # The joined split takes the same abs_max the same way.
  v, _, t_hi, t_lo = ref.bit_split_joined(g, s, abs_max=big)
  np.testing.assert_array_equal(f64(v), 14 * hi + lo)
  assert float(t_hi) == float(s_hi) and float(t_lo) == float(s_lo)


def test_resplit_rows_is_joined_split_of_gathered_rows():
  rng = np.random.default_rng(11)
  g = jnp.asarray(rng.normal(0, 1e-3, (8, 24)), jnp.float32)
  g2 = ref.bit_split(g, seed(1, 2))[0]                         # [16, 24]
  rows = np.array([15, 0, 3, 3, 9, 15, 7], np.int32)           # unsorted, repeats
  row_scale = rng.uniform(0.1, 3.0, 7).astype(np.float32)
  vt, s_hi, s_lo = jax.jit(ref.resplit_rows)(g2, jnp.asarray(rows),
                                             jnp.asarray(row_scale), seed(3, 4))
  assert vt.shape == (24, 7) and vt.dtype == jnp.int8
  t = np.asarray(g2, np.float32)[rows] * row_scale[:, None]
  v, vt2, t_hi, t_lo = ref.bit_split_joined(jnp.asarray(t), seed(3, 4))
  np.testing.assert_array_equal(np.asarray(vt), np.asarray(vt2))
  np.testing.assert_array_equal(np.asarray(vt), np.asarray(v).T)
  assert float(s_hi) == float(t_hi) and float(s_lo) == float(t_lo)
  assert float(s_lo) == np.float32(np.abs(t).max()) * np.float32(1 / 98)


# ------------------------------------------------ inputs near float32's limit --
#
# The butterflies run on x * 2^-L (the float contract), so a finite x whose
# +-1 sums would pass float32's largest value (up to 2^L * max|x|)
# quantizes as x / 2^126 does with step / 2^126.

BIG = 2.0 ** 126


def _quantize_near_limit(mod, x, w, step, block):
  """Activations with a residual, a kernel's axis-0 codes and both weight
  layouts (the module's hadamard_quantize / hadamard_quantize_weight)."""
  return (mod.hadamard_quantize(x, step, block=block, qn=7, qp=7, seed=seed(1, 2)),
          mod.hadamard_quantize(w, step, block=block, qn=8, qp=7, axis=0, transpose=True),
          mod.hadamard_quantize_weight(w, step, block=block, qn=7, qp=7))


@pytest.mark.parametrize("block", [32, 1024, "traced"])
def test_hadamard_quantize_near_float32_limit(block):
  x = near_limit_operand((8, 1024), axis=1)
  w = near_limit_operand((1024, 8), axis=0, seed=1)
  step = np.float32(2.0 ** -6)
  run = jax.jit(lambda x, w, s, l: _quantize_near_limit(
      ref, x, w, s, l if block == "traced" else block))
  log2 = jnp.int32(10)
  want = run(jnp.asarray(x), jnp.asarray(w), jnp.float32(step), log2)
  assert np.isfinite(x * BIG).all() and np.isfinite(w * BIG).all()
  got = run(jnp.asarray(x * BIG), jnp.asarray(w * BIG), jnp.float32(step * BIG), log2)
  (q, _), _, (_, _, poison) = want
  assert len(np.unique(np.asarray(q))) > 8          # codes spread over the range
  assert not np.asarray(poison).any()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("block", [32, 64])
def test_lsq_backward_near_float32_limit(block):
  """A gradient times 2^120 gives dT times 2^120 (exactly) and delta_sum
  times 2^120, finite, where the +-1 sums alone would overflow."""
  scale = np.float32(2.0 ** 120)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(0, 0.3, (8, 64)), jnp.float32)
  _, res = ref.hadamard_quantize(x, jnp.float32(0.3), block=block, qn=7, qp=7,
                                 seed=seed(3, 4))
  g = rng.normal(0, 0.5, (8, 64)).astype(np.float32)
  g[2] = 12.0 + rng.uniform(0, 1, 64)            # same sign: block sums near 2^128
  f = jax.jit(lambda g: ref.lsq_backward(g, res, qn=7, qp=7, block=block))
  dt, ds = f(jnp.asarray(g))
  dt_big, ds_big = f(jnp.asarray(g * scale))
  assert np.isfinite(np.asarray(dt_big)).all() and np.isfinite(float(ds_big))
  np.testing.assert_array_equal(np.asarray(dt_big), np.asarray(dt) * scale)
  np.testing.assert_allclose(float(ds_big), float(ds) * float(scale), rtol=1e-5)

  kernel = jnp.asarray(rng.normal(0, 0.3, (64, 8)), jnp.float32)
  gw = rng.normal(0, 0.5, (64, 8)).astype(np.float32)
  gw[:, 5] = 12.0 + rng.uniform(0, 1, 64)
  fw = jax.jit(lambda g: ref.lsq_weight_backward(g, kernel, jnp.float32(0.3),
                                                 block=block, qn=7, qp=7))
  dk, dsw = fw(jnp.asarray(gw))
  dk_big, dsw_big = fw(jnp.asarray(gw * scale))
  assert np.isfinite(np.asarray(dk_big)).all() and np.isfinite(float(dsw_big))
  np.testing.assert_array_equal(np.asarray(dk_big), np.asarray(dk) * scale)
  np.testing.assert_allclose(float(dsw_big), float(dsw) * float(scale), rtol=1e-5)
