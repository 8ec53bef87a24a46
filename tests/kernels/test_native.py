"""Native CPU handlers against their pure-JAX twins (and engine dispatch).

Integer outputs must be bit-identical; float outputs equal up to rounding.
The native extension is built by `pip install .`; on a machine where it is
not, these tests skip, unless JINT4_REQUIRE_NATIVE=1 (CI sets it), where a
missing build fails them.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint4
from jint4 import kernels
from jint4.kernels import engine as engine_lib
from jint4.kernels import native, reference
from jint4.quant import bitsplit, hadamard
from tests.kernels.native_cases import (FLOAT_DTYPES, GEMM_SHAPES, QUANT_SHAPES,
                                        WEIGHT_SHAPES, activations, assert_same_floats,
                                        assert_same_ints, bit_split_hi_ties, dtype_id,
                                        int_operand, largest_log2, near_limit_operand,
                                        random_rows, random_slots, per_row_split_case, seed,
                                        weight_backward_slack)

if not native.available():
  if os.environ.get("JINT4_REQUIRE_NATIVE") == "1":
    raise RuntimeError(f"JINT4_REQUIRE_NATIVE=1 but {native.reason()}")
  pytest.skip(f"native engine not built: {native.reason()}", allow_module_level=True)

CPU = jax.devices("cpu")[0]


def on_cpu(fn, *args, **kwargs):
  with jax.default_device(CPU):
    return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def log2_blocks(size):
  """Block exponents to try on a dim: none, the smallest and the largest."""
  return sorted({0, min(1, largest_log2(size)), largest_log2(size)})


@pytest.mark.parametrize("qn,qp,dtype", [(7, 7, jnp.float32), (8, 7, jnp.float32),
                                         (3, 4, jnp.float32), (7, 7, jnp.bfloat16),
                                         (8, 7, jnp.float16)],
                         ids=lambda v: dtype_id(v) if isinstance(v, type) else str(v))
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_hadamard_quantize_bit_exact(shape, qn, qp, dtype):
  x = activations(shape, specials=True).astype(dtype)
  step = jnp.float32(0.37)
  for log2 in log2_blocks(shape[1]):
    args = dict(block=2 ** log2, qn=qn, qp=qp, seed=seed(log2))
    q_ref, r_ref = on_cpu(reference.hadamard_quantize, x, step, **args)
    q_nat, r_nat = on_cpu(native.hadamard_quantize, x, step, **args)
    assert_same_ints(q_nat, q_ref)
    assert_same_ints(r_nat.nibbles, r_ref.nibbles)
    assert_same_ints(r_nat.flags, r_ref.flags)
    assert r_nat.norms.shape == (shape[0],)
    assert_same_floats(r_nat.norms, r_ref.norms)
    q_only, none = on_cpu(native.hadamard_quantize, x, step, block=2 ** log2, qn=qn, qp=qp)
    assert none is None
    assert_same_ints(q_only, q_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(24, 7), (1024, 3)], ids=str)
def test_hadamard_quantize_axis_and_transpose(shape, dtype):
  x = activations(shape, seed=11, specials=True).astype(dtype)
  step = jnp.float32(0.29)
  for axis in (0, 1):
    for log2 in log2_blocks(shape[axis]):
      for transpose in (False, True):
        args = dict(block=2 ** log2, qn=8, qp=7, axis=axis, transpose=transpose)
        q_ref, _ = on_cpu(reference.hadamard_quantize, x, step, **args)
        q_nat, none = on_cpu(native.hadamard_quantize, x, step, **args)
        assert none is None
        assert q_nat.shape == (shape[::-1] if transpose else shape)
        assert_same_ints(q_nat, q_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(24, 7), (1024, 3)], ids=str)
def test_hadamard_quantize_weight_is_both_axis0_layouts(shape, dtype):
  w = activations(shape, seed=12, specials=True).astype(dtype)
  step = jnp.float32(0.31)
  for log2 in log2_blocks(shape[0]):
    args = dict(block=2 ** log2, qn=7, qp=7)
    q_t, q, poison = on_cpu(native.hadamard_quantize_weight, w, step, **args)
    want, _ = on_cpu(reference.hadamard_quantize, w, step, axis=0, **args)
    assert q_t.shape == shape[::-1] and q.shape == shape
    assert_same_ints(q, want)
    assert_same_ints(q_t, np.asarray(want).T)
    ref = on_cpu(reference.hadamard_quantize_weight, w, step, **args)
    for got, want_q in zip((q_t, q), ref[:2]):
      assert_same_ints(got, want_q)
    assert poison.shape == (shape[1],) and poison.dtype == np.float32
    assert_same_floats(poison, ref[2])


def test_weight_column_poison_marks_exactly_the_nonfinite_columns():
  """col_poison: NaN where a column holds a NaN, +Inf or -Inf (in any row),
  0 elsewhere; both engines, every float dtype."""
  w = np.array(activations((64, 48), seed=3), np.float32)
  w[0, 5], w[17, 9], w[63, 47], w[40, 9] = np.nan, np.inf, -np.inf, np.nan
  want = np.where(np.isfinite(w).all(axis=0), 0.0, np.nan).astype(np.float32)
  assert np.isnan(want).sum() == 3
  for dtype in FLOAT_DTYPES:
    for mod in (native, reference):
      for block in (1, 32, 64):
        _, _, poison = on_cpu(mod.hadamard_quantize_weight, jnp.asarray(w, dtype),
                              jnp.float32(0.2), block=block, qn=7, qp=7)
        np.testing.assert_array_equal(poison, want)


def test_hadamard_quantize_traced_block():
  """A traced log2 block: along the rows (with a residual) and down the columns."""
  x = activations((16, 64))
  w = activations((64, 24), seed=2).astype(jnp.bfloat16)
  def jitted(mod):
    def f(x, w, l, s):
      q, res = mod.hadamard_quantize(x, jnp.float32(0.5), block=l, qn=8, qp=7, seed=s)
      q_only = mod.hadamard_quantize(x, jnp.float32(0.5), block=l, qn=7, qp=7)[0]
      # A Flax kernel[D, C]: Hb down the columns, written [C, D].
      wq = mod.hadamard_quantize(w, jnp.float32(0.4), block=l, qn=7, qp=7, axis=0,
                                 transpose=True)[0]
      both = mod.hadamard_quantize_weight(w, jnp.float32(0.4), block=l, qn=7, qp=7)
      return q, res, q_only, wq, both
    return jax.jit(f)
  f_ref, f_nat = jitted(reference), jitted(native)   # one compile each
  with jax.default_device(CPU):
    for log2 in range(7):
      out_r = f_ref(x, w, jnp.int32(log2), seed(log2))
      out_n = f_nat(x, w, jnp.int32(log2), seed(log2))
      for a, b in zip(jax.tree.leaves(out_n), jax.tree.leaves(out_r)):
        assert_same_floats(a, b) if a.dtype == jnp.float32 else assert_same_ints(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_hadamard_quantize_nonfinite_rows_have_nan_norms(dtype):
  x = np.array(activations((6, 32), seed=5), np.float32)
  x[1, 3] = np.nan
  x[3, 31] = np.inf
  x[4, 0] = -np.inf
  x = jnp.asarray(x).astype(dtype)
  args = dict(block=8, qn=7, qp=7, seed=seed(3))
  q, res = on_cpu(native.hadamard_quantize, x, jnp.float32(0.6), **args)
  _, res_ref = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.6), **args)
  norms = np.asarray(res.norms)
  np.testing.assert_array_equal(np.isnan(norms), [False, True, False, True, True, False])
  want = np.sqrt(np.sum(np.asarray(q, np.int64) ** 2, axis=1)).astype(np.float32)
  finite = ~np.isnan(norms)
  np.testing.assert_array_equal(norms[finite], want[finite])
  assert_same_floats(res.norms, res_ref.norms)


@pytest.mark.parametrize("qn", [7, 8])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_residual_values(shape, qn):
  x = activations(shape, seed=1, specials=True)
  _, res = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.3), block=1, qn=qn,
                  qp=7, seed=seed(2))
  m = shape[0]
  for rows in (None, random_rows(2 * m + 1, m, seed=m), random_rows(1, m)):
    for transpose in (False, True):
      kw = dict(shape=shape, qn=qn, qp=7, rows=rows, transpose=transpose)
      got = on_cpu(lambda r: native.residual_values(r, **kw), res)
      assert_same_ints(got, on_cpu(lambda r: reference.residual_values(r, **kw), res))


@pytest.mark.parametrize("qn,out_dtype", [(7, jnp.float32), (8, jnp.float32),
                                          (7, jnp.bfloat16), (8, jnp.float16)],
                         ids=lambda v: dtype_id(v) if isinstance(v, type) else str(v))
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_lsq_backward(shape, qn, out_dtype):
  x = activations(shape, seed=1)
  _, res = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.3), block=1, qn=qn,
                  qp=7, seed=seed(2))
  grad = activations(shape, seed=3)
  for log2 in log2_blocks(shape[1]):
    kw = dict(qn=qn, qp=7, block=2 ** log2, out_dtype=out_dtype)
    dt_ref, ds_ref = on_cpu(reference.lsq_backward, grad, res, **kw)
    dt_nat, ds_nat = on_cpu(native.lsq_backward, grad, res, **kw)
    _check_lsq_backward(dt_nat, ds_nat, dt_ref, ds_ref, grad)


def _check_lsq_backward(dt_nat, ds_nat, dt_ref, ds_ref, grad, ds_slack=0.0):
  assert dt_nat.dtype == dt_ref.dtype and dt_nat.shape == dt_ref.shape
  scale = float(jnp.abs(grad).max()) + 1e-30
  if dt_ref.dtype == jnp.float32:
    rtol = 1e-5
  else:  # one rounding of the float32 values to 8 / 11 significant bits
    rtol = 2.0 ** -7 if dt_ref.dtype == jnp.bfloat16 else 2.0 ** -10
  np.testing.assert_allclose(np.asarray(dt_nat, np.float32), np.asarray(dt_ref, np.float32),
                             rtol=rtol, atol=1e-6 * scale)
  np.testing.assert_allclose(ds_nat, ds_ref, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(grad).sum()) + ds_slack)


@pytest.mark.parametrize("qn,out_dtype", [(7, jnp.float32), (8, jnp.float32),
                                          (7, jnp.bfloat16), (8, jnp.float16)],
                         ids=lambda v: dtype_id(v) if isinstance(v, type) else str(v))
@pytest.mark.parametrize("shape", [(1, 4), (5, 24), (33, 96), (64, 1024)], ids=str)
def test_lsq_backward_slots(shape, qn, out_dtype):
  """The sampled backward: rows of dT_hat are sums of two slot rows of grad."""
  m, k = shape
  x = activations(shape, seed=6)
  _, res = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.3), block=1, qn=qn,
                  qp=7, seed=seed(4))
  s = 2 * m + 3
  grad = activations((s, k), seed=7)
  slots = random_slots(m, s, seed=m)
  for log2 in log2_blocks(k):
    kw = dict(qn=qn, qp=7, block=2 ** log2, out_dtype=out_dtype)
    dt_ref, ds_ref = on_cpu(lambda g, sl: reference.lsq_backward(g, res, slots=sl, **kw),
                            grad, slots)
    dt_nat, ds_nat = on_cpu(lambda g, sl: native.lsq_backward(g, res, slots=sl, **kw),
                            grad, slots)
    _check_lsq_backward(dt_nat, ds_nat, dt_ref, ds_ref, grad)
    if m >= 2:   # the row with no slot is zero
      assert not np.asarray(dt_nat[0], np.float32).any()


@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float16], ids=dtype_id)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("shape", [(5, 24), (33, 96), (64, 1024)], ids=str)
def test_lsq_backward_low_precision_grad(shape, gather, grad_dtype):
  """A bfloat16 / float16 dT_hat (the GEMM's output for bf16 activations) is
  widened exactly, slot rows summed in float32, as the reference does."""
  m, k = shape
  _, res = on_cpu(reference.hadamard_quantize, activations(shape, seed=8), jnp.float32(0.3),
                  block=1, qn=7, qp=7, seed=seed(5))
  s = 2 * m + 1 if gather else m
  grad = activations((s, k), seed=9).astype(grad_dtype)
  slots = random_slots(m, s, seed=m + 1) if gather else None
  for log2 in log2_blocks(k):
    kw = dict(qn=7, qp=7, block=2 ** log2, out_dtype=jnp.bfloat16, slots=slots)
    dt_ref, ds_ref = on_cpu(lambda g: reference.lsq_backward(g, res, **kw), grad)
    dt_nat, ds_nat = on_cpu(lambda g: native.lsq_backward(g, res, **kw), grad)
    _check_lsq_backward(dt_nat, ds_nat, dt_ref, ds_ref, grad.astype(jnp.float32))
    wide, _ = on_cpu(lambda g: reference.lsq_backward(g.astype(jnp.float32), res, **kw), grad)
    np.testing.assert_array_equal(np.asarray(dt_ref, np.float32), np.asarray(wide, np.float32))


@pytest.mark.parametrize("qn", [7, 8])
def test_lsq_backward_traced_block(qn):
  m, k = 48, 1024
  x = activations((m, k), seed=6)
  _, res = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.3), block=1, qn=qn,
                  qp=7, seed=seed(4))
  grad = activations((m + 5, k), seed=7)
  slots = random_slots(m, m + 5, seed=1)
  def jitted(mod):
    return jax.jit(lambda g, sl, l: mod.lsq_backward(g, res, qn=qn, qp=7, slots=sl, block=l,
                                                     out_dtype=jnp.bfloat16))
  f_ref, f_nat = jitted(reference), jitted(native)   # one compile each
  with jax.default_device(CPU):
    for log2 in range(largest_log2(k) + 1):
      dt_ref, ds_ref = f_ref(grad, slots, jnp.int32(log2))
      dt_nat, ds_nat = f_nat(grad, slots, jnp.int32(log2))
      _check_lsq_backward(dt_nat, ds_nat, dt_ref, ds_ref, grad)


def _weight_operands(shape, dtype, seed_=0):
  """grad f32[D, C] and kernel[D, C] of `dtype`: with a step of 0.25 or 0.3,
  about a third of v = Hb(kernel) / step lies outside [-8, 7]."""
  kernel = activations(shape, seed=20 + seed_).astype(dtype)
  grad = activations(shape, seed=30 + seed_)
  return grad, kernel


def _check_weight_backward(dk_nat, ds_nat, dk_ref, ds_ref, grad, kernel, step,
                           block, qn, qp):
  slack, edges = weight_backward_slack(grad, kernel, step, block, qn, qp)
  assert edges == 0, "test data with v at a clip edge: pick another seed"
  _check_lsq_backward(dk_nat, ds_nat, dk_ref, ds_ref, grad, ds_slack=slack)


# A power-of-two step (v bit-identical in both engines: exact ties are common
# for half-precision kernels and must round to even) and one that is not.
@pytest.mark.parametrize("step", [0.25, 0.3])
@pytest.mark.parametrize("qn,qp", [(7, 7), (8, 7)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=str)
def test_lsq_weight_backward(shape, dtype, qn, qp, step):
  grad, kernel = _weight_operands(shape, dtype)
  for log2 in sorted({0, largest_log2(shape[0])}):
    # dk in the kernel's dtype (the default) and, for a float32 kernel, bf16.
    for out_dtype in (None,) + ((jnp.bfloat16,) if dtype == jnp.float32 else ()):
      kw = dict(qn=qn, qp=qp, block=2 ** log2, out_dtype=out_dtype)
      dk_ref, ds_ref = on_cpu(reference.lsq_weight_backward, grad, kernel,
                              jnp.float32(step), **kw)
      dk_nat, ds_nat = on_cpu(native.lsq_weight_backward, grad, kernel,
                              jnp.float32(step), **kw)
      assert dk_nat.dtype == (out_dtype or dtype) and dk_nat.shape == shape
      assert ds_nat.shape == () and ds_nat.dtype == jnp.float32
      _check_weight_backward(dk_nat, ds_nat, dk_ref, ds_ref, grad, kernel, step,
                             2 ** log2, qn, qp)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(64, 96), (96, 33)], ids=str)
def test_lsq_weight_backward_bfloat16_grad(shape, dtype):
  """A bfloat16 grad (the dW GEMM's output for a bfloat16 kernel) is read as
  it is, widened exactly: the same results as its float32 copy."""
  grad, kernel = _weight_operands(shape, dtype, seed_=3)
  grad16 = grad.astype(jnp.bfloat16)
  log2 = largest_log2(shape[0])
  kw = dict(qn=7, qp=7, block=2 ** log2)
  dk_nat, ds_nat = on_cpu(native.lsq_weight_backward, grad16, kernel, jnp.float32(0.25), **kw)
  dk32, ds32 = on_cpu(native.lsq_weight_backward, grad16.astype(jnp.float32), kernel,
                      jnp.float32(0.25), **kw)
  dk_ref, ds_ref = on_cpu(reference.lsq_weight_backward, grad16, kernel,
                          jnp.float32(0.25), **kw)
  assert dk_nat.dtype == dtype
  assert_same_floats(dk_nat, dk32)
  assert_same_floats(ds_nat, ds32)
  _check_weight_backward(dk_nat, ds_nat, dk_ref, ds_ref, grad16.astype(jnp.float32),
                         kernel, 0.25, 2 ** log2, 7, 7)


@pytest.mark.parametrize("kernel_dtype,dk_dtype", [(jnp.bfloat16, jnp.float32),
                                                   (jnp.float16, jnp.float32),
                                                   (jnp.float32, jnp.float16),
                                                   (jnp.bfloat16, jnp.float16)],
                         ids=dtype_id)
def test_lsq_weight_backward_dk_dtype_is_independent(kernel_dtype, dk_dtype):
  """The handler's dk may have any float type, whatever the kernel's."""
  shape, log2, step = (64, 96), 5, jnp.float32(0.25)
  grad, kernel = _weight_operands(shape, kernel_dtype, seed_=2)
  raw = lambda g, k, s: native._call(
      "jint4_lsq_weight_backward",
      (jax.ShapeDtypeStruct(shape, dk_dtype), jax.ShapeDtypeStruct((), jnp.float32)),
      g, k, s, jnp.int32(log2), qn=np.int32(8), qp=np.int32(7), log2_hint=np.int32(log2))
  dk_nat, ds_nat = on_cpu(raw, grad, kernel, step)
  dk_ref, ds_ref = on_cpu(reference.lsq_weight_backward, grad, kernel, step,
                          block=2 ** log2, qn=8, qp=7, out_dtype=dk_dtype)
  assert dk_nat.dtype == dk_dtype
  _check_lsq_backward(dk_nat, ds_nat, dk_ref, ds_ref, grad)


def test_lsq_weight_backward_edges_and_ties():
  """Exact values (block 1, step 1/2): v at the clip edges is inside (delta
  0), beyond them delta = -qn or qp and dk = 0, ties round to even."""
  qn, qp = 8, 7
  v = np.array([-9.0, -8.5, -8.0, -7.5, -2.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.0, 7.5, 40.0],
               np.float32)
  want_delta = np.array([-8, -8, 0, -0.5, 0.5, 0.5, -0.5, 0.5, -0.5, -0.5, 0, 7, 7],
                        np.float64)
  inside = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
  kernel = jnp.asarray(np.stack([v * 0.5, -v[::-1] * 0.5], axis=1))     # [13, 2]
  grad = activations((13, 2), seed=4)
  want_ds = (np.sum(np.asarray(grad, np.float64)[:, 0] * want_delta)
             + np.sum(np.asarray(grad, np.float64)[:, 1]
                      * np.where(-v[::-1] < -qn, -qn,
                                 np.where(-v[::-1] > qp, qp,
                                          np.round(-v[::-1]) + v[::-1]))))
  for dtype in FLOAT_DTYPES:
    dk, ds = on_cpu(native.lsq_weight_backward, grad, kernel.astype(dtype),
                    jnp.float32(0.5), block=1, qn=qn, qp=qp)
    mask = np.stack([inside, (-v[::-1] >= -qn) & (-v[::-1] <= qp)], axis=1)
    assert dk.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dk, np.float32), np.asarray(
        jnp.where(mask, grad, 0.0).astype(dtype), np.float32))
    np.testing.assert_allclose(ds, want_ds, rtol=1e-6)


def test_lsq_weight_backward_is_hadamard_of_the_masked_grad():
  """All inside: dk = Hb grad, and Hb Hb = I (applied twice gives grad back);
  all outside: dk = 0, delta_sum = sum grad * (-qn or qp)."""
  grad = activations((16, 8), seed=3)
  sign = np.where(np.arange(8) % 2 == 0, 1.0, -1.0).astype(np.float32)
  small = jnp.asarray(np.ones((16, 1), np.float32) * sign * 1e-2)
  kw = dict(block=16, qn=8, qp=7)
  dk, _ = on_cpu(native.lsq_weight_backward, grad, small, jnp.float32(1.0), **kw)
  np.testing.assert_allclose(dk, hadamard.hadamard_transform(grad, 16, axis=0),
                             rtol=1e-5, atol=1e-5)
  dk2, _ = on_cpu(native.lsq_weight_backward, dk, small, jnp.float32(1.0), **kw)
  np.testing.assert_allclose(dk2, grad, rtol=1e-5, atol=1e-5)
  big = jnp.asarray(np.ones((16, 1), np.float32) * sign * 100.0)
  dk, ds = on_cpu(native.lsq_weight_backward, grad, big, jnp.float32(1.0), block=1,
                  qn=8, qp=7)
  assert not np.asarray(dk).any()
  want = np.sum(np.asarray(grad, np.float64) * np.where(sign > 0, 7.0, -8.0))
  np.testing.assert_allclose(ds, want, rtol=1e-5)


@pytest.mark.parametrize("dtype,qn,step", [(jnp.bfloat16, 7, 0.25), (jnp.float32, 8, 0.3),
                                           (jnp.float16, 8, 0.3)],
                         ids=lambda v: dtype_id(v) if isinstance(v, type) else str(v))
def test_lsq_weight_backward_traced_block(dtype, qn, step):
  d, c = 1024, 40
  grad, kernel = _weight_operands((d, c), dtype, seed_=4)   # no v at a clip edge
  def jitted(mod):
    return jax.jit(lambda g, k, s, l: mod.lsq_weight_backward(g, k, s, qn=qn, qp=7,
                                                              block=l))
  f_ref, f_nat = jitted(reference), jitted(native)   # one compile each
  with jax.default_device(CPU):
    for log2 in range(largest_log2(d) + 1):
      dk_ref, ds_ref = f_ref(grad, kernel, jnp.float32(step), jnp.int32(log2))
      dk_nat, ds_nat = f_nat(grad, kernel, jnp.float32(step), jnp.int32(log2))
      assert dk_nat.dtype == dtype
      _check_weight_backward(dk_nat, ds_nat, dk_ref, ds_ref, grad, kernel, step,
                             2 ** log2, qn, 7)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(0, 4)], ids=str)
def test_bit_split_bit_exact(shape, dtype):
  g = (activations(shape, seed=4) * 1e-3).astype(dtype)
  g2, s_hi, s_lo, norms = on_cpu(native.bit_split, g, seed(5))
  out_ref = on_cpu(reference.bit_split, g, seed(5))
  assert g2.shape == (2 * shape[0], shape[1]) and norms.shape == (2 * shape[0],)
  assert_same_ints(g2, out_ref[0])
  for a, b in zip((s_hi, s_lo, norms), out_ref[1:]):
    assert_same_floats(a, b)
  # A larger max|g| from the caller (e.g. all-reduced over the shards of G):
  # the same in both engines, and the scales follow it.
  m = 2.0 * on_cpu(bitsplit.abs_max, g) + 1e-3
  split = lambda mod: on_cpu(lambda g, m: mod.bit_split(g, seed(5), abs_max=m), g, m)
  given, given_ref = split(native), split(reference)
  assert_same_ints(given[0], given_ref[0])
  for a, b in zip(given[1:], given_ref[1:]):
    assert_same_floats(a, b)
  assert float(given[1]) == float(m * np.float32(1 / 7))
  assert float(given[2]) == float(m * np.float32(1 / 98))


def _with_neighbours(values):
  """values and their float32 neighbours on both sides."""
  v = np.asarray(values, np.float32)
  return np.concatenate([v, np.nextafter(v, np.float32(np.inf)),
                         np.nextafter(v, np.float32(-np.inf))])


def _as_matrix(values, cols):
  """values padded with zeros to whole rows of `cols`."""
  v = np.asarray(values, np.float32)
  v = np.concatenate([v, np.zeros((-v.size) % cols, np.float32)])
  return jnp.asarray(v.reshape(-1, cols))


@pytest.mark.parametrize("qn,qp", [(7, 7), (8, 7), (1, 7), (3, 1)])
def test_hadamard_quantize_rounding_and_clip_boundaries(qn, qp):
  # Block 1 and step 1: v = x, so every rounding tie, clip edge and special
  # value reaches QuantizeEncode (the handlers' one-pass form of
  # QuantizeCode + EncodeBackwardState) exactly.
  ties = _with_neighbours(np.arange(-40, 41) * 0.25)
  specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 3e38, -3e38,
              1e-40, -1e-40, 2.0 ** 22, -(2.0 ** 22), 1.5 * 2.0 ** 23]
  x = _as_matrix(np.concatenate([ties, np.asarray(specials, np.float32)]), 64)
  args = dict(block=1, qn=qn, qp=qp, seed=seed(11))
  q_ref, r_ref = on_cpu(reference.hadamard_quantize, x, jnp.float32(1.0), **args)
  q_nat, r_nat = on_cpu(native.hadamard_quantize, x, jnp.float32(1.0), **args)
  assert_same_ints(q_nat, q_ref)
  assert_same_ints(r_nat.nibbles, r_ref.nibbles)
  assert_same_ints(r_nat.flags, r_ref.flags)
  assert_same_floats(r_nat.norms, r_ref.norms)


def test_bit_split_rounding_boundaries():
  # max|g| = 98, so t = g * 98 / 98 = g: the hi ties (odd multiples of 7),
  # the clip edges and every half-integer of [-98, 98] with its neighbours.
  g = np.concatenate([_with_neighbours(np.arange(-196, 197) * 0.5), [98.0]])
  g = _as_matrix(g, 16)
  for fn in ("bit_split", "bit_split_joined"):
    out_ref = on_cpu(getattr(reference, fn), g, seed(12))
    out_nat = on_cpu(getattr(native, fn), g, seed(12))
    for a, b in zip(out_nat, out_ref):
      if a.dtype == jnp.int8:
        assert_same_ints(a, b)
      else:
        assert_same_floats(a, b)


def test_bit_split_with_constant_abs_max_rounds_as_written():
  """abs_max a compile-time constant (the row split passes 1.0 for its unit
  rows): the twin still rounds t = g 98 / M, then t / 14, as two roundings,
  at every hi tie (g near (2k + 1) / 14) and its neighbours."""
  g = _as_matrix(bit_split_hi_ties(), 16)
  for fn in ("bit_split", "bit_split_joined"):
    nat, ref = (on_cpu(lambda g: getattr(mod, fn)(g, seed(12), abs_max=jnp.float32(1.0)), g)
                for mod in (native, reference))
    for a, b in zip(nat, ref):
      assert_same_ints(a, b) if a.dtype == jnp.int8 else assert_same_floats(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("special", [0.0, np.nan, np.inf])
def test_bit_split_special_values(special, dtype):
  g = jnp.zeros((4, 8)) if special == 0.0 else activations((4, 8)).at[1, 2].set(special)
  g = g.astype(dtype)
  for fn in ("bit_split", "bit_split_joined"):
    out_ref = on_cpu(getattr(reference, fn), g, seed())
    out_nat = on_cpu(getattr(native, fn), g, seed())
    for a, b in zip(out_nat, out_ref):
      if a.dtype == jnp.int8:
        assert_same_ints(a, b)
      else:
        assert_same_floats(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(0, 4)], ids=str)
def test_bit_split_joined(shape, dtype):
  g = (activations(shape, seed=8) * 1e-2).astype(dtype)
  v, vt, s_hi, s_lo = on_cpu(native.bit_split_joined, g, seed(6))
  out_ref = on_cpu(reference.bit_split_joined, g, seed(6))
  assert_same_ints(v, out_ref[0])
  assert_same_ints(vt, out_ref[1])
  assert_same_floats(s_hi, out_ref[2])
  assert_same_floats(s_lo, out_ref[3])
  # v = 14 hi + lo of the stacked split with the same seed; vt = v^T.
  g2 = np.asarray(on_cpu(native.bit_split, g, seed(6))[0], np.int32)
  r = shape[0]
  np.testing.assert_array_equal(np.asarray(v, np.int32), 14 * g2[:r] + g2[r:])
  np.testing.assert_array_equal(np.asarray(vt), np.asarray(v).T)
  assert np.abs(np.asarray(v, np.int32)).max(initial=0) <= 98


@pytest.mark.parametrize("specials", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(0, 4)], ids=str)
def test_bit_split_per_row(shape, dtype, specials):
  """row_inv: both handlers split the unit rows g_i * row_inv_i as they read
  g, bit-identical to the twin; the joined one writes v from the unit rows
  (M = 1) and v^T from g with max|g|, with the same noise."""
  g, row_inv = per_row_split_case(shape, dtype, specials=specials)
  m = on_cpu(bitsplit.abs_max, g)
  for fn, abs_max in (("bit_split", jnp.float32(1.0)), ("bit_split", None),
                      ("bit_split_joined", m), ("bit_split_joined", None)):
    nat, ref = (on_cpu(lambda g, r: getattr(mod, fn)(g, seed(9), abs_max=abs_max, row_inv=r),
                       g, row_inv) for mod in (native, reference))
    for a, b in zip(nat, ref):
      assert_same_ints(a, b) if a.dtype == jnp.int8 else assert_same_floats(a, b)
  # The joined v = 14 hi + lo of the stacked split of the unit rows; its v^T
  # and scales those of the split with one scale.
  v, vt, s_hi, s_lo = on_cpu(lambda g, r: native.bit_split_joined(g, seed(9), m, row_inv=r),
                             g, row_inv)
  g2 = np.asarray(on_cpu(lambda g, r: native.bit_split(g, seed(9), jnp.float32(1.0), row_inv=r),
                         g, row_inv)[0], np.int32)
  np.testing.assert_array_equal(np.asarray(v, np.int32), 14 * g2[:shape[0]] + g2[shape[0]:])
  plain = on_cpu(lambda g: native.bit_split_joined(g, seed(9), m), g)
  for a, b in zip((vt, s_hi, s_lo), plain[1:]):
    assert_same_ints(a, b) if a.dtype == jnp.int8 else assert_same_floats(a, b)
  # Every unit row keeps its own 98 levels: a row's largest digit is +-98.
  g32 = np.asarray(g, np.float32)
  live = np.all(np.isfinite(g32), axis=1) & (np.abs(g32).max(axis=1, initial=0) > 0)
  top = np.abs(np.asarray(v, np.int32)).max(axis=1, initial=0)
  assert np.all(top[live] >= 97), top


@pytest.mark.parametrize("fn", ["bit_split", "bit_split_joined"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("special", [None, 0.0, np.nan, np.inf])
def test_bit_split_with_given_abs_max(special, dtype, fn):
  """abs_max = quant.bitsplit.abs_max(g) given by the caller: bit-identical to
  the split that computes it, in both engines (NaN, Inf and all-zero g too);
  any other value is used as given, the same way in both engines."""
  g = activations((24, 40), seed=2) * 1e-2
  if special == 0.0:
    g = jnp.zeros_like(g)
  elif special is not None:
    g = g.at[5, 7].set(special)
  g = g.astype(dtype)
  m = on_cpu(bitsplit.abs_max, g)
  own = on_cpu(getattr(native, fn), g, seed(3))
  for mod in (native, reference):
    given = on_cpu(lambda g, m: getattr(mod, fn)(g, seed(3), abs_max=m), g, m)
    for a, b in zip(given, own):
      assert_same_ints(a, b) if a.dtype == jnp.int8 else assert_same_floats(a, b)
  for other in (2.0 * np.abs(np.asarray(m, np.float32)) + 1.0, -1.0, np.nan, np.inf, 0.0):
    nat, ref = (on_cpu(lambda g, m: getattr(mod, fn)(g, seed(3), abs_max=m), g,
                       jnp.float32(other)) for mod in (native, reference))
    for a, b in zip(nat, ref):
      assert_same_ints(a, b) if a.dtype == jnp.int8 else assert_same_floats(a, b)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 24), (33, 96), (64, 1024)], ids=str)
def test_resplit_rows(shape):
  r2, c = 2 * shape[0], shape[1]
  g = activations(shape, seed=9) * 1e-3
  g2 = on_cpu(reference.bit_split, g, seed(7))[0]
  rng = np.random.default_rng(r2)
  for j in (1, r2, 2 * r2 + 5):
    rows = random_rows(j, r2, seed=j)
    row_scale = jnp.asarray(rng.uniform(0.01, 3.0, j), jnp.float32)
    vt, s_hi, s_lo = on_cpu(native.resplit_rows, g2, rows, row_scale, seed(8))
    out_ref = on_cpu(reference.resplit_rows, g2, rows, row_scale, seed(8))
    assert vt.shape == (c, j)
    assert_same_ints(vt, out_ref[0])
    assert_same_floats(s_hi, out_ref[1])
    assert_same_floats(s_lo, out_ref[2])
    # = the joined split of the explicitly gathered, weighted rows.
    t = np.asarray(g2, np.float32)[np.asarray(rows)] * np.asarray(row_scale)[:, None]
    _, vt_t, _, s_lo_t = on_cpu(native.bit_split_joined, jnp.asarray(t), seed(8))
    assert_same_ints(vt, vt_t)
    assert_same_floats(s_lo, s_lo_t)


@pytest.mark.parametrize("special", [np.nan, np.inf, 0.0])
def test_resplit_rows_special_row_scale(special):
  g2 = int_operand((6, 16), 3, -7, 7)
  rows = jnp.asarray([4, 1, 1, 5], jnp.int32)
  row_scale = jnp.asarray([0.5, special, 2.0, 1.0], jnp.float32)
  if special == 0.0:
    row_scale = jnp.zeros((4,), jnp.float32)
  out_nat = on_cpu(native.resplit_rows, g2, rows, row_scale, seed(2))
  out_ref = on_cpu(reference.resplit_rows, g2, rows, row_scale, seed(2))
  assert_same_ints(out_nat[0], out_ref[0])
  for a, b in zip(out_nat[1:], out_ref[1:]):
    assert_same_floats(a, b)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=str)
def test_int_gemm(mnk, out_dtype):
  m, n, k = mnk
  a, b = int_operand((m, k), 1), int_operand((n, k), 2)
  scale = jnp.float32(0.013)
  rng = np.random.default_rng(0)
  row_scale = jnp.asarray(rng.uniform(0.5, 2, m), jnp.float32)
  col_bias = jnp.asarray(rng.normal(0, 0.1, n), jnp.float32)
  for rs, cb in ((None, None), (row_scale, None), (None, col_bias), (row_scale, col_bias)):
    kw = dict(scale=scale, row_scale=rs, col_bias=cb, out_dtype=out_dtype)
    ref = on_cpu(reference.int_gemm, a, b, **kw)
    nat = on_cpu(native.int_gemm, a, b, **kw)
    assert nat.dtype == out_dtype
    # Dequantized floats agree to rounding (XLA may reassociate the epilogue);
    # the integer products themselves are checked exactly below.
    np.testing.assert_allclose(np.asarray(nat, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-6 if out_dtype == jnp.float32 else 2 ** -7,
                               atol=1e-6 if out_dtype == jnp.float32 else 1e-3)
  # Exact int32 accumulation at full int8 range and a long K.
  a8, b8 = int_operand((4, 4096), 3, -128, 127), int_operand((3, 4096), 4, -128, 127)
  got = on_cpu(native.int_gemm, a8, b8, scale=jnp.float32(1.0), int4=False)
  want = np.asarray(a8, np.int64) @ np.asarray(b8, np.int64).T
  np.testing.assert_array_equal(np.asarray(got, np.float64), want.astype(np.float32))
  exact = on_cpu(native.int_gemm, a, b, scale=jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(exact, np.int64),
                                np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)


@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=str)
def test_int_gemm_joined_digits(mnk):
  """int4=False: joined bit-split digits (|v| <= 98) times INT4 values, exact."""
  m, n, k = mnk
  a, b = int_operand((m, k), 7, -98, 98), int_operand((n, k), 8)
  row_scale = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2, m), jnp.float32)
  exact = on_cpu(native.int_gemm, a, b, scale=jnp.float32(1.0), int4=False)
  np.testing.assert_array_equal(np.asarray(exact, np.int64),
                                np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)
  col_bias = jnp.asarray(np.random.default_rng(2).normal(0, 1, n), jnp.float32)
  kw = dict(scale=jnp.float32(0.021), row_scale=row_scale, col_bias=col_bias, int4=False)
  np.testing.assert_allclose(on_cpu(native.int_gemm, a, b, **kw),
                             on_cpu(reference.int_gemm, a, b, **kw), rtol=1e-6, atol=1e-6)


def test_native_ops_vmap_and_grad_through_int4_matmul():
  x = activations((32, 64))
  w = activations((64, 16), seed=9) * 0.1
  cfg_n = jint4.Int4Config(engine="native")
  cfg_r = jint4.Int4Config(engine="reference")
  key = jax.random.key(0)
  for backward, scale, dx_budget in (("lss", "tensor", 2.0), ("lss", "row", 2.0),
                                     ("lss", "row", 1.0), ("bitsplit", "tensor", 2.0),
                                     ("bitsplit", "row", 2.0)):
    def loss(cfg):
      cfg = jint4.Int4Config(engine=cfg.engine, backward=backward,
                             split_scale=scale, lss_dx_budget=dx_budget)
      return lambda x, w: jnp.sum(jint4.int4_matmul(x, w, jnp.float32(0.5),
                                                    jnp.float32(0.05), key, config=cfg) ** 2)
    gn = jax.jit(jax.grad(loss(cfg_n), argnums=(0, 1)))(x, w)
    gr = jax.jit(jax.grad(loss(cfg_r), argnums=(0, 1)))(x, w)
    for a, b in zip(gn, gr):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.abs(b).max()))
  # vmap over keys lowers each ffi_call sequentially.
  keys = jax.random.split(key, 3)
  f = lambda k: jint4.int4_matmul(x, w, jnp.float32(0.5), jnp.float32(0.05), k, config=cfg_n)
  yv = jax.vmap(f)(keys)
  np.testing.assert_array_equal(yv[2], f(keys[2]))


_BAD_INPUT_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jint4.kernels import native
cpu = jax.devices("cpu")[0]
i32 = np.int32
S = jax.ShapeDtypeStruct
seed = jnp.zeros((2,), jnp.uint32)
x = jnp.ones((4, 16))
q, res = native.hadamard_quantize(x, jnp.float32(1), block=4, qn=7, qp=7, seed=seed)

def raw_quantize(x, axis, transpose, with_residual=1):
  r, s = x.shape
  n = r * s if with_residual else 0
  return native._call(
      "jint4_hadamard_quantize",
      (S((s, r) if transpose else (r, s), jnp.int8), S((-(-n // 2),), jnp.uint8),
       S((1, -(-n // 8)), jnp.uint8), S((r if with_residual else 0,), jnp.float32)),
      x, jnp.float32(1), seed, jnp.int32(0), qn=i32(7), qp=i32(7),
      with_residual=i32(with_residual), axis=i32(axis), transpose=i32(transpose),
      log2_hint=i32(-1))

def raw_weight_backward(grad, kernel, log2_hint=-1, qn=7):
  return native._call(
      "jint4_lsq_weight_backward", (S(kernel.shape, jnp.float32), S((), jnp.float32)),
      grad, kernel, jnp.float32(1), jnp.int32(0), qn=i32(qn), qp=i32(7),
      log2_hint=i32(log2_hint))[0]

cases = {
  "log2_block": lambda: native.hadamard_quantize(
      jnp.ones((4, 12)), jnp.float32(1), block=jnp.int32(3), qn=7, qp=7)[0],
  "log2_block_axis0": lambda: native.hadamard_quantize(
      jnp.ones((12, 4)), jnp.float32(1), block=jnp.int32(3), qn=7, qp=7, axis=0)[0],
  "residual_axis0": lambda: raw_quantize(x, axis=0, transpose=0),
  "weight_quantize_log2_block": lambda: native.hadamard_quantize_weight(
      jnp.ones((12, 4)), jnp.float32(1), block=jnp.int32(3), qn=7, qp=7)[0],
  "weight_quantize_shape": lambda: native._call(
      "jint4_hadamard_quantize_weight", (S((4, 8), jnp.int8), S((4, 8), jnp.int8),
                                         S((4,), jnp.float32)),
      jnp.ones((8, 4)), jnp.float32(1), jnp.int32(0), qn=i32(7), qp=i32(7),
      log2_hint=i32(-1))[0],
  "weight_poison_shape": lambda: native._call(
      "jint4_hadamard_quantize_weight", (S((4, 8), jnp.int8), S((8, 4), jnp.int8),
                                         S((8,), jnp.float32)),
      jnp.ones((8, 4)), jnp.float32(1), jnp.int32(0), qn=i32(7), qp=i32(7),
      log2_hint=i32(-1))[0],
  "residual_transpose": lambda: raw_quantize(x, axis=1, transpose=1),
  "axis": lambda: raw_quantize(x, axis=2, transpose=0, with_residual=0),
  "x_dtype": lambda: raw_quantize(x.astype(jnp.int32), axis=1, transpose=0),
  "residual_rows": lambda: native.residual_values(
      res, (4, 16), qn=7, qp=7, rows=jnp.asarray([0, 9], jnp.int32)),
  "residual_size": lambda: native.residual_values(res, (5, 16), qn=7, qp=7),
  "slots": lambda: native.lsq_backward(
      jnp.ones((3, 16)), res, qn=7, qp=7,
      slots=jnp.asarray([[0, 1, 2, 3], [-1, -1, 0, 0]], jnp.int32))[0],
  "resplit_rows": lambda: native.resplit_rows(
      jnp.ones((4, 5), jnp.int8), jnp.asarray([0, -1], jnp.int32),
      jnp.ones((2,), jnp.float32), seed)[0],
  "abs_max_shape": lambda: native._call(
      "jint4_bit_split_joined", (S((4, 8), jnp.int8), S((8, 4), jnp.int8),
                                 S((2,), jnp.float32)),
      jnp.ones((4, 8)), seed, jnp.ones((2,), jnp.float32), jnp.ones((0,), jnp.float32))[0],
  "split_abs_max_shape": lambda: native._call(
      "jint4_bit_split", (S((8, 8), jnp.int8), S((2,), jnp.float32), S((8,), jnp.float32)),
      jnp.ones((4, 8)), seed, jnp.ones((2,), jnp.float32), jnp.ones((0,), jnp.float32))[0],
  "row_inv_shape": lambda: native._call(
      "jint4_bit_split_joined", (S((4, 8), jnp.int8), S((8, 4), jnp.int8),
                                 S((2,), jnp.float32)),
      jnp.ones((4, 8)), seed, jnp.float32(1), jnp.ones((3,), jnp.float32))[0],
  "int4_attr": lambda: native._call(
      "jint4_int_gemm", S((2, 3), jnp.float32), jnp.ones((2, 4), jnp.int8),
      jnp.ones((3, 4), jnp.int8), jnp.float32(1), jnp.ones((2,), jnp.float32),
      jnp.zeros((3,), jnp.float32), int4=i32(2)),
  "weight_log2_block": lambda: native.lsq_weight_backward(
      jnp.ones((12, 4)), jnp.ones((12, 4)), jnp.float32(1), block=jnp.int32(3),
      qn=7, qp=7)[0],
  "weight_grad_shape": lambda: native.lsq_weight_backward(
      jnp.ones((8, 5)), jnp.ones((8, 4), jnp.bfloat16), jnp.float32(1), block=2,
      qn=7, qp=7)[0],
  "weight_log2_hint": lambda: raw_weight_backward(jnp.ones((4, 4)), jnp.ones((4, 4)),
                                                  log2_hint=11),
  "weight_qn": lambda: raw_weight_backward(jnp.ones((4, 4)), jnp.ones((4, 4)), qn=9),
  "weight_qn0": lambda: raw_weight_backward(jnp.ones((4, 4)), jnp.ones((4, 4)), qn=0),
  "weight_kernel_dtype": lambda: raw_weight_backward(jnp.ones((4, 4)),
                                                     jnp.ones((4, 4), jnp.int32)),
  "weight_grad_dtype": lambda: raw_weight_backward(jnp.ones((4, 4), jnp.float16),
                                                   jnp.ones((4, 4))),
  "col_bias": lambda: native.int_gemm(
      jnp.ones((2, 4), jnp.int8), jnp.ones((3, 4), jnp.int8), scale=jnp.float32(1),
      col_bias=jnp.zeros((2,), jnp.float32)),
}
with jax.default_device(cpu):
  for name, fn in cases.items():
    try:
      jax.block_until_ready(jax.jit(fn)())
      print(name, "NO ERROR")
    except Exception as e:
      print(name, "ERROR", str(e).replace(chr(10), " ")[:400])
"""


def test_native_engine_under_remat_and_scan():
  """jax.checkpoint and lax.scan over layers with every op on the native engine."""
  x = activations((16, 32))
  ws = jnp.stack([activations((32, 32), seed=s) * 0.1 for s in range(3)])
  cfg = jint4.Int4Config(engine="native")
  ref = jint4.Int4Config(engine="reference")
  def net(ws, config, remat):
    def layer(h, params):
      w, k = params
      body = lambda h: jnp.tanh(jint4.int4_matmul(h, w, jnp.float32(0.3), jnp.float32(0.02),
                                                  k, config=config))
      return (jax.checkpoint(body) if remat else body)(h), None
    h, _ = jax.lax.scan(layer, x, (ws, jax.random.split(jax.random.key(1), 3)))
    return jnp.sum(h ** 2)
  with jax.default_device(CPU):
    g_native = jax.jit(jax.grad(lambda w: net(w, cfg, True)))(ws)
    g_plain = jax.jit(jax.grad(lambda w: net(w, cfg, False)))(ws)
    g_ref = jax.jit(jax.grad(lambda w: net(w, ref, True)))(ws)
  np.testing.assert_allclose(g_native, g_plain, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_native, g_ref, rtol=1e-3, atol=1e-3 * float(jnp.abs(g_ref).max()))


def test_bad_native_input_raises_clear_errors():
  """Handler-level validation surfaces as a Python exception with the reason.

  Run in a subprocess, so that a jaxlib whose FFI error path crashes (as the
  jaxlib 0.11.2 with the CUDA plugin did while the handlers built their messages with
  std::ostringstream) fails this test instead of killing the test process.
  """
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", _BAD_INPUT_SCRIPT], capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
  expect = {
      "log2_block": ["jint4_hadamard_quantize", "does not divide"],
      "log2_block_axis0": ["does not divide", "dim 0"],
      "residual_axis0": ["residual", "axis=1"],
      "weight_quantize_log2_block": ["jint4_hadamard_quantize_weight", "does not divide",
                                     "dim 0 of x", "= 12"],
      "weight_quantize_shape": ["jint4_hadamard_quantize_weight", "'q'", "[8,4]", "got [4,8]"],
      "weight_poison_shape": ["jint4_hadamard_quantize_weight", "col_poison", "[4]"],
      "residual_transpose": ["residual", "transpose=1"],
      "axis": ["'axis'", "got 2"],
      "x_dtype": ["'x'", "f32, bf16 or f16", "s32"],
      "residual_rows": ["jint4_residual_values", "rows[1] = 9", "out of range"],
      "residual_size": ["jint4_residual_values", "[5, 16]", "u8[40]"],
      "slots": ["jint4_lsq_backward", "slots[0][3] = 3", "out of range"],
      "resplit_rows": ["jint4_resplit_rows", "rows[1] = -1", "out of range"],
      "abs_max_shape": ["jint4_bit_split_joined", "'abs_max'", "got [2]"],
      "split_abs_max_shape": ["jint4_bit_split:", "'abs_max'", "f32[] (max|g|) or empty",
                              "got [2]"],
      "row_inv_shape": ["jint4_bit_split_joined", "'row_inv'", "f32[4]", "got [3]"],
      "int4_attr": ["'int4'", "0 or 1"],
      "col_bias": ["jint4_int_gemm", "'col_bias'", "[3]", "got [2]"],
      "weight_log2_block": ["jint4_lsq_weight_backward", "does not divide",
                            "dim 0 of kernel", "= 12"],
      "weight_grad_shape": ["jint4_lsq_weight_backward", "'grad'", "[8,4]", "got [8,5]"],
      "weight_log2_hint": ["jint4_lsq_weight_backward", "'log2_hint'", "got 11"],
      "weight_qn": ["jint4_lsq_weight_backward", "qn=9"],
      "weight_qn0": ["lsq_weight_backward", "1 <= qn <= 8", "qn=0"],
      "weight_grad_dtype": ["jint4_lsq_weight_backward", "'grad'", "float32 or bfloat16",
                            "f16"],
      "weight_kernel_dtype": ["jint4_lsq_weight_backward", "'kernel'", "f32, bf16 or f16",
                              "s32"],
  }
  for name, parts in expect.items():
    line = lines.get(name, "(missing)")
    assert line.startswith("ERROR"), (name, line)
    for part in parts:
      assert part in line, (name, part, line)


def test_engine_info_and_auto_policy():
  info = jint4.engine_info()
  assert info["native_build"]["built"]
  assert info["default_platform"] == {"gpu": "cuda"}.get(jax.default_backend(),
                                                         jax.default_backend())
  cpu = info["platforms"]["cpu"]
  assert cpu["native_usable"]
  assert set(cpu["ops"]) == set(engine_lib.OPS)
  # "auto" on CPU: the pure-JAX ops, but for the kernel's LSQ backward,
  # each with the policy's reason.
  assert {op: v["runs"] for op, v in cpu["ops"].items()} == {
      op: "native" if op == "lsq_weight_backward" else "reference"
      for op in engine_lib.OPS}
  assert all("BENCHMARKS.md" in v["why"] for v in cpu["ops"].values())
  assert cpu["backward_auto"]["mode"] == "bitsplit" and cpu["backward_auto"]["why"]
  cuda = info["platforms"]["cuda"]
  want = "native" if native.has_cuda() else "reference"
  assert {v["runs"] for v in cuda["ops"].values()} == {want}
  if not native.has_cuda():
    assert all("without CUDA" in v["why"] for v in cuda["ops"].values())
  assert kernels.get_engine("reference").int_gemm is reference.int_gemm
  assert kernels.get_engine("native").bit_split is native.bit_split
  # One instance per (choice, platform), not a namespace per trace.
  assert kernels.get_engine("auto", "cpu") is kernels.get_engine("auto", "cpu")


def test_missing_build_falls_back_with_one_warning(monkeypatch):
  monkeypatch.setattr(native, "_status", lambda: (False, "simulated missing build"))
  monkeypatch.setattr(engine_lib, "_warned", set())
  monkeypatch.setattr(engine_lib, "_devices", lambda platform: [object()])
  engine_lib._engine.cache_clear()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      e1 = kernels.get_engine("auto", "cuda")
      e2 = kernels.get_engine("auto", "cuda")
    assert e1.runs == e2.runs == {op: "reference" for op in engine_lib.OPS}
    assert "simulated missing build" in e1.why["int_gemm"]
    assert len([w for w in caught if "simulated missing build" in str(w.message)]) == 1
    with pytest.raises(RuntimeError, match="simulated missing build"):
      kernels.get_engine("native", "cpu")
  finally:
    engine_lib._engine.cache_clear()


# Finite inputs near float32's limit: the butterflies run on x * 2^-L (the
# float contract), so +-1 sums of up to 2^L * max|x| never overflow.


@pytest.mark.parametrize("block", [32, 1024, "traced"])
def test_hadamard_quantize_near_float32_limit(block):
  """Codes of (x * 2^126, step * 2^126) are those of (x, step) in both
  engines: activations with residual, axis 0, and hadamard_quantize_weight."""
  big = np.float32(2.0 ** 126)
  x = near_limit_operand((8, 1024), axis=1)
  w = near_limit_operand((1024, 8), axis=0, seed=1)
  step = np.float32(2.0 ** -6)
  assert np.isfinite(x * big).all() and np.isfinite(w * big).all()
  def run(mod, x, w, s):
    def f(x, w, s, log2):
      blk = log2 if block == "traced" else block
      return (mod.hadamard_quantize(x, s, block=blk, qn=7, qp=7, seed=seed(1)),
              mod.hadamard_quantize(w, s, block=blk, qn=8, qp=7, axis=0, transpose=True),
              mod.hadamard_quantize_weight(w, s, block=blk, qn=7, qp=7))
    return jax.tree.leaves(on_cpu(f, jnp.asarray(x), jnp.asarray(w), jnp.float32(s),
                                  jnp.int32(10)))
  want = run(reference, x, w, step)
  assert len(np.unique(np.asarray(want[0]))) > 8     # codes spread over the range
  for mod in (native, reference):
    for a, b in zip(run(mod, x * big, w * big, step * big), want):
      assert_same_floats(a, b) if a.dtype == jnp.float32 else assert_same_ints(a, b)
  for a, b in zip(run(native, x, w, step), want):
    assert_same_floats(a, b) if a.dtype == jnp.float32 else assert_same_ints(a, b)


@pytest.mark.parametrize("engine", ["reference", "native"])
def test_int4_matmul_row_near_float32_limit(engine):
  """One row of x times 2^120 (its block sums pass float32's max) with
  step_x times 2^120 gives that row's output times 2^120, finite."""
  scale = np.float32(2.0 ** 120)
  rng = np.random.default_rng(5)
  x = rng.normal(0, 1, (8, 64)).astype(np.float32)
  x[3] = 24.0 + rng.normal(0, 3, 64)
  w = jnp.asarray(rng.normal(0, 0.1, (64, 16)), jnp.float32)
  t = np.asarray(hadamard.hadamard_transform(jnp.asarray(x[3:4]), 32))
  step = np.float32(2 * np.abs(t).mean() / np.sqrt(7))   # the init rule, on row 3
  cfg = jint4.Int4Config(engine=engine)
  key = jax.random.key(0)
  f = jax.jit(lambda x, s: jint4.int4_matmul(x, w, s, jnp.float32(0.02), key, config=cfg))
  with jax.default_device(CPU):
    y = np.asarray(f(jnp.asarray(x), jnp.float32(step)))
    x_big = x.copy()
    x_big[3] *= scale
    y_big = np.asarray(f(jnp.asarray(x_big), jnp.float32(step * scale)))
  assert np.isfinite(y_big).all() and np.abs(y[3]).max() > 0
  np.testing.assert_allclose(y_big[3], y[3] * scale, rtol=1e-6)


@pytest.mark.parametrize("block", [32, 64])
def test_lsq_backward_near_float32_limit(block):
  """A gradient times 2^120 gives dT (dK) times 2^120 exactly and delta_sum
  times 2^120, finite, in both engines (the +-1 sums alone would overflow)."""
  scale = np.float32(2.0 ** 120)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(0, 0.3, (8, 64)), jnp.float32)
  _, res = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.3), block=block, qn=7,
                  qp=7, seed=seed(3))
  g = rng.normal(0, 0.5, (8, 64)).astype(np.float32)
  g[2] = 12.0 + rng.uniform(0, 1, 64)            # same sign: block sums near 2^128
  kernel = jnp.asarray(rng.normal(0, 0.3, (64, 8)), jnp.float32)
  gw = rng.normal(0, 0.5, (64, 8)).astype(np.float32)
  gw[:, 5] = 12.0 + rng.uniform(0, 1, 64)
  for mod in (native, reference):
    act = lambda g: mod.lsq_backward(g, res, qn=7, qp=7, block=block)
    wgt = lambda g: mod.lsq_weight_backward(g, kernel, jnp.float32(0.3), block=block,
                                            qn=7, qp=7)
    for fn, grad in ((act, g), (wgt, gw)):
      d, ds = on_cpu(fn, jnp.asarray(grad))
      d_big, ds_big = on_cpu(fn, jnp.asarray(grad * scale))
      assert np.isfinite(np.asarray(d_big)).all() and np.isfinite(float(ds_big))
      np.testing.assert_array_equal(np.asarray(d_big), np.asarray(d) * scale)
      np.testing.assert_allclose(float(ds_big), float(ds) * float(scale), rtol=1e-5)
