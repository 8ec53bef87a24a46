"""`int4ify`: turn the Dense layers of an existing model into INT4 layers.

Linen: the model's code is not touched. `int4ify` returns an `Int4Model`
that runs the model under a Flax method interceptor: every `nn.Dense.__call__`
whose module path is not kept in float runs `Int4Dense`'s body in that Dense's
own scope, so the variables keep their paths and names (``kernel``, ``bias``)
and only gain the quantizer state (``step_size_x``, ``step_size_w``, ...).

NNX: the model is a mutable object graph, so `int4ify` replaces its
`nnx.Linear` submodules in place by `Int4Linear`s holding the same kernel and
bias, and returns the model.

``keep`` selects layers to keep in float: a regular expression searched in
the layer's path ("/"-joined: ``"Decoder_0/lm_head"`` in Linen, attribute
names in NNX) or a predicate on that path. The paper keeps the final
classifier / LM head in float: ``int4ify(model, keep=r"lm_head|classifier")``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Union

import flax.linen as nn
from flax import nnx

from jint4.config import Int4Config
from jint4.nn import linen as linen_lib
from jint4.nn.nnx import Int4Linear

Keep = Union[None, str, Callable[[str], bool]]


def int4ify(model: Any, config: Int4Config = Int4Config(), *, keep: Keep = None,
            rng_collection: str = "quant"):
  """Returns ``model`` with its Dense layers computing in INT4.

  Args:
    model: a `flax.linen.Module` (returns an `Int4Model` wrapper with the same
      ``init`` / ``apply`` API) or a `flax.nnx.Module` (modified in place and
      returned).
    config: the quantization recipe for every converted layer.
    keep: layers to leave in float (regex on the path, or a predicate).
    rng_collection: Linen rng stream name for the stochastic rounding.
  """
  keep_fn = _keep_fn(keep)
  if isinstance(model, nn.Module):
    return Int4Model(model, config=config, keep=keep_fn,
                     rng_collection=rng_collection)
  if isinstance(model, nnx.Module):
    _replace_nnx_linears(model, config, keep_fn, ())
    return model
  raise TypeError(f"int4ify takes a flax.linen or flax.nnx Module; got"
                  f" {type(model)}.")


def _keep_fn(keep: Keep) -> Callable[[str], bool]:
  if keep is None:
    return lambda path: False
  if isinstance(keep, str):
    pattern = re.compile(keep)
    return lambda path: pattern.search(path) is not None
  if callable(keep):
    return keep
  raise TypeError(f"keep must be None, a regex string or a predicate; got {keep!r}.")


class Int4Model:
  """A Linen model whose `nn.Dense` calls run as `Int4Dense` (see module doc).

  Exposes ``init``, ``init_with_output``, ``apply`` and ``bind`` like the
  wrapped module; other attributes are forwarded to it.
  """

  def __init__(self, model: nn.Module, *, config: Int4Config,
               keep: Callable[[str], bool], rng_collection: str):
    self.model = model
    self.config = config
    self.keep = keep
    self.rng_collection = rng_collection

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, nn.Dense)
        and not self.keep("/".join(map(str, module.path)))):
      (inputs,) = args
      return linen_lib.int4_dense(
          module, inputs, features=module.features, use_bias=module.use_bias,
          dtype=module.dtype, param_dtype=module.param_dtype,
          kernel_init=module.kernel_init, bias_init=module.bias_init,
          config=self.config, rng_collection=self.rng_collection)
    return next_fun(*args, **kwargs)

  def _wrap(self, fn):
    def wrapped(*args, **kwargs):
      with nn.intercept_methods(self._intercept):
        return fn(*args, **kwargs)
    return wrapped

  def init(self, *args, **kwargs):
    return self._wrap(self.model.init)(*args, **kwargs)

  def init_with_output(self, *args, **kwargs):
    return self._wrap(self.model.init_with_output)(*args, **kwargs)

  def apply(self, *args, **kwargs):
    return self._wrap(self.model.apply)(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)

  def __repr__(self):
    return f"Int4Model({self.model!r}, config={self.config!r})"


def _replace_nnx_linears(node: Any, config: Int4Config, keep, path) -> None:
  """Replaces `nnx.Linear` attributes / list items of ``node`` in place."""
  if isinstance(node, nnx.Module):
    items = [(name, value) for name, value in vars(node).items()
             if not name.startswith("_")]
    setter = lambda name, value: setattr(node, name, value)
  elif isinstance(node, (list, dict)) or _is_nnx_container(node):
    items = list(node.items()) if hasattr(node, "items") else list(enumerate(node))
    def setter(name, value):
      node[name] = value
  else:
    return
  for name, child in items:
    child_path = path + (str(name),)
    if type(child) is nnx.Linear and not keep("/".join(child_path)):
      setter(name, _linear_to_int4(child, config, "/".join(child_path)))
    elif isinstance(child, (nnx.Module, list, dict)) or _is_nnx_container(child):
      _replace_nnx_linears(child, config, keep, child_path)


def _is_nnx_container(node):
  return any(isinstance(node, cls) for cls in
             (getattr(nnx, "List", ()), getattr(nnx, "Dict", ()))
             if isinstance(cls, type))


def _linear_to_int4(linear: "nnx.Linear", config: Int4Config,
                    path: str) -> Int4Linear:
  kernel = linear.kernel[...]
  layer = Int4Linear(
      linear.in_features, linear.out_features, use_bias=linear.use_bias,
      dtype=linear.dtype, param_dtype=linear.param_dtype, config=config,
      kernel_init=lambda *_: kernel,
      bias_init=(lambda *_: linear.bias[...]) if linear.use_bias else
      nnx.initializers.zeros_init(),
      name=path, rngs=nnx.Rngs(0))
  return layer
