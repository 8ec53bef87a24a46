"""A ViT patch embedding (a Conv whose kernel_size == strides) in INT4.

A Vision Transformer cuts its image into non-overlapping p x p patches and
maps each one to a token with one convolution::

    nn.Conv(features, kernel_size=(p, p), strides=(p, p), padding="VALID")
    nnx.Conv(in_features, out_features, kernel_size=(p, p), strides=(p, p),
             padding="VALID", rngs=rngs)

Why it is a linear layer: with kernel W[kh, kw, c, f] of shape (p, p, C, F),
such a conv computes, for output position (i, j),

    y[i, j, f] = sum_{kh, kw, c} x[i p + kh, j p + kw, c] W[kh, kw, c, f] + b[f].

The windows of a stride-p, size-p kernel do not overlap and (with VALID
padding, which drops the last H mod p rows and W mod p columns) tile the
image, so every input value enters exactly one output position. Flattening
each patch in (kh, kw, c) order, P[i, j, :] = x[i p : (i+1) p, j p : (j+1) p,
:].reshape(p p C), gives

    y = P @ W.reshape(p p C, F) + b,

a `Dense` over K = p p C features with the token grid as its batch. The
kernel's row-major reshape uses the same (kh, kw, c) order, so the conv's
kernel *is* the Dense kernel and no weight is moved. The INT4 training recipe
of Xi et al., "Training Transformers with 4-bit Integers" (NeurIPS 2023),
is defined on the matmuls of linear layers, so it applies unchanged:
`jint4.int4_matmul` on the patches, its Hadamard transform running along K
(`patch_contraction` gives K, from which the caller picks the block). The
same holds for any number n of spatial dims.

Which convs qualify (`patch_conv_why` says why another one stays float):
kernel_size == strides (ints and tuples alike; strides None means 1, so a
pointwise conv, kernel 1 and stride 1, qualifies too), zero padding ("VALID",
0 or (0, 0) pairs; for a pointwise conv every padding string pads nothing, so
nn.Conv's default "SAME" qualifies there), no input or kernel dilation,
feature_group_count 1, no mask, shared weights (not `nn.ConvLocal`) and
Flax's own convolution (a custom ``conv_general_dilated`` is kept as given).

Parameters keep nn.Conv's names, shapes, dtypes and initializers: ``kernel``
of shape kernel_size + (in_features, features) and ``bias`` (features,); the
INT4 layers add their step sizes beside them, as `Int4Dense` / `Int4Linear`
do (``step_size_x`` / ``step_size_w`` and the quantizer state). A float
checkpoint of the conv therefore loads as it is.

Linen: `int4_patch_conv(module, inputs, config=...)` is the body of
`nn.Conv.__call__` in INT4, run by a Flax method interceptor in the Conv's
own scope, as `jint4.nn.linen.int4_dense` runs for `nn.Dense`.
NNX: `Int4PatchConv(conv, config=..., name=...)` takes over an `nnx.Conv`'s
``kernel`` and ``bias`` (the same `nnx.Param` objects).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.linear import canonicalize_padding

from jint4.config import Int4Config
from jint4.matmul import int4_matmul
from jint4.nn.linen import quantized_dense
from jint4.nn.linen import layer_errors
from jint4.nn.linen import layer_path
from jint4.nn.nnx import add_lazy_step_sizes
from jint4.nn.nnx import call_key
from jint4.nn.nnx import lazy_step_sizes

_data = getattr(nnx, "data", lambda value: value)

NOT_A_PATCH_CONV = (
    "not converted: a Conv that is not a patch embedding (needs kernel_size =="
    " strides, padding VALID, no dilation, feature_group_count 1)")

# Padding strings that pad nothing when kernel and strides are all 1: "SAME"
# pads (out - 1) s + k - n = 0, the circular / reflect / causal modes pad
# k - 1 = 0.
_NO_PAD_WHEN_POINTWISE = ("SAME", "SAME_LOWER", "CIRCULAR", "REFLECT", "CAUSAL")


def _kernel_size(kernel_size: Union[int, Sequence[int]]) -> Tuple[int, ...]:
  if isinstance(kernel_size, int):
    return (kernel_size,)
  return tuple(int(k) for k in kernel_size)


def _broadcast(x: Union[None, int, Sequence[int]], n: int) -> Tuple[int, ...]:
  """As flax's Conv reads strides and dilations: None is 1, an int is
  repeated over the n spatial dims."""
  if x is None:
    x = 1
  if isinstance(x, int):
    return (x,) * n
  return tuple(int(v) for v in x)


def _pads_nothing(padding: Any, kernel_size: Tuple[int, ...],
                  strides: Tuple[int, ...]) -> bool:
  n = len(kernel_size)
  if isinstance(padding, str):
    # lax reads padding strings case-insensitively.
    mode = padding.upper()
    pointwise = all(k == 1 for k in kernel_size + strides)
    return mode == "VALID" or (pointwise and mode in _NO_PAD_WHEN_POINTWISE)
  try:
    pads = canonicalize_padding(padding, n)
  except (ValueError, TypeError):
    return False  # nn.Conv itself rejects it
  return all(tuple(int(v) for v in p) == (0, 0) for p in pads)


def patch_conv_why(module: Any) -> str:
  """"" when ``module`` (a Linen `nn.Conv` or an `nnx.Conv`) is a patch
  embedding that jint4 computes in INT4, else why it stays float.

  The reasons for convs of another shape start with "not converted: "; a conv
  with its own product (``conv_general_dilated`` / ``conv_general_dilated_cls``)
  gives "custom conv_general_dilated (kept as given)", as a Dense with a custom
  ``dot_general`` does in `jint4.int4ify_report`.
  """
  if isinstance(module, nnx.Conv):
    custom = module.conv_general_dilated not in (None, jax.lax.conv_general_dilated)
  elif isinstance(module, (nn.Conv, nn.ConvLocal)):
    custom = (getattr(module, "conv_general_dilated", None) is not None
              or getattr(module, "conv_general_dilated_cls", None) is not None)
  else:
    return ("not converted: jint4 converts flax.linen.Conv / flax.nnx.Conv patch"
            f" embeddings only; got {type(module).__name__}")
  if custom:
    return "custom conv_general_dilated (kept as given)"
  if not getattr(module, "shared_weights", True):
    return "not converted: an unshared (locally connected) Conv"
  kernel_size = _kernel_size(module.kernel_size)
  n = len(kernel_size)
  strides = _broadcast(module.strides, n)
  problems = []
  if strides != kernel_size:
    problems.append(f"kernel_size={kernel_size}, strides={strides}")
  if not _pads_nothing(module.padding, kernel_size, strides):
    problems.append(f"padding={module.padding!r}")
  for name in ("input_dilation", "kernel_dilation"):
    value = getattr(module, name)
    if any(d != 1 for d in _broadcast(value, n)):
      problems.append(f"{name}={value!r}")
  if module.feature_group_count != 1:
    problems.append(f"feature_group_count={module.feature_group_count}")
  if problems:
    return f"{NOT_A_PATCH_CONV}; got {', '.join(problems)}"
  if getattr(module, "mask", None) is not None:
    return "not converted: a masked Conv (mask=...)"
  return ""


def patch_contraction(kernel_size: Union[int, Sequence[int]],
                      in_features: int) -> int:
  """The contraction dim K = prod(kernel_size) * in_features of the patch
  embedding's matmul: the dim the Hadamard blocks must divide."""
  return math.prod(_kernel_size(kernel_size)) * int(in_features)


def patchify(inputs: jax.Array, kernel_size: Union[int, Sequence[int]]) -> jax.Array:
  """[..., S1, ..., Sn, C] -> [..., S1 // p1, ..., Sn // pn, p1 ... pn C].

  Cuts the n spatial dims into non-overlapping (p1, ..., pn) patches, each
  flattened in (k1, ..., kn, c) order: the order of a conv kernel
  (p1, ..., pn, C, F) reshaped to (p1 ... pn C, F). A remainder Si mod pi is
  dropped, as VALID padding does. Any number (>= 0) of leading batch dims.
  """
  x = jnp.asarray(inputs)
  ks = _kernel_size(kernel_size)
  n = len(ks)
  if n == 0 or any(k < 1 for k in ks):
    raise ValueError(f"patchify needs a kernel_size of positive ints; got {ks}.")
  if x.ndim < n + 1:
    raise ValueError(
        f"inputs of shape {x.shape} lack the {n} spatial dims and the channel"
        f" dim that a kernel_size of {ks} needs.")
  lead = x.shape[:x.ndim - n - 1]
  spatial = x.shape[len(lead):-1]
  counts = tuple(s // k for s, k in zip(spatial, ks))
  if any(s % k for s, k in zip(spatial, ks)):
    x = x[(Ellipsis,) + tuple(slice(0, m * k) for m, k in zip(counts, ks))
          + (slice(None),)]
  b = len(lead)
  x = x.reshape(lead + sum(((m, k) for m, k in zip(counts, ks)), ()) + (x.shape[-1],))
  # (..., m1, k1, ..., mn, kn, C) -> (..., m1, ..., mn, k1, ..., kn, C)
  perm = (tuple(range(b)) + tuple(b + 2 * i for i in range(n))
          + tuple(b + 2 * i + 1 for i in range(n)) + (b + 2 * n,))
  x = x.transpose(perm)
  return x.reshape(lead + counts + (math.prod(ks) * x.shape[-1],))


def int4_patch_conv(module: nn.Conv, inputs: jax.Array, *, config: Int4Config,
                    rng_collection: str = "quant") -> jax.Array:
  """The body of `nn.Conv.__call__` for a patch embedding, in INT4.

  Runs in ``module``'s scope (a Flax method interceptor calls it with the bound
  Conv): the params are nn.Conv's ``kernel`` / ``bias`` (same names, shapes,
  dtypes and initializers) plus ``step_size_x`` / ``step_size_w`` (and the
  quantizer state) of `jint4.Int4Dense`. The output has nn.Conv's shape.
  """
  if not isinstance(config, Int4Config):
    raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
  path = layer_path(module)
  why = patch_conv_why(module)
  if why:
    raise ValueError(f"{path}: int4_patch_conv takes patch embeddings only: {why}.")
  kernel_size = _kernel_size(module.kernel_size)
  inputs = jnp.asarray(inputs)
  with layer_errors(path):
    if inputs.ndim < len(kernel_size) + 1:
      raise ValueError(
          f"inputs of shape {inputs.shape} lack the {len(kernel_size)} spatial"
          " dims and the channel dim of the conv.")
    # nn.Conv infers in_features from the inputs, as here.
    kernel = module.param("kernel", module.kernel_init,
                          kernel_size + (inputs.shape[-1], module.features),
                          module.param_dtype)
    bias = (module.param("bias", module.bias_init, (module.features,),
                         module.param_dtype) if module.use_bias else None)
    # nn.Conv's own promotion (its promote_dtype attribute): integer inputs
    # are cast to the params' dtype, ``dtype`` overrides.
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias,
                                                dtype=module.dtype)
    patches = patchify(inputs, kernel_size)
    return quantized_dense(module, patches, kernel.reshape(-1, module.features),
                            bias, config, rng_collection)


class Int4PatchConv(nnx.Module):
  """An `nnx.Conv` patch embedding whose matmuls run in INT4.

  Takes over ``conv``'s ``kernel`` and ``bias`` (the same `nnx.Param`
  objects: state paths and shapes unchanged) and adds the lazy step sizes of
  `jint4.Int4Linear`, set on the first call. ``name``: the layer's path, for
  error messages and the data-derived key. ``rngs``: an optional ``quant``
  stream (also accepted per call); without one the key derives from the
  data, as in `Int4Linear`.
  """

  def __init__(self, conv: nnx.Conv, *, config: Int4Config = Int4Config(),
               name: Optional[str] = None, rngs: Optional[nnx.Rngs] = None):
    if not isinstance(conv, nnx.Conv):
      raise TypeError(f"Int4PatchConv takes an nnx.Conv; got {type(conv)}.")
    if not isinstance(config, Int4Config):
      raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
    self.name = name or (f"Int4PatchConv({tuple(conv.kernel_size)},"
                         f" {conv.in_features} -> {conv.out_features})")
    if config.warmup_steps:
      raise ValueError(f"{self.name}: Int4Config.warmup_steps is supported by"
                       " the Linen layers only; use warmup_steps=0 with NNX.")
    why = patch_conv_why(conv)
    if why:
      raise ValueError(f"{self.name}: Int4PatchConv takes patch embeddings"
                       f" only: {why}.")
    self.kernel_size = _kernel_size(conv.kernel_size)
    self.in_features = conv.in_features
    self.out_features = conv.out_features
    self.use_bias = conv.use_bias
    self.dtype = conv.dtype
    self.param_dtype = conv.param_dtype
    self.promote_dtype = conv.promote_dtype
    self.preferred_element_type = getattr(conv, "preferred_element_type", None)
    self.config = config
    self.kernel = conv.kernel
    self.bias = conv.bias if conv.bias is not None else _data(None)
    self.quant_rngs = (rngs["quant"].fork() if rngs is not None and "quant" in rngs
                       else _data(None))
    if config.quantizes_forward:
      add_lazy_step_sizes(self)

  def _operands(self, inputs):
    """(patches [..., K], kernel [K, F], bias), promoted as nnx.Conv does."""
    inputs = jnp.asarray(inputs)
    n = len(self.kernel_size)
    if inputs.ndim < n + 1:
      raise ValueError(f"inputs of shape {inputs.shape} lack the {n} spatial"
                       " dims and the channel dim of the conv.")
    if inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs have {inputs.shape[-1]} channels (shape"
                       f" {inputs.shape}); the conv's kernel takes"
                       f" in_features={self.in_features}.")
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias),
                                              dtype=self.dtype)
    patches = patchify(inputs, self.kernel_size)
    return patches, kernel.reshape(-1, self.out_features), bias

  def calibrate(self, inputs: jax.Array) -> None:
    """Sets the step sizes (and the "auto" block) from a batch and the
    current kernel, as the first call does."""
    if self.config.quantizes_forward:
      with layer_errors(self.name):
        patches, kernel, _ = self._operands(inputs)
        self.calibrated[...] = jnp.zeros((), jnp.int32)
        lazy_step_sizes(self, patches, kernel, self.config)

  def __call__(self, inputs: jax.Array, *,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    cfg = self.config
    with layer_errors(self.name):
      patches, kernel, bias = self._operands(inputs)
      key = self._key(rngs, patches, kernel)
      if not cfg.quantizes_forward:
        y = int4_matmul(patches, kernel, jnp.float32(1), jnp.float32(1), key,
                        config=cfg, bias=bias)
      else:
        step_x, step_w, log2 = lazy_step_sizes(self, patches, kernel, cfg)
        auto = cfg.uses_hadamard and cfg.hadamard_block == "auto"
        y = int4_matmul(patches, kernel, step_x, step_w, key, config=cfg,
                        bias=bias, hadamard_log2_block=log2 if auto else None)
    # nnx.Conv hands preferred_element_type to the conv as its output dtype.
    if self.preferred_element_type is not None:
      y = y.astype(self.preferred_element_type)
    return y

  def _key(self, rngs, inputs, kernel):
    return call_key(self, rngs, inputs, kernel)
