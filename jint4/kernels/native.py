"""The native engine: `jax.ffi.ffi_call` wrappers over the xla_ffi handlers.

The extension `jint4._jint4_native` (built from xla_ffi/ by the package's
CMake build) exports one handler capsule per op for the CPU and, when built
with nvcc, for CUDA. This module registers them with XLA on first use and
exposes the same op signatures as `jint4.kernels.reference`, whose pure-JAX
functions are their twins (integer outputs are bit-identical).

A missing build, or one made against a newer XLA FFI API than the running
jaxlib speaks (such a handler would take the backend down when it first
runs), is detected before anything is registered: `available()` is then
False with the reason, and `jint4.kernels` falls back to the reference engine
with one warning.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jint4.kernels.contract import Residual

# The sm_90a GEMM configs the CUDA build compiles, in the order of
# xla_ffi/cuda/gemm_sm90.cu's kConfigs: the values JINT4_GEMM_SM90_CONFIG
# takes (xla_ffi/README.md, "GEMM knobs").
SM90_GEMM_CONFIGS = ("128x256_c1x2", "128x256_c2x1", "256x128_c2x1", "256x128_c1x2",
                     "128x128_c1x2_pingpong")

try:  # the compiled extension is optional
  _ext = importlib.import_module("jint4._jint4_native")
  _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - depends on the build
  _ext = None
  _IMPORT_ERROR = e


def _runtime_ffi_api() -> Optional[tuple]:
  """(major, minor) of the XLA FFI API the running jaxlib speaks."""
  try:
    header = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    with open(header) as f:
      text = f.read()
  except (OSError, AttributeError):
    return None
  found = [re.search(rf"#define XLA_FFI_API_{part} (\d+)", text)
           for part in ("MAJOR", "MINOR")]
  return tuple(int(m.group(1)) for m in found) if all(found) else None


@functools.lru_cache(maxsize=None)
def _status() -> tuple:
  """(available, reason); registers the handlers the first time it succeeds."""
  if _ext is None:
    return False, f"the native extension is not built ({_IMPORT_ERROR})"
  built = tuple(_ext.ffi_api_version)
  runtime = _runtime_ffi_api()
  if runtime is not None and (built[0] != runtime[0] or built[1] > runtime[1]):
    return False, (f"the native extension was built for XLA FFI API"
                   f" {built[0]}.{built[1]} but this jaxlib speaks"
                   f" {runtime[0]}.{runtime[1]}; rebuild jint4 against it")
  for name, capsule in _ext.cpu_targets().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  # CUDA targets only when a CUDA backend is up (registering them with the
  # CUDA plugin installed but disabled, JAX_PLATFORMS=cpu, is not needed and
  # is the suspect of a crash seen with jaxlib 0.11.2).
  if _ext.with_cuda and _cuda_backend():
    for name, capsule in _ext.cuda_targets().items():
      jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
  return True, "built"


def _cuda_backend() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices("gpu"))
  except RuntimeError:
    return False


def available() -> bool:
  return _status()[0]


def reason() -> str:
  return _status()[1]


def has_cuda() -> bool:
  """True when the extension holds CUDA handlers."""
  return _ext is not None and bool(_ext.with_cuda)


def build_info() -> dict:
  if _ext is None:
    return {"built": False}
  return {"built": True, "ffi_api": tuple(_ext.ffi_api_version),
          "cuda": bool(_ext.with_cuda), "cuda_archs": _ext.cuda_archs}


def _call(name, out_types, *args, **attrs):
  if not available():
    raise RuntimeError(f"jint4 native engine unavailable: {reason()}")
  return jax.ffi.ffi_call(name, out_types, vmap_method="sequential")(*args, **attrs)


def _i32(v):
  return np.int32(v)


def _log2(block) -> jax.Array:
  if isinstance(block, (int, np.integer)):
    block = int(block)
    if block < 1 or block & (block - 1):
      raise ValueError(f"Hadamard block must be a power of two; got {block}.")
    return jnp.asarray(block.bit_length() - 1, jnp.int32)
  return jnp.asarray(block, jnp.int32)


def _static_log2(block) -> int:
  """log2 of a static block size, -1 for a traced one."""
  if isinstance(block, (int, np.integer)):
    return int(block).bit_length() - 1
  return -1


def _residual_shapes(size: int, qn: int):
  planes = 1 if qn <= 7 else 2
  return (-(-size // 2),), (planes, -(-size // 8))


def _float_operand(x):
  """float32 / bfloat16 / float16 pass as they are (the handlers convert)."""
  if x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    return x
  return x.astype(jnp.float32)


def _no_rows():
  return jnp.zeros((0,), jnp.int32)


def hadamard_quantize(x, step, *, block, qn: int, qp: int, seed=None,
                      axis: int = 1, transpose: bool = False):
  """Native `reference.hadamard_quantize` (one fused pass)."""
  axis = axis % 2
  r, s = x.shape
  if isinstance(block, (int, np.integer)) and x.shape[axis] % int(block):
    raise ValueError(f"Hadamard block {block} does not divide dim {axis} of"
                     f" {x.shape}.")
  with_residual = seed is not None
  if with_residual and (axis != 1 or transpose):
    raise ValueError("hadamard_quantize keeps a residual only for axis=1"
                     " without transpose (activations).")
  nib, flg = _residual_shapes(r * s, qn) if with_residual else ((0,), (1, 0))
  if not with_residual:
    seed = jnp.zeros((2,), jnp.uint32)
  q, nibbles, flags, norms = _call(
      "jint4_hadamard_quantize",
      (jax.ShapeDtypeStruct((s, r) if transpose else (r, s), jnp.int8),
       jax.ShapeDtypeStruct(nib, jnp.uint8),
       jax.ShapeDtypeStruct(flg, jnp.uint8),
       jax.ShapeDtypeStruct((r if with_residual else 0,), jnp.float32)),
      _float_operand(x), jnp.asarray(step, jnp.float32).reshape(()),
      jnp.asarray(seed, jnp.uint32), _log2(block),
      qn=_i32(qn), qp=_i32(qp), with_residual=_i32(with_residual),
      axis=_i32(axis), transpose=_i32(transpose), log2_hint=_i32(_static_log2(block)))
  return q, (Residual(nibbles, flags, norms) if with_residual else None)


def hadamard_quantize_weight(kernel, step, *, block, qn: int, qp: int):
  """Native `reference.hadamard_quantize_weight` (one pass on CUDA)."""
  d, c = kernel.shape
  if isinstance(block, (int, np.integer)) and d % int(block):
    raise ValueError(f"Hadamard block {block} does not divide dim 0 of"
                     f" {kernel.shape}.")
  return _call(
      "jint4_hadamard_quantize_weight",
      (jax.ShapeDtypeStruct((c, d), jnp.int8), jax.ShapeDtypeStruct((d, c), jnp.int8),
       jax.ShapeDtypeStruct((c,), jnp.float32)),
      _float_operand(kernel), jnp.asarray(step, jnp.float32).reshape(()), _log2(block),
      qn=_i32(qn), qp=_i32(qp), log2_hint=_i32(_static_log2(block)))


def residual_values(res: Residual, shape, *, qn: int, qp: int, rows=None,
                    transpose: bool = False):
  m, k = shape
  t = m if rows is None else rows.shape[0]
  return _call("jint4_residual_values",
               jax.ShapeDtypeStruct((k, t) if transpose else (t, k), jnp.int8),
               res.nibbles, res.flags,
               _no_rows() if rows is None else jnp.asarray(rows, jnp.int32),
               qn=_i32(qn), qp=_i32(qp), m=_i32(m), gather=_i32(rows is not None),
               transpose=_i32(transpose))


def lsq_backward(grad, res: Residual, *, qn: int, qp: int, slots=None, block=1,
                 out_dtype=jnp.float32):
  m = grad.shape[0] if slots is None else slots.shape[1]
  k = grad.shape[1]
  if isinstance(block, (int, np.integer)) and k % int(block):
    raise ValueError(f"Hadamard block {block} does not divide K={k}.")
  native_dtype = out_dtype if jnp.dtype(out_dtype) in (
      jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
  ) else jnp.float32
  dt, delta_sum = _call(
      "jint4_lsq_backward",
      (jax.ShapeDtypeStruct((m, k), native_dtype),
       jax.ShapeDtypeStruct((), jnp.float32)),
      _float_operand(grad), res.nibbles, res.flags,
      (jnp.zeros((2, 0), jnp.int32) if slots is None
       else jnp.asarray(slots, jnp.int32)),
      _log2(block), qn=_i32(qn), qp=_i32(qp), gather=_i32(slots is not None))
  return dt.astype(out_dtype), delta_sum


def _grad32_or_bf16(grad):
  """A gradient operand as float32, or bfloat16 as it is (read as such)."""
  grad = jnp.asarray(grad)
  return grad if grad.dtype == jnp.bfloat16 else grad.astype(jnp.float32)


def lsq_weight_backward(grad, kernel, step, *, block, qn: int, qp: int, out_dtype=None):
  d, c = kernel.shape
  if isinstance(block, (int, np.integer)) and d % int(block):
    raise ValueError(f"Hadamard block {block} does not divide D={d}.")
  kf = _float_operand(kernel)
  dk, delta_sum = _call(
      "jint4_lsq_weight_backward",
      (jax.ShapeDtypeStruct((d, c), kf.dtype),
       jax.ShapeDtypeStruct((), jnp.float32)),
      _grad32_or_bf16(grad), kf, jnp.asarray(step, jnp.float32).reshape(()),
      _log2(block), qn=_i32(qn), qp=_i32(qp), log2_hint=_i32(_static_log2(block)))
  return dk.astype(out_dtype or kernel.dtype), delta_sum


def _abs_max_operand(abs_max):
  # The caller's max|g| as f32[], or f32[0]: the handler computes it.
  return (jnp.zeros((0,), jnp.float32) if abs_max is None
          else jnp.asarray(abs_max, jnp.float32).reshape(()))


def _row_inv_operand(row_inv, r):
  # The per-row split's 1 / M_i as f32[R], or f32[0]: one scale per tensor.
  if row_inv is None:
    return jnp.zeros((0,), jnp.float32)
  row_inv = jnp.asarray(row_inv, jnp.float32)
  if row_inv.shape != (r,):
    raise ValueError(f"row_inv must be float32[{r}] (one 1 / max|g_i| per row of g);"
                     f" got shape {row_inv.shape}")
  return row_inv


def bit_split(g, seed, abs_max=None, row_inv=None):
  r, c = g.shape
  g2, scales, norms = _call(
      "jint4_bit_split",
      (jax.ShapeDtypeStruct((2 * r, c), jnp.int8),
       jax.ShapeDtypeStruct((2,), jnp.float32),
       jax.ShapeDtypeStruct((2 * r,), jnp.float32)),
      _float_operand(g), jnp.asarray(seed, jnp.uint32), _abs_max_operand(abs_max),
      _row_inv_operand(row_inv, r))
  return g2, scales[0], scales[1], norms


def bit_split_joined(g, seed, abs_max=None, row_inv=None):
  r, c = g.shape
  v, vt, scales = _call(
      "jint4_bit_split_joined",
      (jax.ShapeDtypeStruct((r, c), jnp.int8),
       jax.ShapeDtypeStruct((c, r), jnp.int8),
       jax.ShapeDtypeStruct((2,), jnp.float32)),
      _float_operand(g), jnp.asarray(seed, jnp.uint32), _abs_max_operand(abs_max),
      _row_inv_operand(row_inv, r))
  return v, vt, scales[0], scales[1]


def resplit_rows(g2, rows, row_scale, seed):
  c = g2.shape[1]
  j = rows.shape[0]
  vt, scales = _call(
      "jint4_resplit_rows",
      (jax.ShapeDtypeStruct((c, j), jnp.int8),
       jax.ShapeDtypeStruct((2,), jnp.float32)),
      g2.astype(jnp.int8), jnp.asarray(rows, jnp.int32),
      jnp.asarray(row_scale, jnp.float32), jnp.asarray(seed, jnp.uint32))
  return vt, scales[0], scales[1]


def int_gemm(a, b, *, scale, row_scale=None, col_bias=None,
             out_dtype=jnp.float32, int4: bool = True):
  m, n = a.shape[0], b.shape[0]
  if row_scale is None:
    row_scale = jnp.ones((m,), jnp.float32)
  if col_bias is None:
    col_bias = jnp.zeros((n,), jnp.float32)
  native_dtype = out_dtype if jnp.dtype(out_dtype) in (
      jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)) else jnp.float32
  out = _call("jint4_int_gemm", jax.ShapeDtypeStruct((m, n), native_dtype),
              a.astype(jnp.int8), b.astype(jnp.int8),
              jnp.asarray(scale, jnp.float32).reshape(()),
              jnp.asarray(row_scale, jnp.float32), jnp.asarray(col_bias, jnp.float32),
              int4=_i32(int4))
  return out.astype(out_dtype)
