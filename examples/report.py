"""The comparison grid: every example x every quant mode x several seeds.

Runs each cell as its own process (`train_gpt.py`, `train_bert.py`,
`train_vit.py` with ``--quant``, ``--seed`` and ``--out-dir``), then writes
``docs/RESULTS.md``: each stage's final held-out loss / accuracy as mean +- std
over seeds, the ratio to float (paired by seed), and the mean curves as PNGs.

    python examples/report.py                       # the whole grid, CPU size
    python examples/report.py --examples gpt --seeds 3 --jobs 2
    python examples/report.py --size gpu           # bigger models, more steps
    python examples/report.py --jobs 10            # on a GPU: cells share it
    python examples/report.py --examples width     # the pre-training gap against width
    python examples/report.py --summarize-only     # rebuild RESULTS.md

The grid is resumable: a finished cell (its metrics.json reaches the last
step) is not run again, and an interrupted one continues from its latest
checkpoint (``--resume``), on the same curve. Cells with a ``long`` stage run
the long-horizon comparison: 10x the default steps at a small width, to see
whether the INT4 gap grows with training tokens.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("fp", "hq_lss", "hq_bitsplit", "hq_only", "lsq_luq")
PAPER_MODES = ("hq_lss", "hq_bitsplit")  # the targets: within 2% of fp, ahead of lsq_luq
WIDTH_MODES = ("fp", *PAPER_MODES)
# The GPT stages' GPU size beside their width (--d-model: 4x the CPU's).
GPT_GPU_ARGV = ("--layers", "6", "--heads", "8", "--seq-len", "256", "--batch", "64",
                "--steps", "5000", "--eval-every", "500")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
  """One row group of the grid: a script, its arguments, the modes it runs."""
  name: str
  title: str
  script: str
  argv: Tuple[str, ...] = ()
  gpu_argv: Tuple[str, ...] = ()
  modes: Tuple[str, ...] = MODES
  seeds: Optional[int] = None           # None: --seeds
  init_from: Optional[str] = None       # a stage whose fp run (same seed) it starts from
  metric: str = "eval_loss"             # lower is better; eval_accuracy is also shown


STAGES: Dict[str, Tuple[Stage, ...]] = {
    "gpt": (
        Stage(name="gpt", title="GPT pre-training (byte-level LM, Bible text)",
              script="train_gpt.py", gpu_argv=("--d-model", "512", *GPT_GPU_ARGV)),
        Stage(name="gpt_long", title="GPT pre-training, long horizon (10x steps, width 64)",
              script="train_gpt.py", modes=("fp", "hq_lss", "hq_bitsplit"), seeds=1,
              argv=("--d-model", "64", "--steps", "6000", "--eval-every", "500"),
              gpu_argv=("--d-model", "256", "--steps", "50000", "--eval-every", "2500")),
    ),
    "bert": (
        Stage(name="bert_pretrain", title="BERT MLM pre-training (Bible text)",
              script="train_bert.py", argv=("--stage", "pretrain")),
        Stage(name="bert_finetune",
              title="BERT fine-tuning of the float pre-trained model (verse division, 6 classes)",
              script="train_bert.py", argv=("--stage", "finetune"),
              init_from="bert_pretrain", metric="eval_loss"),
    ),
    "vit": (
        # Six seeds: one scan of the 355 held out is 0.28 accuracy points.
        Stage(name="vit", title="ViT on scikit-learn's digits (10 classes)",
              script="train_vit.py", seeds=6),
    ),
    # Not in the default --examples: how the pre-training gap depends on the
    # model's width: the GPT stage at half and at twice its width, BERT
    # pre-training at twice.
    "width": (
        *(Stage(name=f"gpt_w{w}", title=f"GPT pre-training at width {w} ({label} the gpt stage's)",
                script="train_gpt.py", modes=WIDTH_MODES, argv=("--d-model", str(w)),
                gpu_argv=("--d-model", str(4 * w), *GPT_GPU_ARGV))
          for w, label in ((64, "half"), (256, "twice"))),
        # At the bert_pretrain stage's 2e-3, float BERT (post-LN) at width 256
        # is still on the early loss plateau after 400 steps (2.70; 1.78 at 1e-3).
        Stage(name="bert_pretrain_w256",
              title="BERT MLM pre-training at width 256 (twice the bert_pretrain stage's)",
              script="train_bert.py", modes=WIDTH_MODES,
              argv=("--stage", "pretrain", "--d-model", "256", "--lr", "1e-3")),
    ),
}
DEFAULT_EXAMPLES = ("gpt", "bert", "vit")
STAGES_BY_NAME = {s.name: s for group in STAGES.values() for s in group}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--examples", default=",".join(DEFAULT_EXAMPLES),
                 help="comma-separated: " + ", ".join(STAGES))
  p.add_argument("--stages", default="", help="only these stages (comma-separated)")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--size", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--jobs", type=int, default=1, help="cells run at once")
  p.add_argument("--single-thread", action="store_true",
                 help="one CPU thread per cell (XLA's Eigen pool off): with"
                      " --jobs = cores, small models use the cores best")
  p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "grid"))
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "RESULTS.md"))
  p.add_argument("--summarize-only", action="store_true")
  p.add_argument("--diagnose-stage", default="gpt",
                 help="the stage whose final INT4 weights jint4.diagnose examines")
  p.add_argument("--diagnose-mode", default="hq_lss")
  p.add_argument("--extra", default="", help="more arguments for every cell")
  return p.parse_args(argv)


def selected_stages(args) -> List[Stage]:
  names = [e for e in args.examples.split(",") if e]
  unknown = [e for e in names if e not in STAGES]
  if unknown:
    raise SystemExit(f"--examples: unknown {unknown}; choose from {list(STAGES)}")
  stages = [s for e in names for s in STAGES[e]]
  if args.stages:
    wanted = set(args.stages.split(","))
    stages = [s for s in stages if s.name in wanted]
  return stages


def cell_dir(args, stage: Stage, mode: str, seed: int) -> str:
  return os.path.join(args.runs_dir, args.size, stage.name, mode, f"seed{seed}")


def _done(path: str) -> bool:
  try:
    with open(os.path.join(path, "metrics.json")) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return False
  return m["history"][-1]["step"] >= m["args"]["steps"]


def cells(args, stage: Stage):
  modes = [m for m in stage.modes if m in args.modes.split(",")]
  for seed in range(stage.seeds or args.seeds):
    for mode in modes:
      yield mode, seed


def command(args, stage: Stage, mode: str, seed: int) -> List[str]:
  cmd = [sys.executable, os.path.join(HERE, stage.script), *stage.argv]
  if args.size == "gpu":
    cmd += stage.gpu_argv
  cmd += ["--quant", mode, "--seed", str(seed), "--out-dir", cell_dir(args, stage, mode, seed),
          "--no-progress", "--resume", *args.extra.split()]
  if stage.init_from:
    source = STAGES_BY_NAME[stage.init_from]
    cmd += ["--init-from", cell_dir(args, source, "fp", seed)]
  return cmd


def cell_env(args, environ) -> Dict[str, str]:
  """A cell's environment: ``environ`` with one CPU thread per cell on
  request, and, when cells run at once, each allocating GPU memory as it
  needs it (JAX's default takes most of the GPU for the first process,
  leaving the others out of memory); a value the caller set is kept."""
  env = dict(environ)
  if args.single_thread:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  if args.jobs > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  return env


def run_cell(args, stage: Stage, mode: str, seed: int) -> Tuple[str, float, int]:
  path = cell_dir(args, stage, mode, seed)
  if _done(path):
    return path, 0.0, 0
  os.makedirs(path, exist_ok=True)
  env = cell_env(args, os.environ)
  tic = time.time()
  with open(os.path.join(path, "log.txt"), "a") as log:
    rc = subprocess.call(command(args, stage, mode, seed), stdout=log,
                         stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  return path, time.time() - tic, rc


def run_grid(args, stages: Sequence[Stage]) -> None:
  # A stage that starts from another's fp checkpoint waits for it.
  for group in ([s for s in stages if not s.init_from],
                [s for s in stages if s.init_from]):
    work = [(s, m, seed) for s in group for m, seed in cells(args, s)]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
      for path, seconds, rc in pool.map(lambda c: run_cell(args, *c), work):
        status = "ok" if rc == 0 else f"FAILED (exit {rc}; see {path}/log.txt)"
        if seconds:
          print(f"{os.path.relpath(path, args.runs_dir)}: {seconds:.0f}s {status}", flush=True)


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------

def load(args, stage: Stage):
  """{mode: {seed: metrics}} of the finished cells."""
  out: Dict[str, Dict[int, dict]] = {}
  for mode, seed in cells(args, stage):
    path = cell_dir(args, stage, mode, seed)
    if _done(path):
      with open(os.path.join(path, "metrics.json")) as f:
        out.setdefault(mode, {})[seed] = json.load(f)
  return out


def _mean_std(xs) -> str:
  xs = np.asarray(xs, float)
  return f"{xs.mean():.4f} ± {xs.std(ddof=1) if len(xs) > 1 else 0.0:.4f}"


def stage_table(stage: Stage, runs) -> List[str]:
  fp = runs.get("fp", {})
  has_acc = any("eval_accuracy" in m["final"] for r in runs.values() for m in r.values())
  head = ["mode", "seeds", "eval loss", "ratio to fp"]
  if has_acc:
    head += ["accuracy", "Δ acc vs fp (points)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for mode in stage.modes:
    if mode not in runs:
      continue
    seeds = sorted(runs[mode])
    loss = [runs[mode][s]["final"]["eval_loss"] for s in seeds]
    paired = [s for s in seeds if s in fp]
    ratio = [runs[mode][s]["final"]["eval_loss"] / fp[s]["final"]["eval_loss"] for s in paired]
    row = [mode, str(len(seeds)), _mean_std(loss),
           "-" if mode == "fp" or not ratio else
           f"{np.mean(ratio):.4f} ({(np.mean(ratio) - 1) * 100:+.1f}%)"]
    if has_acc:
      acc = [runs[mode][s]["final"].get("eval_accuracy", np.nan) for s in seeds]
      dacc = [100 * (runs[mode][s]["final"]["eval_accuracy"] - fp[s]["final"]["eval_accuracy"])
              for s in paired]
      row += [_mean_std(acc), "-" if mode == "fp" or not dacc else f"{np.mean(dacc):+.2f}"]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def measured_on(runs) -> str:
  """The machines (and dates, versions) the runs of a stage recorded, most
  runs first; "not recorded" for runs that predate the record."""
  return _tally(m.get("machine", "not recorded") for r in runs.values() for m in r.values())


def engines_used(runs) -> str:
  """The jint4 engine that ran the INT4 runs' ops (`trainer.engine_used`),
  most runs first; "" where no run recorded one (float runs, older runs)."""
  return _tally(m["engine"] for r in runs.values() for m in r.values() if m.get("engine"))


def _tally(values) -> str:
  """"a" where every value is a, else "a (3 runs); b (1 runs)", most first."""
  counts = collections.Counter(values)
  return "; ".join(v if len(counts) == 1 else f"{v} ({n} runs)" for v, n in counts.most_common())


def verdicts(stage: Stage, runs) -> List[str]:
  """The targets, checked: within 2% of fp and ahead of lsq_luq."""
  if "fp" not in runs:
    return []
  out = []
  fp = runs["fp"]
  # The mean over seeds of each seed's loss ratio to fp, as in the table.
  gap = lambda m: np.mean([r["final"]["eval_loss"] / fp[s]["final"]["eval_loss"]
                           for s, r in runs[m].items() if s in fp]) - 1
  for mode in PAPER_MODES:
    if mode not in runs:
      continue
    line = (f"- {mode}: {gap(mode):+.1%} of fp's loss"
            f" ({'within' if gap(mode) <= 0.02 else 'MISSES'} the 2% target)")
    if "lsq_luq" in runs:
      ahead = gap(mode) < gap("lsq_luq")
      line += f"; {'ahead of' if ahead else 'BEHIND'} lsq_luq ({gap('lsq_luq'):+.1%})"
    out.append(line)
  return out


def plot_stage(stage: Stage, runs, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for mode in stage.modes:
    if mode not in runs:
      continue
    hs = [r["history"] for r in runs[mode].values()]
    steps = [h["step"] for h in hs[0] if "eval_loss" in h and h["step"] > 0]
    ys = np.array([[next(p["eval_loss"] for p in h if p["step"] == s) for s in steps]
                   for h in hs])
    ax.plot(steps, ys.mean(0), label=f"{mode} ({len(hs)} seeds)")
    if len(hs) > 1:
      ax.fill_between(steps, ys.min(0), ys.max(0), alpha=0.15)
  ax.set_xlabel("step")
  ax.set_ylabel("held-out loss")
  ax.set_title(stage.title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _example_module(script: str):
  import importlib.util
  name = os.path.splitext(script)[0]
  if name not in sys.modules:
    sys.path.insert(0, HERE)
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, script))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its Flax modules (dataclasses) look it up
    spec.loader.exec_module(module)
  return sys.modules[name]


def diagnose_cell(args, stage: Stage, mode: str, seed: int, png: str) -> Optional[str]:
  """`jint4.diagnose` on a finished cell's final checkpoint: its table as text
  (None when the cell has not run), and the PNG."""
  import jax
  import jint4
  path = cell_dir(args, stage, mode, seed)
  if not _done(path):
    return None
  module = _example_module(stage.script)
  trainer = sys.modules["trainer"]
  argv = [*stage.argv, *(stage.gpu_argv if args.size == "gpu" else ()), *args.extra.split(),
          "--quant", mode, "--seed", str(seed)]
  if stage.init_from:
    source = STAGES_BY_NAME[stage.init_from]
    argv += ["--init-from", cell_dir(args, source, "fp", seed)]
  ex = module.parse_args(argv)
  task = module.task(ex)
  model, initial = trainer.build(task, trainer.quant_config(ex), seed, keep=ex.keep)
  params = trainer.load_params(path)
  batch = {k: np.asarray(v)[:8] for k, v in task.eval_batches[0].items()}
  rows = jint4.diagnose(model, {**initial, "params": params}, batch["inputs"],
                        lambda out, b: task.loss_fn(out, b)[0], batch,
                        key=jax.random.key(seed), samples=16,
                        estimators=("lss", "bitsplit", "luq"),
                        initial_variables=initial, apply_kwargs=task.model_kwargs)
  jint4.plot_diagnosis(rows, png)
  return jint4.format_diagnosis(rows)


def summarize(args, stages: Sequence[Stage]) -> str:
  figs = os.path.join(os.path.dirname(args.out), "results")
  os.makedirs(figs, exist_ok=True)
  parts = []
  for stage in stages:
    runs = load(args, stage)
    if not runs:
      continue
    any_run = next(iter(next(iter(runs.values())).values()))
    engines = engines_used(runs)
    png = os.path.join(figs, f"{stage.name}_{args.size}.png")
    plot_stage(stage, runs, png)
    cmd = " ".join(["python", f"examples/{stage.script}", *stage.argv,
                    *(stage.gpu_argv if args.size == "gpu" else ()), "--quant MODE --seed S"])
    parts += [f"## {stage.title}", "",
              f"`{cmd}`: {any_run['params']:,} parameters,"
              f" {any_run['args']['steps']} steps of batch {any_run['args']['batch']}."
              f" Measured: {measured_on(runs)}."
              + (f" jint4 engine of the INT4 runs: {engines}." if engines else ""), "",
              *stage_table(stage, runs), "", *verdicts(stage, runs), "",
              f"![{stage.name}](results/{os.path.basename(png)})", ""]
  diag_stage = next((s for s in stages if s.name == args.diagnose_stage), None)
  if diag_stage is not None:
    png = os.path.join(figs, f"diagnosis_{diag_stage.name}_{args.size}.png")
    table = diagnose_cell(args, diag_stage, args.diagnose_mode, 0, png)
    if table is not None:
      parts += [f"## Diagnostics: {diag_stage.title}, {args.diagnose_mode}, seed 0, final weights",
                "", "`jint4.diagnose` on the final checkpoint and 8 held-out sequences"
                " (docs/DIAGNOSTICS.md says how to read it):", "", "```", table, "```", "",
                f"![diagnosis](results/{os.path.basename(png)})", ""]
  notes = os.path.join(figs, "NOTES.md")
  if os.path.exists(notes):
    with open(notes) as f:
      parts = [f.read().strip(), ""] + parts
  header = [
      "# Results: INT4 training next to float, on real data", "",
      "Each cell trains an unedited Flax model with `jint4.int4ify` (`fp`: the float",
      "model itself) in the examples' shared `jax.jit` + optax loop, from the same",
      "initial weights and batches for every mode of a seed. Loss is the final",
      "held-out loss; the ratio to fp is paired by seed, then averaged; ± is the",
      "standard deviation over seeds. Modes: `hq_lss` the paper (HQ forward, bit",
      "splitting + leverage score sampling backward; jint4 samples the weight",
      "gradient and keeps every row of the activation gradient, `lss_dx_budget=2`,",
      "unless the notes say the rows were measured sampling both, as the paper",
      "does), `hq_bitsplit` every bit-split",
      "row kept (both split with one scale per token row, jint4's default",
      "`split_scale=\"row\"`, unless the notes say otherwise),",
      "`hq_only` INT4 forward with a float backward, `lsq_luq`",
      "the paper's baseline (LSQ forward without Hadamard, LUQ gradients). Every",
      "INT4 mode runs jint4's defaults (step sizes start at the least quantization",
      "error, `step_init=\"mse\"`) and the examples' AdamW wrapped in",
      "`jint4.relative_step_sizes`.", "",
      "Each stage says where its runs were measured; the diagnostics below:"
      f" {_example_module('trainer.py').machine()}. Reproduce: `python examples/report.py"
      f" --size {args.size}` (`--summarize-only` rebuilds this page from the runs).", ""]
  return "\n".join(header + parts)


def main(argv=None) -> int:
  args = parse_args(argv)
  stages = selected_stages(args)
  if not args.summarize_only:
    run_grid(args, stages)
  # The page shows every stage with finished runs, not only those run now.
  text = summarize(args, [s for group in STAGES.values() for s in group])
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
