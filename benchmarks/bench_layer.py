"""Benchmark one linear layer: jint4.Int4Dense vs flax.linen.Dense, in bfloat16.

What is measured: a full training step of the layer alone, the forward pass
and the backward pass, as ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))``
with

    f(params, x, cotangent) = sum(layer.apply(params, x) * cotangent),

so the gradients w.r.t. the parameters (kernel, bias and, for Int4Dense, the
step sizes) and w.r.t. the input are all computed. The cotangent is a fixed
random array passed as an argument (a closed-over constant would let XLA fold
the gradient quantization at compile time).

Baseline: ``nn.Dense(dtype=bfloat16, param_dtype=bfloat16)`` on bfloat16
inputs. Int4Dense gets the same bfloat16 inputs and bfloat16 parameters
(``Int4Dense(dtype=bfloat16, param_dtype=bfloat16)``), HQ forward, with the
backward modes of ``--backward`` (``lss``: bit splitting + leverage score
sampling, the paper's default; ``bitsplit``: bit splitting, all rows kept;
``exact``: float gradient products, only when listed). With ``--fp8`` (the
default) also what a Flax user would pick instead of INT4: the same bf16
``nn.Dense`` with Flax's FP8 ``dot_general``
(``dot_general_cls=flax.linen.fp8_ops.Fp8DotGeneralOp``: e4m3 forward, e5m2
output gradient, delayed scaling; its scales and amax histories are
differentiated like the parameters, as Flax's overwrite-with-gradient rule
needs).

How: for each shape, every case is compiled and warmed up first; then the
timed runs go round robin over the cases of that shape (so load changes on a
shared machine hit all alike), each ``--calls`` back-to-back steps
synchronised once with ``jax.block_until_ready`` (per-step time = sample /
calls, as an asynchronously dispatched training loop runs); the median of
``--repeats`` samples is reported. The default of 20 calls per sample keeps
the host's dispatch of a sample's first step (a few tenths of a millisecond,
with the device idle) and the switch from the previous case's executable a
small share of the sample, as in a training loop that runs one step over and
over.
Speed-up = bf16 median / case median (> 1: INT4 faster).

Shapes: ``--tokens`` x (D -> D) and ``--tokens`` x (D -> 4D) for each D of
``--hidden``. Defaults: 16384 tokens and D in 1024, 2048, 4096, 8192 on a
GPU; 2048 tokens and D = 1024 on a CPU (so that a CPU run ends in minutes).
``--budget-s``: after that many seconds no new shape is started; the rest are
recorded as skipped. Also recorded per shape and case: the bytes each layer
keeps for the backward per element of its input (from ``jax.vjp``'s residuals,
tracing only).

    PYTHONPATH=. python benchmarks/bench_layer.py
    PYTHONPATH=. python benchmarks/bench_layer.py --hidden 1024 --tokens 512 --repeats 5

Writes ``<out-dir>/bench_layer_<platform>.json`` (``--tag T``:
``bench_layer_T_<platform>.json``; rewritten after every shape,
so an interrupted run keeps what it measured) and ``.png`` (speed-up per shape
and backward mode); prints a table. The numbers depend on the machine and are
never asserted by the tests.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import flax.linen as nn
from flax.linen import fp8_ops
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jint4  # noqa: E402

BF16 = "bf16 nn.Dense"
FP8 = "fp8 nn.Dense"
DEFAULTS = {  # backend -> (tokens, hidden sizes)
    "gpu": (16384, [1024, 2048, 4096, 8192]),
    "cpu": (2048, [1024]),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--tokens", type=int, default=None,
                 help="rows of the input (batch x sequence); default 16384 on"
                      " a GPU, 2048 on a CPU")
  p.add_argument("--hidden", type=common.comma_list(int), default=None,
                 help="comma-separated widths D, each timed as D -> D and"
                      " D -> 4D; default 1024,2048,4096,8192 on a GPU, 1024 on"
                      " a CPU")
  p.add_argument("--calls", type=int, default=20,
                 help="back-to-back steps per timed sample (one sync each)")
  p.add_argument("--repeats", type=int, default=15,
                 help="timed runs per case (the median is reported)")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed runs per case after the compiling call")
  p.add_argument("--backward", type=common.comma_list(str),
                 default=["lss", "bitsplit"],
                 help="comma-separated Int4Dense backward modes, of"
                      f" {','.join(jint4.config.BACKWARD_MODES)}, each optionally"
                      " with :row or :tensor, the bit split's Int4Config.split_scale"
                      " (e.g. bitsplit:tensor; default: the config's)")
  p.add_argument("--engine", default="auto", choices=jint4.config.ENGINES,
                 help="Int4Config.engine of the Int4Dense cases")
  p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                 help="also time nn.Dense with Flax's FP8 dot_general")
  p.add_argument("--budget-s", type=float, default=None,
                 help="soft wall-clock budget: no shape is started after it"
                      " (the rest are recorded as skipped)")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "results"), help="where the JSON/PNG go")
  p.add_argument("--tag", default="",
                 help="output name bench_layer_<tag>_<platform> instead of"
                      " bench_layer_<platform> (a run kept beside the default one)")
  args = p.parse_args(argv)
  bad = [m for m in args.backward if split_mode(m)[0] not in jint4.config.BACKWARD_MODES
         or split_mode(m)[1] not in ("", *jint4.config.SPLIT_SCALES)]
  if bad or not args.backward:
    p.error(f"--backward: unknown mode(s) {bad}; choose from"
            f" {','.join(jint4.config.BACKWARD_MODES)}")
  tokens, hidden = DEFAULTS.get(jax.default_backend(), DEFAULTS["cpu"])
  args.tokens = args.tokens or tokens
  args.hidden = args.hidden or hidden
  if args.tokens < 1 or args.repeats < 1 or args.calls < 1 or min(args.hidden) < 1:
    p.error("--tokens, --repeats, --calls and --hidden must be positive")
  return args


def split_mode(mode: str):
  """``--backward``'s MODE[:SCALE] as (backward, split_scale or "")."""
  backward, _, scale = mode.partition(":")
  return backward, scale


def layers(backward_modes, engine, d_out, fp8=False):
  """{case name: (module, backward mode or None)} for one output width."""
  bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  out = {BF16: (nn.Dense(d_out, **bf16), None)}
  if fp8:
    out[FP8] = (nn.Dense(d_out, dot_general_cls=fp8_ops.Fp8DotGeneralOp, **bf16), None)
  for mode in backward_modes:
    backward, scale = split_mode(mode)
    config = jint4.Int4Config(backward=backward, engine=engine,
                              **({"split_scale": scale} if scale else {}))
    out[f"int4 {mode}"] = (jint4.Int4Dense(d_out, config=config, **bf16), mode)
  return out


def make_step(layer: nn.Module, tokens: int, d_in: int, d_out: int, seed=0):
  """(jitted fwd+bwd step, its arguments, residual bytes per input element)."""
  kx, kg, kp, kq = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (tokens, d_in), jnp.bfloat16)
  cot = jax.random.normal(kg, (tokens, d_out), jnp.bfloat16)
  params = jax.jit(layer.init)(kp, x)

  def f(params, x, cot, key):
    # 'quant' drives Int4Dense's stochastic rounding / sampling; nn.Dense
    # ignores it.
    y = layer.apply(params, x, rngs={"quant": key})
    return jnp.sum(y * cot, dtype=jnp.float32)

  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  return step, (params, x, cot, kq), common.residual_bytes_per_element(layer, d_in)


def time_cases(steps: dict, repeats: int, warmup: int, calls: int = 5) -> dict:
  """Median / min / max per-step time of each jitted step, in ms.

  Every case is compiled and warmed up first; the timed samples then go round
  robin over the cases, so a change of machine load hits all of them alike.
  A sample is ``calls`` back-to-back steps and one synchronization (JAX
  dispatches asynchronously: a training loop does not wait on the host
  between steps), divided by ``calls``.
  """
  out = {}
  for name, (step, args) in steps.items():
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))  # tracing + compilation + first run
    out[name] = {"first_call_s": time.perf_counter() - t0, "times_ms": [], "windows_s": []}
    for _ in range(warmup):
      jax.block_until_ready(step(*args))
  for _ in range(repeats):
    for name, (step, args) in steps.items():
      ms, window = common.sample(step, args, calls)
      out[name]["times_ms"].append(ms)
      out[name]["windows_s"].append(window)
  for r in out.values():
    r.update(median_ms=statistics.median(r["times_ms"]),
             min_ms=min(r["times_ms"]), max_ms=max(r["times_ms"]))
  return out


def run_shape(args, d_in, d_out) -> list:
  """Result rows (one per case) of one shape."""
  cases = layers(args.backward, args.engine, d_out, args.fp8)
  steps, residual = {}, {}
  for name, (layer, _) in cases.items():
    step, step_args, residual[name] = make_step(layer, args.tokens, d_in, d_out)
    steps[name] = (step, step_args)
  timed = time_cases(steps, args.repeats, args.warmup, args.calls)
  base = timed[BF16]["median_ms"]
  fp8 = timed[FP8]["median_ms"] if FP8 in timed else None
  flops = 3 * 2 * args.tokens * d_in * d_out  # forward, dX and dW GEMMs
  rows = []
  for name, r in timed.items():
    r.update(shape=[args.tokens, d_in, d_out], case=name,
             backward=cases[name][1], speedup_vs_bf16=base / r["median_ms"],
             speedup_vs_fp8=fp8 / r["median_ms"] if fp8 else None,
             tflops_equivalent=flops / (r["median_ms"] * 1e-3) / 1e12,
             residual_bytes_per_input_element=residual[name])
    rows.append(r)
  return rows


def shape_label(shape) -> str:
  n, d_in, d_out = shape
  return f"{n} x ({d_in} -> {d_out})"


def print_table(rows):
  header = (f"{'shape':>24} | {'case':16} | {'median ms':>10} | {'min ms':>10} |"
            f" {'vs bf16':>7} | {'vs fp8':>7} | {'TFLOP/s':>7} | {'res B/el':>8} |"
            f" {'compile s':>9}")
  print("\n" + header + "\n" + "-" * len(header))
  for r in rows:
    if "skipped" in r:
      print(f"{shape_label(r['shape']):>24} | skipped: {r['skipped']}")
      continue
    print(f"{shape_label(r['shape']):>24} | {r['case']:16} |"
          f" {r['median_ms']:10.3f} | {r['min_ms']:10.3f} |"
          f" {r['speedup_vs_bf16']:6.2f}x |"
          + (f" {r['speedup_vs_fp8']:6.2f}x |" if r.get("speedup_vs_fp8") else f" {'-':>7} |")
          + f" {r['tflops_equivalent']:7.2f} |"
          f" {r['residual_bytes_per_input_element']:8.3f} |"
          f" {r['first_call_s']:9.1f}")


def plot(args, rows, name, env):
  shapes = [r["shape"] for r in rows if r.get("case") == BF16]
  series = {}
  for mode in args.backward:
    by_shape = {tuple(r["shape"]): r["speedup_vs_bf16"] for r in rows
                if r.get("backward") == mode}
    series[f"int4 {mode}"] = [by_shape.get(tuple(s), math.nan) for s in shapes]
  if args.fp8:
    by_shape = {tuple(r["shape"]): r["speedup_vs_bf16"] for r in rows if r.get("case") == FP8}
    series["fp8 (Flax)"] = [by_shape.get(tuple(s), math.nan) for s in shapes]
  return common.bar_plot(
      args.out_dir, name, [shape_label(s) for s in shapes], series,
      "speed-up vs bf16 nn.Dense (fwd + bwd)",
      f"Int4Dense vs bf16 nn.Dense, {env['device']}, engine {args.engine}"
      "\n(> 1: INT4 faster)", hline=1.0)


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  env = common.environment(args.engine)
  name = common.output_name("bench_layer", args.tag, jax.default_backend())
  print(f"jax {env['jax']}, {env['device']} ({env['backend']}), load avg"
        f" {env['load_average_1m']}; {args.tokens} tokens, D in {args.hidden},"
        f" backward {args.backward}, engine {args.engine!r}", flush=True)
  report = {
      "benchmark": "Int4Dense vs bf16 nn.Dense: jit(value_and_grad) of"
                   " sum(layer(x) * cotangent) w.r.t. params and x",
      "environment": env,
      "settings": {
          "tokens": args.tokens, "hidden": args.hidden, "repeats": args.repeats,
          "calls_per_sample": args.calls,
          "warmup": args.warmup, "statistic": "median",
          "order": "round robin over the cases of a shape",
          "dtype": "bfloat16 inputs, params and outputs (both layers)",
          "backward": args.backward, "budget_s": args.budget_s,
          "int4_config": {"forward": "hq", "hadamard_block": 32,
                          "engine": args.engine},
          "speedup": "bf16 median ms / case median ms (> 1: INT4 faster)"},
      "results": [],
  }
  shapes = [(d, e) for d in args.hidden for e in (d, 4 * d)]
  for d_in, d_out in shapes:
    shape = [args.tokens, d_in, d_out]
    elapsed = time.perf_counter() - start
    if args.budget_s is not None and elapsed > args.budget_s:
      report["results"].append({"shape": shape, "skipped":
                                f"budget of {args.budget_s:g} s spent"})
      print(f"  {shape_label(shape)}: skipped (budget)", flush=True)
      continue
    for r in run_shape(args, d_in, d_out):
      report["results"].append(r)
      print(f"  {shape_label(shape)} {r['case']:16} {r['median_ms']:10.3f} ms"
            f" ({r['speedup_vs_bf16']:.2f}x vs bf16)", flush=True)
    common.write(args.out_dir, name, report)

  env["load_average_1m_end"] = common.load_average()
  report["total_s"] = time.perf_counter() - start
  json_path = common.write(args.out_dir, name, report)
  print_table(report["results"])
  png_path = plot(args, report["results"], name, env)
  print(f"\nwrote {json_path} and {png_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
