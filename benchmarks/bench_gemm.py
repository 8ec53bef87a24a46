"""GEMM engines at the paper's sizes: jint4's INT4 GEMM (+ dequantize
epilogue, bf16 out) against XLA's bf16 dot, int8 dot (+ the same dequantize)
and fp8 dot, all with K-major ("TN") operands, timed in the same run.

    python benchmarks/bench_gemm.py                 # GPU: paper sizes
    python benchmarks/bench_gemm.py --quick         # small sizes (CPU)

Prints a table (ms and TOPS, ratio vs bf16) and writes
<out-dir>/bench_gemm_<backend>.json and .png. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from jint4 import kernels  # noqa: E402

PAPER = [(4608, 5120, 6144), (5120, 6144, 8192), (6144, 6144, 9216),
         (7168, 6656, 8704), (8192, 7680, 9728), (15360, 8704, 10752),
         (4096, 4096, 4096), (8192, 8192, 8192)]
QUICK = [(512, 512, 512), (1024, 1024, 1024)]
TN = (((1,), (1,)), ((), ()))


def cases(engine_name):
  eng = kernels.get_engine(engine_name)
  scale = jnp.float32(0.01)
  out = {
      "xla bf16": lambda a, b, *_: lax.dot_general(a, b, TN, preferred_element_type=jnp.bfloat16),
      "xla int8+dequant": lambda _a, _b, qa, qb: (lax.dot_general(
          qa, qb, TN, preferred_element_type=jnp.int32).astype(jnp.float32) * scale
          ).astype(jnp.bfloat16),
      f"jint4 int_gemm ({engine_name})": lambda _a, _b, qa, qb: eng.int_gemm(
          qa, qb, scale=scale, out_dtype=jnp.bfloat16),
  }
  if jax.default_backend() == "gpu":
    out["xla fp8 (inexact)"] = lambda a, b, *_: lax.dot_general(
        a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn), TN,
        preferred_element_type=jnp.bfloat16)
  return {k: jax.jit(v) for k, v in out.items()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--engine", default="auto")
  p.add_argument("--shapes", type=str, default=None,
                 help="'M,N,K;M,N,K;...' instead of the default list")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args()
  shapes = QUICK if args.quick or jax.default_backend() == "cpu" else PAPER
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
      p.error("--shapes takes positive M,N,K triples separated by ';'")
  fns = cases(args.engine)
  rows = []
  print(f"{'M,N,K':>20} | " + " | ".join(f"{k:>26}" for k in fns))
  for m, n, k in shapes:
    ka, kb = jax.random.split(jax.random.key(0))
    qa = jax.random.randint(ka, (m, k), -7, 8, jnp.int8)
    qb = jax.random.randint(kb, (n, k), -7, 8, jnp.int8)
    a, b = qa.astype(jnp.bfloat16), qb.astype(jnp.bfloat16)
    row = {"shape": [m, n, k]}
    for name, fn in fns.items():
      t = common.time_fn(fn, (a, b, qa, qb), repeats=args.repeats)
      t["tops"] = 2 * m * n * k / (t["median_ms"] * 1e-3) / 1e12
      row[name] = t
    base = row["xla bf16"]["median_ms"]
    for name in fns:
      row[name]["vs_bf16"] = base / row[name]["median_ms"]
    rows.append(row)
    print(f"{str((m, n, k)):>20} | " + " | ".join(
        f"{row[x]['median_ms']:8.3f}ms {row[x]['tops']:6.0f}T {row[x]['vs_bf16']:4.2f}x"
        for x in fns), flush=True)
    # Rewritten after every shape: an interrupted run keeps what it measured.
    name = f"bench_gemm_{jax.default_backend()}"
    common.write(args.out_dir, name, {"environment": common.environment(), "rows": rows})
  labels = [",".join(map(str, r["shape"])) for r in rows]
  common.bar_plot(args.out_dir, name, labels,
                  {k: [r[k]["vs_bf16"] for r in rows] for k in fns},
                  "speed vs XLA bf16 dot", f"GEMM, {common.environment()['device']}")


if __name__ == "__main__":
  main()
