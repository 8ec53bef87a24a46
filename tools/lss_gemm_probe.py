"""The LSS-Weight GEMM against the BS-Weight one: why K's alignment matters.

    python tools/lss_gemm_probe.py [--n 8192] [--repeats 10]

bench_ops' LSS-Weight GEMM reduces over the kept-row slots (qx^T rows [D, S]
. re-split v^T [C, S]); the BS-Weight GEMM of the same M, N reduces over all
N tokens. This times int_gemm (int8 operands, bf16 out, engine "auto") on:

  lss        the LSS-Weight operands themselves (bench_ops' stages; S is
             padded by lss.pad_slots),
  lss[:N]    the same operands cut to K = N,
  bs         the BS-Weight operands (decode x^T, joined bit split),
  rand K     random int8 in [-7, 7] (A) and [-98, 98] (B, joined digits) at
             K = N, N + 16 and round_up(N + 1, 128): the shape alone.

so that a difference is attributed to the reduction length and its alignment
(rows not a multiple of the GEMM's 128-byte K tile are slower, docs/HOPPER.md)
or to the operands' contents. Prints one line per case (median / min ms,
benchmarks.common.time_fn).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_ops, common  # noqa: E402
from jint4 import kernels  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=8192, help="N = D = C")
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()
  n = args.n
  eng = kernels.get_engine("auto")
  env = bench_ops.make_inputs(eng, n, n, n)
  for steps in bench_ops._stages(eng, n, n, n).values():  # materialize the operands
    for _, fn, ins, outs in steps:
      if outs[0] in ("dw", "dw_bs", "dk", "dk_bs"):
        continue
      res = jax.jit(fn)(*[env[i] for i in ins])
      env.update(zip(outs, res if isinstance(res, tuple) else (res,)))
  gemm = jax.jit(lambda a, b: eng.int_gemm(a, b, scale=jnp.float32(1e-3), int4=False,
                                           out_dtype=jnp.bfloat16))
  rng = np.random.default_rng(0)
  cases = {"lss": (env["qxt2"], env["vt2"]),
           "lss[:N]": (env["qxt2"][:, :n], env["vt2"][:, :n]),
           "bs": (env["qxt"], env["vt"])}
  for k in sorted({n, n + 16, -(-(n + 1) // 128) * 128}):
    cases[f"rand K={k}"] = (jnp.asarray(rng.integers(-7, 8, (n, k), dtype=np.int8)),
                            jnp.asarray(rng.integers(-98, 99, (n, k), dtype=np.int8)))
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, N = D = C = {n}")
  for name, (a, b) in cases.items():
    a, b = jax.device_put(a), jax.device_put(b)
    t = common.time_fn(gemm, (a, b), repeats=args.repeats)
    zeros = float(jnp.mean(b == 0))
    print(f"{name:>14}  K={a.shape[1]:6d}  {t['median_ms']:.3f} / {t['min_ms']:.3f} ms"
          f"  (B zeros {zeros:.3f})")


if __name__ == "__main__":
  main()
