"""`relative_step_sizes`: an optax wrapper that lets LSQ step sizes learn under Adam.

LSQ (Esser et al. 2020; the paper's Sec. 4.1) learns one step size s per
tensor and scales its gradient by g = 1 / sqrt(Qp * numel) so that, under SGD,
s moves by about as large a fraction of itself per step as the weights do.
Adam-type optimizers (Adam, AdamW, Lion, Adafactor's ...) normalise every
parameter's update to about the learning rate whatever its gradient's scale,
so g has no effect and s moves by ~lr per step in absolute terms. A weight step
size is small (about 2 mean|W| / sqrt(7), 0.05 for a 128-wide layer), so at a
pre-training learning rate of 1e-3 it moves by a few percent per step: it
random-walks away from the weights' scale within a few hundred steps, can cross
zero, and the forward error grows (`jint4.diagnose` shows s/init and the
forward error per layer). Fine-tuning learning rates (1e-5) hide the problem.

`relative_step_sizes(tx)` multiplies the update of every step-size parameter
(``step_size_x``, ``step_size_w``, and embeddings' ``step_size``) by |s|:

    s <- s + |s| * u,      u = tx's update for s,

so each step changes s by a fraction ~lr of itself: Adam on log s, to first
order. The step size keeps its sign and scale and still follows the loss
gradient (LSQ's dL/ds), while the weights' updates are untouched. One line in
the user's optax loop:

    tx = jint4.relative_step_sizes(optax.adamw(schedule, weight_decay=0.1))
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp

# The names of LSQ step-size parameters in Linen and NNX trees.
STEP_SIZE_NAMES: Tuple[str, ...] = ("step_size_x", "step_size_w", "step_size")


def _name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def is_step_size(path) -> bool:
  """Whether a tree path (from `jax.tree_util.tree_map_with_path`) ends at
  an LSQ step size."""
  names = [_name(p) for p in path]
  # NNX state paths may end in a Variable's "value" entry.
  names = [n for n in names if n not in ("value", "raw_value")]
  return bool(names) and names[-1] in STEP_SIZE_NAMES


def relative_step_sizes(tx: Any) -> Any:
  """``tx`` (an `optax.GradientTransformation`) with the updates of LSQ step
  sizes scaled by |s|: s changes by a fraction ~lr of itself per step.

  Needs ``params`` in ``update`` (``tx.update(grads, state, params)``), as
  AdamW's weight decay does. Other parameters get ``tx``'s updates unchanged.
  """
  import optax

  def init(params):
    return tx.init(params)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("jint4.relative_step_sizes: call update(grads, state,"
                       " params); the step sizes' updates are scaled by the"
                       " step sizes themselves.")
    updates, state = tx.update(updates, state, params)
    scale = lambda path, u, p: (u * jnp.abs(p).astype(u.dtype)
                                if u is not None and is_step_size(path) else u)
    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(init, update)
