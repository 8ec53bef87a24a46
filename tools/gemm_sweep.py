"""Sweep the sm_90a INT8 GEMM's configs and tile-scheduler knobs (GPU only).

    python tools/gemm_sweep.py --out gemm_sweep.json

For every shape (M, N, K), in one process: XLA's bf16 dot (TN, bf16 out),
XLA's int8 dot alone (TN, int32 out) and jint4's ``int_gemm`` (bf16 out,
native engine) under every JINT4_GEMM_SM90_CONFIG x JINT4_GEMM_SWIZZLE x
JINT4_GEMM_RASTER combination (xla_ffi/cuda/gemm_sm90.cu). The handler reads
those variables on every call and the handler is not captured into a CUDA
graph (it declares no command-buffer trait), so one jitted function per
shape serves them all: os.environ is changed between timings, nothing is
recompiled. A sanity step checks that (JINT4_CUDA_GEMM=fallback must be much
slower through the same executable).

Timings per case: 2 warm-up calls, then ``--repeats`` calls each synchronized
(median: "sync", the method of benchmarks/common.time_fn), then ``--batches``
batches of ``--repeats`` calls enqueued back to back and synchronized once
(median per-call time: "stream", closer to the kernel time, without the
dispatch and sync latency). Cases are ranked by "stream".

Correctness: at small shapes, every combination's output (f32 and bf16 out,
with row_scale, col_bias and scale) must equal the default's bit for bit; the
default f32 output is also compared with numpy's float32 epilogue.

Prints a compact table and writes the JSON named by --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jint4.kernels import native  # noqa: E402

SHAPES = [(8192, 8192, 8192), (15360, 8704, 10752), (16384, 4096, 4096),
          (4096, 4096, 16384), (16384, 16384, 4096), (16384, 4096, 16384)]
# The configs compiled in (gemm_sm90*.cu), by their JINT4_GEMM_SM90_CONFIG
# names; the first is the one the reference combination forces.
CONFIGS = list(native.SM90_GEMM_CONFIGS)
SWIZZLES = ["1", "2", "4", "8"]
RASTERS = ["auto", "m", "n"]
DEFAULT = (CONFIGS[0], "1", "auto")
# No variable set: the handler's own choice per shape (gemm_sm90.cu's
# DefaultChoice); timed as one more combination.
HANDLER = ("handler", "-", "-")
CHECK_SHAPES = [(512, 768, 1024), (333, 264, 1008)]
KNOBS = ("JINT4_GEMM_SM90_CONFIG", "JINT4_GEMM_SWIZZLE", "JINT4_GEMM_RASTER")  # combo
TN = (((1,), (1,)), ((), ()))


def fail(message: str):
  print(f"gemm_sweep: {message}", file=sys.stderr)
  sys.exit(2)


def set_knobs(combo):
  for name, value in zip(KNOBS, combo):
    if combo == HANDLER:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value


def label(combo) -> str:
  cfg, sw, ra = combo
  return f"{cfg} sw{sw} {ra}"


def time_case(jax, fn, args, repeats: int, batches: int) -> dict:
  """sync: median of individually synchronized calls; stream: median over
  batches of (back-to-back calls, one sync) / calls. Milliseconds."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  sync = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    sync.append((time.perf_counter() - t0) * 1e3)
  stream = []
  for _ in range(batches):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(repeats)]
    jax.block_until_ready(outs)
    stream.append((time.perf_counter() - t0) * 1e3 / repeats)
    del outs
  return {"sync_ms": statistics.median(sync), "sync_min_ms": min(sync),
          "stream_ms": statistics.median(stream)}


def check_environment(jax):
  if jax.default_backend() != "gpu":
    fail(f"GPU only: JAX's default backend is {jax.default_backend()!r}, not 'gpu'"
         " (needs jaxlib with CUDA and an NVIDIA GPU of compute capability 9.0)")
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  if cc is not None and str(cc) != "9.0":
    fail(f"{dev.device_kind} has compute capability {cc}; the swept knobs only"
         " act on the sm_90a path (H100 / H200, compute 9.0)")
  from jint4 import kernels
  try:
    eng = kernels.get_engine("native")
  except RuntimeError as e:
    fail(str(e))
  if not native.has_cuda():
    fail(f"the native engine has no CUDA handlers: {native.build_info()}")
  return eng


def correctness(jax, jnp, eng, combos) -> list:
  """Every combination vs the default, bit for bit, f32 and bf16 out."""
  results = []
  for (m, n, k), dtype in itertools.product(CHECK_SHAPES, (jnp.float32, jnp.bfloat16)):
    rng = np.random.default_rng(m * 7 + n * 3 + k)
    qa = rng.integers(-7, 8, (m, k), dtype=np.int8)
    qb = rng.integers(-7, 8, (n, k), dtype=np.int8)
    rs = rng.uniform(0.5, 2.0, m).astype(np.float32)
    cb = rng.normal(0, 10, n).astype(np.float32)
    scale = np.float32(0.0123)
    fn = jax.jit(lambda a, b, r, c, s, dtype=dtype: eng.int_gemm(
        a, b, scale=s, row_scale=r, col_bias=c, out_dtype=dtype))
    args = jax.device_put((qa, qb, rs, cb, scale))
    outs = {}
    for combo in combos:
      set_knobs(combo)
      try:
        outs[combo] = np.asarray(jax.device_get(fn(*args))).view(
            np.uint16 if dtype == jnp.bfloat16 else np.uint32)
      except Exception as e:  # reported, the sweep goes on
        outs[combo] = e
    ref = outs[DEFAULT]
    name = f"{m}x{n}x{k} {jnp.dtype(dtype).name}"
    if isinstance(ref, Exception):
      results.append({"case": name, "combo": label(DEFAULT), "error": repr(ref)})
      continue
    if dtype == jnp.float32:  # the default against numpy's float32 epilogue
      acc = (qa.astype(np.int64) @ qb.astype(np.int64).T).astype(np.float32)
      want = ((acc * scale) * rs[:, None] + cb[None, :]).astype(np.float32)
      bad = int(np.count_nonzero(want.view(np.uint32) != ref))
      if bad:
        results.append({"case": name, "combo": label(DEFAULT) + " vs numpy",
                        "mismatches": bad})
    for combo, out in outs.items():
      if isinstance(out, Exception):
        results.append({"case": name, "combo": label(combo), "error": repr(out)})
      elif not np.array_equal(out, ref):
        results.append({"case": name, "combo": label(combo),
                        "mismatches": int(np.count_nonzero(out != ref))})
  return results


def sanity(jax, jnp, eng, repeats: int) -> dict:
  """The env is read per call through one executable: the generic fallback
  kernel (JINT4_CUDA_GEMM=fallback) must be much slower than sm90."""
  m = n = k = 2048
  qa = jnp.ones((m, k), jnp.int8)
  qb = jnp.ones((n, k), jnp.int8)
  fn = jax.jit(lambda a, b: eng.int_gemm(a, b, scale=jnp.float32(1.0), out_dtype=jnp.bfloat16))
  set_knobs(DEFAULT)
  t = {}
  for path in ("sm90", "fallback", "sm90"):
    os.environ["JINT4_CUDA_GEMM"] = path
    t[path] = time_case(jax, fn, (qa, qb), max(3, repeats // 3), 1)["stream_ms"]
  os.environ.pop("JINT4_CUDA_GEMM")
  ok = t["fallback"] > 3 * t["sm90"]
  return {"sm90_ms": t["sm90"], "fallback_ms": t["fallback"], "env_read_per_call": ok}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="gemm_sweep.json", help="JSON output path")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--batches", type=int, default=3)
  p.add_argument("--shapes", default=None,
                 help="M,N,K;M,N,K;... (default: the six sweep shapes)")
  p.add_argument("--configs", default=None,
                 help="comma-separated subset of CONFIGS (default: all)")
  p.add_argument("--no-raster", action="store_true",
                 help="only raster auto for the non-default configs (shorter)")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  from jax import lax

  eng = check_environment(jax)
  from benchmarks import common

  if os.environ.pop("JINT4_CUDA_GEMM", None) not in (None, "auto", "sm90"):
    print("gemm_sweep: JINT4_CUDA_GEMM unset for the sweep")
  saved = {name: os.environ.get(name) for name in KNOBS}
  shapes = SHAPES if args.shapes is None else [
      tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s.strip()]
  configs = CONFIGS if args.configs is None else args.configs.split(",")
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown:
    fail(f"--configs: unknown {unknown}; compiled: {CONFIGS}")
  combos = [DEFAULT] + [c for c in itertools.product(configs, SWIZZLES, RASTERS)
                        if c != DEFAULT and not (args.no_raster and c[0] != DEFAULT[0]
                                                 and c[2] != "auto")] + [HANDLER]
  t_start = time.perf_counter()

  check = correctness(jax, jnp, eng, combos)
  print(f"correctness ({len(combos)} combos x {len(CHECK_SHAPES)} shapes x f32/bf16 vs the"
        f" default): {'OK' if not check else f'{len(check)} PROBLEMS'}")
  for r in check:
    print("  MISMATCH", r)
  sane = sanity(jax, jnp, eng, args.repeats)
  print(f"env read per call: sm90 {sane['sm90_ms']:.3f} ms, fallback"
        f" {sane['fallback_ms']:.3f} ms -> {'yes' if sane['env_read_per_call'] else 'NO (!)'}")

  scale = jnp.float32(0.01)
  bf16_dot = jax.jit(lambda a, b: lax.dot_general(a, b, TN, preferred_element_type=jnp.bfloat16))
  int8_dot = jax.jit(lambda a, b: lax.dot_general(a, b, TN, preferred_element_type=jnp.int32))
  int_gemm = jax.jit(lambda a, b: eng.int_gemm(a, b, scale=scale, out_dtype=jnp.bfloat16))

  rows = []
  for m, n, k in shapes:
    flop = 2 * m * n * k
    tops = lambda ms: flop / (ms * 1e-3) / 1e12  # noqa: E731
    ka, kb = jax.random.split(jax.random.key(0))
    qa = jax.random.randint(ka, (m, k), -7, 8, jnp.int8)
    qb = jax.random.randint(kb, (n, k), -7, 8, jnp.int8)
    a, b = qa.astype(jnp.bfloat16), qb.astype(jnp.bfloat16)
    row = {"shape": [m, n, k]}
    row["xla bf16"] = time_case(jax, bf16_dot, (a, b), args.repeats, args.batches)
    del a, b
    row["xla int8"] = time_case(jax, int8_dot, (qa, qb), args.repeats, args.batches)
    cases = []
    for combo in combos:
      set_knobs(combo)
      try:
        t = time_case(jax, int_gemm, (qa, qb), args.repeats, args.batches)
      except Exception as e:  # reported, the sweep goes on
        t = {"error": repr(e)}
      t.update(config=combo[0], swizzle=combo[1], raster=combo[2])
      cases.append(t)
    del qa, qb
    for t in [row["xla bf16"], row["xla int8"]] + cases:
      if "stream_ms" in t:
        t["tops"] = tops(t["stream_ms"])
        t["sync_tops"] = tops(t["sync_ms"])
        t["vs_bf16"] = row["xla bf16"]["stream_ms"] / t["stream_ms"]
        t["vs_int8"] = row["xla int8"]["stream_ms"] / t["stream_ms"]
    row["int_gemm"] = cases
    rows.append(row)

    ok = [c for c in cases if "stream_ms" in c]
    default = next((c for c in cases if (c["config"], str(c["swizzle"]), c["raster"])
                    == DEFAULT), None)
    print(f"\n{m}x{n}x{k}: xla bf16 {row['xla bf16']['stream_ms']:.3f} ms"
          f" {row['xla bf16']['tops']:.0f} T | xla int8 {row['xla int8']['stream_ms']:.3f} ms"
          f" {row['xla int8']['tops']:.0f} T (sync: {row['xla bf16']['sync_tops']:.0f} /"
          f" {row['xla int8']['sync_tops']:.0f} T)")
    fmt = lambda c: (f"{c['stream_ms']:7.3f} ms {c['tops']:5.0f} T  {c['vs_bf16']:4.2f}x bf16"  # noqa: E731
                     f"  {c['vs_int8']:4.2f}x int8  (sync {c['sync_tops']:5.0f} T)")
    if default is not None and "stream_ms" in default:
      print(f"  {'default ' + label(DEFAULT):<40} {fmt(default)}")
    handler = next((c for c in ok if c["config"] == HANDLER[0]), None)
    if handler is not None:
      print(f"  {'handler (no variable set)':<40} {fmt(handler)}")
    for cfg in configs:
      mine = [c for c in ok if c["config"] == cfg]
      if mine:
        best = min(mine, key=lambda c: c["stream_ms"])
        worst = max(mine, key=lambda c: c["stream_ms"])
        name = label((cfg, str(best["swizzle"]), best["raster"]))
        print(f"  {'best of ' + name:<40} {fmt(best)}  worst {worst['tops']:.0f} T")
    if ok:
      best = min(ok, key=lambda c: c["stream_ms"])
      print(f"  => BEST {label((best['config'], str(best['swizzle']), best['raster']))}:"
            f" {best['tops']:.0f} T, {best['vs_bf16']:.2f}x bf16, {best['vs_int8']:.2f}x int8")
    errors = [c for c in cases if "error" in c]
    for c in errors:
      print(f"  ERROR {label((c['config'], str(c['swizzle']), c['raster']))}: {c['error'][:200]}")

  # One setting for all shapes: highest geometric mean of TOPS.
  summary = []
  for combo in combos:
    ts = [next((c.get("tops") for c in r["int_gemm"] if (c["config"], str(c["swizzle"]),
                c["raster"]) == combo), None) for r in rows]
    if ts and all(t is not None for t in ts):
      summary.append({"combo": label(combo),
                      "geomean_tops": math.exp(sum(math.log(t) for t in ts) / len(ts))})
  summary.sort(key=lambda s: -s["geomean_tops"])
  if summary:
    print("\nover all shapes (geomean TOPS):")
    for s in summary[:5]:
      print(f"  {s['combo']:<36} {s['geomean_tops']:.0f}")
    d = next((s for s in summary if s["combo"] == label(DEFAULT)), None)
    if d is not None:
      print(f"  {'(default) ' + d['combo']:<36} {d['geomean_tops']:.0f}")

  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  elapsed = time.perf_counter() - t_start
  print(f"\nsweep time {elapsed:.0f} s")
  payload = {"environment": common.environment("native"), "timing": {
      "repeats": args.repeats, "batches": args.batches, "warmup": 2,
      "tops_from": "stream_ms"}, "correctness": {"shapes": CHECK_SHAPES,
      "problems": check}, "sanity": sane, "rows": rows, "geomean": summary,
      "elapsed_s": elapsed}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(payload, f, indent=1, default=str)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
