"""CUDA handlers against the pure-JAX twins and the CPU handlers (GPU only).

Integer outputs must be bit-identical; float outputs equal to float rounding.
Run on a GPU by tools/gpu_test.sh; skipped without one.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint4
from jint4.kernels import native, reference
from jint4.quant import bitsplit
from tests.kernels.native_cases import (FLOAT_DTYPES, GEMM_SHAPES, QUANT_SHAPES,
                                        activations, assert_same_floats,
                                        assert_same_ints, bit_split_hi_ties, dtype_id,
                                        int_operand, largest_log2, near_limit_operand,
                                        random_rows, random_slots, per_row_split_case, seed)


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


def _is_sm90():
  return str(getattr(_gpus()[0], "compute_capability", "")) == "9.0"


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _gpus(), reason="needs a CUDA GPU")]

BIG_QUANT = [(4096, 1024), (1024, 4096)]


def _run(device, fn, *args, **kwargs):
  args = jax.device_put(args, device)
  return jax.device_get(jax.jit(lambda *a: fn(*a, **kwargs))(*args))


def on_gpu(fn, *args, **kwargs):
  return _run(_gpus()[0], fn, *args, **kwargs)


def on_cpu(fn, *args, **kwargs):
  return _run(jax.devices("cpu")[0], fn, *args, **kwargs)


def twins(fn, *args, cpu_handler=True, **kwargs):
  """(CUDA handler, pure-JAX twin on the CPU, CPU handler or None)."""
  ref = getattr(reference, fn.__name__)
  return (on_gpu(fn, *args, **kwargs), on_cpu(ref, *args, **kwargs),
          on_cpu(fn, *args, **kwargs) if cpu_handler else None)


def test_native_cuda_is_registered():
  assert native.available() and native.has_cuda(), native.build_info()
  ops = jint4.engine_info()["platforms"]["cuda"]["ops"]
  assert {v["runs"] for v in ops.values()} == {"native"}, ops


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("qn", [7, 8])
@pytest.mark.parametrize("shape", QUANT_SHAPES + BIG_QUANT, ids=str)
def test_hadamard_quantize_rows(shape, qn, dtype):
  x = activations(shape, specials=True).astype(dtype)
  for log2 in sorted({0, largest_log2(shape[1])}):
    kw = dict(block=2 ** log2, qn=qn, qp=7, seed=seed(log2))
    (q, r), ref, cpu = twins(
        native.hadamard_quantize, x, jnp.float32(0.4), cpu_handler=x.size < 2 ** 16, **kw)
    for other_q, other_r in [ref] + ([cpu] if cpu is not None else []):
      assert_same_ints(q, other_q)
      assert_same_ints(r.nibbles, other_r.nibbles)
      assert_same_ints(r.flags, other_r.flags)
      assert_same_floats(r.norms, other_r.norms)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape", [(1, 7), (24, 5), (96, 33), (1024, 64), (2048, 3000),
                                   (4096, 1024)], ids=str)
def test_hadamard_quantize_columns(shape, transpose, dtype):
  w = activations(shape, seed=4).astype(dtype) * 0.05
  for log2 in sorted({0, largest_log2(shape[0])}):
    (q, _), (q_ref, _), _ = twins(native.hadamard_quantize, w, jnp.float32(0.01),
                                  cpu_handler=False, block=2 ** log2, qn=7, qp=7, axis=0,
                                  transpose=transpose)
    assert_same_ints(q, q_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 7), (24, 5), (96, 33), (1024, 64), (2048, 3000),
                                   (4096, 1024)], ids=str)
def test_hadamard_quantize_weight(shape, dtype):
  w = activations(shape, seed=5, specials=True) * 0.05
  w = w.at[-1, -1].set(jnp.nan).astype(dtype)  # the last row tile, the last column too
  for log2 in sorted({0, largest_log2(shape[0])}):
    (q_t, q, poison), (q_t_ref, q_ref, poison_ref), _ = twins(
        native.hadamard_quantize_weight, w, jnp.float32(0.01), cpu_handler=False,
        block=2 ** log2, qn=7, qp=7)
    assert_same_ints(q_t, q_t_ref)
    assert_same_ints(q, q_ref)
    assert_same_floats(poison, poison_ref)
    assert np.isnan(poison[-1])


def test_hadamard_quantize_traced_block():
  x = activations((64, 256))
  f = lambda x, l: native.hadamard_quantize(x, jnp.float32(0.5), block=l, qn=7, qp=7,
                                            seed=seed())
  g = lambda x, l: reference.hadamard_quantize(x, jnp.float32(0.5), block=l, qn=7, qp=7,
                                               seed=seed())
  for log2 in (0, 3, 8):
    (q, r), (q_ref, r_ref) = on_gpu(f, x, jnp.int32(log2)), on_cpu(g, x, jnp.int32(log2))
    assert_same_ints(q, q_ref)
    assert_same_ints(r.nibbles, r_ref.nibbles)


def _residual(shape, qn=7):
  x = activations(shape, seed=1)
  _, res = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.3), block=1, qn=qn, qp=7,
                  seed=seed(1))
  return res


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(4096, 1024), (1000, 300)], ids=str)
def test_residual_values(shape, gather, transpose):
  res = _residual(shape, qn=8 if transpose else 7)
  qn = 8 if transpose else 7
  rows = random_rows(shape[0] + 5, shape[0], seed=2) if gather else None
  q, q_ref, q_cpu = twins(native.residual_values, res, shape=shape, qn=qn, qp=7, rows=rows,
                          transpose=transpose)
  assert_same_ints(q, q_ref)
  assert_same_ints(q, q_cpu)


@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(4096, 1024)], ids=str)
def test_lsq_backward(shape, gather, out_dtype, grad_dtype):
  m, k = shape
  res = _residual(shape)
  s = m + 3
  grad = activations((s, k) if gather else shape, seed=2).astype(grad_dtype)
  slots = random_slots(m, s, seed=3) if gather else None
  top = largest_log2(k)
  for log2 in sorted({0, min(5, top), top}):
    (dt, ds), (dt_ref, ds_ref), _ = twins(native.lsq_backward, grad, res, qn=7, qp=7,
                                          slots=slots, block=2 ** log2, out_dtype=out_dtype,
                                          cpu_handler=False)
    assert dt.dtype == out_dtype
    tol = 1e-5 if out_dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(dt, np.float32), np.asarray(dt_ref, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(ds, ds_ref, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(grad.astype(jnp.float32)).sum()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 1), (8, 3), (24, 5), (96, 33), (1024, 40),
                                   (4096, 1024)], ids=str)
@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16], ids=dtype_id)
def test_lsq_weight_backward(shape, dtype, grad_dtype):
  w = (activations(shape, seed=6) * 0.05).astype(dtype)
  grad = activations(shape, seed=7).astype(grad_dtype)
  for log2 in sorted({0, largest_log2(shape[0])}):
    (dk, ds), (dk_ref, ds_ref), _ = twins(native.lsq_weight_backward, grad, w,
                                          jnp.float32(0.02), block=2 ** log2, qn=7, qp=7,
                                          cpu_handler=False)
    assert dk.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(dk, np.float32), np.asarray(dk_ref, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(ds, ds_ref, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(grad.astype(jnp.float32)).sum()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(8192, 1024)], ids=str)
def test_bit_split(shape, dtype):
  g = activations(shape, seed=3).astype(dtype)
  (g2, s_hi, s_lo, norms), ref, _ = twins(native.bit_split, g, seed(3), cpu_handler=False)
  assert_same_ints(g2, ref[0])
  assert_same_floats(s_hi, ref[1])
  assert_same_floats(s_lo, ref[2])
  np.testing.assert_allclose(norms, ref[3], rtol=1e-6)
  # With max|g| given by the caller (XLA's reduction on the GPU): the same.
  given = on_gpu(lambda g: native.bit_split(g, seed(3), abs_max=bitsplit.abs_max(g)), g)
  assert_same_ints(given[0], ref[0])
  for a, b in zip(given[1:3], ref[1:3]):
    assert_same_floats(a, b)
  np.testing.assert_allclose(given[3], ref[3], rtol=1e-6)
  # A larger one (e.g. all-reduced over the shards of G): as the twin.
  big = 2.0 * on_cpu(bitsplit.abs_max, g)
  (g2, s_hi, s_lo, norms), ref, _ = twins(native.bit_split, g, seed(3), big,
                                          cpu_handler=False)
  assert_same_ints(g2, ref[0])
  assert_same_floats(s_hi, ref[1])
  assert_same_floats(s_lo, ref[2])
  np.testing.assert_allclose(norms, ref[3], rtol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(4096, 1024), (1000, 777)], ids=str)
def test_bit_split_joined(shape, dtype):
  g = activations(shape, seed=4).astype(dtype)
  (v, vt, s_hi, s_lo), ref, _ = twins(native.bit_split_joined, g, seed(4), cpu_handler=False)
  assert_same_ints(v, ref[0])
  assert_same_ints(vt, ref[1])
  assert_same_floats(s_lo, ref[3])
  # With max|g| given by the caller (XLA's reduction on the GPU): the same.
  given = on_gpu(lambda g: native.bit_split_joined(g, seed(4), abs_max=bitsplit.abs_max(g)), g)
  for a, b in zip(given, ref):
    assert_same_ints(a, b) if a.dtype == jnp.int8 else assert_same_floats(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(4096, 1024), (1000, 777), (1000, 776)],
                         ids=str)
def test_bit_split_per_row(shape, dtype):
  """row_inv: the CUDA handlers split the unit rows as they read g (fast and
  scalar kernels), bit-identical to the twin; NaN and Inf rows included."""
  g, row_inv = per_row_split_case(shape, dtype, specials=True)
  m = on_cpu(bitsplit.abs_max, g)
  for fn, abs_max in ((native.bit_split, jnp.float32(1.0)), (native.bit_split, None),
                      (native.bit_split_joined, m), (native.bit_split_joined, None)):
    out, ref, _ = twins(fn, g, seed(6), abs_max, row_inv=row_inv, cpu_handler=False)
    for i, (a, b) in enumerate(zip(out, ref)):
      if a.dtype == jnp.int8:
        assert_same_ints(a, b)
      elif fn is native.bit_split and i == 3:   # norms: a float sum, any order
        np.testing.assert_allclose(a, b, rtol=1e-6)
      else:
        assert_same_floats(a, b)


def test_bit_split_with_constant_abs_max_at_hi_ties():
  """abs_max a compile-time constant (the row split's 1.0): the CUDA handlers
  and the twin agree on every tie of t / 14 (g near (2k + 1) / 14)."""
  g = jnp.asarray(np.resize(bit_split_hi_ties(), (4, 64)))
  for fn in (native.bit_split, native.bit_split_joined):
    out, ref, _ = twins(fn, g, seed(5), abs_max=jnp.float32(1.0), cpu_handler=False)
    for a, b in zip(out, ref):
      assert_same_ints(a, b) if a.dtype == jnp.int8 else assert_same_floats(a, b)


@pytest.mark.parametrize("shape", [(3, 5), (33, 96), (1000, 300), (4096, 1024)], ids=str)
def test_resplit_rows(shape):
  r, c = shape
  g2 = int_operand((2 * r, c), 5, -7, 7)
  rows = random_rows(r + 1, 2 * r, seed=5)
  scale = jnp.asarray(np.random.default_rng(5).uniform(0, 3, r + 1), jnp.float32)
  (vt, s_hi, s_lo), ref, _ = twins(native.resplit_rows, g2, rows, scale, seed(5),
                                   cpu_handler=False)
  assert_same_ints(vt, ref[0])
  assert_same_floats(s_lo, ref[2])


def test_non_finite_gradients_stay_visible():
  g = activations((64, 128), specials=True)
  _, s_hi, s_lo, _ = on_gpu(native.bit_split, g, seed())
  assert np.isnan(s_hi) and np.isnan(s_lo)
  _, _, _, s_lo = on_gpu(native.bit_split_joined, g, seed())
  assert np.isnan(s_lo)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mnk", GEMM_SHAPES + [(1024, 1024, 1024), (1000, 1000, 1008),
                                               (4096, 4096, 4096)], ids=str)
def test_int_gemm(mnk, out_dtype):
  m, n, k = mnk
  a, b = int_operand((m, k), 1), int_operand((n, k), 2)
  rs = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2, m), jnp.float32)
  kw = dict(scale=jnp.float32(0.01), row_scale=rs, out_dtype=out_dtype)
  g, ref = on_gpu(native.int_gemm, a, b, **kw), on_cpu(reference.int_gemm, a, b, **kw)
  assert g.dtype == out_dtype
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32),
                             rtol=1e-6 if out_dtype == jnp.float32 else 2 ** -7)


@pytest.mark.parametrize("int4", [True, False])
@pytest.mark.parametrize("mnk", GEMM_SHAPES + [(512, 384, 2048), (1000, 1000, 1008)], ids=str)
def test_int_gemm_exact(mnk, int4):
  """Exact int32 products against numpy int64 (joined digits in [-98, 98] too)."""
  m, n, k = mnk
  lo, hi = (-8, 7) if int4 else (-98, 98)
  a, b = int_operand((m, k), 1, lo, hi), int_operand((n, k), 2, -8, 7)
  out = on_gpu(lambda a, b: native.int_gemm(a, b, scale=jnp.float32(1.0), int4=int4), a, b)
  np.testing.assert_array_equal(np.asarray(out, np.int64),
                                np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)


@pytest.mark.parametrize("path", ["sm80", "fallback"])
@pytest.mark.parametrize("int4", [True, False])
def test_int_gemm_other_paths_on_this_gpu(path, int4, monkeypatch):
  """The sm_80 INT4 tensor-core kernel (compiled for sm_90a too) and the
  generic kernel, forced through JINT4_CUDA_GEMM (read per call): exact int32
  products against numpy. Joined digits (int4=False) skip the INT4 kernel."""
  monkeypatch.setenv("JINT4_CUDA_GEMM", path)
  m, n, k = 200, 136, 1000
  a = int_operand((m, k), 1, *((-8, 7) if int4 else (-98, 98)))
  b = int_operand((n, k), 2)
  out = on_gpu(lambda a, b: native.int_gemm(a, b, scale=jnp.float32(1.0), int4=int4), a, b)
  np.testing.assert_array_equal(np.asarray(out, np.int64),
                                np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)


@pytest.mark.parametrize("config", native.SM90_GEMM_CONFIGS)
def test_int_gemm_every_sm90_config(config, monkeypatch):
  """Each compiled sm_90a config, forced through JINT4_GEMM_SM90_CONFIG (read
  per call), with a non-default tile scheduler: exact int32 products, and the
  f32 / bf16 epilogue bit-identical to the CPU twin's. Shapes cover partial
  tiles in M, N and K and more tiles than SMs."""
  if not _is_sm90():
    pytest.skip("the sm_90a configs run on compute 9.0 only")
  monkeypatch.setenv("JINT4_GEMM_SM90_CONFIG", config)
  monkeypatch.setenv("JINT4_GEMM_SWIZZLE", "2")
  for m, n, k in [(333, 264, 1008), (2304, 2560, 512)]:
    a, b = int_operand((m, k), 1, -98, 98), int_operand((n, k), 2)
    out = on_gpu(lambda a, b: native.int_gemm(a, b, scale=jnp.float32(1.0), int4=False), a, b)
    np.testing.assert_array_equal(np.asarray(out, np.int64),
                                  np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)
    rs = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2, m), jnp.float32)
    cb = jnp.asarray(np.random.default_rng(4).normal(0, 10, n), jnp.float32)
    for out_dtype in (jnp.float32, jnp.bfloat16):
      kw = dict(scale=jnp.float32(0.0123), row_scale=rs, col_bias=cb, out_dtype=out_dtype,
                int4=False)
      g = on_gpu(native.int_gemm, a, b, **kw)
      ref = on_cpu(native.int_gemm, a, b, **kw)
      np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(ref).view(np.uint8))


def test_int_gemm_default_choice_on_a_long_walk(monkeypatch):
  """At N = 12288 (the raster walks 12288 rows of B per band) the handler
  picks 128x256 cluster 2x1 with swizzle 8: exact int32 products, and
  bit-identical to the forced 128x256 cluster 1x2 config."""
  if not _is_sm90():
    pytest.skip("the sm_90a configs run on compute 9.0 only")
  m, n, k = 6144, 12288, 64
  a, b = int_operand((m, k), 1, -98, 98), int_operand((n, k), 2)
  gemm = lambda a, b: native.int_gemm(a, b, scale=jnp.float32(1.0), int4=False)  # noqa: E731
  monkeypatch.delenv("JINT4_GEMM_SM90_CONFIG", raising=False)
  monkeypatch.delenv("JINT4_GEMM_SWIZZLE", raising=False)
  out = on_gpu(gemm, a, b)
  want = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T  # exact: |sums| < 2^16
  np.testing.assert_array_equal(out, want)
  monkeypatch.setenv("JINT4_GEMM_SM90_CONFIG", "128x256_c1x2")
  np.testing.assert_array_equal(on_gpu(gemm, a, b), out)


def test_int_gemm_unknown_sm90_config_is_a_clear_error(monkeypatch):
  """The error lists the compiled configs: exactly native.SM90_GEMM_CONFIGS."""
  if not _is_sm90():
    pytest.skip("the sm_90a configs run on compute 9.0 only")
  monkeypatch.setenv("JINT4_GEMM_SM90_CONFIG", "64x64_typo")
  a = int_operand((256, 256), 1)
  names = re.escape(", ".join(native.SM90_GEMM_CONFIGS))
  with pytest.raises(Exception, match=f"64x64_typo.*unset it or use one of: {names}(?!, )"):
    on_gpu(lambda a: native.int_gemm(a, a, scale=jnp.float32(1.0)), a)


def test_every_output_element_is_written():
  """Outputs are exact even when their memory held poison just before.

  The handlers' signatures take no output operand, so the poison is planted
  through XLA's allocator: a freed NaN / 0xAA buffer of the output's size is
  what the next allocation of that size reuses. Any element a kernel skips
  keeps the poison and fails the comparison.
  """
  dev = _gpus()[0]
  m, n, k = 77, 45, 96
  a, b = int_operand((m, k), 5), int_operand((n, k), 6)
  x = activations((9, 40))
  for _ in range(3):
    poison = [jax.device_put(jnp.full((m, n), jnp.nan, jnp.float32), dev),
              jax.device_put(jnp.full((9, 40), 99, jnp.int8), dev),
              jax.device_put(jnp.full((40, 9), 99, jnp.int8), dev),
              jax.device_put(jnp.full((180,), 0xAA, jnp.uint8), dev),
              jax.device_put(jnp.full((9,), jnp.nan, jnp.float32), dev)]
    jax.block_until_ready(poison)
    del poison
    out, ref, _ = twins(native.int_gemm, a, b, scale=jnp.float32(1.0), cpu_handler=False)
    np.testing.assert_array_equal(out, ref)
    (q, r), (q_r, r_r), _ = twins(native.hadamard_quantize, x, jnp.float32(0.3), block=8,
                                  qn=7, qp=7, seed=seed(), cpu_handler=False)
    assert_same_ints(q, q_r)
    assert_same_ints(r.nibbles, r_r.nibbles)
    assert_same_ints(r.flags, r_r.flags)
    assert_same_floats(r.norms, r_r.norms)
    v, v_r, _ = twins(native.bit_split_joined, x, seed(), cpu_handler=False)
    assert_same_ints(v[1], v_r[1])
    qt, qt_r, _ = twins(native.residual_values, r_r, shape=(9, 40), qn=7, qp=7,
                        transpose=True, cpu_handler=False)
    assert_same_ints(qt, qt_r)


@pytest.mark.parametrize("backward", ["lss", "lss_tensor", "lss_sampled_dx", "bitsplit",
                                     "bitsplit_tensor"])
def test_int4_matmul_native_gpu_matches_reference_cpu(backward):
  """The whole op (forward + backward) on the CUDA engine vs the pure-JAX twin.

  The twin runs on the CPU, where XLA's integer dot is exact (see
  test_xla_gpu_int8_dot_exactness for the GPU's). The output gradient is a
  fixed array, not a function of the output: the epilogue's float rounding
  may differ by an ulp between the backends, and with G = f(Y) one ulp moves
  a stochastic rounding of G, then every later row's cumulative sampling
  probability, so lss would keep other rows (unbiased on both, not equal).
  """
  x = activations((256, 512)).astype(jnp.bfloat16)
  w = activations((512, 256), seed=7) * 0.05
  ct = activations((256, 256), seed=3).astype(jnp.bfloat16)
  key = jax.random.key(0)
  grads = {}
  for engine, dev in (("native", _gpus()[0]), ("reference", jax.devices("cpu")[0])):
    # *_tensor: the paper's one bit-split scale per tensor; *_sampled_dx: dX
    # sampled too, as the paper does.
    cfg = jint4.Int4Config(engine=engine, backward=backward.split("_")[0],
                           split_scale="tensor" if "_tensor" in backward else "row",
                           lss_dx_budget=1.0 if "_sampled_dx" in backward else 2.0)
    f = jax.jit(jax.grad(lambda x, w, ct: jnp.sum(jint4.int4_matmul(
        x, w, jnp.float32(0.5), jnp.float32(0.02), key, config=cfg).astype(jnp.float32)
        * ct.astype(jnp.float32)), argnums=(0, 1)))
    grads[engine] = f(*jax.device_put((x, w, ct), dev))
  for a, b in zip(grads["native"], grads["reference"]):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * float(np.abs(b).max()))


@pytest.mark.parametrize("mnk", [
    pytest.param((3, 5, 7), marks=pytest.mark.xfail(
        strict=True, reason="XLA:GPU (jaxlib 0.11.2, H100/H200) returns a wrong int8 dot"
        " for this tiny shape; seen on every device run")),
    (256, 256, 512), (512, 256, 272), (256, 512, 256)], ids=str)
def test_xla_gpu_int8_dot_exactness(mnk):
  """XLA's own int8 x int8 -> int32 dot on the GPU (the reference engine's GEMM).

  Records whether the pure-JAX engine is exact on this GPU; jint4 defaults to
  the native GEMM there.
  """
  m, n, k = mnk
  a, b = int_operand((m, k), 8, -98, 98), int_operand((n, k), 9)
  out = on_gpu(reference.int_gemm_i32, a, b)
  np.testing.assert_array_equal(np.asarray(out, np.int64),
                                np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)


def test_sanitizer_small_case():
  """A small run of every op, for compute-sanitizer in tools/gpu_test.sh."""
  x = activations((8, 64))
  q, res = native.hadamard_quantize(x, jnp.float32(0.5), block=32, qn=7, qp=7, seed=seed())
  qw, _ = native.hadamard_quantize(activations((64, 16), seed=1), jnp.float32(0.5),
                                   block=8, qn=7, qp=7, axis=0, transpose=True)
  native.residual_values(res, (8, 64), qn=7, qp=7)
  rows = jnp.asarray([3, 0, 7], jnp.int32)
  native.residual_values(res, (8, 64), qn=7, qp=7, rows=rows, transpose=True)
  native.lsq_backward(x, res, qn=7, qp=7, block=32, out_dtype=jnp.bfloat16)
  native.lsq_backward(x[:3], res, qn=7, qp=7, slots=random_slots(8, 3), block=32)
  native.residual_values(res, (8, 64), qn=7, qp=7, rows=jnp.arange(16, dtype=jnp.int32) % 8,
                         transpose=True)  # the wide transposed path
  native.lsq_weight_backward(x, x, jnp.float32(0.5), block=8, qn=7, qp=7)
  w = activations((64, 40), seed=2)  # 32-row blocks: the two-thread-per-column path
  native.lsq_weight_backward(w.astype(jnp.bfloat16), w.astype(jnp.bfloat16), jnp.float32(0.5),
                             block=32, qn=7, qp=7)
  g2, _, _, _ = native.bit_split(x, seed())
  native.bit_split_joined(x, seed())
  native.resplit_rows(g2, rows, jnp.ones((3,), jnp.float32), seed())
  native.int_gemm(q, q, scale=jnp.float32(1.0))
  out = native.int_gemm(q, qw, scale=jnp.float32(1.0), int4=False)
  jax.block_until_ready(out)


def test_engine_follows_where_the_program_runs():
  """On a GPU host, the same jitted function placed on the CPU lowers the CPU
  choice of engine="auto", placed on the GPU the CUDA handlers."""
  import re
  x, w = activations((64, 128)), activations((128, 32), seed=3) * 0.1
  cfg = jint4.Int4Config()
  f = jax.jit(jax.grad(lambda x, w: jnp.sum(jint4.int4_matmul(
      x, w, jnp.float32(0.5), jnp.float32(0.05), jax.random.key(0), config=cfg) ** 2),
      argnums=(0, 1)))
  calls = {}
  for name, dev in (("cpu", jax.devices("cpu")[0]), ("gpu", _gpus()[0])):
    args = jax.device_put((x, w), dev)
    calls[name] = set(re.findall(r"jint4_[a-z_]+", f.lower(*args).as_text()))
    grads = f(*args)
    assert all(g.devices() == {dev} for g in grads)
  assert calls["cpu"] == {"jint4_lsq_weight_backward"}
  assert {"jint4_hadamard_quantize", "jint4_int_gemm", "jint4_lsq_backward"} <= calls["gpu"]


@pytest.mark.parametrize("block", [32, 1024])
def test_hadamard_quantize_near_float32_limit_cuda(block):
  """The CUDA handlers keep the float contract's pre-scale: codes of
  (x * 2^126, step * 2^126) are those of (x, step), as on the CPU twin."""
  big = np.float32(2.0 ** 126)
  x = near_limit_operand((8, 1024), axis=1)
  w = near_limit_operand((1024, 8), axis=0, seed=1)
  step = np.float32(2.0 ** -6)

  def run(x, w, s):
    def f(x, w, s):
      return (native.hadamard_quantize(x, s, block=block, qn=7, qp=7, seed=seed(1)),
              native.hadamard_quantize(w, s, block=block, qn=8, qp=7, axis=0,
                                       transpose=True),
              native.hadamard_quantize_weight(w, s, block=block, qn=7, qp=7))
    return jax.tree.leaves(on_gpu(f, jnp.asarray(x), jnp.asarray(w), jnp.float32(s)))

  want = jax.tree.leaves(on_cpu(
      lambda x, w, s: (reference.hadamard_quantize(x, s, block=block, qn=7, qp=7, seed=seed(1)),
                       reference.hadamard_quantize(w, s, block=block, qn=8, qp=7, axis=0,
                                                   transpose=True),
                       reference.hadamard_quantize_weight(w, s, block=block, qn=7, qp=7)),
      jnp.asarray(x), jnp.asarray(w), jnp.float32(step)))
  for got in (run(x * big, w * big, step * big), run(x, w, step)):
    for a, b in zip(got, want):
      assert_same_floats(a, b) if a.dtype == jnp.float32 else assert_same_ints(a, b)
