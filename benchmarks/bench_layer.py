"""Benchmark one linear layer: jint4.Int4Dense vs flax.linen.Dense (float32).

Times a full training step of the layer alone: the forward pass and the
backward pass, as ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))`` with

    f(params, x, cotangent) = sum(layer.apply(params, x) * cotangent),

so the gradients w.r.t. the parameters (kernel, bias and, for Int4Dense, the
step sizes) and w.r.t. the input are all computed. Each case is compiled and
warmed up first; the reported time is the median of ``--repeats`` timed runs,
each synchronised with ``jax.block_until_ready``, taken round robin over the
cases of a shape so that load changes on a shared machine hit all alike.

Cases: float32 nn.Dense, and Int4Dense (HQ forward) with the backward modes
``lss`` (bit splitting + leverage score sampling, the paper's default),
``nonzero`` (bit splitting, every row kept) and ``exact`` (float gradient
products, for reference), all on the pure-JAX reference engine unless
``--engine`` says otherwise. Shapes: ``--tokens`` x (1024 -> 1024) and
``--tokens`` x (1024 -> 4096).

    PYTHONPATH=. python benchmarks/bench_layer.py
    PYTHONPATH=. python benchmarks/bench_layer.py --tokens 512 --repeats 5

Writes ``<out-dir>/bench_layer_<platform>.json`` and ``.png``. The numbers
depend on the machine and are never asserted by the tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import jint4

SHAPES = ((1024, 1024), (1024, 4096))  # (in_features, out_features)
BACKWARD_MODES = ("lss", "nonzero", "exact")


def make_case(layer: nn.Module, tokens: int, d_in: int, d_out: int, seed=0):
  """(jitted fwd+bwd step, its arguments) for one layer and shape."""
  kx, kg, kp, kq = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (tokens, d_in), jnp.float32)
  cot = jax.random.normal(kg, (tokens, d_out), jnp.float32)
  params = layer.init(kp, x)

  def f(params, x, cot, key):
    # 'quant' drives Int4Dense's stochastic rounding / sampling; nn.Dense
    # ignores it.
    y = layer.apply(params, x, rngs={"quant": key})
    return jnp.sum(y * cot)

  # The cotangent is an argument, not a closed-over constant: XLA would
  # otherwise constant-fold the gradient quantization at compile time.
  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  return step, (params, x, cot, kq)


def time_cases(steps: dict, repeats: int, warmup: int = 2) -> dict:
  """Median / min / max wall time of each jitted step, in ms.

  Every case is compiled and warmed up first; the timed runs then go round
  robin over the cases, so a change of machine load hits all of them alike.
  """
  out = {}
  for name, (step, args) in steps.items():
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))  # tracing + compilation + first run
    out[name] = {"first_call_s": time.perf_counter() - t0, "times_ms": []}
    for _ in range(warmup):
      jax.block_until_ready(step(*args))
  for _ in range(repeats):
    for name, (step, args) in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(*args))
      out[name]["times_ms"].append(1e3 * (time.perf_counter() - t0))
  for r in out.values():
    r.update(median_ms=statistics.median(r["times_ms"]),
             min_ms=min(r["times_ms"]), max_ms=max(r["times_ms"]))
  return out


def cases(backward_modes, engine):
  yield "float32 nn.Dense", None, lambda d_out: nn.Dense(d_out)
  for mode in backward_modes:
    config = jint4.Int4Config(backward=mode, engine=engine)
    yield (f"int4 {mode}", mode,
           lambda d_out, config=config: jint4.Int4Dense(d_out, config=config))


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--tokens", type=int, default=2048,
                 help="rows of the input (batch x sequence)")
  p.add_argument("--repeats", type=int, default=15,
                 help="timed runs per case (the median is reported)")
  p.add_argument("--backward", nargs="+", default=list(BACKWARD_MODES),
                 choices=jint4.config.BACKWARD_MODES,
                 help="Int4Dense backward modes to time")
  p.add_argument("--engine", default="reference",
                 choices=jint4.config.ENGINES,
                 help="Int4Config.engine of the Int4Dense cases (reference:"
                      " the pure-JAX engine)")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "results"), help="where the JSON/PNG go")
  return p.parse_args(argv)


def environment(engine: str) -> dict:
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "jint4": jint4.__version__,
      "jint4_engine": engine,
      "jint4_engine_info": _engine_info(engine),
      "python": platform.python_version(),
      "platform": platform.platform(), "machine": platform.machine(),
      "processor": platform.processor() or _cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
  }


def _engine_info(engine):
  try:
    return jint4.engine_info(engine)
  except Exception as e:  # informational only
    return {"error": repr(e)}


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shapes = sorted({r["shape"] for r in results}, key=lambda s: s[::-1])
  names = list(dict.fromkeys(r["case"] for r in results))
  width = 0.8 / len(names)
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for i, name in enumerate(names):
    ms = [next(r["median_ms"] for r in results
               if r["case"] == name and r["shape"] == s) for s in shapes]
    xs = np.arange(len(shapes)) + (i - (len(names) - 1) / 2) * width
    bars = ax.bar(xs, ms, width, label=name)
    for bar, r in zip(bars, [next(r for r in results if r["case"] == name
                                  and r["shape"] == s) for s in shapes]):
      ax.annotate(f"{r['ratio_vs_float32']:.1f}x",
                  (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  ha="center", va="bottom", fontsize=8)
  ax.set_xticks(np.arange(len(shapes)))
  ax.set_xticklabels([f"{s[0]} x ({s[1]} -> {s[2]})" for s in shapes])
  ax.set_ylabel("forward + backward, median ms")
  ax.set_title(f"Int4Dense vs nn.Dense, {jax.default_backend()}"
               f" ({os.cpu_count()} cores); labels: ratio vs float32")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  args = parse_args(argv)
  env = environment(args.engine)
  print(f"jax {env['jax']} / jaxlib {env['jaxlib']} / flax {env['flax']},"
        f" backend {env['jax_backend']}, {env['cpu_count']} CPUs"
        f" ({env['processor']}), load avg {env['load_average_1m']:.2f};"
        f" Int4Dense engine {args.engine!r}")
  results = []
  for d_in, d_out in SHAPES:
    shape = (args.tokens, d_in, d_out)
    modes = {name: mode for name, mode, _ in cases(args.backward, args.engine)}
    steps = {name: make_case(make_layer(d_out), *shape)
             for name, _, make_layer in cases(args.backward, args.engine)}
    timed = time_cases(steps, args.repeats)
    base = timed["float32 nn.Dense"]["median_ms"]
    for name, r in timed.items():
      r.update(case=name, backward=modes[name], shape=shape,
               ratio_vs_float32=r["median_ms"] / base)
      results.append(r)
      print(f"  {shape[0]} x ({d_in} -> {d_out}) {name:18s}"
            f" {r['median_ms']:9.2f} ms (min {r['min_ms']:.2f})", flush=True)

  header = (f"{'shape':>22} | {'case':18} | {'median ms':>9} | {'min ms':>9} |"
            f" {'vs f32':>6} | {'first call s':>12}")
  env["load_average_1m_end"] = os.getloadavg()[0] if hasattr(
      os, "getloadavg") else None
  print()
  print(header)
  print("-" * len(header))
  for r in results:
    n, d_in, d_out = r["shape"]
    print(f"{f'{n} x ({d_in} -> {d_out})':>22} | {r['case']:18} |"
          f" {r['median_ms']:9.2f} | {r['min_ms']:9.2f} |"
          f" {r['ratio_vs_float32']:5.2f}x |"
          f" {r['first_call_s']:12.1f}")

  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"bench_layer_{jax.default_backend()}")
  report = {
      "benchmark": "Int4Dense vs nn.Dense, jit(value_and_grad) of"
                   " sum(layer(x) * cotangent) w.r.t. params and x",
      "environment": env,
      "settings": {"tokens": args.tokens, "repeats": args.repeats,
                   "warmup": 2, "statistic": "median",
                   "order": "round robin over the cases of a shape",
                   "shapes": [list(s) for s in SHAPES],
                   "int4_config": {"forward": "hq", "hadamard_block": 32,
                                   "engine": args.engine}},
      "results": [dict(r, shape=list(r["shape"])) for r in results],
  }
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=2, default=str)
  plot(results, stem + ".png")
  print(f"\nwrote {stem}.json and {stem}.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
