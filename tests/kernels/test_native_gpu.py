"""CUDA handlers against the CPU handlers and the pure-JAX twins (GPU only).

Run on the H100/H200 machine by tools/gpu_check.sh; skipped without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint4
from jint4.kernels import native, reference
from tests.kernels.native_cases import (GEMM_SHAPES, QUANT_SHAPES, activations,
                                        assert_same_ints, int_operand, largest_log2,
                                        seed)


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _gpus(), reason="needs a CUDA GPU")]


def _run(device, fn, *args, **kwargs):
  args = jax.device_put(args, device)
  return jax.device_get(jax.jit(lambda *a: fn(*a, **kwargs))(*args))


def both(fn, *args, big=False, **kwargs):
  """(CUDA handler result, CPU oracle result).

  The oracle is the CPU handler, or for ``big`` problems the pure-JAX twin of
  the same op on the CPU (the single-threaded C++ GEMM is too slow there).
  """
  oracle = getattr(reference, fn.__name__) if big else fn
  return (_run(_gpus()[0], fn, *args, **kwargs),
          _run(jax.devices("cpu")[0], oracle, *args, **kwargs))


def test_native_cuda_is_registered():
  assert native.available() and native.has_cuda(), native.build_info()
  assert jint4.engine_info()["ops"]["int_gemm"] == "native"


@pytest.mark.parametrize("qn", [7, 8])
@pytest.mark.parametrize("shape", QUANT_SHAPES + [(4096, 1024)], ids=str)
def test_hadamard_quantize(shape, qn):
  x = activations(shape, specials=True)
  for log2 in sorted({0, largest_log2(shape[1])}):
    kw = dict(block=2 ** log2, qn=qn, qp=7, seed=seed(log2))
    (q_gpu, r_gpu), (q_cpu, r_cpu) = both(native.hadamard_quantize, x, jnp.float32(0.4), **kw)
    assert_same_ints(q_gpu, q_cpu)
    assert_same_ints(r_gpu.nibbles, r_cpu.nibbles)
    assert_same_ints(r_gpu.flags, r_cpu.flags)
    q_ref, _ = _run(jax.devices("cpu")[0], reference.hadamard_quantize, x, jnp.float32(0.4), **kw)
    assert_same_ints(q_gpu, q_ref)


@pytest.mark.parametrize("shape", QUANT_SHAPES + [(4096, 1024)], ids=str)
def test_residual_and_lsq_backward(shape):
  x = activations(shape, seed=1)
  _, res = _run(jax.devices("cpu")[0], reference.hadamard_quantize, x, jnp.float32(0.3),
                block=1, qn=7, qp=7, seed=seed(1))
  g, c = both(native.residual_values, res, shape=shape, qn=7, qp=7)
  assert_same_ints(g, c)
  grad = activations(shape, seed=2)
  (dt_g, ds_g), (dt_c, ds_c) = both(native.lsq_backward, grad, res, qn=7, qp=7)
  np.testing.assert_array_equal(dt_g, dt_c)
  np.testing.assert_allclose(ds_g, ds_c, rtol=1e-4, atol=1e-4 * float(jnp.abs(grad).sum()))


@pytest.mark.parametrize("shape", QUANT_SHAPES + [(8192, 1024)], ids=str)
def test_bit_split(shape):
  g = activations(shape, seed=3)
  out_g, out_c = both(native.bit_split, g, seed(3))
  assert_same_ints(out_g[0], out_c[0])
  assert_same_ints(out_g[1], out_c[1])
  for a, b in zip(out_g[2:], out_c[2:]):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mnk", GEMM_SHAPES + [(1024, 1024, 1024), (1000, 1000, 1008),
                                               (4096, 4096, 4096)], ids=str)
def test_int_gemm(mnk, out_dtype):
  m, n, k = mnk
  a, b = int_operand((m, k), 1), int_operand((n, k), 2)
  rs = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2, m), jnp.float32)
  g, c = both(native.int_gemm, a, b, scale=jnp.float32(0.01), row_scale=rs,
              out_dtype=out_dtype, big=m * n * k > 2 ** 27)
  assert g.dtype == out_dtype
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(c, np.float32),
                             rtol=1e-6 if out_dtype == jnp.float32 else 2 ** -7)
  if m * n * k <= 2 ** 27:  # exact int32 products against numpy int64
    exact = jax.jit(lambda a, b: native.int_gemm(a, b, scale=jnp.float32(1.0)))(
        *jax.device_put((a, b), _gpus()[0]))
    np.testing.assert_array_equal(np.asarray(exact, np.int64),
                                  np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)


@pytest.mark.parametrize("mnk", GEMM_SHAPES + [(1024, 512, 2048)], ids=str)
def test_int_gemm_gather_rows(mnk):
  m, n, r = mnk
  a, b = int_operand((r, m), 3), int_operand((r + 7, n), 4)
  rows = jnp.asarray(np.random.default_rng(2).integers(0, r + 7, r), jnp.int32)
  g, c = both(native.int_gemm_gather_rows, a, b, rows, scale=jnp.float32(0.25),
              big=m * n * r > 2 ** 27)
  np.testing.assert_array_equal(g, c)


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
              jax.device_put(jnp.full((180,), 0xAA, jnp.uint8), dev)]
    jax.block_until_ready(poison)
    del poison
    out, cpu = both(native.int_gemm, a, b, scale=jnp.float32(1.0))
    assert bool(np.all(np.isfinite(out)))
    np.testing.assert_array_equal(out, cpu)
    (q, r), (q_c, r_c) = both(native.hadamard_quantize, x, jnp.float32(0.3), block=8,
                              qn=7, qp=7, seed=seed())
    assert_same_ints(q, q_c)
    assert_same_ints(r.nibbles, r_c.nibbles)
    assert_same_ints(r.flags, r_c.flags)


def test_int4dense_trains_on_gpu_with_native_engine():
  x = activations((256, 512))
  w = activations((512, 256), seed=7) * 0.05
  key = jax.random.key(0)
  grads = {}
  for engine in ("native", "reference"):
    cfg = jint4.Int4Config(engine=engine)
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(jint4.int4_matmul(
        x, w, jnp.float32(0.5), jnp.float32(0.02), key, config=cfg) ** 2), argnums=(0, 1)))
    grads[engine] = f(*jax.device_put((x, w), _gpus()[0]))
  for a, b in zip(grads["native"], grads["reference"]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(b).max()))


def test_sanitizer_small_case():
  """A small run of every op, for compute-sanitizer in tools/gpu_check.sh."""
  x = activations((8, 64))
  q, res = native.hadamard_quantize(x, jnp.float32(0.5), block=32, qn=7, qp=7, seed=seed())
  native.residual_values(res, (8, 64), qn=7, qp=7)
  native.lsq_backward(x, res, qn=7, qp=7)
  native.bit_split(x, seed())
  native.int_gemm(q, q, scale=jnp.float32(1.0))
  out = native.int_gemm_gather_rows(q, q, jnp.arange(8, dtype=jnp.int32), scale=jnp.float32(1))
  jax.block_until_ready(out)
