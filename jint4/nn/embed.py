"""LSQ on the outputs of embedding layers, as the paper's recipe does.

Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers" (NeurIPS 2023,
Sec. 4): the linear layers of the Transformer blocks get the Hadamard quantizer
(HQ, `jint4.Int4Dense` / `jint4.Int4Linear`), the *outputs of the embedding
layers* get plain LSQ (no Hadamard transform: the lookup is not a matmul), and
the final classifier / LM head stays in floating point.

With one learned scalar step s per embedding layer and E the looked-up
embeddings (any leading dims, ``features`` last), v = E / s:

    E_hat = s * clamp(round(v), -Qn, Qp)
    dL/dE = 1[-Qn <= v <= Qp] * dL/dE_hat                  (straight-through)
    dL/ds = sum(dL/dE_hat * delta) / sqrt(Qp * numel(E)),
    delta = -Qn if v < -Qn,  Qp if v > Qp,  round(v) - v otherwise,
    s0    = step_init's rule on E                           (init batch)

(`jint4.quant.lsq.fake_quantize` and `step_size_rule`: the least
quantization error by default, 2 mean|E| / sqrt(Qp) with
``step_init="lsq"``). The gradient of the embedding table is the float one
with the clipped entries masked out. NaN in E
gives NaN in E_hat, so a bad index or table stays visible.

Parameters (nothing else of the embedding layer changes, so a float checkpoint
loads with only ``step_size`` added):

  Linen  params/<embed path>/step_size   float32 scalar, added next to
      ``embedding`` by `lsq_embed_output`, which a Flax method interceptor
      runs after `nn.Embed.__call__`, in the Embed's own scope.
  NNX    <embed path>.step_size (`nnx.Param`) and .calibrated (`QuantState`,
      0 until the step is set) on `LsqEmbed`, which takes over the
      `nnx.Embed`'s ``embedding`` Param as it is.

``attend`` (a tied output head) is left in float, as the paper keeps the head.
`config.forward == "none"` leaves the output float and adds no parameter.

Opt-in: `jint4.int4ify` leaves embeddings alone unless its config flag asks
for this (wired there, not here).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

from jint4.config import Int4Config
from jint4.nn.linen import layer_errors
from jint4.nn.linen import layer_path
from jint4.nn.nnx import QuantState
from jint4.quant.lsq import fake_quantize
from jint4.quant.lsq import step_size_rule

STEP_SIZE = "step_size"


def _check_config(config) -> None:
  if not isinstance(config, Int4Config):
    raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")


def _check_float(out: jax.Array) -> None:
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(
        f"LSQ on embedding outputs needs float embeddings; got {out.dtype}"
        " (set the Embed's param_dtype / dtype to a float type).")


def lsq_embed_output(module: nn.Embed, out: jax.Array, *,
                     config: Int4Config) -> jax.Array:
  """LSQ of ``out``, the result of ``module``'s `nn.Embed.__call__`.

  Runs in the Embed's bound scope (from a Flax method interceptor); creates
  the float32 scalar param ``step_size`` there, set by ``config.step_init``'s
  rule on the init batch, and returns ``out`` fake-quantized in its own dtype.
  """
  _check_config(config)
  if not config.quantizes_forward:
    return out
  with layer_errors(layer_path(module)):
    out = jnp.asarray(out)
    _check_float(out)
    # `nn.Embed` builds its params in setup(), so `module.param` refuses here
    # (outside setup and @compact); the scope itself does not. The scope is
    # not rewound after a non-compact call, so a second call in the same
    # apply (a shared embedding) reads the param instead of reserving the
    # name again.
    if module.has_variable("params", STEP_SIZE):
      step = meta.unbox(module.get_variable("params", STEP_SIZE))
    else:
      step = module.scope.param(STEP_SIZE,
                                lambda _: step_size_rule(out, config.step_init, qn=config.qn,
                                                         qp=config.qp))
    return fake_quantize(out, step, qn=config.qn, qp=config.qp).astype(out.dtype)


class LsqEmbed(nnx.Module):
  """An `nnx.Embed` whose outputs are LSQ fake-quantized with a learned step.

  ``LsqEmbed(embed, config=..., name=...)`` takes over ``embed``'s
  ``embedding`` Param (the same object: state path and shape unchanged) and
  its attributes. The step size ``step_size`` is set by the first call, eager
  or traced (e.g. the first `nnx.jit` training step), from that call's
  embeddings, and learned from then on. ``name``: the layer's path for error
  messages.
  """

  def __init__(self, embed: nnx.Embed, *, config: Int4Config = Int4Config(),
               name: Optional[str] = None):
    _check_config(config)
    if not isinstance(embed, nnx.Embed):
      raise TypeError(f"LsqEmbed wraps an nnx.Embed; got {type(embed)}.")
    self.embedding = embed.embedding
    self.num_embeddings = embed.num_embeddings
    self.features = embed.features
    self.dtype = embed.dtype
    self.param_dtype = embed.param_dtype
    # Older flax has no promote_dtype attribute (and does not read one).
    if hasattr(embed, "promote_dtype"):
      self.promote_dtype = embed.promote_dtype
    self.config = config
    self.name = name or f"LsqEmbed({embed.num_embeddings} x {embed.features})"
    if config.quantizes_forward:
      self.step_size = nnx.Param(jnp.zeros((), jnp.float32))
      self.calibrated = QuantState(jnp.zeros((), jnp.int32))

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    with layer_errors(self.name):
      # nnx.Embed's own lookup (dtype promotion, the num_embeddings == 1
      # broadcast, sharding) run on this module's copies of its attributes,
      # so it stays exactly flax's as flax changes.
      kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
      out = nnx.Embed.__call__(self, inputs, **kwargs)
      if not self.config.quantizes_forward:
        return out
      _check_float(out)
      step = self._step(out)
      return fake_quantize(out, step, qn=self.config.qn,
                           qp=self.config.qp).astype(out.dtype)

  def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
    """nnx.Embed's attend, in float (the tied head is not quantized)."""
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    with layer_errors(self.name):
      return nnx.Embed.attend(self, query, **kwargs)

  def _step(self, out: jax.Array) -> jax.Array:
    """The step for this call; the first one (``calibrated`` still 0, eager
    or traced) sets it from ``out``, as `jint4.nn.nnx.lazy_step_sizes` does
    for the linear layers."""
    param = self.step_size[...]
    flag = self.calibrated[...]
    if not isinstance(flag, jax.core.Tracer) and int(flag):
      return param
    # The init rule is a starting point, not part of the model: no gradient
    # through mean|E| into the table on the first step.
    init = jax.lax.stop_gradient(step_size_rule(out, self.config.step_init,
                                                qn=self.config.qn, qp=self.config.qp))
    ready = flag > 0
    # The init value now, with its gradient passed on to the parameter, so
    # the very first (traced) training step already learns it.
    step = jnp.where(ready, param, init + (param - jax.lax.stop_gradient(param)))
    self.step_size[...] = jnp.where(ready, param, init)
    self.calibrated[...] = jnp.ones((), jnp.int32)
    return step
