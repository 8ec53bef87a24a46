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

from jint4.kernels import reference
from jint4.kernels.reference import Residual

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
  if _ext.with_cuda:
    for name, capsule in _ext.cuda_targets().items():
      jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
  return True, "built"


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


def _residual_shapes(size: int, qn: int):
  planes = 1 if qn <= 7 else 2
  return (-(-size // 2),), (planes, -(-size // 8))


# Ops that are not FFI targets are the reference's own (cheap or host-side).
uniform = reference.uniform
seeds_from_key = reference.seeds_from_key
apply_hadamard = reference.apply_hadamard
row_norms = reference.row_norms
int_gemm_i32 = reference.int_gemm_i32
pack_residual = reference.pack_residual
unpack_residual = reference.unpack_residual


def hadamard_quantize(x, step, *, block, qn: int, qp: int, seed=None):
  """Native `reference.hadamard_quantize` (one fused pass)."""
  m, k = x.shape
  if isinstance(block, (int, np.integer)) and k % int(block):
    raise ValueError(f"Hadamard block {block} does not divide K={k}.")
  with_residual = seed is not None
  nib, flg = _residual_shapes(m * k, qn) if with_residual else ((0,), (1, 0))
  if not with_residual:
    seed = jnp.zeros((2,), jnp.uint32)
  q, nibbles, flags = _call(
      "jint4_hadamard_quantize",
      (jax.ShapeDtypeStruct((m, k), jnp.int8),
       jax.ShapeDtypeStruct(nib, jnp.uint8),
       jax.ShapeDtypeStruct(flg, jnp.uint8)),
      x.astype(jnp.float32), jnp.asarray(step, jnp.float32).reshape(()),
      jnp.asarray(seed, jnp.uint32), _log2(block),
      qn=_i32(qn), qp=_i32(qp), with_residual=_i32(with_residual))
  return q, (Residual(nibbles, flags) if with_residual else None)


def residual_values(res: Residual, shape, *, qn: int, qp: int):
  return _call("jint4_residual_values",
               jax.ShapeDtypeStruct(tuple(shape), jnp.int8),
               res.nibbles, res.flags, qn=_i32(qn), qp=_i32(qp))


def lsq_backward(grad, res: Residual, *, qn: int, qp: int):
  dt, delta_sum = _call(
      "jint4_lsq_backward",
      (jax.ShapeDtypeStruct(grad.shape, jnp.float32),
       jax.ShapeDtypeStruct((), jnp.float32)),
      grad.astype(jnp.float32), res.nibbles, res.flags, qn=_i32(qn), qp=_i32(qp))
  return dt, delta_sum


def bit_split(g, seed):
  r, c = g.shape
  hi, lo, scales, hi_norm, lo_norm = _call(
      "jint4_bit_split",
      (jax.ShapeDtypeStruct((r, c), jnp.int8),
       jax.ShapeDtypeStruct((r, c), jnp.int8),
       jax.ShapeDtypeStruct((2,), jnp.float32),
       jax.ShapeDtypeStruct((r,), jnp.float32),
       jax.ShapeDtypeStruct((r,), jnp.float32)),
      g.astype(jnp.float32), jnp.asarray(seed, jnp.uint32))
  return hi, lo, scales[0], scales[1], hi_norm, lo_norm


def int_gemm(a, b, *, scale, row_scale=None, out_dtype=jnp.float32):
  m, n = a.shape[0], b.shape[0]
  if row_scale is None:
    row_scale = jnp.ones((m,), jnp.float32)
  native_dtype = out_dtype if jnp.dtype(out_dtype) in (
      jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)) else jnp.float32
  out = _call("jint4_int_gemm", jax.ShapeDtypeStruct((m, n), native_dtype),
              a.astype(jnp.int8), b.astype(jnp.int8),
              jnp.asarray(scale, jnp.float32).reshape(()),
              jnp.asarray(row_scale, jnp.float32))
  return out.astype(out_dtype)


def int_gemm_gather_rows(a, b, b_rows, *, scale, out_dtype=jnp.float32):
  out = _call("jint4_int_gemm_gather_rows",
              jax.ShapeDtypeStruct((a.shape[1], b.shape[1]), jnp.float32),
              a.astype(jnp.int8), b.astype(jnp.int8),
              jnp.asarray(b_rows, jnp.int32),
              jnp.asarray(scale, jnp.float32).reshape(()))
  return out.astype(out_dtype)
