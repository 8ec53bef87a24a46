"""Benchmark the three INT4 operators of a linear layer, stage by stage.

The paper's Fig. 4 (operator speed vs an FP16 GEMM of the same shape) and
Fig. 6 (time breakdown). For x[N, D], a kernel[D, C] and an output gradient
g[N, C] (bf16), each operator includes all of its quantization work:

  HQ-MM      y = x @ kernel:   quantize x (Hadamard + LSQ + residual),
             quantize the kernel (both layouts: [C, D] for this GEMM, and
             [D, C], kept for the dX GEMM), INT4 GEMM + dequantize.
  LSS-Act    dX = g W:         bit split (stacked halves + norms), sampling,
             gather of the kept rows, INT4 GEMM (1/p row scales in the
             epilogue), scatter to tokens + STE mask + Hadamard^T (lsq_backward).
  LSS-Weight dW = g^T X:       leverage scores + sampling, re-split of the
             weighted kept rows (transposed), kept activation rows decoded
             from the residual (transposed), INT4 GEMM, the kernel's STE mask
             + Hadamard^T.
  BS-Act / BS-Weight: the same with every row kept (``backward="bitsplit"``):
             one joined bit split (v and v^T) serves both GEMMs.
The dX operators use the kernel's [D, C] codes from HQ-MM's pass, as the
layer does.

Each is timed whole (one jit) and per stage (one jit per stage, its inputs
precomputed), against a bf16 dot of the same shape with bf16 output, all in
the same run: median of ``--repeats`` device-synchronized runs after warm-up.
Speed-up = bf16 ms / op ms (> 1: INT4 faster).

    PYTHONPATH=. python benchmarks/bench_ops.py                 # GPU: 8192^3 ...
    PYTHONPATH=. python benchmarks/bench_ops.py --shapes 512,256,256 --repeats 3

Writes ``<out-dir>/bench_ops_<platform>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from jint4 import kernels  # noqa: E402
from jint4.kernels import contract  # noqa: E402
from jint4.quant import lss  # noqa: E402

BLOCK = 32
QN = QP = 7


def _stages(eng, n, d, c, pad_multiple=None):
  """Stage functions of each operator: name -> [(stage, fn, input names)].

  ``pad_multiple``: LSS-Weight's kept-row slots are padded to a multiple of
  this (default: the engine's ``gemm_k_multiple``, as the layer does).
  """
  budget = lss.budget_rows(n, 1.0)
  pad = eng.gemm_k_multiple if pad_multiple is None else pad_multiple

  def quant_x(x, sx, seeds):
    return eng.hadamard_quantize(x, sx, block=BLOCK, qn=QN, qp=QP, seed=seeds[0])

  def quant_w(w, sw):  # both layouts: q_w^T is kept for the backward's dX GEMM
    return eng.hadamard_quantize_weight(w, sw, block=BLOCK, qn=QN, qp=QP)

  def gemm_fwd(qx, qw, sx, sw, res, col_poison):
    return eng.int_gemm(qx, qw, scale=sx * sw, row_scale=res.row_flag,
                        col_bias=col_poison, out_dtype=jnp.bfloat16)

  def split(g, seeds):
    return eng.bit_split(g, seeds[1])

  def sample_act(norms, seeds):
    u = contract.uniform(seeds[2], (2,))
    return lss.sample_rows(norms, budget, u[0])

  def gemm_act(g2, index, weight, s_hi, s_lo, qwt, sw):
    rows = jnp.take(g2, index, axis=0)
    return eng.int_gemm(rows, qwt, scale=sw,
                        row_scale=weight * jnp.where(index >= n, s_lo, s_hi))

  def finish_act(part, index, weight, res):
    target = jnp.where(weight > 0, index, 2 * n)
    slots = jnp.full((2 * n,), -1, jnp.int32).at[target].set(
        jnp.arange(index.shape[0], dtype=jnp.int32), mode="drop").reshape(2, n)
    return eng.lsq_backward(part, res, qn=QN, qp=QP, slots=slots, block=BLOCK,
                            out_dtype=jnp.bfloat16)

  def sample_weight(norms, res, seeds):
    u = contract.uniform(seeds[2], (2,))
    # As the layer does: the kept rows are the GEMM's reduction dim, padded
    # to its K tile (B + 1 slots would make every stage below unaligned).
    return lss.pad_slots(*lss.sample_rows(
        norms * jnp.concatenate([res.norms, res.norms]), budget, u[1]), pad)

  def resplit(g2, index2, weight2, s_hi, s_lo, seeds):
    return eng.resplit_rows(g2, index2, weight2 * jnp.where(index2 >= n, s_lo, s_hi),
                            seeds[3])

  def decode_rows(res, index2):
    return eng.residual_values(res, (n, d), qn=QN, qp=QP, rows=index2 % n, transpose=True)

  def gemm_weight(qxt, vt, s_lo2, sx):
    return eng.int_gemm(qxt, vt, scale=s_lo2 * sx, int4=False)

  def finish_weight(dw, w, sw):
    return eng.lsq_weight_backward(dw, w, sw, block=BLOCK, qn=QN, qp=QP)

  def split_joined(g, seeds):
    return eng.bit_split_joined(g, seeds[1])

  def gemm_bs_act(v, qwt, s_lo, sw):
    return eng.int_gemm(v, qwt, scale=s_lo * sw, int4=False)

  def finish_bs_act(dxh, res):
    return eng.lsq_backward(dxh, res, qn=QN, qp=QP, block=BLOCK, out_dtype=jnp.bfloat16)

  def decode_all(res):
    return eng.residual_values(res, (n, d), qn=QN, qp=QP, transpose=True)

  def gemm_bs_weight(qxt, vt, s_lo, sx):
    return eng.int_gemm(qxt, vt, scale=s_lo * sx, int4=False)

  return {
      "HQ-MM": [("quantize x", quant_x, ("x", "sx", "seeds"), ("qx", "res")),
                ("quantize w (both layouts)", quant_w, ("w", "sw"),
                 ("qw", "qwt", "col_poison")),
                ("GEMM", gemm_fwd, ("qx", "qw", "sx", "sw", "res", "col_poison"), ("y",))],
      "LSS-Act": [("bit split", split, ("g", "seeds"), ("g2", "s_hi", "s_lo", "norms")),
                  ("sampling", sample_act, ("norms", "seeds"), ("index", "weight")),
                  ("gather + GEMM", gemm_act,
                   ("g2", "index", "weight", "s_hi", "s_lo", "qwt", "sw"), ("part",)),
                  ("scatter + LSQ bwd + H^T", finish_act, ("part", "index", "weight", "res"),
                   ("dx", "dsx"))],
      "LSS-Weight": [("sampling", sample_weight, ("norms", "res", "seeds"),
                      ("index2", "weight2")),
                     ("re-split rows", resplit,
                      ("g2", "index2", "weight2", "s_hi", "s_lo", "seeds"),
                      ("vt2", "s_hi2", "s_lo2")),
                     ("decode x rows", decode_rows, ("res", "index2"), ("qxt2",)),
                     ("GEMM", gemm_weight, ("qxt2", "vt2", "s_lo2", "sx"), ("dw",)),
                     ("LSQ bwd + H^T (w)", finish_weight, ("dw", "w", "sw"), ("dk", "dsw"))],
      "BS-Act": [("joined bit split", split_joined, ("g", "seeds"),
                  ("v", "vt", "s_hi_j", "s_lo_j")),
                 ("GEMM", gemm_bs_act, ("v", "qwt", "s_lo_j", "sw"), ("dxh",)),
                 ("LSQ bwd + H^T", finish_bs_act, ("dxh", "res"), ("dx_bs", "dsx_bs"))],
      "BS-Weight": [("decode x^T", decode_all, ("res",), ("qxt",)),
                    ("GEMM", gemm_bs_weight, ("qxt", "vt", "s_lo_j", "sx"), ("dw_bs",)),
                    ("LSQ bwd + H^T (w)", finish_weight, ("dw_bs", "w", "sw"),
                     ("dk_bs", "dsw_bs"))],
  }


def _bf16_dot(op, n, d, c):
  lhs, rhs, dims = {"HQ-MM": ((n, d), (d, c), (((1,), (0,)), ((), ()))),
                    "LSS-Act": ((n, c), (d, c), (((1,), (1,)), ((), ()))),
                    "BS-Act": ((n, c), (d, c), (((1,), (1,)), ((), ()))),
                    "LSS-Weight": ((n, d), (n, c), (((0,), (0,)), ((), ()))),
                    "BS-Weight": ((n, d), (n, c), (((0,), (0,)), ((), ())))}[op]
  k1, k2 = jax.random.split(jax.random.key(9))
  a = jax.random.normal(k1, lhs, jnp.bfloat16)
  b = jax.random.normal(k2, rhs, jnp.bfloat16)
  fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.bfloat16))
  return fn, (a, b)


def make_inputs(eng, n, d, c):
  """The first stages' inputs: x[N, D] and g[N, C] bf16, a kernel[D, C] f32."""
  keys = jax.random.split(jax.random.key(0), 3)
  return {"x": jax.random.normal(keys[0], (n, d), jnp.bfloat16),
          "w": (jax.random.normal(keys[1], (d, c), jnp.float32) * 0.02),
          "g": jax.random.normal(keys[2], (n, c), jnp.bfloat16) * 1e-3,
          "sx": jnp.float32(0.3), "sw": jnp.float32(0.005),
          "seeds": contract.seeds_from_key(jax.random.key(1), 6)}


def run_shape(eng, n, d, c, repeats, pad_multiple=None):
  env = make_inputs(eng, n, d, c)
  stages = _stages(eng, n, d, c, pad_multiple)
  out = {}
  for op, steps in stages.items():
    # Materialize every stage's inputs (outputs of earlier stages).
    per_stage = []
    for name, fn, ins, outs in steps:
      jf = jax.jit(fn)
      res = jf(*[env[i] for i in ins])
      res = res if isinstance(res, tuple) else (res,)
      env.update(zip(outs, res))
      t = common.time_fn(jf, [env[i] for i in ins], repeats=repeats)
      per_stage.append({"stage": name, **t})

    def whole(*args, steps=steps, names=tuple(env)):
      local = dict(zip(names, args))
      for _, fn, ins, outs in steps:
        r = fn(*[local[i] for i in ins])
        local.update(zip(outs, r if isinstance(r, tuple) else (r,)))
      return local[steps[-1][3][0]]

    names = tuple(env)
    whole_t = common.time_fn(jax.jit(whole), [env[k] for k in names], repeats=repeats)
    dot_fn, dot_args = _bf16_dot(op, n, d, c)
    dot_t = common.time_fn(dot_fn, dot_args, repeats=repeats)
    out[op] = {"int4_ms": whole_t["median_ms"], "bf16_ms": dot_t["median_ms"],
               "speedup": dot_t["median_ms"] / whole_t["median_ms"], "stages": per_stage}
  return out


def compare_engines(n, d, c, repeats):
  """Each engine op on the native and the reference engine: the "auto" policy.

  Returns op -> {"native_ms", "reference_ms", "faster"} for representative
  inputs of a layer x[N, D] @ kernel[D, C].
  """
  nat, ref = kernels.get_engine("native"), kernels.get_engine("reference")
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (n, d), jnp.bfloat16)
  w = jax.random.normal(keys[1], (d, c), jnp.float32) * 0.02
  g = jax.random.normal(keys[2], (n, c), jnp.bfloat16) * 1e-3
  seeds = contract.seeds_from_key(jax.random.key(1), 6)
  qx, res = jax.jit(lambda x: ref.hadamard_quantize(x, jnp.float32(0.3), block=BLOCK, qn=QN,
                                                     qp=QP, seed=seeds[0]))(x)
  qwt = jax.jit(lambda w: ref.hadamard_quantize(w, jnp.float32(0.005), block=BLOCK, qn=QN,
                                                 qp=QP, axis=0)[0])(w)
  g2 = jax.jit(lambda g: ref.bit_split(g, seeds[1])[0])(g)
  rows = jnp.arange(0, 2 * n, 2, dtype=jnp.int32)
  dxh = jax.random.normal(keys[0], (n, d), jnp.float32)
  dwt = jax.random.normal(keys[1], (d, c), jnp.float32)
  cases = {
      "hadamard_quantize": lambda e: (lambda x: e.hadamard_quantize(
          x, jnp.float32(0.3), block=BLOCK, qn=QN, qp=QP, seed=seeds[0]), (x,)),
      "hadamard_quantize_weight": lambda e: (lambda w: e.hadamard_quantize_weight(
          w, jnp.float32(0.005), block=BLOCK, qn=QN, qp=QP), (w,)),
      "residual_values": lambda e: (lambda r: e.residual_values(
          r, (n, d), qn=QN, qp=QP, transpose=True), (res,)),
      "lsq_backward": lambda e: (lambda t, r: e.lsq_backward(
          t, r, qn=QN, qp=QP, block=BLOCK, out_dtype=jnp.bfloat16), (dxh, res)),
      "lsq_weight_backward": lambda e: (lambda t, w: e.lsq_weight_backward(
          t, w, jnp.float32(0.005), block=BLOCK, qn=QN, qp=QP), (dwt, w)),
      "bit_split": lambda e: (lambda g: e.bit_split(g, seeds[1]), (g,)),
      "bit_split_joined": lambda e: (lambda g: e.bit_split_joined(g, seeds[1]), (g,)),
      "resplit_rows": lambda e: (lambda g2, r: e.resplit_rows(
          g2, r, jnp.ones(r.shape, jnp.float32), seeds[3]), (g2, rows)),
      "int_gemm": lambda e: (lambda a, b: e.int_gemm(
          a, b, scale=jnp.float32(1e-3), out_dtype=jnp.bfloat16), (qx, qwt.T)),
  }
  table = {}
  for op, make in cases.items():
    times = {}
    for name, eng in (("native", nat), ("reference", ref)):
      fn, fargs = make(eng)
      times[name] = common.time_fn(jax.jit(fn), fargs, repeats=repeats)["median_ms"]
    table[op] = {"native_ms": times["native"], "reference_ms": times["reference"],
                 "faster": min(times, key=times.get)}
  return table


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default=None,
                 help="';'-separated N,D,C triples (default: GPU 8192,8192,8192;"
                      "16384,4096,4096;16384,4096,16384 / CPU 1024,512,512)")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--engine", default="auto", choices=("auto", "native", "reference"))
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--pad-multiple", type=int, default=None,
                 help="pad LSS-Weight's kept-row slots (its GEMM's K) to a multiple of"
                      " this; default: the engine's GEMM K tile (128 on CUDA, 1 on CPU);"
                      " 1 turns the padding off")
  p.add_argument("--compare", default=None,
                 help="N,D,C at which to time every engine op on both engines (the"
                      " measurement behind jint4.kernels.AUTO_POLICY); default: the first"
                      " shape on GPU, skipped on CPU")
  args = p.parse_args()
  if args.pad_multiple is not None and args.pad_multiple < 1:
    p.error("--pad-multiple must be >= 1")
  gpu = jax.default_backend() == "gpu"
  text = args.shapes or ("8192,8192,8192;16384,4096,4096;16384,4096,16384" if gpu
                         else "1024,512,512")
  shapes = [tuple(int(v) for v in s.split(",")) for s in text.split(";") if s]
  eng = kernels.get_engine(args.engine)
  pad = eng.gemm_k_multiple if args.pad_multiple is None else args.pad_multiple
  results = {"environment": common.environment(args.engine), "block": BLOCK,
             "lss_weight_pad_multiple": pad, "shapes": {}}
  platform = "gpu" if gpu else jax.default_backend()
  for n, d, c in shapes:
    label = f"{n}x{d}->{c}"
    results["shapes"][label] = r = run_shape(eng, n, d, c, args.repeats, args.pad_multiple)
    print(f"\n== N={n} D={d} C={c} (ms, median of {args.repeats}) ==")
    print(f"{'operator':12s} {'INT4':>9s} {'bf16 dot':>9s} {'speed-up':>9s}   stages")
    for op, v in r.items():
      st = ", ".join(f"{s['stage']} {s['median_ms']:.3f}" for s in v["stages"])
      print(f"{op:12s} {v['int4_ms']:9.3f} {v['bf16_ms']:9.3f} {v['speedup']:8.2f}x   {st}")
    common.write(args.out_dir, f"bench_ops_{platform}", results)
  compare = args.compare or (text.split(";")[0] if gpu else None)
  if compare:
    n, d, c = (int(v) for v in compare.split(","))
    results["engine_ops"] = table = compare_engines(n, d, c, args.repeats)
    print(f"\n== engine ops at N={n} D={d} C={c}: native vs reference (ms) ==")
    for op, v in table.items():
      print(f"{op:18s} native {v['native_ms']:8.3f}  reference {v['reference_ms']:8.3f}"
            f"  -> {v['faster']}")
    common.write(args.out_dir, f"bench_ops_{platform}", results)
  labels = [f"{op}\n{s}" for s in results["shapes"] for op in results["shapes"][s]]
  speed = [v["speedup"] for s in results["shapes"].values() for v in s.values()]
  common.bar_plot(args.out_dir, f"bench_ops_{platform}", labels, {"INT4 / bf16 dot": speed},
                  "speed-up vs bf16 dot (x)", "INT4 operators incl. quantization", hline=1.0)
  print(f"\nwrote {os.path.join(args.out_dir, f'bench_ops_{platform}.json')}")


if __name__ == "__main__":
  main()
