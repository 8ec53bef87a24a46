"""Benchmark the GPT train step on several devices: INT4 vs bf16 per layout.

What is measured: the full training step (forward, backward, ``optax.adamw``;
parameters and optimizer state donated) of the GPT of
``examples/train_transformer.py`` (token + position embeddings, pre-LayerNorm
blocks of Flax's ``nn.MultiHeadDotProductAttention`` and a 4x GELU MLP, LM
head) on a device mesh, in one of these layouts, with that script's
``make_mesh`` and ``param_sharding`` (sharding by parameter path):

  ``data``         mesh data=N: the batch over 'data', parameters replicated
  ``tensor``       mesh model=N: Megatron tensor parallelism (attention heads
                   and MLP hidden units over 'model'), the batch replicated
  ``fsdp``         mesh data=N: the batch over 'data' and the kernels' model
                   dim over 'data' too (FSDP / ZeRO-3)
  ``fsdp_tensor``  mesh data=N/2, model=2: both at once

Two models per layout, in the same run: ``bf16``, the float model, and
``int4``, the same model through ``jint4.int4ify(model, Int4Config(...),
keep="lm_head")`` (the LM head and the embeddings stay float). Both keep
float32 master weights and compute in bfloat16: the loss casts the floating
parameters (not the scalar step sizes) to bfloat16 before ``apply``, so under
FSDP the bf16 model gathers bf16 kernels and the int4 model gathers the
kernels' 4-bit codes (u8, two per byte). The model, data, optimizer and
jitted step are ``bench_train.training``'s.

Per layout and model:
  * tokens/s: global batch x sequence / the median of ``--steps`` timed
    steps (each synchronized with ``jax.block_until_ready``) after
    ``--warmup`` untimed ones; the global batch is ``--batch`` x the size of
    the 'data' axis (N for data and FSDP, 1 for tensor, N/2 for
    fsdp_tensor);
  * the ratio int4 / bf16 of tokens/s (> 1: INT4 faster), next to the same
    ratio on one device;
  * scaling efficiency: tokens/s on N devices / (N x tokens/s of the same
    model on 1 device at ``--batch`` sequences);
  * collective bytes per step, read from the compiled HLO of the step
    (``.lower(...).compile().as_text()``): the operand bytes of every
    all-gather, reduce-scatter, all-reduce, all-to-all and
    collective-permute, split into the FSDP gathers of the Dense kernels
    (int4: u8 codes; bf16: float kernels) and the rest; the int4 / bf16 ratio
    of kernel-gather bytes per step as compiled, per step with the bf16
    model's gathers counted at 2 bytes per element (a CPU compiles its bf16
    dots in float32 and so gathers float32 kernels; a GPU gathers bf16), and
    per gather (the largest, at 2 bytes). INT4 gathers each kernel twice,
    for the forward and for the backward (the forward keeps only its shard),
    where the bf16 model keeps the kernel it gathered: a gather is a quarter
    of bf16's, a step's gathers half of it when both are bf16;
  * a correctness check: for a fixed quantization key, the forward loss of
    the sharded model against the same parameters and batch on one device
    (the sharded INT4 forward is bit-identical except the row-parallel
    layers' partial sums). Reported, not asserted.

Targets it reports against (``targets`` in the JSON, never asserted): the
int4 / bf16 ratio on N GPUs within 5% of the 1-GPU ratio at hidden 4096;
data-parallel scaling efficiency >= 90%; FSDP kernel gathers <= 1/4 of
bf16's bytes.

Defaults are sized for GPUs such as the H200 (hidden 4096, 32 heads, 2
blocks, sequence 2048, 8 sequences per device, vocab 32000):

    python benchmarks/bench_multi.py --devices 2
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/bench_multi.py --devices 4 --hidden 128 --heads 4 \\
        --layers 1 --seq-len 32 --batch 2 --vocab 64 --steps 2 \\
        --layouts data,tensor,fsdp,fsdp_tensor --out-dir /tmp/bench

Writes ``<out-dir>/bench_multi_<platform>.json`` and ``.png`` (tokens/s of
int4 and bf16 per layout; kernel-gather bytes per layout) and prints a
table. The script measures and reports; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))
import bench_train  # noqa: E402
import common  # noqa: E402
import jint4  # noqa: E402
from examples.train_transformer import GPT, make_mesh, param_sharding  # noqa: E402

P = jax.sharding.PartitionSpec
MODELS = ("bf16", "int4")
LAYOUTS = ("data", "tensor", "fsdp", "fsdp_tensor")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2,
               "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
FLOATS = ("f16", "bf16", "f32", "f64")
TARGETS = {
    "int4_vs_bf16_ratio_within_of_1_device": 0.05,
    "data_scaling_efficiency_min": 0.90,
    "fsdp_kernel_gather_bytes_int4_vs_bf16_max": 0.25,
}


# ----------------------------------------------------------------------------
# Models: train_transformer's GPT, float32 master weights, bfloat16 compute.
# ----------------------------------------------------------------------------

def _to_bf16(tree):
  """Floating arrays of rank >= 1 to bfloat16 (scalar step sizes stay)."""
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.bfloat16)
      if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim >= 1 else a, tree)


class Bf16Compute:
  """``init`` / ``apply`` of a Linen model (or an Int4Model) that run
  ``apply`` on bfloat16 copies of the float32 master parameters. With
  ``shardings`` set (the parameters' NamedShardings), each copy is pinned to
  its parameter's sharding: every device casts its own shard, so what FSDP
  gathers is bfloat16 (XLA would otherwise gather the float32 shard)."""

  def __init__(self, model):
    self.model = model
    self.shardings = None

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    params = _to_bf16(variables["params"])
    if self.shardings is not None:
      params = jax.lax.with_sharding_constraint(params, self.shardings)
    return self.model.apply({**variables, "params": params}, *args, **kwargs)


def make_model(args, name):
  model = GPT(vocab_size=args.vocab, d_model=args.hidden, num_layers=args.layers,
              num_heads=args.heads, max_len=args.seq_len)
  if name == "int4":
    model = jint4.int4ify(model, jint4.Int4Config(backward=args.backward,
                                                  engine=args.engine),
                          keep=r"lm_head")
  return Bf16Compute(model)


def training(args, name, batch):
  """bench_train.training of the model: params, AdamW state, random batch,
  loss_fn and the jitted, donating train step (all on one device), and the
  model (its ``shardings`` to set once the parameters are placed)."""
  model = make_model(args, name)
  return model, bench_train.training(model, config=None, vocab=args.vocab,
                                     seq_len=args.seq_len, batch=batch)


def mesh_axes(layout, n):
  if layout == "tensor":
    return (("model", n),)
  if layout == "fsdp_tensor":
    return (("data", n // 2), ("model", 2))
  return (("data", n),)


def data_size(mesh):
  return dict(zip(mesh.axis_names, mesh.devices.shape)).get("data", 1)


# ----------------------------------------------------------------------------
# Collectives in compiled HLO text.
# ----------------------------------------------------------------------------

_OP = re.compile(r"=\s*(?P<result>.*?)\s+(?P<op>" + "|".join(COLLECTIVES)
                 + r")(?P<start>-start)?\((?P<operands>[^)]*)\)")
_TYPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def _types(text):
  return [(t, tuple(int(v) for v in s.split(",") if v))
          for t, s in _TYPE.findall(text) if t in DTYPE_BYTES]


def _nbytes(dtype, shape):
  return int(np.prod(shape, dtype=np.int64) * DTYPE_BYTES[dtype])


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")


def group_size(line: str):
  """Devices per replica group of a collective's HLO line (None: unknown)."""
  m = _MESH_GROUPS.search(line)
  if m:
    sizes = dict((k.strip(" '"), int(v)) for k, v in
                 (a.split("=") for a in m.group(1).split(",")))
    return math.prod(sizes[a.strip(" '")] for a in m.group(2).split(",") if a.strip())
  m = _IOTA_GROUPS.search(line)
  if m:
    return int(m.group(1).split(",")[-1])
  m = _LIST_GROUPS.search(line)
  if m:
    return len([v for v in m.group(1).split(",") if v])
  return None


def collectives(hlo: str):
  """Every collective of compiled HLO text: (op, [(dtype, result shape)],
  devices per group); async ``-start`` ops once (``-done`` skipped; of a
  ``-start``'s (operands, results) tuple, the results)."""
  out = []
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    results = _types(m.group("result"))
    if m.group("start") and len(results) % 2 == 0 and m.group("op") != "all-reduce":
      results = results[len(results) // 2:]
    out.append((m.group("op"), results, group_size(line)))
  return out


def kernel_gather_sizes(params, shardings):
  """Element counts of the FSDP-sharded kernels as one device gathers them
  (the 'data' dim whole, a 'model' dim still sharded)."""
  sizes = set()
  for p, s in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(shardings)):
    axes = [a for a in s.spec if a is not None]
    if p.ndim >= 2 and "data" in axes:
      mesh = dict(zip(s.mesh.axis_names, s.mesh.devices.shape))
      sizes.add(p.size // math.prod(mesh[a] for a in axes if a != "data"))
  return sizes


def collective_bytes(hlo: str, kernel_sizes) -> dict:
  """Operand bytes per collective kind, and the all-gathers of the kernels
  (4-bit codes packed in u8/s8 or float kernels) apart from the rest."""
  per_op = {op: 0 for op in COLLECTIVES}
  counts = {op: 0 for op in COLLECTIVES}
  kernel, kernel_2b, kernel_dtypes, kernel_each = 0, 0, set(), []
  unknown_groups = 0
  for op, results, group in collectives(hlo):
    counts[op] += 1
    unknown_groups += group is None
    for rtype, rshape in results:
      # Operand bytes from the result's: an all-gather's operand is 1/group
      # of its result, a reduce-scatter's is group x its result.
      nbytes = _nbytes(rtype, rshape)
      if op == "all-gather":
        nbytes //= group or 1
      elif op == "reduce-scatter":
        nbytes *= group or 1
      per_op[op] += nbytes
      if op != "all-gather":
        continue
      n = int(np.prod(rshape, dtype=np.int64))
      matrix = sum(v > 1 for v in rshape) >= 2
      codes = rtype in ("u8", "s8") and 2 * n in kernel_sizes
      floats = rtype in FLOATS and n in kernel_sizes
      if matrix and (codes or floats):
        kernel += nbytes
        kernel_2b += nbytes if codes else n * 2 // (group or 1)
        kernel_dtypes.add(rtype)
        kernel_each.append(n if codes else 2 * n)
  total = sum(per_op.values())
  return {"operand_bytes": per_op, "count": counts, "total_bytes": total,
          "kernel_gather_bytes": kernel, "other_bytes": total - kernel,
          "kernel_gather_bytes_at_bf16": kernel_2b,
          "kernel_gathers": len(kernel_each),
          "kernel_gather_result_bytes_at_bf16": sorted(kernel_each, reverse=True),
          "kernel_gather_dtypes": sorted(kernel_dtypes),
          "ops_with_unknown_group_size": unknown_groups}


# ----------------------------------------------------------------------------
# One (model, layout).
# ----------------------------------------------------------------------------

def run_steps(compiled, state, batch, key, warmup, steps):
  """(median ms, [ms per timed step], first/last loss): ``warmup`` untimed
  steps then ``steps`` timed ones, each synchronized."""
  keys = [jax.random.fold_in(key, i) for i in range(warmup + steps)]
  jax.block_until_ready(keys)
  times, losses = [], []
  for i, k in enumerate(keys):
    t0 = time.perf_counter()
    *state, loss = compiled(*state, *batch, k)
    jax.block_until_ready((state, loss))
    if i >= warmup:
      times.append(1e3 * (time.perf_counter() - t0))
    losses.append(float(loss))
  return statistics.median(times), times, losses


def measure(args, name, mesh, layout):
  """Times one model on ``mesh`` (None: one device); returns a JSON dict."""
  batch = args.batch * (data_size(mesh) if mesh is not None else 1)
  model, t = training(args, name, batch)
  params, opt_state, inputs, targets = t.params, t.opt_state, t.inputs, t.targets
  row = {"global_batch": batch, "tokens_per_step": batch * args.seq_len,
         "n_params": int(sum(p.size for p in jax.tree_util.tree_leaves(params)))}
  fixed_key = jax.random.fold_in(t.k_quant, 10**6)
  loss_fn = jax.jit(t.loss_fn)
  if mesh is not None:
    shardings = param_sharding(params, mesh, fsdp=layout.startswith("fsdp"))
    batch_spec = P("data") if "data" in mesh.axis_names else P()
    put_batch = lambda a: jax.device_put(
        a, jax.sharding.NamedSharding(mesh, batch_spec))
    # The check: the same parameters, batch and key on one device.
    one = float(loss_fn(params, inputs, targets, fixed_key))
    params = jax.device_put(params, shardings)
    inputs, targets = put_batch(inputs), put_batch(targets)
    model.shardings = shardings
    loss_fn = jax.jit(t.loss_fn)   # traced again, with the constraints
    sharded = float(loss_fn(params, inputs, targets, fixed_key))
    row["check"] = {"loss_1_device": one, "loss_sharded": sharded,
                    "abs_diff": abs(sharded - one),
                    "rel_diff": abs(sharded - one) / max(abs(one), 1e-30)}
    # AdamW's state sharded like the parameters (its moments mirror them).
    opt_state = jax.device_put(opt_state, _like(opt_state, params, shardings, mesh))
    kernel_sizes = kernel_gather_sizes(params, shardings)
  state = (params, opt_state)
  t0 = time.perf_counter()
  compiled = t.train_step.lower(*state, inputs, targets, t.k_quant).compile()
  row["compile_s"] = time.perf_counter() - t0
  if mesh is not None:
    row["collectives"] = collective_bytes(compiled.as_text(), kernel_sizes)
  median_ms, times, losses = run_steps(compiled, state, (inputs, targets),
                                       t.k_quant, args.warmup, args.steps)
  row.update(median_ms=median_ms, times_ms=times,
             tokens_per_s=row["tokens_per_step"] / (median_ms * 1e-3),
             loss_first=losses[0], loss_last=losses[-1])
  return row


def _like(opt_state, params, shardings, mesh):
  """Shardings for the optimizer state: a leaf at a parameter's path (Adam's
  moments) takes that parameter's sharding, the rest are replicated."""
  names = lambda path: tuple(k.key for k in path if hasattr(k, "key"))
  by_path = {names(path): s for (path, _), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_leaves(shardings))}
  replicated = jax.sharding.NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: by_path.get(names(path), replicated)
      if getattr(leaf, "ndim", 0) >= 1 else replicated, opt_state)


# ----------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------

def ratio(a, b):
  return a / b if a is not None and b else None


def summarize(row, one, n):
  """Ratios of one layout's row (int4 vs bf16, N devices vs 1)."""
  b, i = row.get("bf16", {}), row.get("int4", {})
  if "tokens_per_s" not in b or "tokens_per_s" not in i:
    return
  row["int4_vs_bf16_tokens_per_s"] = ratio(i["tokens_per_s"], b["tokens_per_s"])
  one_ratio = ratio(one["int4"]["tokens_per_s"], one["bf16"]["tokens_per_s"])
  row["int4_vs_bf16_on_1_device"] = one_ratio
  row["int4_vs_bf16_change_vs_1_device"] = ratio(
      row["int4_vs_bf16_tokens_per_s"], one_ratio) - 1
  for name in MODELS:
    row[name]["scaling_efficiency"] = row[name]["tokens_per_s"] / (
        n * one[name]["tokens_per_s"])
  kb, ki = (b["collectives"]["kernel_gather_bytes"],
            i["collectives"]["kernel_gather_bytes"])
  row["kernel_gather_bytes_int4_vs_bf16"] = ratio(ki, kb)
  row["kernel_gather_bytes_int4_vs_bf16_at_bf16"] = ratio(
      i["collectives"]["kernel_gather_bytes_at_bf16"],
      b["collectives"]["kernel_gather_bytes_at_bf16"])
  eb, ei = (b["collectives"]["kernel_gather_result_bytes_at_bf16"],
            i["collectives"]["kernel_gather_result_bytes_at_bf16"])
  row["largest_kernel_gather_int4_vs_bf16"] = ratio(max(ei, default=None),
                                                     max(eb, default=None))


def print_table(report):
  n = report["settings"]["devices"]
  one = report["one_device"]
  print(f"\n1 device: bf16 {one['bf16']['tokens_per_s']:.0f} tokens/s, int4"
        f" {one['int4']['tokens_per_s']:.0f} tokens/s, int4/bf16"
        f" {ratio(one['int4']['tokens_per_s'], one['bf16']['tokens_per_s']):.3f}")
  header = (f"{'layout':>11} | {'mesh':>16} | {'bf16 tok/s':>10} | {'int4 tok/s':>10} |"
            f" {'int4/bf16':>9} | {'eff bf16/int4':>13} | {'kernel gather MiB bf16/int4':>27} |"
            f" {'loss diff':>9}")
  print(f"\n{n} devices\n" + header + "\n" + "-" * len(header))
  mib = lambda v: v / 2**20
  for layout, row in report["layouts"].items():
    if "int4_vs_bf16_tokens_per_s" not in row:
      print(f"{layout:>11} | FAILED: " + "; ".join(
          f"{m}: {row[m]['error'][:200]}" for m in MODELS if "error" in row.get(m, {})))
      continue
    b, i = row["bf16"], row["int4"]
    print(f"{layout:>11} | {row['mesh']:>16} | {b['tokens_per_s']:10.0f} |"
          f" {i['tokens_per_s']:10.0f} | {row['int4_vs_bf16_tokens_per_s']:8.3f}x |"
          f" {b['scaling_efficiency']:6.2f}/{i['scaling_efficiency']:<6.2f} |"
          f" {mib(b['collectives']['kernel_gather_bytes']):13.3f}/"
          f"{mib(i['collectives']['kernel_gather_bytes']):<13.3f} |"
          f" {i['check']['abs_diff']:9.2e}")


def plot(args, report, name):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = {k: v for k, v in report["layouts"].items()
          if "int4_vs_bf16_tokens_per_s" in v}
  labels = ["1 device"] + list(rows)
  one = report["one_device"]
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  x = np.arange(len(labels))
  for k, m in enumerate(MODELS):
    tps = [one[m]["tokens_per_s"]] + [r[m]["tokens_per_s"] for r in rows.values()]
    ax0.bar(x + (k - 0.5) * 0.4, tps, 0.4, label=m)
  ax0.set_xticks(x, labels, fontsize=8)
  ax0.set_ylabel("tokens/s")
  ax0.set_title(f"train step, D={args.hidden}, {args.layers} blocks,"
                f" {args.devices} x {report['environment']['device']}", fontsize=9)
  ax0.legend(fontsize=8)
  x = np.arange(len(rows))
  for k, m in enumerate(MODELS):
    gb = [r[m]["collectives"]["kernel_gather_bytes"] / 2**20 for r in rows.values()]
    ax1.bar(x + (k - 0.5) * 0.4, gb, 0.4, label=m)
  ax1.set_xticks(x, list(rows), fontsize=8)
  ax1.set_ylabel("MiB per step")
  ax1.set_title("kernel all-gathers per step (compiled HLO)", fontsize=9)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(args.out_dir, f"{name}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.devices is None:
    args.devices = jax.device_count()
  if "fsdp_tensor" in args.layouts and (args.devices < 4 or args.devices % 2):
    raise SystemExit("--layouts fsdp_tensor needs an even --devices >= 4")
  start = time.perf_counter()
  env = common.environment(args.engine)
  name = f"bench_multi_{env['backend']}"
  report = {
      "benchmark": "GPT train step (jit of fwd + bwd + adamw, donated state) on"
                   " a device mesh per layout: int4ify(model) vs the bf16 model",
      "environment": env,
      "settings": {k: getattr(args, k) for k in (
          "hidden", "heads", "layers", "seq_len", "batch", "vocab", "steps",
          "warmup", "devices", "layouts", "engine", "backward")},
      "targets": TARGETS,
      "one_device": {},
      "layouts": {},
  }
  report["settings"].update(
      batch_meaning="sequences per device of the 'data' axis (global batch ="
                    " batch x data axis size)",
      statistic="median of the timed steps",
      dtype="float32 master weights, bfloat16 compute",
      keep_in_float="lm_head (and the nn.Embed embeddings)")
  failed = False
  for m in MODELS:
    report["one_device"][m] = measure(args, m, None, None)
    print(f"  1 device {m}: {report['one_device'][m]['median_ms']:.2f} ms/step,"
          f" {report['one_device'][m]['tokens_per_s']:.0f} tokens/s", flush=True)
  for layout in args.layouts:
    axes = mesh_axes(layout, args.devices)
    row = {"mesh": ",".join(f"{a}={s}" for a, s in axes)}
    mesh = make_mesh(axes)
    for m in MODELS:
      try:
        row[m] = measure(args, m, mesh, layout)
        print(f"  {layout} {m}: {row[m]['median_ms']:.2f} ms/step,"
              f" {row[m]['tokens_per_s']:.0f} tokens/s, kernel gathers"
              f" {row[m]['collectives']['kernel_gather_bytes']} B, loss diff"
              f" {row[m]['check']['abs_diff']:.2e}", flush=True)
      except Exception as e:  # recorded; the script exits 1
        failed = True
        row[m] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {layout} {m}: FAILED: {row[m]['error'][:500]}", file=sys.stderr,
              flush=True)
    summarize(row, report["one_device"], args.devices)
    report["layouts"][layout] = row
    common.write(args.out_dir, name, report)
  report["total_s"] = time.perf_counter() - start
  json_path = common.write(args.out_dir, name, report)
  print_table(report)
  png_path = plot(args, report, name)
  print(f"\nwrote {json_path} and {png_path}")
  return 1 if failed else 0


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--hidden", type=int, default=4096, help="model width D")
  p.add_argument("--heads", type=int, default=None,
                 help="attention heads (default D / 128); a multiple of the"
                      " 'model' axis, heads of whole Hadamard blocks")
  p.add_argument("--layers", type=int, default=2, help="Transformer blocks")
  p.add_argument("--seq-len", type=int, default=2048, help="sequence length")
  p.add_argument("--batch", type=int, default=8,
                 help="sequences per device of the 'data' axis")
  p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps per (layout, model) (the median is reported)")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after compilation")
  p.add_argument("--devices", type=int, default=None,
                 help="devices N of the mesh (default: all)")
  p.add_argument("--layouts", type=common.comma_list(str),
                 default=["data", "tensor", "fsdp"],
                 help=f"comma-separated, of {','.join(LAYOUTS)}")
  p.add_argument("--engine", default="auto", choices=jint4.config.ENGINES,
                 help="Int4Config.engine of the int4 model")
  p.add_argument("--backward", default="auto", choices=jint4.config.BACKWARD_MODES,
                 help="Int4Config.backward of the int4 model")
  p.add_argument("--out-dir", default=os.path.join(_HERE, "results"),
                 help="where the JSON/PNG go")
  args = p.parse_args(argv)
  if args.heads is None:
    args.heads = max(1, args.hidden // 128)
  if args.hidden % args.heads:
    p.error(f"--heads ({args.heads}) must divide --hidden ({args.hidden})")
  bad = [l for l in args.layouts if l not in LAYOUTS]
  if bad or not args.layouts:
    p.error(f"--layouts: unknown {bad}; choose from {','.join(LAYOUTS)}")
  if min(args.layers, args.seq_len, args.batch, args.vocab, args.steps) < 1 \
      or args.warmup < 0 or (args.devices is not None and args.devices < 1):
    p.error("--layers, --seq-len, --batch, --vocab, --steps, --devices must be"
            " >= 1, --warmup >= 0")
  return args


if __name__ == "__main__":
  sys.exit(main())
