"""Engines behind jint4's fixed integer-op boundary.

An engine is a module exposing the ops of `jint4.kernels.reference`
(`hadamard_quantize`, `lsq_backward`, `bit_split`, `int_gemm`,
`int_gemm_gather_rows`, `residual_values`, `uniform`, ...) with identical
semantics. The algorithm (`jint4.matmul`) asks `get_engine` for one and never
knows which it got. Today the pure-JAX reference engine is the only one; the
native XLA FFI engine plugs in here.
"""

from __future__ import annotations

from jint4.kernels import reference

_ENGINES = {"reference": reference}


def get_engine(name: str = "auto"):
  """The engine module for an `Int4Config.engine` value."""
  if name == "auto":
    return reference
  try:
    return _ENGINES[name]
  except KeyError:
    raise ValueError(
        f"Unknown jint4 engine {name!r}; available: {sorted(_ENGINES)} or"
        " 'auto'.") from None


def engine_info(name: str = "auto") -> dict:
  """Which engine a config's ``engine`` value selects, and why."""
  if name in ("auto", "reference"):
    why = ("requested" if name == "reference" else
           "the native engine is not built in this version; pure JAX runs"
           " everywhere")
    return {"engine": "reference", "reason": why}
  get_engine(name)
  return {"engine": name, "reason": "requested"}
