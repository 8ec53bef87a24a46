"""Shared helpers of the benchmark scripts: timing, environment, output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import jax
import jaxlib


def environment() -> dict:
  import jint4
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "jint4": jint4.__version__,
      "device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "jint4_engine": jint4.engine_info(),
  }


def time_fn(fn, args, *, repeats: int = 20, warmup: int = 3) -> dict:
  """Median / min wall time (ms) of fn(*args), device-synchronized per call."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return {"median_ms": statistics.median(times), "min_ms": min(times)}


def write(out_dir: str, name: str, payload: dict) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=str)
  return path


def bar_plot(out_dir: str, name: str, labels, series: dict, ylabel: str, title: str):
  """One PNG with grouped bars: series name -> values per label."""
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
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=110)
  return path
