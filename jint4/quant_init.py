"""The quantizer's initial state of one linear layer, from data.

Every INT4 layer (`Int4Dense`, `Int4Linear`, layers converted by `int4ify`)
and `jint4.calibrate` start their quantizers here, so one rule holds
everywhere. By default (``Int4Config(step_init="mse")``) each step is the
one with the least quantization error of X Hb (W Hb), searched around LSQ's
rule (`jint4.quant.lsq.mse_step_size`); with ``step_init="lsq"`` it is LSQ's
rule itself (paper Sec. 4.1):

    s_x0 = 2 mean|X Hb| / sqrt(Qp),      s_w0 = 2 mean|W Hb| / sqrt(Qp),

with Hb the block-diagonal Hadamard transform along the contraction dim D
(block 1 for ``forward="lsq"``). With ``hadamard_block="auto"`` the block is
chosen first by the reference code's per-layer search
(`jint4.quant.hadamard.search_hadamard_block`) on the same batch and kernel.
An empty batch carries no information: its step is 1.0, as for an all-zero
tensor; a NaN/Inf in the data gives a NaN/Inf step, so it stays visible.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jint4.config import Int4Config
from jint4.matmul import check_contraction_dim
from jint4.quant import hadamard
from jint4.quant import lsq


class QuantInit(NamedTuple):
  """Initial quantizer state: float32 step sizes and the int32 log2 block."""
  step_x: jax.Array
  step_w: jax.Array
  log2_block: jax.Array


def init_step_sizes(x: jax.Array, kernel: jax.Array, config: Int4Config, *,
                    log2_block: Optional[jax.Array] = None) -> QuantInit:
  """LSQ's initial step sizes of a layer's input ``x`` [..., D] and its
  ``kernel`` [D, C] (Flax layout), for ``config``'s forward quantizer.

  ``log2_block``: the Hadamard block already chosen (int32 log2, may be
  traced) for ``hadamard_block="auto"``; searched on (x, kernel) when None.
  Traceable. Without a forward quantizer (``forward="none"``) the steps are
  1.0 and unused.
  """
  x = jnp.asarray(x)
  kernel = jnp.asarray(kernel)
  one = jnp.ones((), jnp.float32)
  if not config.quantizes_forward:
    return QuantInit(one, one, jnp.zeros((), jnp.int32))
  check_contraction_dim(kernel.shape[0], config)
  block = config.hadamard_block if config.uses_hadamard else 1
  if block == "auto":
    if log2_block is None:
      log2_block = hadamard.search_hadamard_block(x, kernel, qn=config.qn,
                                                  qp=config.qp)
    block = jnp.asarray(log2_block, jnp.int32)
    log2 = block
  else:
    log2 = jnp.asarray(int(block).bit_length() - 1, jnp.int32)
  return QuantInit(_init_step(x.reshape(-1, kernel.shape[0]), block, -1, config),
                   _init_step(kernel, block, 0, config), log2)


def _init_step(t, block, axis, config):
  """The init rule's step of t Hb, computed on t / 2^e with 2^e near max|t|
  and scaled back: exact (powers of two), and the transform's sums cannot
  overflow for finite t near float32's limit. A non-finite t is left as it
  is, so its step stays NaN / Inf."""
  t = t.astype(jnp.float32)
  peak = jnp.max(jnp.abs(t), initial=0.0)
  usable = jnp.isfinite(peak) & (peak > 0)
  _, e = jnp.frexp(jnp.where(usable, peak, 1.0))
  scale = jnp.where(usable, jnp.ldexp(jnp.float32(1.0), e), 1.0)
  th = hadamard.apply_block_hadamard(t / scale, block, axis=axis)
  return lsq.step_size_rule(th, config.step_init, qn=config.qn, qp=config.qp) * scale
