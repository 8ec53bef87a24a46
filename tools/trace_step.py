"""Where a jitted step's GPU time goes: a kernel table from JAX's profiler.

Runs a few steps of one benchmark case under ``jax.profiler.trace`` and reads
the trace back (``jax.profiler.ProfileData``): for every kernel name on the
device plane, launches and microseconds per step, and per step the span from
the first kernel's start to the last one's end against the summed kernel
time (the difference is idle time between kernels: launch gaps, host waits).
No Nsight tools needed; runs the jitted step on the default GPU.

    PYTHONPATH=. python tools/trace_step.py layer --shape 16384,4096,4096
    PYTHONPATH=. python tools/trace_step.py train --hidden 4096

Cases: ``layer`` is bench_layer.py's step (bf16 nn.Dense and Int4Dense with
``--backward``); ``train`` is bench_train.py's GPT train step (bf16 and
int4), both in this one process. Prints one table per case (``--top`` rows).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import jint4  # noqa: E402


def layer_cases(args):
  import bench_layer  # noqa: PLC0415
  n, d_in, d_out = args.shape
  out = {}
  for name, (layer, _) in bench_layer.layers(args.backward, "auto", d_out).items():
    step, step_args, _ = bench_layer.make_step(layer, n, d_in, d_out)
    out[name] = lambda step=step, a=step_args: step(*a)
    if args.hlo_dir:
      write_hlo(args.hlo_dir, name, step.lower(*step_args).compile().as_text())
  return out


def train_cases(args):
  import bench_train  # noqa: PLC0415
  out = {}
  for variant in ("bf16", "int4"):
    config = (jint4.Int4Config(backward=args.backward[0])
              if variant == "int4" else None)
    size = bench_train.DEFAULTS  # the benchmark's model, at width --hidden
    model = bench_train.GPT(size["vocab"], args.hidden, size["layers"], size["seq_len"],
                            args.attention)
    t = bench_train.training(model, config=config, vocab=size["vocab"],
                             seq_len=size["seq_len"],
                             batch=size["tokens"] // size["seq_len"])
    state = [t.params, t.opt_state]

    def run(t=t, state=state):
      *new, loss = t.train_step(*state, t.inputs, t.targets, t.k_quant)
      state[:] = new
      return loss
    out[variant] = run
    if args.hlo_dir:
      write_hlo(args.hlo_dir, variant, t.train_step.lower(
          *state, t.inputs, t.targets, t.k_quant).compile().as_text())
  return out


def write_hlo(hlo_dir, name, text):
  """The optimized HLO: a trace's kernel names are its fusion names."""
  os.makedirs(hlo_dir, exist_ok=True)
  with open(os.path.join(hlo_dir, name.replace(" ", "_") + ".hlo.txt"), "w") as f:
    f.write(text)


def device_events(path):
  """[(line name, kernel name, start ns, duration ns)] of the first GPU plane."""
  data = jax.profiler.ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  if not planes:
    raise SystemExit("no /device:GPU plane in the trace: run this on a GPU")
  events = []
  for line in planes[0].lines:
    if line.name in ("XLA Modules", "XLA Ops", "Steps", "Source code"):
      continue
    for e in line.events:
      events.append((line.name, e.name, e.start_ns, e.duration_ns))
  return events


def dispatch_ms(fn, repeats=10):
  """Median ms for one call to return after a sync, without waiting for its
  result: the host's dispatch time, during which the device is idle."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(1e3 * (time.perf_counter() - t0))
    jax.block_until_ready(out)
  return statistics.median(times)


def trace_case(fn, steps):
  jax.block_until_ready(fn())  # compile
  wall = common.time_fn(fn, (), repeats=10, warmup=1, calls=5)["median_ms"]
  print(f"# wall {wall:.3f} ms/step (5 back-to-back calls, one sync), "
        f"dispatch {dispatch_ms(fn):.3f} ms/call")
  d = tempfile.mkdtemp(prefix="jint4_trace_")
  with jax.profiler.trace(d):
    out = None
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
  path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
  return device_events(path[0])


def report(name, events, steps, top):
  if not events:
    print(f"## {name}: no device events")
    return
  per = collections.defaultdict(lambda: [0, 0.0])
  for _, kname, _, dur in events:
    per[kname][0] += 1
    per[kname][1] += dur
  busy = sum(e[3] for e in events) / steps
  span = (max(e[2] + e[3] for e in events) - min(e[2] for e in events)) / steps
  print(f"## {name}: {len(events) / steps:.0f} kernels/step, kernel time "
        f"{busy / 1e3:.1f} us/step, span {span / 1e3:.1f} us/step "
        f"(idle {100 * (1 - busy / span):.1f}%), lines "
        f"{sorted(set(e[0] for e in events))}")
  rows = sorted(per.items(), key=lambda kv: -kv[1][1])
  for kname, (count, dur) in rows[:top]:
    print(f"  {dur / steps / 1e3:9.1f} us  {count / steps:5.1f}x  {kname[:150]}")
  rest = sum(d for _, (_, d) in rows[top:]) / steps
  print(f"  {rest / 1e3:9.1f} us  (the other {max(0, len(rows) - top)} kernel names)")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("what", choices=("layer", "train"))
  p.add_argument("--shape", default="16384,4096,4096",
                 help="layer: tokens,d_in,d_out")
  p.add_argument("--hidden", type=int, default=4096, help="train: width")
  p.add_argument("--backward", default="bitsplit",
                 help="comma-separated Int4Dense backward modes (train: the first)")
  p.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                 help="train: jax.nn.dot_product_attention implementation")
  p.add_argument("--hlo-dir", default=None,
                 help="write each case's optimized HLO here (kernel names in the"
                      " table are its fusion names)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=40)
  args = p.parse_args(argv)
  args.shape = [int(s) for s in args.shape.split(",")]
  args.backward = args.backward.split(",")
  cases = layer_cases(args) if args.what == "layer" else train_cases(args)
  print(f"# {args.what} {args.shape if args.what == 'layer' else args.hidden}"
        f" on {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for name, fn in cases.items():
    print(f"## {name}")
    report(name, trace_case(fn, args.steps), args.steps, args.top)


if __name__ == "__main__":
  main()
