"""Shared helpers of the benchmark scripts: timing, environment, output."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jaxlib


def environment(engine: str = "auto") -> dict:
  """Versions, date, device and machine load; ``engine``: the jint4 engine
  whose per-op choice is recorded (``jint4_engine``)."""
  import jint4
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "jint4": jint4.__version__,
      "device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "jint4_engine": _engine_info(engine),
      "flax": _version("flax"), "optax": _version("optax"),
      "platform": platform.platform(), "processor": _cpu_model(),
      "device_count": jax.device_count(), "load_average_1m": load_average(),
  }


def _engine_info(engine: str):
  import jint4
  try:
    return jint4.engine_info(engine)
  except Exception as e:  # informational only: the benchmark reports the error
    return {"requested": engine, "error": repr(e)}


def _version(module: str):
  try:
    return __import__(module).__version__
  except Exception:
    return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def load_average():
  """1-minute load average of the machine, or None where unknown."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def comma_list(kind=str):
  """argparse ``type`` for comma-separated lists: "1024,2048" -> [1024, 2048]."""
  def parse(text: str):
    try:
      return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected a comma-separated list of {kind.__name__}; got {text!r}")
  return parse


def residual_bytes(fn, *args) -> int:
  """Bytes that ``jax.vjp(fn, *args)`` keeps for the backward pass.

  The sum over the residual arrays of the vjp function, found by
  ``jax.eval_shape`` (tracing only, nothing runs). It is what JAX saves before
  XLA's optimisations; parameters and constants that the backward needs are
  included, so compare two sizes of the batch to isolate the activations.
  """
  vjp_fn = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
  return int(sum(leaf.size * leaf.dtype.itemsize
                 for leaf in jax.tree_util.tree_leaves(vjp_fn)
                 if hasattr(leaf, "dtype") and not jax.dtypes.issubdtype(
                     leaf.dtype, jax.dtypes.prng_key)))


def residual_bytes_per_element(layer, d_in: int, *, rows: int = 64, dtype="bfloat16") -> float:
  """Bytes a Flax layer keeps for the backward per element of its input:
  the growth of its vjp's residuals (`residual_bytes`) from ``rows`` to
  ``2 * rows`` input rows of width ``d_in``, per added element (tracing
  only). A ``'quant'`` rng is passed, which jint4's layers draw from and
  others ignore."""
  key = jax.random.key(0)
  x = lambda n: jax.ShapeDtypeStruct((n, d_in), dtype)
  params = jax.eval_shape(layer.init, key, x(rows))
  apply = lambda p, x: layer.apply(p, x, rngs={"quant": key})
  size = [residual_bytes(apply, params, x(n)) for n in (rows, 2 * rows)]
  return (size[1] - size[0]) / (rows * d_in)


def sample(fn, args, calls: int):
  """One timed sample: ``calls`` back-to-back calls of fn(*args) and one
  synchronization (JAX dispatches asynchronously: a training loop does not
  wait on the host between steps). Returns (ms per call, [start, end] of the
  sample in Unix seconds, to read a clock or power log against)."""
  t0, w0 = time.perf_counter(), time.time()
  out = None
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - t0) / calls, [w0, time.time()]


def time_fn(fn, args, *, repeats: int = 20, warmup: int = 3, calls: int = 5) -> dict:
  """Per-call time (ms) of fn(*args) as a training loop sees it.

  JAX dispatches asynchronously, so a loop of steps never waits on the host
  between them: each of ``repeats`` samples enqueues ``calls`` back-to-back
  calls and synchronizes once, and counts its wall time / calls. Returns the
  median and min over the samples, and ``sync_median_ms``: the median of
  ``repeats`` single calls each synchronized on its own, which adds the
  host's dispatch and synchronization latency (tens of microseconds to a few
  tenths of a millisecond) to every call. ``windows_s``: each sample's
  [start, end] in Unix seconds (`sample`).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times, sync, windows = [], [], []
  for _ in range(repeats):
    ms, window = sample(fn, args, calls)
    times.append(ms)
    windows.append(window)
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    sync.append((time.perf_counter() - t0) * 1e3)
  return {"median_ms": statistics.median(times), "min_ms": min(times),
          "sync_median_ms": statistics.median(sync), "calls_per_sample": calls,
          "windows_s": windows}


def output_name(stem: str, tag: str, backend: str) -> str:
  """<stem>_<backend>, or <stem>_<tag>_<backend> with a --tag."""
  return f"{stem}_{tag}_{backend}" if tag else f"{stem}_{backend}"


def write(out_dir: str, name: str, payload: dict) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=str)
  return path


def bar_plot(out_dir: str, name: str, labels, series: dict, ylabel: str, title: str,
             hline=None):
  """One PNG with grouped bars: series name -> values per label (NaN: no bar);
  ``hline``: a dashed horizontal reference line at that value."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
  width = 0.8 / max(1, len(series))
  x = np.arange(len(labels))
  for i, (s, values) in enumerate(series.items()):
    ax.bar(x + i * width, values, width, label=s)
  ax.set_xticks(x + 0.4 - width / 2, labels, rotation=30, ha="right", fontsize=8)
  if hline is not None:
    ax.axhline(hline, color="black", linestyle="--", linewidth=0.8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
