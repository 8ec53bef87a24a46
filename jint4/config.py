"""The training recipe of one INT4 linear layer.

`Int4Config` is a frozen, keyword-only dataclass: it decides *what* is computed
(which forward and backward quantizers, their ranges, the Hadamard block and the
leverage-score budget) and which engine computes the integer work. It holds no
arrays and no state, so it can be a static argument of `jax.jit` and of
`jax.custom_vjp`.

Defaults follow the paper (Xi, Li, Chen, Zhu, "Training Transformers with 4-bit
Integers", NeurIPS 2023): Hadamard quantizer with LSQ step sizes in the forward
pass (range [-7, 7], block 32), bit splitting in the backward pass, with
leverage score sampling (a budget of N of the 2N bit-split rows) where it pays:
on GPUs with INT4 tensor cores. Elsewhere (Hopper, CPU) the INT4 operands run on
INT8 engines, where the two bit-split halves cost one GEMM together, so sampling
would save no work and only add variance: ``backward="auto"`` keeps every row.
One departure: the step sizes start at the least quantization error
(``step_init="mse"``) rather than LSQ's rule, which is about 1.8x too coarse
for the Hadamard-transformed tensors (``step_init="lsq"`` restores it).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal, Optional, Tuple, Union

ForwardMode = Literal["hq", "lsq", "none"]
BackwardMode = Literal["auto", "lss", "bitsplit", "exact", "luq", "minmax"]
EngineChoice = Literal["auto", "native", "reference"]
StepInit = Literal["lsq", "mse"]
SplitScale = Literal["row", "tensor"]

FORWARD_MODES = ("hq", "lsq", "none")
BACKWARD_MODES = ("auto", "lss", "bitsplit", "exact", "luq", "minmax")
ENGINES = ("auto", "native", "reference")
STEP_INITS = ("lsq", "mse")
SPLIT_SCALES = ("row", "tensor")
_RENAMED = {"backward": {"nonzero": "bitsplit"}}
MAX_HADAMARD_BLOCK = 1024
# The smallest Hadamard block a layer may fall back to (`fit_hadamard_block`):
# below it the transform no longer spreads outliers, and such narrow products
# (the first layer of a small image model, say) cost little in float.
MIN_HADAMARD_BLOCK = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4Config:
  """How one linear layer is quantized.

  Attributes:
    forward: forward quantizer. ``"hq"``: Hadamard transform along the
      contraction dim, then LSQ on both operands (paper Sec. 4). ``"lsq"``:
      LSQ without the Hadamard transform (the paper's LSQ+LUQ baseline).
      ``"none"``: no quantization (float matmul).
    backward: gradient quantizer. ``"auto"`` (default): ``"lss"`` on GPUs with
      INT4 tensor cores (compute capability 8.x), else ``"bitsplit"``,
      decided per platform when the program is lowered (see
      `jint4.matmul.backward_mode`). ``"lss"``: bit splitting + leverage
      score sampling with a fixed budget (paper Sec. 5). ``"bitsplit"``: bit
      splitting with every row kept (the paper's reference code; an
      INT8-accurate gradient from two INT4 GEMMs, which INT8 tensor cores run
      as one on the joined digits). ``"exact"``:
      no gradient quantization (float products with the quantized forward
      operands). ``"luq"``: the LUQ baseline (Chmiel et al. 2021). ``"minmax"``:
      uniform min/max bins with stochastic rounding (the PTQ baseline).
    qn, qp: LSQ integer range [-qn, qp]. Paper: 7, 7. Reference code: 8, 7.
    hadamard_block: block size 2^k of the block-diagonal Hadamard transform, or
      ``"auto"`` for the paper's per-layer search at initialization (the chosen
      size is stored in the layer's ``quant_state``).
    lss_budget: fraction of the N token rows kept by leverage score sampling;
      the kept-row count is ``ceil(lss_budget * N)`` out of the 2N bit-split rows
      (paper: 1.0, i.e. N rows). Must be in (0, 2]. It is the weight
      gradient's budget, and the activation gradient's where
      ``lss_dx_budget`` says so.
    lss_dx_budget: the same fraction for the activation gradient dX = G W.
      ``2.0`` (default) keeps all 2N rows: dX is bit splitting's
      INT8-accurate product (one GEMM on the joined digits, as with
      ``"bitsplit"``), and only dW = G^T X is sampled. Sampling dX adds
      variance that every earlier layer's gradients inherit, while dW's
      reaches one weight: on a language model's dense gradients, sampling
      dX at the paper's budget cost most of the loss that sampling adds
      (docs/RESULTS.md). ``1.0`` samples dX as the paper does (Sec. 5), at
      half the dX GEMM's work where INT4 tensor cores run the halves. Must
      be in (0, 2].
    split_scale: the scale of the output gradient's bit split (``"lss"``
      and ``"bitsplit"``). ``"row"`` (default): one M_i = max|G_i| per token
      row (`jint4.quant.bitsplit.bit_split_rows`). For ``"lss"`` each row's
      high half then carries the row, so the sampler keeps high halves and
      samples low ones (on a language model's dense gradient this halves the
      loss gap that sampling adds at the paper's budget). For ``"bitsplit"``
      the dX GEMM's rows keep 98 levels each, where one M leaves a row far
      below max|G| (a masked-LM loss's unmasked tokens) mostly rounding
      noise; its dW GEMM reduces over the rows and keeps one M (the split
      handler writes both operands in one pass; the rows' maxima cost one
      more read of G than ``"tensor"``). docs/RESULTS.md and BENCHMARKS.md
      have the measurements. Still INT4 halves and unbiased. ``"tensor"``: one
      M = max|G| for the whole gradient, as the paper writes it.
    step_init: the rule that sets the step sizes at init (and calibration, and
      warm-up). ``"mse"`` (default): the step with the least quantization
      error of the Hadamard-transformed tensor T, searched from 0.1x to 1.2x
      LSQ's rule (`jint4.quant.lsq.mse_step_size`); for the near-Gaussian T
      that the transform makes, about 0.55x LSQ's rule with 2.4x less squared
      error, which lowered the INT4 pre-training loss gap (docs/RESULTS.md).
      ``"lsq"``: LSQ's ``2 mean|T| / sqrt(qp)`` on T, as the paper does
      (Sec. 4.1).
    warmup_steps: pre-training warm-up: for this many training steps the step
      sizes follow the init rule (``step_init``) of the current batch instead
      of being learned (needs the ``quant_state`` collection mutable).
    embedding_lsq: `jint4.int4ify` also quantizes the outputs of embedding
      layers (``nn.Embed`` / ``nnx.Embed``) with LSQ, a learned step and no
      Hadamard transform, as the paper's recipe does. Off by default: it saves
      no time (a lookup has no matmul) and only adds quantization noise.
    attention_products: `jint4.int4ify` also runs attention's two batched
      products, Q K^T and P V (``nn.MultiHeadDotProductAttention``,
      ``nnx.MultiHeadAttention``), as INT4 products with this recipe (HQ
      forward along head_dim and along the keys, the configured backward).
      Off by default, as in the paper, which keeps them in float.
    engine: which engine runs the integer work: ``"auto"`` (per op and
      platform, the faster of native and pure JAX; pure JAX with one warning
      where the native handlers cannot run), ``"native"`` (the XLA FFI
      handlers; an error where they cannot run) or ``"reference"`` (pure JAX,
      exact, runs anywhere). `jint4.engine_info()` shows the choice and why.
  """

  forward: ForwardMode = "hq"
  backward: BackwardMode = "auto"
  qn: int = 7
  qp: int = 7
  hadamard_block: Union[int, Literal["auto"]] = 32
  lss_budget: float = 1.0
  lss_dx_budget: float = 2.0
  split_scale: SplitScale = "row"
  step_init: StepInit = "mse"
  warmup_steps: int = 0
  embedding_lsq: bool = False
  attention_products: bool = False
  engine: EngineChoice = "auto"

  def __post_init__(self):
    _check_choice("forward", self.forward, FORWARD_MODES)
    _check_choice("backward", self.backward, BACKWARD_MODES)
    _check_choice("engine", self.engine, ENGINES)
    _check_choice("step_init", self.step_init, STEP_INITS)
    _check_choice("split_scale", self.split_scale, SPLIT_SCALES)
    if not isinstance(self.qn, int) or not 1 <= self.qn <= 8:
      raise ValueError(
          f"Int4Config.qn must be an int in [1, 8]; got {self.qn!r}. Use qn=7"
          " (paper) or qn=8 (reference code).")
    if not isinstance(self.qp, int) or not 1 <= self.qp <= 7:
      raise ValueError(
          f"Int4Config.qp must be an int in [1, 7] (4-bit two's complement"
          f" tops out at 7); got {self.qp!r}.")
    block = self.hadamard_block
    if block != "auto":
      if (not isinstance(block, int) or block < 1 or block & (block - 1)
          or block > MAX_HADAMARD_BLOCK):
        raise ValueError(
            "Int4Config.hadamard_block must be a power of two in [1,"
            f" {MAX_HADAMARD_BLOCK}] or 'auto'; got {block!r}.")
    for name in ("lss_budget", "lss_dx_budget"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, numbers.Real)
          or not 0.0 < float(value) <= 2.0):
        raise ValueError(
            f"Int4Config.{name} is the kept fraction of the N token rows and"
            f" must be a number in (0, 2] (2 keeps every bit-split row); got"
            f" {value!r}.")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(
          f"Int4Config.warmup_steps must be an int >= 0; got {self.warmup_steps!r}.")

    for name in ("embedding_lsq", "attention_products"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"Int4Config.{name} must be True or False; got"
                         f" {getattr(self, name)!r}.")

  @property
  def quantizes_forward(self) -> bool:
    return self.forward != "none"

  @property
  def uses_hadamard(self) -> bool:
    return self.forward == "hq"


def fit_hadamard_block(config: Int4Config, d: int
                       ) -> Tuple[Optional[Int4Config], str]:
  """The config a product contracting over ``d`` elements runs, and why.

  The configured block if it divides ``d`` (why: ""); else the largest power
  of two dividing ``d``, if it is at least `MIN_HADAMARD_BLOCK` (784 -> 16,
  48 -> 16); else ``(None, why)``: the product stays in float. Configs
  without the Hadamard transform, or with the "auto" block, fit any ``d``.
  """
  block = config.hadamard_block
  if not config.uses_hadamard or block == "auto" or d % block == 0:
    return config, ""
  fit = d & -d  # the largest power of two dividing d
  if fit < MIN_HADAMARD_BLOCK:
    return None, (f"no Hadamard block >= {MIN_HADAMARD_BLOCK} divides the"
                  f" contraction dim {d}")
  return dataclasses.replace(config, hadamard_block=min(fit, block)), (
      f"block {min(fit, block)}: {block} does not divide {d}")


def _check_choice(name, value, choices):
  renamed = _RENAMED.get(name, {}).get(value)
  if renamed:
    raise ValueError(f"Int4Config.{name}={value!r} is now called {renamed!r}.")
  if value not in choices:
    raise ValueError(
        f"Int4Config.{name} must be one of {choices}; got {value!r}.")
