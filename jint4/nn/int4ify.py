"""`int4ify`: turn the linear layers of an existing model into INT4 layers.

What converts, in Linen and NNX alike (subclasses included):

  Dense / Linear          -> `Int4Dense`'s body / an `Int4Linear`
  DenseGeneral / LinearGeneral, nnx.Einsum
                          -> the INT4 product hook (`Int4DotGeneral`,
                             `Int4NnxDotGeneral`) as the layer's product
  Linen nn.Einsum         -> its body with an INT4 product (`jint4.nn.einsum`)
  Conv as patch embedding -> a linear layer on patches (`jint4.nn.patch_conv`)
  (kernel_size == strides, VALID; other convs stay float, with a warning)
  Embed                   -> LSQ on its output, with ``embedding_lsq``
                             (`jint4.nn.embed`); ``attend`` stays float
  attention's Q K^T, P V  -> INT4 products, with ``attention_products``
                             (`jint4.nn.attention`)

Linen: the model's code is not touched. `int4ify` returns an `Int4Model`
that runs the model under a Flax method interceptor, which runs each
converted layer's INT4 body in the layer's own scope (or sets its product
hook for the call), so the variables keep their paths and names
(``kernel``, ``bias``, ``embedding``) and only gain the quantizer state
(``step_size_x``, ``step_size_w``, ...; a hooked layer's sit in its
``Int4DotGeneral_0`` submodule).

NNX: the model is a mutable object graph, so `int4ify` changes it in place:
converted layers are replaced by INT4 modules holding the same `nnx.Param`
objects, hooked layers get the hook as their product, and it returns the
model.

``keep`` selects layers to keep in float: a regular expression searched in
the layer's path ("/"-joined: ``"Decoder_0/lm_head"`` in Linen, attribute
names in NNX) or a predicate on that path. The paper keeps the final
classifier / LM head in float: ``int4ify(model, keep=r"lm_head|classifier")``.

Per layer: a contraction dim that the configured Hadamard block does not
divide (784, 48, ...: typical first layers) gets the largest power-of-two
block that divides it, down to `jint4.config.MIN_HADAMARD_BLOCK`; with none
that large (an odd dim, say) the layer stays in float. Nothing is left in
float silently: `int4ify_report(model)` lists every layer that holds a
kernel or an embedding and every attention's products, converted or kept
and why (`jint4.nn.report`), and layer types that hold a kernel but are not
converted warn once per type.
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from jint4.config import Int4Config
from jint4.config import fit_hadamard_block
from jint4.nn import linen as linen_lib
from jint4.nn.attention import PV
from jint4.nn.attention import QK
from jint4.nn.attention import Int4NnxAttention
from jint4.nn.attention import product_shape
from jint4.nn.attention import takes_einsum_hooks
from jint4.nn.dot_general import Int4DotGeneral
from jint4.nn.dot_general import Int4NnxDotGeneral
from jint4.nn.dot_general import einsum_dimension_numbers
from jint4.nn.einsum import einsum_contraction
from jint4.nn.einsum import int4_einsum
from jint4.nn.embed import LsqEmbed
from jint4.nn.embed import lsq_embed_output
from jint4.nn.nnx import Int4Linear
from jint4.nn.patch_conv import Int4PatchConv
from jint4.nn.patch_conv import int4_patch_conv
from jint4.nn.patch_conv import patch_contraction
from jint4.nn.patch_conv import patch_conv_why
from jint4.nn.report import LayerReport
from jint4.nn.report import format_table

Keep = Union[None, str, Callable[[str], bool]]

# NNX models' reports, kept beside the model (NNX modules are changed in place).
_NNX_REPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_warned_types: set = set()
_nnx_data = getattr(nnx, "data", lambda value: value)


def int4ify(model: Any, config: Int4Config = Int4Config(), *, keep: Keep = None,
            rng_collection: str = "quant", report: bool = False):
  """Returns ``model`` with its Dense layers computing in INT4.

  Args:
    model: a `flax.linen.Module` (returns an `Int4Model` wrapper with the same
      ``init`` / ``apply`` API) or a `flax.nnx.Module` (modified in place and
      returned).
    config: the quantization recipe for every converted layer (its Hadamard
      block adapted per layer where it does not divide the contraction dim).
    keep: layers to leave in float (regex on the path, or a predicate).
    rng_collection: Linen rng stream name for the stochastic rounding.
    report: print the table of `int4ify_report` (NNX: now; Linen: after the
      first ``init`` / ``apply``, when the layers are known).
  """
  if not isinstance(config, Int4Config):
    raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
  keep_fn = _keep_fn(keep)
  if isinstance(model, Int4Model):
    raise TypeError("int4ify: this model is int4ified already (an Int4Model);"
                    " int4ify the original model once, with the config you want.")
  if isinstance(model, nn.Module):
    return Int4Model(model, config=config, keep=keep_fn,
                     rng_collection=rng_collection, print_report=report)
  if isinstance(model, nnx.Module):
    if model in _NNX_REPORTS:
      raise TypeError("int4ify: this NNX model is int4ified already; int4ify it"
                      " once, with the config you want.")
    rows: List[LayerReport] = []
    _replace_nnx_linears(model, config, keep_fn, (), rows)
    _NNX_REPORTS[model] = rows
    if report:
      print(format_table(rows))
    return model
  raise TypeError(f"int4ify takes a flax.linen or flax.nnx Module; got"
                  f" {type(model)}.")


def int4ify_report(model: Any) -> List[LayerReport]:
  """The table rows of an int4ified model (Linen: after its first init/apply)."""
  if isinstance(model, Int4Model):
    if not model.rows:
      raise ValueError("int4ify_report: the Linen model has not run yet; call"
                       " its init (or apply) first, e.g. jax.eval_shape(model.init,"
                       " key, batch).")
    return list(model.rows.values())
  if isinstance(model, nnx.Module) and model in _NNX_REPORTS:
    return list(_NNX_REPORTS[model])
  raise TypeError("int4ify_report takes a model returned by jint4.int4ify.")


def hadamard_block_for(d: int, config: Int4Config) -> Tuple[Optional[Int4Config], str]:
  """The config a layer with contraction dim ``d`` runs, or (None, why) when
  it stays in float (`jint4.config.fit_hadamard_block`)."""
  return fit_hadamard_block(config, d)


def _keep_fn(keep: Keep) -> Callable[[str], bool]:
  if keep is None:
    return lambda path: False
  if isinstance(keep, str):
    pattern = re.compile(keep)
    return lambda path: pattern.search(path) is not None
  if callable(keep):
    return keep
  raise TypeError(f"keep must be None, a regex string or a predicate; got {keep!r}.")


def _block_of(config: Optional[Int4Config]) -> Optional[int]:
  if config is None or not config.quantizes_forward:
    return None
  if not config.uses_hadamard:
    return 1
  return None if config.hadamard_block == "auto" else config.hadamard_block


_PRODUCT_NAMES = {QK: "attention Q K^T", PV: "attention P V"}
_PRODUCTS_OFF = ("float: Int4Config.attention_products is off (the paper keeps"
                 " attention's products float)")


def _embed_kept_why(config: Int4Config, kept: bool) -> str:
  """Why an embedding's output stays float ("" when LSQ quantizes it)."""
  if kept:
    return "kept by keep="
  if config.embedding_lsq:
    return ""
  return "output in float (Int4Config(embedding_lsq=True) quantizes it)"


def _is_int4_hook(cls) -> bool:
  return isinstance(cls, functools.partial) and cls.func is Int4DotGeneral


def _warn_unsupported(layer: str, path: str) -> None:
  if layer not in _warned_types:
    _warned_types.add(layer)
    warnings.warn(
        f"jint4.int4ify: {layer} layers (first: {path or '(top)'}) hold a kernel"
        " but are not converted; they stay in float. int4ify_report(model)"
        " lists every layer.", RuntimeWarning, stacklevel=4)


class Int4Model:
  """A Linen model whose `nn.Dense` calls run as `Int4Dense` (see module doc).

  Exposes ``init``, ``init_with_output``, ``apply`` like the wrapped module;
  other attributes are forwarded to it. ``rows`` holds the layers seen so far
  (`int4ify_report`).
  """

  def __init__(self, model: nn.Module, *, config: Int4Config,
               keep: Callable[[str], bool], rng_collection: str,
               print_report: bool = False):
    self.model = model
    self.config = config
    self.keep = keep
    self.rng_collection = rng_collection
    self.rows: Dict[str, LayerReport] = {}
    self._print_report = print_report

  def _record(self, row: LayerReport) -> None:
    if row.path not in self.rows:
      self.rows[row.path] = row
      if not row.converted and row.why.startswith("not converted"):
        _warn_unsupported(row.layer, row.path)

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    path = "/".join(map(str, module.path))
    layer = type(module).__name__
    if isinstance(module, nn.Embed):
      return self._embed(module, context.method_name, path, next_fun, args, kwargs)
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    for cls, handler in ((linen_lib.Int4Dense, self._int4_dense),
                         (Int4DotGeneral, self._product_hook),
                         (nn.MultiHeadDotProductAttention, self._attention),
                         (nn.DenseGeneral, self._dense_general),
                         (nn.Einsum, self._einsum),
                         (nn.Conv, self._conv),
                         (nn.Dense, self._dense)):
      if isinstance(module, cls):
        return handler(module, path, layer, next_fun, args, kwargs)
    out = next_fun(*args, **kwargs)
    if module.has_variable("params", "kernel"):
      shape = tuple(jax.numpy.shape(nn.unbox(module.get_variable("params", "kernel"))))
      self._record(LayerReport(path=path, layer=layer, shape=shape, converted=False,
                               why="not converted: jint4 does not convert this"
                                   " layer type"))
    return out

  def _int4_dense(self, module, path, layer, next_fun, args, kwargs):
    out = next_fun(*args, **kwargs)
    self._record(LayerReport(
        path=path, layer=layer, shape=(jax.numpy.shape(args[0])[-1], module.features),
        converted=True, block=_block_of(module.config), why="INT4 already"))
    return out

  def _dense(self, module, path, layer, next_fun, args, kwargs):
    (inputs,) = args
    d = jax.numpy.shape(inputs)[-1]
    config = self._decide(module, path, layer, (d, module.features), d)
    if config is None:
      return next_fun(*args, **kwargs)
    return linen_lib.int4_dense(
        module, inputs, features=module.features, use_bias=module.use_bias,
        dtype=module.dtype, param_dtype=module.param_dtype,
        kernel_init=module.kernel_init, bias_init=module.bias_init,
        config=config, rng_collection=self.rng_collection)

  def _einsum(self, module, path, layer, next_fun, args, kwargs):
    """``nn.Einsum`` runs `jint4.nn.einsum.int4_einsum` in its scope."""
    inputs = args[0]
    einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    equation = (einsum_str or module.einsum_str or "").replace(" ", "")
    try:
      kernel = jax.ShapeDtypeStruct(tuple(module.shape), jax.numpy.float32)
      einsum_dimension_numbers(equation, inputs, kernel)
    except ValueError as e:  # Flax's own call reports a malformed equation
      self._record(LayerReport(path=path, layer=layer, shape=tuple(module.shape),
                               converted=False, why=f"not converted: {e}"))
      return next_fun(*args, **kwargs)
    config = self._decide(module, path, layer, tuple(module.shape),
                          einsum_contraction(equation, module.shape))
    if config is None:
      return next_fun(*args, **kwargs)
    return int4_einsum(module, inputs, einsum_str, config=config,
                       rng_collection=self.rng_collection)

  def _conv(self, module, path, layer, next_fun, args, kwargs):
    """A patch embedding (kernel_size == strides, VALID) is a linear layer
    on patches (`jint4.nn.patch_conv`); other convs stay float."""
    inputs = args[0] if args else kwargs["inputs"]
    why = patch_conv_why(module)
    if why:
      out = next_fun(*args, **kwargs)
      self._record(LayerReport(
          path=path, layer=layer,
          shape=tuple(jax.numpy.shape(nn.unbox(module.get_variable("params", "kernel")))),
          converted=False, why=why))
      return out
    k = patch_contraction(module.kernel_size, jax.numpy.shape(inputs)[-1])
    config = self._decide(module, path, layer, (k, module.features), k)
    if config is None:
      return next_fun(*args, **kwargs)
    return int4_patch_conv(module, inputs, config=config,
                           rng_collection=self.rng_collection)

  def _embed(self, module, method, path, next_fun, args, kwargs):
    """Embedding outputs get LSQ with ``embedding_lsq`` (the paper's recipe);
    ``attend`` (a tied output head) stays float, as the paper keeps the head."""
    shape = (module.num_embeddings, module.features)
    if method == "attend":
      self._record(LayerReport(path=f"{path}.attend", layer="Embed.attend",
                               shape=shape[::-1], converted=False,
                               why="tied output head: float, as the paper keeps"
                                   " the head"))
      return next_fun(*args, **kwargs)
    if method != "__call__":
      return next_fun(*args, **kwargs)
    why = _embed_kept_why(self.config, self.keep(path))
    self._record(LayerReport(path=path, layer=type(module).__name__, shape=shape,
                             converted=not why,
                             why=why or "LSQ on the output (no matmul)"))
    out = next_fun(*args, **kwargs)
    return out if why else lsq_embed_output(module, out, config=self.config)

  def _attention(self, module, path, layer, next_fun, args, kwargs):
    """With ``attention_products``, Q K^T and P V run as INT4 products: the
    hooks ``qk_product`` / ``pv_product`` (`Int4DotGeneral`, block fitted per
    call) are set for this call; their rows are recorded when they run."""
    if _is_int4_hook(module.qk_attn_weights_einsum_cls):
      return next_fun(*args, **kwargs)  # a subclass's call of its parent's
    inputs_q = args[0] if args else kwargs["inputs_q"]
    features = module.qkv_features or jax.numpy.shape(inputs_q)[-1]
    why = ""
    if not self.config.attention_products:
      why = _PRODUCTS_OFF
    elif not takes_einsum_hooks(module.attention_fn):
      why = "custom attention_fn without einsum hooks (kept as given)"
    elif (module.qk_attn_weights_einsum_cls is not None
          or module.attn_weights_value_einsum_cls is not None):
      why = "custom attention einsums (kept as given)"
    elif module.precision is not None:
      why = "precision= is set (Flax takes no einsum hooks with it)"
    kept = {name: why or ("kept by keep=" if self.keep(f"{path}/{name}") else "")
            for name in (QK, PV)}
    for name, reason in kept.items():
      if reason:
        self._record(LayerReport(
            path=f"{path}/{name}", layer=_PRODUCT_NAMES[name],
            shape=(module.num_heads, features // module.num_heads),
            converted=False, why=reason))
    if all(kept.values()):
      return next_fun(*args, **kwargs)
    hooks = {name: (lambda: jax.numpy.einsum) if kept[name] else functools.partial(
        Int4DotGeneral, config=self.config, rng_collection=self.rng_collection,
        fit_block=True, name=name) for name in (QK, PV)}
    object.__setattr__(module, "qk_attn_weights_einsum_cls", hooks[QK])
    object.__setattr__(module, "attn_weights_value_einsum_cls", hooks[PV])
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "qk_attn_weights_einsum_cls", None)
      object.__setattr__(module, "attn_weights_value_einsum_cls", None)

  def _product_hook(self, module, path, layer, next_fun, args, kwargs):
    """Records the row of an attention product hook set by `_attention`."""
    if module.fit_block and module.name in _PRODUCT_NAMES and isinstance(args[0], str):
      k, n = product_shape(*args[:3])
      config, why = fit_hadamard_block(module.config, k)
      self._record(LayerReport(path=path, layer=_PRODUCT_NAMES[module.name],
                               shape=(k, n), converted=config is not None,
                               block=_block_of(config),
                               why=why or "INT4 product"))
    return next_fun(*args, **kwargs)

  def _dense_general(self, module, path, layer, next_fun, args, kwargs):
    """`nn.DenseGeneral` (attention's projections) runs with the INT4 hook
    `Int4DotGeneral` as its ``dot_general_cls``: its params stay as they are,
    the step sizes go to its ``Int4DotGeneral_0`` submodule."""
    shape_in = jax.numpy.shape(args[0])
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    features = (module.features if isinstance(module.features, (tuple, list))
                else (module.features,))
    contract = tuple(shape_in[a] for a in axis)
    config = self._decide(module, path, layer, contract + tuple(features),
                          int(np.prod(contract)))
    if config is None:
      return next_fun(*args, **kwargs)
    hook = functools.partial(Int4DotGeneral, config=config,
                             rng_collection=self.rng_collection)
    # Flax modules are frozen dataclasses: the hook is set for this call only.
    object.__setattr__(module, "dot_general_cls", hook)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "dot_general_cls", None)

  def _decide(self, module, path, layer, shape, k) -> Optional[Int4Config]:
    """Records the layer's row; returns its config, or None to keep it float
    (``k``: its contraction size)."""
    why = self._kept_why(module, path)
    config = None
    if not why:
      config, why = hadamard_block_for(k, self.config)
    self._record(LayerReport(path=path, layer=layer, shape=shape,
                             converted=config is not None, block=_block_of(config),
                             why=why))
    return config

  def _kept_why(self, module, path) -> str:
    """Why a Dense-like layer stays float ("" when it converts)."""
    if self.keep(path):
      return "kept by keep="
    if (getattr(module, "dot_general", None) is not None
        or getattr(module, "dot_general_cls", None) is not None):
      return "custom dot_general (kept as given)"
    return ""

  def _wrap(self, fn):
    def wrapped(*args, **kwargs):
      first = not self.rows
      with nn.intercept_methods(self._intercept):
        out = fn(*args, **kwargs)
      if first and self.rows and self._print_report:
        print(format_table(list(self.rows.values())))
      return out
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


def _replace_nnx_linears(node: Any, config: Int4Config, keep, path,
                         rows: List[LayerReport]) -> None:
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
    joined = "/".join(child_path)
    if isinstance(child, nnx.Linear):
      row, layer_config = _nnx_linear_row(child, config, keep, joined)
      rows.append(row)
      if layer_config is not None:
        setter(name, _linear_to_int4(child, layer_config, joined))
    elif isinstance(child, (nnx.LinearGeneral, nnx.Einsum)):
      rows.append(_nnx_hooked_row(child, config, keep, joined))
    elif isinstance(child, nnx.Conv):
      row, layer_config = _nnx_conv_row(child, config, keep, joined)
      rows.append(row)
      if layer_config is not None:
        setter(name, Int4PatchConv(child, config=layer_config, name=joined))
    elif isinstance(child, nnx.Embed):
      rows.append(_nnx_embed_row(child, config, keep, joined))
      if rows[-1].converted:
        setter(name, LsqEmbed(child, config=config, name=joined))
    elif isinstance(child, nnx.MultiHeadAttention):
      rows.append(_nnx_attention_row(child, config, keep, joined))
      _replace_nnx_linears(child, config, keep, child_path, rows)
    elif isinstance(child, Int4Linear):
      rows.append(LayerReport(path=joined, layer="Int4Linear",
                              shape=tuple(child.kernel[...].shape), converted=True,
                              block=_block_of(child.config), why="INT4 already"))
    elif isinstance(child, nnx.Module) and isinstance(
        getattr(child, "kernel", None), nnx.Variable):
      layer = type(child).__name__
      rows.append(LayerReport(path=joined, layer=layer,
                              shape=tuple(child.kernel[...].shape), converted=False,
                              why="not converted: jint4 does not convert this layer type"))
      _warn_unsupported(layer, joined)
      _replace_nnx_linears(child, config, keep, child_path, rows)
    elif isinstance(child, (nnx.Module, list, dict)) or _is_nnx_container(child):
      _replace_nnx_linears(child, config, keep, child_path, rows)


def _nnx_linear_row(linear, config, keep, path):
  """(row, the layer's config or None when it stays float)."""
  shape = (linear.in_features, linear.out_features)
  kept = lambda why: (LayerReport(path=path, layer=type(linear).__name__, shape=shape,
                                  converted=False, why=why), None)
  if keep(path):
    return kept("kept by keep=")
  if getattr(linear, "dot_general", None) not in (None, jax.lax.dot_general):
    return kept("custom dot_general (kept as given)")
  layer_config, why = hadamard_block_for(linear.in_features, config)
  if layer_config is None:
    return kept(why)
  return LayerReport(path=path, layer=type(linear).__name__, shape=shape, converted=True,
                     block=_block_of(layer_config), why=why), layer_config


def _nnx_conv_row(conv, config, keep, path):
  """(row, the layer's config or None): a patch-embedding conv becomes an
  `Int4PatchConv` holding the same kernel and bias."""
  shape = tuple(conv.kernel[...].shape)
  row = functools.partial(LayerReport, path=path, layer=type(conv).__name__,
                          shape=shape)
  why = patch_conv_why(conv)
  if why:
    _warn_unsupported(f"{type(conv).__name__} (not a patch embedding)", path)
    return row(converted=False, why=why), None
  if keep(path):
    return row(converted=False, why="kept by keep="), None
  layer_config, why = hadamard_block_for(
      patch_contraction(conv.kernel_size, conv.in_features), config)
  if layer_config is None:
    return row(converted=False, why=why), None
  return row(converted=True, block=_block_of(layer_config), why=why), layer_config


def _nnx_embed_row(embed, config, keep, path) -> LayerReport:
  why = _embed_kept_why(config, keep(path))
  return LayerReport(path=path, layer=type(embed).__name__,
                     shape=(embed.num_embeddings, embed.features),
                     converted=not why,
                     why=why or "LSQ on the output; attend (a tied head) stays float")


def _nnx_attention_row(attention, config, keep, path) -> LayerReport:
  """Q K^T and P V of an ``nnx.MultiHeadAttention``: with
  ``attention_products``, its ``attention_fn`` becomes an `Int4NnxAttention`."""
  fn_path = f"{path}/attention_fn"
  row = functools.partial(LayerReport, path=fn_path, layer="attention Q K^T, P V",
                          shape=(attention.num_heads, attention.head_dim))
  if not config.attention_products:
    return row(converted=False, why=_PRODUCTS_OFF)
  if keep(fn_path):
    return row(converted=False, why="kept by keep=")
  if attention.attention_fn is not nnx.dot_product_attention:
    return row(converted=False, why="custom attention_fn (kept as given)")
  attention.attention_fn = _nnx_data(Int4NnxAttention(config, name=fn_path))
  return row(converted=True, block=_block_of(config),
             why="block fitted per call to head_dim and to the key length")


def _nnx_hooked_row(layer, config, keep, path) -> LayerReport:
  """`nnx.LinearGeneral` / `nnx.Einsum`: the INT4 hook `Int4NnxDotGeneral`
  becomes the layer's product (``dot_general`` / ``einsum_op``), in place."""
  kernel_shape = tuple(layer.kernel[...].shape)
  if isinstance(layer, nnx.Einsum):
    attr, default = "einsum_op", jax.numpy.einsum
    k = einsum_contraction(layer.einsum_str, kernel_shape)
  else:
    attr, default = "dot_general", jax.lax.dot_general
    k = int(np.prod(layer.in_features))
  row = functools.partial(LayerReport, path=path, layer=type(layer).__name__,
                          shape=kernel_shape)
  if keep(path):
    return row(converted=False, why="kept by keep=")
  if (getattr(layer, attr) not in (None, default)
      or getattr(layer, "dot_general_cls", None) is not None):
    if isinstance(getattr(layer, attr), Int4NnxDotGeneral):
      return row(converted=True, block=_block_of(getattr(layer, attr).config),
                 why="INT4 already")
    return row(converted=False, why=f"custom {attr} (kept as given)")
  layer_config, why = hadamard_block_for(k, config)
  if layer_config is None:
    return row(converted=False, why=why)
  # The product was a static attribute; the hook holds state (data).
  setattr(layer, attr, _nnx_data(Int4NnxDotGeneral(layer_config, name=path)))
  return row(converted=True, block=_block_of(layer_config), why=why)


def _is_nnx_container(node):
  return any(isinstance(node, cls) for cls in
             (getattr(nnx, "List", ()), getattr(nnx, "Dict", ()))
             if isinstance(cls, type))


def _linear_to_int4(linear: "nnx.Linear", config: Int4Config,
                    path: str) -> Int4Linear:
  # The Int4Linear holds the Linear's own kernel and bias Params, so their
  # metadata (sharding annotations, ...) stays as it was.
  return Int4Linear.from_linear(linear, config=config, name=path)
