"""Engines behind jint4's fixed integer-op boundary.

An engine exposes the ops of `jint4.kernels.reference` (`hadamard_quantize`,
`hadamard_quantize_weight`, `residual_values`, `lsq_backward`,
`lsq_weight_backward`, `bit_split`, `bit_split_joined`, `resplit_rows`,
`int_gemm`, plus the shared helpers `uniform`, `seeds_from_key`) with
identical semantics. The algorithm (`jint4.matmul`) asks `get_engine` for
one and never knows which it got.

Engines: ``"reference"`` (pure JAX, runs anywhere), ``"native"`` (the XLA FFI
handlers of xla_ffi/: CPU, and CUDA when built with nvcc) and ``"auto"``,
which picks per op and per backend from `AUTO_POLICY`. When the native
extension is missing or unusable, ``"auto"`` uses the reference engine and
warns once; ``"native"`` raises.
"""

from __future__ import annotations

import types
import warnings

import jax

from jint4.kernels import native
from jint4.kernels import reference

OPS = ("hadamard_quantize", "hadamard_quantize_weight", "residual_values",
       "lsq_backward", "lsq_weight_backward", "bit_split", "bit_split_joined",
       "resplit_rows", "int_gemm")
HELPERS = ("uniform", "uniform24", "seeds_from_key", "int_gemm_i32")

# Which engine "auto" runs each op with, per backend.
# CPU (measured 2026-11-27, 2-core AMD EPYC, jax 0.12, 2048x1024 operands):
# XLA's multi-threaded fusions beat the single-threaded C++ handlers on every
# op (quantize 7.5 vs 28.7 ms, bit split 4.4 vs 30.4, int GEMM 25 vs 375), so
# the CPU handlers serve as the exactly-tested twin and a forced choice.
# GPU (measured 2026-11-28 by benchmarks/bench_ops.py, H200, jax 0.11.2,
# 8192^3 layer): the CUDA handler beats XLA's fusion of the pure-JAX op on
# every op (quantize 0.62 vs 1.38 ms, lsq_backward 0.46 vs 1.38, weight
# backward 0.81 vs 2.00, resplit 0.68 vs 1.05, GEMM 0.93 vs 1.08; bit splits
# and residual decode by 4-8%). At 2048^3 the pure-JAX bit splits and GEMM
# were 20-50 us faster; the policy is per backend, set where the time goes.
AUTO_POLICY = {
    "cpu": {op: "reference" for op in OPS},
    "gpu": {op: "native" for op in OPS},
}

_warned = []


def _namespace(name, choice):
  ns = types.SimpleNamespace(name=name, choice=dict(choice))
  for op in HELPERS:
    setattr(ns, op, getattr(reference, op))
  for op in OPS:
    setattr(ns, op, getattr(native if choice[op] == "native" else reference, op))
  return ns


def _backend() -> str:
  backend = jax.default_backend()
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def _native_usable(backend: str) -> tuple:
  if not native.available():
    return False, native.reason()
  if backend == "gpu" and not native.has_cuda():
    return False, "the native extension was built without CUDA (no nvcc at build time)"
  if backend not in ("cpu", "gpu"):
    return False, f"no native handlers for the {backend!r} backend"
  return True, ""


def get_engine(name: str = "auto"):
  """The engine for an `Int4Config.engine` value, on the default backend."""
  if name == "reference":
    return _namespace("reference", {op: "reference" for op in OPS})
  backend = _backend()
  usable, why = _native_usable(backend)
  if name == "native":
    if not usable:
      raise RuntimeError(
          f"Int4Config(engine='native') but the native engine is unusable:"
          f" {why}. Build it (pip install . with a C++ compiler; nvcc for"
          " CUDA) or use engine='auto' / 'reference'.")
    return _namespace("native", {op: "native" for op in OPS})
  if name != "auto":
    raise ValueError(f"Unknown jint4 engine {name!r}; use 'auto', 'native' or"
                     " 'reference'.")
  if not usable:
    if not _warned:
      _warned.append(True)
      warnings.warn(f"jint4: native engine unavailable ({why}); using the"
                    " pure-JAX reference engine.", RuntimeWarning, stacklevel=3)
    return _namespace("reference", {op: "reference" for op in OPS})
  policy = AUTO_POLICY.get(backend, {op: "reference" for op in OPS})
  return _namespace("auto", policy)


def int4_tensor_cores() -> bool:
  """True when the default device runs INT4 operands on INT4 tensor cores.

  That is compute capability 8.x (A100, A10, L4, RTX 30/40): `mma.sync` with
  s4 operands at twice the INT8 rate. Hopper emulates INT4 `mma.sync` in
  software (HOPPER_NOTES.md), so INT4 values run on its INT8 tensor cores, as
  on CPU: there the joined bit-split digits (14 hi + lo) cost one GEMM, the
  same as the sampled rows of leverage score sampling, and
  `Int4Config(backward="auto")` keeps every row.
  """
  if _backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "")
  return str(capability).split(".")[0] == "8"


def engine_info(name: str = "auto") -> dict:
  """Which implementation each op runs with for ``name``, and why."""
  backend = _backend()
  usable, why = _native_usable(backend)
  info = {"backend": backend, "requested": name, "native_build": native.build_info(),
          "native_usable": usable}
  if not usable:
    info["native_reason"] = why
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      engine = get_engine(name)
    info["ops"] = engine.choice
  except RuntimeError as e:
    info["error"] = str(e)
  return info
