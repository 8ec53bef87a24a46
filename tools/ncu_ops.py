"""Run every stage of benchmarks/bench_ops.py once, for Nsight Compute.

Each stage is compiled and run once outside the profiled range (warm-up,
and it materializes the next stage's inputs), then run once more inside a
cuProfilerStart/Stop range, so that under

  ncu --profile-from-start off --clock-control none --csv --metrics ... \
      python3 tools/ncu_ops.py 8192,8192,8192

only the stages' own kernels are profiled. Without ncu it simply runs.
"""

from __future__ import annotations

import ctypes
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_ops  # noqa: E402
from jint4 import kernels  # noqa: E402


def _profiler():
  """(start, stop) through the CUDA driver API, or no-ops where unavailable."""
  try:
    cuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) != 0:
      raise OSError("cuDevicePrimaryCtxRetain failed")

    def call(fn):
      cuda.cuCtxSetCurrent(ctx)
      return fn()
    return (lambda: call(cuda.cuProfilerStart)), (lambda: call(cuda.cuProfilerStop))
  except OSError as e:
    print("no profiler control:", e)
    return (lambda: None), (lambda: None)


def main():
  n, d, c = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8192,8192,8192").split(","))
  eng = kernels.get_engine("native")
  start, stop = _profiler()
  env = bench_ops.make_inputs(eng, n, d, c)
  for op, steps in bench_ops._stages(eng, n, d, c).items():
    for name, fn, ins, outs in steps:
      jf = jax.jit(fn)
      args = [env[i] for i in ins]
      res = jax.block_until_ready(jf(*args))
      res = res if isinstance(res, tuple) else (res,)
      env.update(zip(outs, res))
      start()
      jax.block_until_ready(jf(*args))
      stop()
      print(f"profiled {op} / {name}", flush=True)


if __name__ == "__main__":
  main()
