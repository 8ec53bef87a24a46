"""Engines behind jint4's fixed set of integer ops.

`engine.Engine` lists the ops with their types; `reference` implements them
in pure JAX (runs anywhere, the test oracle), `native` over the XLA FFI
handlers of xla_ffi/ (CPU, and CUDA when built with nvcc). `contract` holds
what both share bit for bit: the counter RNG and the residual format. The
algorithm (`jint4.matmul`) receives an engine per platform from
`engine.run_per_platform` and never knows which it got.
"""

from jint4.kernels.engine import AUTO_POLICY
from jint4.kernels.engine import Engine
from jint4.kernels.engine import engine_info
from jint4.kernels.engine import get_engine
from jint4.kernels.engine import run_per_platform

__all__ = ["AUTO_POLICY", "Engine", "engine_info", "get_engine", "run_per_platform"]
