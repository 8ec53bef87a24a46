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
from jint4.kernels import native, reference
from tests.kernels.native_cases import (GEMM_SHAPES, QUANT_SHAPES, activations,
                                        assert_same_ints, int_operand, largest_log2,
                                        seed)

if not native.available():
  if os.environ.get("JINT4_REQUIRE_NATIVE") == "1":
    raise RuntimeError(f"JINT4_REQUIRE_NATIVE=1 but {native.reason()}")
  pytest.skip(f"native engine not built: {native.reason()}", allow_module_level=True)

CPU = jax.devices("cpu")[0]


def on_cpu(fn, *args, **kwargs):
  with jax.default_device(CPU):
    return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


@pytest.mark.parametrize("qn,qp", [(7, 7), (8, 7), (3, 4)])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_hadamard_quantize_bit_exact(shape, qn, qp):
  x = activations(shape, specials=True)
  step = jnp.float32(0.37)
  for log2 in sorted({0, min(1, largest_log2(shape[1])), largest_log2(shape[1])}):
    args = dict(block=2 ** log2, qn=qn, qp=qp, seed=seed(log2))
    q_ref, r_ref = on_cpu(reference.hadamard_quantize, x, step, **args)
    q_nat, r_nat = on_cpu(native.hadamard_quantize, x, step, **args)
    assert_same_ints(q_nat, q_ref)
    assert_same_ints(r_nat.nibbles, r_ref.nibbles)
    assert_same_ints(r_nat.flags, r_ref.flags)
    q_only, none = on_cpu(native.hadamard_quantize, x, step, block=2 ** log2, qn=qn, qp=qp)
    assert none is None
    assert_same_ints(q_only, q_ref)


def test_hadamard_quantize_traced_block():
  x = activations((16, 64))
  for log2 in range(7):
    ref = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.5),
                 block=jnp.int32(log2), qn=7, qp=7)[0]
    nat = on_cpu(lambda x, l: native.hadamard_quantize(x, jnp.float32(0.5), block=l,
                                                       qn=7, qp=7)[0], x, jnp.int32(log2))
    assert_same_ints(nat, ref)


@pytest.mark.parametrize("qn", [7, 8])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_residual_decode_and_lsq_backward(shape, qn):
  x = activations(shape, seed=1)
  _, res = on_cpu(reference.hadamard_quantize, x, jnp.float32(0.3), block=1, qn=qn,
                  qp=7, seed=seed(2))
  assert_same_ints(on_cpu(native.residual_values, res, shape=shape, qn=qn, qp=7),
                   on_cpu(reference.residual_values, res, shape=shape, qn=qn, qp=7))
  grad = activations(shape, seed=3)
  dt_ref, ds_ref = on_cpu(reference.lsq_backward, grad, res, qn=qn, qp=7)
  dt_nat, ds_nat = on_cpu(native.lsq_backward, grad, res, qn=qn, qp=7)
  np.testing.assert_array_equal(dt_nat, dt_ref)
  np.testing.assert_allclose(ds_nat, ds_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(grad).sum()))


@pytest.mark.parametrize("shape", QUANT_SHAPES + [(0, 4)], ids=str)
def test_bit_split_bit_exact(shape):
  g = activations(shape, seed=4) * 1e-3
  out_ref = on_cpu(reference.bit_split, g, seed(5))
  out_nat = on_cpu(native.bit_split, g, seed(5))
  assert_same_ints(out_nat[0], out_ref[0])
  assert_same_ints(out_nat[1], out_ref[1])
  for a, b in zip(out_nat[2:], out_ref[2:]):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("special", [0.0, np.nan, np.inf])
def test_bit_split_special_values(special):
  g = jnp.zeros((4, 8)) if special == 0.0 else activations((4, 8)).at[1, 2].set(special)
  out_ref = on_cpu(reference.bit_split, g, seed())
  out_nat = on_cpu(native.bit_split, g, seed())
  assert_same_ints(out_nat[0], out_ref[0])
  assert_same_ints(out_nat[1], out_ref[1])
  for a, b in zip(out_nat[2:], out_ref[2:]):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=str)
def test_int_gemm(mnk, out_dtype):
  m, n, k = mnk
  a, b = int_operand((m, k), 1), int_operand((n, k), 2)
  scale = jnp.float32(0.013)
  row_scale = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2, m), jnp.float32)
  for rs in (None, row_scale):
    ref = on_cpu(reference.int_gemm, a, b, scale=scale, row_scale=rs, out_dtype=out_dtype)
    nat = on_cpu(native.int_gemm, a, b, scale=scale, row_scale=rs, out_dtype=out_dtype)
    assert nat.dtype == out_dtype
    # Dequantized floats agree to rounding (XLA may reassociate the epilogue);
    # the integer products themselves are checked exactly below.
    np.testing.assert_allclose(np.asarray(nat, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-6 if out_dtype == jnp.float32 else 2 ** -7)
  # Exact int32 accumulation at full int8 range and a long K.
  a8, b8 = int_operand((4, 4096), 3, -128, 127), int_operand((3, 4096), 4, -128, 127)
  got = on_cpu(native.int_gemm, a8, b8, scale=jnp.float32(1.0))
  want = np.asarray(a8, np.int64) @ np.asarray(b8, np.int64).T
  np.testing.assert_array_equal(np.asarray(got, np.float64), want.astype(np.float32))
  exact = on_cpu(native.int_gemm, a, b, scale=jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(exact, np.int64),
                                np.asarray(a, np.int64) @ np.asarray(b, np.int64).T)


@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=str)
def test_int_gemm_gather_rows(mnk):
  m, n, r = mnk
  t = r + 5
  a, b = int_operand((r, m), 5), int_operand((t, n), 6)
  rows = jnp.asarray(np.random.default_rng(1).integers(0, t, r), jnp.int32)
  ref = on_cpu(reference.int_gemm_gather_rows, a, b, rows, scale=jnp.float32(0.5))
  nat = on_cpu(native.int_gemm_gather_rows, a, b, rows, scale=jnp.float32(0.5))
  np.testing.assert_array_equal(nat, ref)


def test_native_ops_vmap_and_grad_through_int4_matmul():
  x = activations((32, 64))
  w = activations((64, 16), seed=9) * 0.1
  cfg_n = jint4.Int4Config(engine="native")
  cfg_r = jint4.Int4Config(engine="reference")
  key = jax.random.key(0)
  for backward in ("lss", "nonzero"):
    def loss(cfg):
      cfg = jint4.Int4Config(engine=cfg.engine, backward=backward)
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
cases = {
  "log2_block": lambda: native.hadamard_quantize(
      jnp.ones((4, 12)), jnp.float32(1), block=jnp.int32(3), qn=7, qp=7)[0],
  "rows": lambda: native.int_gemm_gather_rows(
      jnp.ones((2, 3), jnp.int8), jnp.ones((4, 5), jnp.int8),
      jnp.asarray([0, 9], jnp.int32), scale=jnp.float32(1)),
}
with jax.default_device(cpu):
  for name, fn in cases.items():
    try:
      jax.block_until_ready(jax.jit(fn)())
      print(name, "NO ERROR")
    except Exception as e:
      print(name, "ERROR", str(e).replace(chr(10), " ")[:300])
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

  Run in a subprocess: a jaxlib whose FFI error path is broken would take the
  whole test process down (seen with jaxlib 0.11.2 on the GPU machine).
  """
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", _BAD_INPUT_SCRIPT], capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
  assert lines["log2_block"].startswith("ERROR") and "divide" in lines["log2_block"], lines
  assert lines["rows"].startswith("ERROR") and "out of range" in lines["rows"], lines


def test_engine_info_and_auto_policy():
  info = jint4.engine_info()
  assert info["native_usable"] and info["native_build"]["built"]
  assert set(info["ops"]) == set(kernels.OPS)
  assert kernels.get_engine("reference").int_gemm is reference.int_gemm
  assert kernels.get_engine("native").bit_split is native.bit_split


def test_missing_build_falls_back_with_one_warning(monkeypatch):
  monkeypatch.setattr(native, "_status", lambda: (False, "simulated missing build"))
  monkeypatch.setattr(kernels, "_warned", [])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    e1 = kernels.get_engine("auto")
    e2 = kernels.get_engine("auto")
  assert e1.name == e2.name == "reference"
  assert len([w for w in caught if "simulated missing build" in str(w.message)]) == 1
  with pytest.raises(RuntimeError, match="simulated missing build"):
    kernels.get_engine("native")
