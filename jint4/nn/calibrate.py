"""`calibrate`: set the step sizes of a model's INT4 layers from data.

The step sizes start from `jint4.init_step_sizes` on a batch and the layer's
kernel. A model initialised from scratch gets them at init (Linen) or at its
first call (NNX). A model whose kernels come from elsewhere, e.g. a float
`nn.Dense` / `nnx.Linear` checkpoint loaded into an int4ified model (the
paper's fine-tuning regime), needs them set again from the loaded kernels and
a calibration batch: that is `calibrate`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
from flax import nnx

from jint4.nn.int4ify import Int4Model
from jint4.nn.linen import QUANT_STATE
from jint4.nn.nnx import QuantState

# The variables `calibrate` derives from data: every other one is kept.
_DERIVED_PARAMS = ("step_size_x", "step_size_w", "step_size")  # (embeddings: step_size)
_DERIVED_STATE = ("hadamard_log2_block",)


def calibrate(model: Any, *args: Any, variables: Mapping | None = None,
              **kwargs: Any):
  """Sets every INT4 layer's step sizes from its kernel and a batch.

  Linen (an `Int4Model` from `jint4.int4ify`, or a module with `Int4Dense`
  layers): ``variables`` are the model's variables (``{"params": ...}``), with
  or without step sizes, e.g. a float checkpoint of the unconverted model;
  ``args`` / ``kwargs`` go to ``model.apply`` (the calibration batch). Returns
  the variables with step sizes (and "auto" blocks) set from the loaded
  kernels; every other variable is returned as given.

  NNX: runs ``model(*args, **kwargs)`` once after resetting every INT4 layer
  (`Int4Linear`, `Int4NnxDotGeneral`, the patch-embedding and embedding
  layers of `jint4.int4ify`), which then takes its step sizes from the batch
  and its current kernel. Returns the model (changed in place).
  """
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise TypeError("calibrate: NNX models hold their variables; load them"
                      " into the model (nnx.update) and pass no variables=.")
    # Every NNX INT4 layer (Int4Linear, the Int4NnxDotGeneral hook) keeps a
    # `calibrated` flag: cleared, the next call sets the steps again.
    layers = [m for _, m in nnx.iter_graph(model)
              if isinstance(m, nnx.Module) and isinstance(getattr(m, "calibrated", None),
                                                          QuantState)]
    if not layers:
      raise ValueError("calibrate: the model has no NNX INT4 layer (int4ify it"
                       " first, or use Int4Linear / Int4NnxDotGeneral).")
    for layer in layers:
      layer.calibrated[...] = jax.numpy.zeros((), jax.numpy.int32)
    model(*args, **kwargs)
    return model
  if not isinstance(model, (nn.Module, Int4Model)):
    raise TypeError(f"calibrate takes a Flax Linen or NNX model; got {type(model)}.")
  if variables is None or "params" not in variables:
    raise ValueError("calibrate: pass the Linen model's variables, e.g."
                     " variables={'params': params}.")
  stripped = {name: _strip(tree, _DERIVED_PARAMS if name == "params" else
                           _DERIVED_STATE if name == QUANT_STATE else ())
              for name, tree in variables.items()}
  # The step sizes' initializers read no randomness, but Flax asks for a
  # "params" stream to create parameters.
  rngs = {"params": jax.random.key(0), **dict(kwargs.pop("rngs", None) or {})}
  _, updated = model.apply(stripped, *args, mutable=["params", QUANT_STATE],
                           rngs=rngs, **kwargs)
  out = dict(variables)
  out["params"] = _merge(stripped["params"], updated["params"])
  if QUANT_STATE in updated:
    out[QUANT_STATE] = _merge(stripped.get(QUANT_STATE, {}), updated[QUANT_STATE])
  found = _count(out["params"], "step_size_x")
  if not found:
    raise ValueError("calibrate: the model has no INT4 layer (int4ify it or"
                     " use jint4.Int4Dense).")
  return out


def _strip(tree, names):
  if not isinstance(tree, Mapping):
    return tree
  return {k: _strip(v, names) for k, v in tree.items() if k not in names}


def _merge(base, new):
  """``new``'s leaves over ``base`` (apply returns the whole mutable tree)."""
  if not isinstance(base, Mapping) or not isinstance(new, Mapping):
    return new
  out = dict(base)
  for k, v in new.items():
    out[k] = _merge(base.get(k), v) if k in base else v
  return out


def _count(tree, name):
  if not isinstance(tree, Mapping):
    return 0
  return sum((k == name) + _count(v, name) for k, v in tree.items())

