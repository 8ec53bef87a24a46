"""The training loop the examples share: a user's ordinary jax.jit + optax loop.

Each example (`train_gpt.py`, `train_bert.py`, `train_vit.py`) supplies a
`Task`: an unedited Flax model, its loss, and batches that are a pure function
of (seed, step). `train` then

* converts the model with `jint4.int4ify` for the chosen ``--quant`` mode
  (`QUANT_MODES`; ``fp`` trains the float model itself);
* runs AdamW with warm-up + cosine decay under `jax.jit`, wrapped in
  `jint4.relative_step_sizes` for the INT4 modes (the one line jint4 asks
  of an Adam loop; ``--plain-steps`` leaves it out), a fresh ``'quant'``
  key every step, and a progress bar with loss and tokens/s;
* evaluates every ``--eval-every`` steps on a fixed held-out set;
* saves an orbax checkpoint every ``--ckpt-every`` steps (params, quantizer
  state, optimizer state, step); ``--resume`` continues from the latest one
  on the very same curve, since batches and keys depend only on the step;
* writes ``metrics.json`` (config, curve, final numbers) and ``curves.png``
  to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jint4

# The grid's quantization modes: None trains the float model.
QUANT_MODES: Dict[str, Optional[jint4.Int4Config]] = {
    "fp": None,
    # The paper's recipe: HQ + LSQ forward, bit splitting + leverage score
    # sampling (half of the 2N bit-split rows) backward; the sampling on the
    # weight gradient, dX keeping every row (jint4's default lss_dx_budget).
    "hq_lss": jint4.Int4Config(forward="hq", backward="lss"),
    # Every bit-split row kept: an INT8-accurate gradient (the Hopper default).
    "hq_bitsplit": jint4.Int4Config(forward="hq", backward="bitsplit"),
    # The INT4 forward alone, float gradient products: the forward's share.
    "hq_only": jint4.Int4Config(forward="hq", backward="exact"),
    # The paper's baseline: LSQ without Hadamard, LUQ gradients.
    "lsq_luq": jint4.Int4Config(forward="lsq", backward="luq"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """What an example trains.

  ``loss_fn(output, batch)`` returns (loss, metrics), metrics a dict of
  scalars (e.g. accuracy); ``batch(step)`` gives the training batch of a step
  as a dict holding ``inputs`` (what the model takes) and whatever the loss
  needs; ``eval_batches`` is the fixed held-out set; ``keep`` names the layers
  left in float (the paper keeps the output head).
  """
  model: Any
  loss_fn: Callable[[Any, Dict[str, Any]], Any]
  batch: Callable[[int], Dict[str, np.ndarray]]
  eval_batches: Sequence[Dict[str, np.ndarray]]
  tokens_per_batch: int
  keep: Optional[str] = None
  model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
  description: str = ""


def add_flags(p: argparse.ArgumentParser, *, steps: int, batch: int, lr: float,
              eval_every: int) -> None:
  """The flags every example shares (model flags are the example's own)."""
  p.add_argument("--quant", default="hq_bitsplit", choices=tuple(QUANT_MODES),
                 help="fp: float; hq_lss: the paper (HQ forward, bit splitting +"
                      " LSS backward; dW sampled, dX every row unless --lss-dx-budget"
                      " 1); hq_bitsplit: every bit-split row kept (both"
                      " split per row unless --split-scale tensor);"
                      " hq_only: INT4 forward, float backward; lsq_luq: the"
                      " paper's baseline")
  p.add_argument("--seed", type=int, default=0, help="init, data order and quantization keys")
  p.add_argument("--steps", type=int, default=steps)
  p.add_argument("--batch", type=int, default=batch)
  p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
  p.add_argument("--eval-every", type=int, default=eval_every)
  p.add_argument("--ckpt-every", type=int, default=0,
                 help="save an orbax checkpoint every N steps (0: only at the end)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out-dir")
  p.add_argument("--stop-after", type=int, default=0,
                 help="save and stop after this step, as a preempted job would"
                      " (the schedule still runs to --steps; --resume goes on)")
  p.add_argument("--out-dir", default="",
                 help="checkpoints, metrics.json and curves.png (default:"
                      " runs/<example>/<quant>/seed<seed>)")
  p.add_argument("--engine", default="auto", choices=jint4.config.ENGINES)
  p.add_argument("--warmup-steps", type=int, default=0,
                 help="jint4 step-size warm-up (Int4Config.warmup_steps)")
  p.add_argument("--lss-budget", type=float, default=None,
                 help="Int4Config.lss_budget for the lss modes (default: the paper's 1.0)")
  p.add_argument("--lss-dx-budget", type=float, default=None,
                 help="Int4Config.lss_dx_budget for the lss modes: 1.0 samples dX as the"
                      " paper does (default: the config's 2.0, every dX row kept)")
  p.add_argument("--split-scale", default=None, choices=jint4.config.SPLIT_SCALES,
                 help="Int4Config.split_scale for hq_lss and hq_bitsplit: one bit-split"
                      " scale per tensor (the paper's) or per token row (default: the"
                      " config's)")
  p.add_argument("--hadamard-block", default=None,
                 type=lambda v: v if v == "auto" else int(v),
                 help="Int4Config.hadamard_block: a power of two or auto (default: the config's)")
  p.add_argument("--qn", type=int, default=None,
                 help="Int4Config.qn: 7 (paper) or 8 (reference code) (default: the config's)")
  p.add_argument("--step-init", default=None, choices=jint4.config.STEP_INITS,
                 help="Int4Config.step_init (default: the config's)")
  p.add_argument("--keep", default="",
                 help="more layers left in float: a regex on the layer path (see the"
                      " table printed at the start), besides the example's own (its head)")
  p.add_argument("--plain-steps", action="store_true",
                 help="do not wrap the optimizer in jint4.relative_step_sizes (the"
                      " step sizes then move by ~lr per step, as any Adam parameter)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--no-plot", action="store_true", help="no curves.png")


def machine() -> str:
  """Where a run was measured, for the results page: the date, the device
  (CPU model and cores, or the accelerator), jax and Python versions."""
  device = jax.devices()[0]
  where = (f"{platform.machine()} CPU ({os.cpu_count()} cores)" if device.platform == "cpu"
           else f"{device.device_kind} ({device.platform})")
  return (f"{datetime.date.today().isoformat()}, {where}, jax {jax.__version__},"
          f" Python {platform.python_version()}")


def engine_used(config: Optional[jint4.Int4Config]) -> Optional[str]:
  """Which jint4 engine runs the INT4 ops on this process's default backend
  (``jint4.engine_info``): "native", "reference", or "native for k of n ops";
  None for the float model."""
  if config is None:
    return None
  info = jint4.engine_info(config.engine)
  ops = info["platforms"][info["default_platform"]]["ops"]
  native = sum(op["runs"] == "native" for op in ops.values())
  if native in (0, len(ops)):
    return "native" if native else "reference"
  return f"native for {native} of {len(ops)} ops"


def quant_config(args) -> Optional[jint4.Int4Config]:
  base = QUANT_MODES[args.quant]
  if base is None:
    return None
  extra = {name: getattr(args, name) for name in ("lss_budget", "lss_dx_budget",
                                                  "split_scale", "step_init",
                                                  "hadamard_block", "qn")
           if getattr(args, name, None) is not None}
  return dataclasses.replace(base, engine=args.engine, warmup_steps=args.warmup_steps, **extra)


def make_optimizer(lr: float, steps: int, weight_decay: float = 0.01
                   ) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay; matrices decayed only (not
  biases, norms or jint4's scalar step sizes)."""
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=lr / 10)
  decay = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay, mask=decay))


def out_dir(args, example: str) -> str:
  return args.out_dir or os.path.join("runs", example, args.quant, f"seed{args.seed}")


class _Progress:
  """A tqdm bar when it is installed and stderr is a terminal; else log lines."""

  def __init__(self, total: int, start: int, enabled: bool):
    self.bar = None
    if enabled and sys.stderr.isatty():
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
      except ImportError:
        pass

  def postfix(self, **values):
    if self.bar is not None:
      self.bar.set_postfix(values, refresh=False)

  def update(self):
    if self.bar is not None:
      self.bar.update(1)

  def write(self, line: str):
    (self.bar.write if self.bar is not None else print)(line)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _split(variables):
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  return params, state


def keep_pattern(task: Task, extra: str = "") -> Optional[str]:
  """The layers left in float: the task's own and ``extra`` (``--keep``),
  one regex (`jint4.int4ify`'s ``keep=``)."""
  parts = [p for p in (task.keep, extra) if p]
  return "|".join(f"(?:{p})" for p in parts) or None


def build(task: Task, config: Optional[jint4.Int4Config], seed: int, report: bool = False,
          keep: str = ""):
  """(model, variables) for a quant config: the float model or its INT4 twin,
  with the task's layers and those ``keep`` names left in float.

  The same seed gives the same initial weights for every mode.
  """
  model = task.model if config is None else jint4.int4ify(
      task.model, config, keep=keep_pattern(task, keep), report=report)
  sample = task.batch(0)["inputs"]
  variables = jax.jit(lambda k, x: model.init(k, x, **task.model_kwargs))(
      jax.random.key(seed), jnp.asarray(sample))
  if config is not None and keep:
    check_keep(keep, [row.path for row in jint4.int4ify_report(model)])
  return model, dict(variables)


def check_keep(keep: str, paths: Sequence[str]) -> None:
  """A ``--keep`` that matches no layer path is a typo, not a choice: an
  error that lists the paths (a run would otherwise quantize the layers the
  user meant to keep float without a word)."""
  pattern = re.compile(keep)
  if not any(pattern.search(p) for p in paths):
    raise SystemExit(f"--keep {keep!r} matches none of the model's layer paths: "
                     + ", ".join(paths))


def make_steps(model, task: Task, tx, state_keys: Sequence[str]):
  """Jitted train and eval steps; ``state_keys``: mutable collections
  (jint4's ``quant_state`` under step-size warm-up)."""
  mutable = list(state_keys)

  def loss(params, state, batch, key):
    variables = {"params": params, **state}
    if mutable:
      out, new_state = model.apply(variables, batch["inputs"], rngs={"quant": key},
                                   mutable=mutable, **task.model_kwargs)
    else:
      out, new_state = model.apply(variables, batch["inputs"], rngs={"quant": key},
                                   **task.model_kwargs), {}
    value, metrics = task.loss_fn(out, batch)
    return value, (metrics, new_state)

  @jax.jit
  def train_step(params, state, opt_state, batch, key):
    (value, (metrics, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(
        params, state, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**state, **new_state}, opt_state, value, metrics

  @jax.jit
  def eval_step(params, state, batch):
    out = model.apply({"params": params, **state}, batch["inputs"], **task.model_kwargs)
    return task.loss_fn(out, batch)

  return train_step, eval_step


def evaluate(eval_step, params, state, batches) -> Dict[str, float]:
  totals: Dict[str, List[float]] = {}
  for b in batches:
    value, metrics = eval_step(params, state, {k: jnp.asarray(v) for k, v in b.items()})
    for name, v in {"loss": value, **metrics}.items():
      totals.setdefault(name, []).append(float(v))
  return {name: float(np.mean(vs)) for name, vs in totals.items()}


def _checkpointer(directory: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(os.path.abspath(os.path.join(directory, "checkpoints")),
                               item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))


def save_checkpoint(manager, step: int, params, state, opt_state):
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.StandardSave(
      {"params": params, "state": state, "opt_state": opt_state}))


def restore_checkpoint(manager, step: int, params, state, opt_state):
  import orbax.checkpoint as ocp
  target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                  {"params": params, "state": state, "opt_state": opt_state})
  got = manager.restore(step, args=ocp.args.StandardRestore(target))
  return got["params"], got["state"], got["opt_state"]


def load_params(directory: str):
  """The params of the latest checkpoint under ``directory`` (e.g. a float
  pre-training run, to fine-tune from), as a plain tree."""
  import orbax.checkpoint as ocp
  manager = _checkpointer(directory)
  step = manager.latest_step()
  if step is None:
    raise SystemExit(f"no checkpoint under {directory}/checkpoints")
  # Restored onto this process's default device, not the devices it was
  # saved from: a checkpoint written on a GPU (or a mesh) loads on a CPU.
  device = (jax.sharding.make_single_device_sharding(jax.devices()[0])
            if hasattr(jax.sharding, "make_single_device_sharding")  # jax >= 0.12
            else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      manager.item_metadata(step))
  got = manager.restore(step, args=ocp.args.StandardRestore(target))
  return got["params"]


def train(args, task: Task, example: str, *, variables=None) -> Dict[str, Any]:
  """Trains ``task`` for ``args.steps`` steps; returns the metrics it writes.

  ``variables``: start from these instead of a fresh init (fine-tuning).
  """
  config = quant_config(args)
  directory = out_dir(args, example)
  os.makedirs(directory, exist_ok=True)
  model, fresh = build(task, config, args.seed, report=config is not None,
                       keep=args.keep)
  params, state = _split(variables if variables is not None else fresh)
  tx = make_optimizer(args.lr, args.steps)
  if config is not None and not getattr(args, "plain_steps", False):
    tx = jint4.relative_step_sizes(tx)
  opt_state = jax.jit(tx.init)(params)
  train_step, eval_step = make_steps(model, task, tx, tuple(state))

  manager = _checkpointer(directory)
  history: List[Dict[str, float]] = []
  start = 0
  metrics_path = os.path.join(directory, "metrics.json")
  if args.resume:
    start = manager.latest_step() or 0
    if start:
      params, state, opt_state = restore_checkpoint(manager, start, params, state, opt_state)
      if os.path.exists(metrics_path):
        with open(metrics_path) as f:
          history = [h for h in json.load(f)["history"] if h["step"] <= start]
      print(f"resumed from step {start} ({directory})")

  n_params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
  print(f"{example}: {args.quant} ({config}), seed {args.seed}, {n_params:,} params;"
        f" {task.description}")
  if not history:
    history.append({"step": 0, "time_s": 0.0, **{f"eval_{k}": v for k, v in
                    evaluate(eval_step, params, state, task.eval_batches).items()}})

  quant_key = jax.random.key(args.seed + 1_000_003)
  progress = _Progress(args.steps, start, not args.no_progress)
  window: List[Any] = []
  tic = time.time()
  elapsed0 = history[-1].get("time_s", 0.0)
  # tokens/s of training alone: from the end of the first (compiling) step,
  # read only after waiting for the device, evaluation time left out.
  timer = {"from": None, "steps": 0, "rate": 0.0}

  def rate(loss):
    jax.block_until_ready(loss)
    if timer["steps"]:
      timer["rate"] = timer["steps"] * task.tokens_per_batch / (time.time() - timer["from"])
    return timer["rate"]

  stop = min(args.steps, args.stop_after or args.steps)
  for step in range(start + 1, stop + 1):
    batch = {k: jnp.asarray(v) for k, v in task.batch(step).items()}
    params, state, opt_state, loss, _ = train_step(
        params, state, opt_state, batch, jax.random.fold_in(quant_key, step))
    window.append(loss)
    if timer["from"] is None:
      jax.block_until_ready(loss)
      timer["from"] = time.time()
    else:
      timer["steps"] += 1
    if step % 10 == 0:  # waits for the step: not every step
      progress.postfix(loss=f"{float(loss):.3f}", tok_s=f"{rate(loss):,.0f}")
    progress.update()
    last = step == stop
    if step % args.eval_every == 0 or last:
      train_loss = float(np.mean(jax.device_get(window)))
      window = []
      tokens_s = rate(loss)
      eval_tic = time.time()
      evals = evaluate(eval_step, params, state, task.eval_batches)
      timer["from"] += time.time() - eval_tic
      history.append({"step": step, "time_s": elapsed0 + time.time() - tic,
                      "train_loss": train_loss, **{f"eval_{k}": v for k, v in evals.items()}})
      progress.write(f"step {step:>6}  train {train_loss:.4f}  " + "  ".join(
          f"eval {k} {v:.4f}" for k, v in evals.items()) + f"  {tokens_s:,.0f} tok/s")
      if not np.isfinite(train_loss):
        progress.close()
        raise SystemExit(f"{example} {args.quant}: the training loss is {train_loss}"
                         f" at step {step}")
    if last or (args.ckpt_every and step % args.ckpt_every == 0):
      save_checkpoint(manager, step, params, state, opt_state)
  progress.close()
  manager.wait_until_finished()

  result = {"example": example, "quant": args.quant, "seed": args.seed,
            "config": repr(config), "args": vars(args), "params": n_params,
            "tokens_per_s": timer["rate"] or None, "machine": machine(),
            "engine": engine_used(config),
            "final": {k: v for k, v in history[-1].items() if k.startswith("eval_")},
            "history": history}
  with open(metrics_path, "w") as f:
    json.dump(result, f, indent=1)
  if not args.no_plot:
    plot_curves({args.quant: history}, os.path.join(directory, "curves.png"),
                title=f"{example} ({args.quant}, seed {args.seed})")
  return result


def plot_curves(curves: Dict[str, List[Dict[str, float]]], path: str, title: str = "",
                keys: Sequence[str] = ("train_loss", "eval_loss")):
  """Loss curves (one line per name and key) as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, history in curves.items():
    for key, style in zip(keys, ("--", "-")):
      pts = [(h["step"], h[key]) for h in history if key in h]
      if pts:
        ax.plot(*zip(*pts), style, label=f"{name} {key.replace('_', ' ')}")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
