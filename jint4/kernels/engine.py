"""The engine door: one typed set of integer ops, chosen per platform.

An `Engine` is a frozen bundle of the ops `jint4.matmul` needs, each with the
same signature and semantics in every engine (the pure-JAX functions of
`jint4.kernels.reference` are the specification and the test oracle), plus
the engine's own tuning: how the ops' operands are best shaped for it.

Choice: `Int4Config.engine` is ``"reference"`` (pure JAX everywhere),
``"native"`` (the XLA FFI handlers of xla_ffi/; an error where they cannot
run) or ``"auto"`` (per op and platform, from `AUTO_POLICY`, with the reason
kept). The platform is decided when XLA lowers the program, not when Python
traces it: `run_per_platform` traces the algorithm once per platform with that
platform's engine under `jax.lax.platform_dependent`, and lowering keeps the
branch of the platform the computation is placed on. So ``jax.jit(f,
device=cpu_device)`` on a GPU host runs the CPU choice, and a program lowered
for several platforms carries each one's engine.

`engine_info()` reports, per platform, which implementation each op runs and
why.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Any, Callable, Mapping, Optional, Protocol, Tuple, Union

import jax

from jint4.kernels import native
from jint4.kernels import reference
from jint4.kernels.contract import Residual

Block = Union[int, jax.Array]  # static block size, or traced int32 log2(block)

OPS = ("hadamard_quantize", "hadamard_quantize_weight", "residual_values",
       "lsq_backward", "lsq_weight_backward", "bit_split", "bit_split_joined",
       "resplit_rows", "int_gemm")
CHOICES = ("auto", "native", "reference")
# Platforms with their own branch; any other platform (rocm, tpu, ...) runs
# the reference engine: there are no native handlers for it.
PLATFORMS = ("cpu", "cuda")


# --- the op signatures (reference.py documents each one's semantics) --------

class HadamardQuantize(Protocol):
  def __call__(self, x: jax.Array, step: jax.Array, *, block: Block, qn: int,
               qp: int, seed: Optional[jax.Array] = None, axis: int = 1,
               transpose: bool = False
               ) -> Tuple[jax.Array, Optional[Residual]]: ...


class HadamardQuantizeWeight(Protocol):
  def __call__(self, kernel: jax.Array, step: jax.Array, *, block: Block,
               qn: int, qp: int) -> Tuple[jax.Array, jax.Array, jax.Array]: ...


class ResidualValues(Protocol):
  def __call__(self, res: Residual, shape: Tuple[int, int], *, qn: int, qp: int,
               rows: Optional[jax.Array] = None,
               transpose: bool = False) -> jax.Array: ...


class LsqBackward(Protocol):
  def __call__(self, grad: jax.Array, res: Residual, *, qn: int, qp: int,
               slots: Optional[jax.Array] = None, block: Block = 1,
               out_dtype: Any = ...) -> Tuple[jax.Array, jax.Array]: ...


class LsqWeightBackward(Protocol):
  def __call__(self, grad: jax.Array, kernel: jax.Array, step: jax.Array, *,
               block: Block, qn: int, qp: int,
               out_dtype: Any = None) -> Tuple[jax.Array, jax.Array]: ...


class BitSplit(Protocol):
  def __call__(self, g: jax.Array, seed: jax.Array,
               abs_max: Optional[jax.Array] = None,
               row_inv: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]: ...


class BitSplitJoined(Protocol):
  def __call__(self, g: jax.Array, seed: jax.Array,
               abs_max: Optional[jax.Array] = None,
               row_inv: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]: ...


class ResplitRows(Protocol):
  def __call__(self, g2: jax.Array, rows: jax.Array, row_scale: jax.Array,
               seed: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]: ...


class IntGemm(Protocol):
  def __call__(self, a: jax.Array, b: jax.Array, *, scale: jax.Array,
               row_scale: Optional[jax.Array] = None,
               col_bias: Optional[jax.Array] = None, out_dtype: Any = ...,
               int4: bool = True) -> jax.Array: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Engine:
  """The integer ops of one engine on one platform, and its tuning.

  Attributes:
    name: the `Int4Config.engine` choice this was resolved from.
    platform: the platform whose branch runs these ops (``"cpu"``,
      ``"cuda"``, or ``"default"`` for any other).
    runs: per op, ``"native"`` or ``"reference"``.
    why: per op, the reason for that choice.
    gemm_k_multiple: a GEMM whose reduction dim the algorithm sizes itself
      (the kept rows of leverage score sampling) is padded with empty rows
      to a multiple of this: the K tile of the native GEMM (1: no padding).
    abs_max_in_xla: compute max|G| of bit splitting as an XLA reduction and
      pass it to the op, so that XLA may fuse it into the op producing G,
      instead of the handler's own pass over G.
    int4_tensor_cores: the platform's devices multiply INT4 values on INT4
      tensor cores (compute capability 8.x), at twice the INT8 rate; decides
      ``backward="auto"`` (`jint4.matmul.backward_mode`).
  """
  name: str
  platform: str
  runs: Mapping[str, str]
  why: Mapping[str, str]
  gemm_k_multiple: int
  abs_max_in_xla: bool
  int4_tensor_cores: bool
  hadamard_quantize: HadamardQuantize
  hadamard_quantize_weight: HadamardQuantizeWeight
  residual_values: ResidualValues
  lsq_backward: LsqBackward
  lsq_weight_backward: LsqWeightBackward
  bit_split: BitSplit
  bit_split_joined: BitSplitJoined
  resplit_rows: ResplitRows
  int_gemm: IntGemm


# Why "auto" runs each op where it does, per platform (BENCHMARKS.md shows the
# measurements: "CPU operators" and "Operators").
_CPU_WHY = ("on CPU, XLA's multi-threaded fusion of the pure-JAX op beats the"
            " single-threaded C++ handler (BENCHMARKS.md, CPU operators); the"
            " C++ handler is its exactly tested twin, chosen by engine='native'")
_CPU_NATIVE_WHY = ("on CPU, the C++ handler's one pass down the kernel's columns"
                   " beats XLA's fusion of the pure-JAX op several times over"
                   " (BENCHMARKS.md, CPU operators)")
_CUDA_WHY = ("on CUDA, the fused handler beats XLA's fusion of the pure-JAX op"
             " (BENCHMARKS.md, Operators)")
AUTO_POLICY: Mapping[str, Mapping[str, Tuple[str, str]]] = types.MappingProxyType({
    "cpu": types.MappingProxyType({
        op: ("native", _CPU_NATIVE_WHY) if op == "lsq_weight_backward"
        else ("reference", _CPU_WHY) for op in OPS}),
    "cuda": types.MappingProxyType({op: ("native", _CUDA_WHY) for op in OPS}),
})

# The sm_90a GEMM runs K in tiles of 128 int8 values; operands whose rows are
# not a multiple of 128 bytes are slower (BENCHMARKS.md, Operators: LSS-Weight)
# or copied into padded scratch.
_CUDA_GEMM_K_MULTIPLE = 128

_warned: set = set()


def _devices(platform: str) -> list:
  try:
    return list(jax.devices(platform))
  except RuntimeError:
    return []


def _int4_tensor_cores(platform: str) -> bool:
  """Compute capability 8.x (A100, A10, L4, RTX 30/40): `mma.sync` on s4
  operands at twice the INT8 rate. Hopper emulates INT4 `mma.sync`, so INT4
  values run on its INT8 tensor cores there, as on CPUs (docs/HOPPER.md)."""
  if platform != "cuda":
    return False
  devices = _devices("cuda")
  capability = getattr(devices[0], "compute_capability", "") if devices else ""
  return str(capability).split(".")[0] == "8"


def native_status(platform: str) -> Tuple[bool, str]:
  """(usable, reason) of the native handlers on ``platform``."""
  if not native.available():
    return False, native.reason()
  if platform == "cuda" and not native.has_cuda():
    return False, ("the native extension was built without CUDA (no nvcc at"
                   " build time)")
  if platform not in PLATFORMS:
    return False, f"there are no native handlers for the {platform!r} platform"
  return True, "built"


def _plan(choice: str, platform: str) -> Mapping[str, Tuple[str, str]]:
  """Per op: (engine, why) for ``choice`` on ``platform``."""
  if choice == "reference":
    return {op: ("reference", "engine='reference' was asked for") for op in OPS}
  usable, reason = native_status(platform)
  if choice == "native":
    if not usable and (not native.available() or _devices(platform)):
      raise RuntimeError(
          f"Int4Config(engine='native') but the native engine cannot run on"
          f" {platform}: {reason}. Build it (pip install . with a C++ compiler;"
          " nvcc for CUDA) or use engine='auto' / 'reference'.")
    return {op: ("native", "engine='native' was asked for") for op in OPS}
  if choice != "auto":
    raise ValueError(f"Unknown jint4 engine {choice!r}; use one of {CHOICES}.")
  policy = AUTO_POLICY.get(platform)
  if policy is None:
    return {op: ("reference", reason) for op in OPS}
  plan = {}
  for op, (want, why) in policy.items():
    if want == "native" and not usable:
      plan[op] = ("reference", f"native would run it, but {reason}")
      if platform not in _warned and _devices(platform):
        _warned.add(platform)
        warnings.warn(
            f"jint4: the native engine cannot run on {platform} ({reason});"
            " Int4Config(engine='auto') runs the pure-JAX reference engine"
            " there. jint4.engine_info() shows the choice per op.",
            RuntimeWarning, stacklevel=4)
    else:
      plan[op] = (want, why)
  return plan


def get_engine(choice: str = "auto", platform: Optional[str] = None) -> Engine:
  """The engine for an `Int4Config.engine` value on ``platform``.

  ``platform`` defaults to the default backend's; `jint4.matmul` does not use
  that default but `run_per_platform`. One instance per (choice, platform).
  """
  return _engine(choice, _platform(platform))


@functools.lru_cache(maxsize=None)
def _engine(choice: str, platform: str) -> Engine:
  plan = _plan(choice, platform)
  ops = {op: getattr(native if engine == "native" else reference, op)
         for op, (engine, _) in plan.items()}
  gemm_native = plan["int_gemm"][0] == "native"
  return Engine(
      name=choice, platform=platform,
      runs=types.MappingProxyType({op: e for op, (e, _) in plan.items()}),
      why=types.MappingProxyType({op: w for op, (_, w) in plan.items()}),
      gemm_k_multiple=_CUDA_GEMM_K_MULTIPLE if gemm_native and platform == "cuda" else 1,
      # The CPU handler's own max pass is cheaper than an XLA reduction
      # feeding it; on CUDA, XLA can fuse the reduction into G's producer.
      abs_max_in_xla=not (plan["bit_split_joined"][0] == "native" and platform == "cpu"),
      int4_tensor_cores=_int4_tensor_cores(platform),
      **ops)


def _platform(platform: Optional[str]) -> str:
  if platform is None:
    platform = jax.default_backend()
  platform = {"gpu": "cuda"}.get(platform, platform)
  return platform if platform in PLATFORMS else "default"


def run_per_platform(choice: str, fn: Callable[..., Any], *args: Any) -> Any:
  """``fn(engine, *args)`` with the engine of the platform XLA lowers for.

  Traces ``fn`` once per platform (`PLATFORMS`, plus the reference engine for
  any other) under `jax.lax.platform_dependent`; when every platform resolves
  to the same ops and tuning, calls it once without a branch.
  """
  engines = {p: get_engine(choice, p) for p in PLATFORMS + ("default",)}
  first = engines["cpu"]
  if all(_same(first, e) for e in engines.values()):
    return fn(first, *args)
  branches = {p: functools.partial(fn, engines[p]) for p in PLATFORMS}
  return jax.lax.platform_dependent(
      *args, default=functools.partial(fn, engines["default"]), **branches)


def _same(a: Engine, b: Engine) -> bool:
  return (all(getattr(a, op) is getattr(b, op) for op in OPS)
          and (a.gemm_k_multiple, a.abs_max_in_xla, a.int4_tensor_cores)
          == (b.gemm_k_multiple, b.abs_max_in_xla, b.int4_tensor_cores))


def engine_info(choice: str = "auto") -> dict:
  """What ``Int4Config(engine=choice)`` runs on each platform, and why.

  Returns a dict: the native build, ``default_platform`` (the key of
  ``platforms`` that the default backend uses), and per platform (``cpu``,
  ``cuda``, ``default`` for any other) its devices in this process, whether the native
  handlers can run there (and why not), per op the engine and the reason,
  the engine's tuning and what ``backward="auto"`` resolves to.
  """
  info: dict = {"requested": choice, "default_backend": jax.default_backend(),
                "default_platform": _platform(None),
                "native_build": native.build_info(), "platforms": {}}
  for platform in PLATFORMS + ("default",):
    usable, reason = native_status(platform)
    entry: dict = {"devices": len(_devices(platform)) if platform != "default" else None,
                   "native_usable": usable, "native_reason": reason}
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = get_engine(choice, platform)
    except (RuntimeError, ValueError) as e:
      entry["error"] = str(e)
    else:
      entry["ops"] = {op: {"runs": engine.runs[op], "why": engine.why[op]}
                      for op in OPS}
      entry["gemm_k_multiple"] = engine.gemm_k_multiple
      entry["abs_max_in_xla"] = engine.abs_max_in_xla
      entry["backward_auto"] = (
          {"mode": "lss", "why": "INT4 tensor cores: the sampled half-size GEMMs"
                                 " run at twice the INT8 rate"}
          if engine.int4_tensor_cores else
          {"mode": "bitsplit", "why": "INT4 values run on INT8 engines, where the"
                                      " joined hi/lo GEMM costs what the sampled"
                                      " one does, without sampling variance"})
    info["platforms"][platform] = entry
  return info
