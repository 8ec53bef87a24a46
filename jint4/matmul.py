"""The INT4 linear-layer op: HQ forward, BS/LSS backward, as one custom_vjp.

For x[..., D] and a Flax-layout kernel[D, C] (so W = kernel^T), with the
block-diagonal Hadamard transform Hb on D (`jint4.quant.hadamard`) and LSQ step
sizes s_x, s_w (`jint4.quant.lsq`):

Forward (HQ-MM, paper Sec. 4):
    q_x = int_{s_x}(X Hb),  q_w = int_{s_w}(W Hb)           (INT4 values)
    Y   = s_x s_w (q_x q_w^T)                    (int32 accumulation)

Backward (paper Sec. 5), G = dL/dY:
    G ~= s_hi hi + s_lo lo                       (bit splitting; 2N INT4 rows)
    dX_hat_h = G W_hat_h,   dW_hat_h = G^T X_hat_h  (leverage score sampling:
                                                  fixed budget, 1/p rescaling)
    dX = (1[in range] * dX_hat_h) Hb^T,   dW = (1[in range] * dW_hat_h) Hb^T
    ds = g * sum(dT_hat_h * delta)               (LSQ step-size gradients)

Backward modes (`Int4Config.backward`; "auto" picks "lss" on INT4 tensor
cores, else "bitsplit": `backward_mode`, per platform):
  "lss":     dX: keep B of the 2N bit-split rows (scores ||G2_i||), one INT4
             GEMM over the B kept rows with the 1/p_i and half scales applied
             per output row in the epilogue, scatter-added to their token.
             dW: keep B rows (scores ||G2_i|| ||X_i||); the reduction runs over
             the kept rows, so the per-row factors s_half / p_i cannot go to an
             epilogue: the weighted kept rows are bit-split again (unbiased),
             and the hi/lo GEMM pair over the B kept rows runs joined (below).
             B = ceil(lss_budget * N). With split_scale="row" each row
             G_i is split with its own M_i = max|G_i| (G_i / M_i split with
             M = 1, the handler scaling the rows as it reads G; M_i joins
             the row's half scale, hence its score and factor).
  "bitsplit": bit splitting, every row kept: the hi/lo GEMM pair of each
             gradient runs joined, one GEMM per gradient. With
             split_scale="row" the dX GEMM's rows are split on their own
             M_i (M_i in its epilogue's row scale); the dW GEMM sums over
             the rows and keeps the split with one M. One pass over G
             writes both operands.
  Joined pairs: s_hi (hi A) + s_lo (lo A) = s_lo ((14 hi + lo) A), since
  s_hi = 14 s_lo, and 14 hi + lo is an exact integer in [-98, 98]: one GEMM on
  the joined digits gives the same int32 accumulator as the two INT4 GEMMs
  added. Hopper runs INT4 values on INT8 tensor cores anyway, so the pair costs
  one GEMM there (an INT4-only engine would run the two halves).
  "exact":   float G against the dequantized forward operands.
  "luq", "minmax": the paper's gradient-quantizer baselines, in float.

Every integer GEMM and quantize step goes through an `Engine`, handed in per
platform by `jint4.kernels.run_per_platform` when XLA lowers the program;
this module only decides what to compute.

Saved for the backward, per element of X: its 4-bit code and one stochastic
bit that encodes LSQ's delta without bias (`jint4.quant.lsq`): 0.625 bytes for
the default range [-7, 7] (0.75 bytes for [-8, 7]), against 2 bytes of a
bfloat16 activation; plus one float32 per token row (the row norm of q_x, the
weight gradient's leverage scores and the row's non-finite flag). The kernel
itself is a parameter and is kept by reference, with its dX GEMM operand
q_w^T (one int8 per weight, quantized by the forward's pass together with
q_w), so the backward does not quantize the kernel again.

Non-finite values stay visible: a NaN/Inf in a row of X makes that row of Y
NaN, in a column of W that column, as a float matmul would; a NaN/Inf in G
makes the gradients NaN. An all-zero G gives zero gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jint4 import partition
from jint4.config import Int4Config
from jint4.kernels import contract
from jint4.kernels.engine import Engine
from jint4.kernels.engine import get_engine
from jint4.kernels.engine import run_per_platform
from jint4.quant import bitsplit
from jint4.quant import hadamard
from jint4.quant import lsq
from jint4.quant import lss
from jint4.quant.luq import luq_quantize
from jint4.quant.minmax import minmax_quantize

_HIGHEST = jax.lax.Precision.HIGHEST


def int4_matmul(x: jax.Array, kernel: jax.Array, step_x: jax.Array,
                step_w: jax.Array, key: jax.Array, *,
                config: Int4Config = Int4Config(),
                bias: Optional[jax.Array] = None,
                hadamard_log2_block: Optional[jax.Array] = None) -> jax.Array:
  """y = x @ kernel (+ bias) with INT4 forward and backward matmuls.

  Args:
    x: activations [..., D], float32 / bfloat16 / float16; any leading dims.
    kernel: [D, C], as `flax.linen.Dense`'s kernel.
    step_x, step_w: scalar LSQ step sizes of x and of the kernel.
    key: a JAX PRNG key for the stochastic rounding and sampling; the same key
      gives bit-identical results.
    config: the quantization recipe.
    bias: optional [C], added in float32 inside the GEMM's dequantize epilogue
      (before the one rounding to the output dtype); its gradient is the
      float32 row sum of G.
    hadamard_log2_block: log2 of the Hadamard block as an int32 scalar (may be
      traced); required when ``config.hadamard_block == "auto"``, else unused.
  Returns:
    [..., C] in the promoted dtype of x and kernel.
  """
  _check_inputs(x, kernel, step_x, step_w, key, config, hadamard_log2_block)
  d, c = kernel.shape
  lead = x.shape[:-1]
  y = _matmul3(x.reshape(1, -1, d), kernel[None], step_x, step_w, key,
               config=config, bias=bias, log2=hadamard_log2_block, batched=False)
  return y.reshape(*lead, c)


def _matmul3(x3, kernel3, step_x, step_w, key, *, config, bias, log2, batched):
  """y[b] = x3[b] @ kernel3[b] for x3 [B, N, D], kernel3 [B, D, C], as one op
  (`jint4.partition`: one partitioning rule for the forward, one for the
  backward); ``batched``: independent randomness per b (the key folded with
  b), else B == 1 and the key is used as given."""
  hook = _PRODUCT_HOOK.get()
  if hook is not None:  # `product_hook`: jint4.diagnose is watching
    return _run_hooked(hook, x3, kernel3, step_x, step_w, key, config=config,
                       bias=bias, log2=log2, batched=batched)
  out_dtype = jnp.result_type(x3.dtype, kernel3.dtype)
  _, n, d = x3.shape
  c = kernel3.shape[2]
  if config.uses_hadamard and config.hadamard_block == "auto":
    block, log2 = None, jnp.asarray(log2, jnp.int32)
  else:
    block = config.hadamard_block if config.uses_hadamard else 1
    log2 = jnp.zeros((), jnp.int32)
  if bias is not None and bias.shape != (c,):
    raise ValueError(f"bias must have shape ({c},); got {bias.shape}.")
  if n == 0 or c == 0:
    # No tokens (or no outputs): nothing to quantize, and every gradient is
    # an empty sum. The float product has the right shapes and zero
    # gradients, as nn.Dense gives.
    y = jnp.einsum("bnd,bdc->bnc", x3, kernel3, preferred_element_type=jnp.float32)
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
  if batched:  # the batch index folded into the key
    key = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x3.shape[0]))
  else:
    key = jax.tree.map(lambda k: k[None], key)
  key_data, key_impl = _key_data(key)
  static = _Static(config=config, block=block, x_dtype=np.dtype(x3.dtype),
                   out_dtype=np.dtype(out_dtype),
                   bias_dtype=None if bias is None else np.dtype(bias.dtype),
                   key_impl=key_impl, flat_residual=d % 8 != 0,
                   name=partition.layer_name())
  if bias is None:
    bias = jnp.zeros((c,), jnp.float32)
  return _int4_matmul_3d(x3, kernel3, bias, jnp.asarray(step_x),
                         jnp.asarray(step_w), key_data, log2, static)


def _key_data(key):
  """(raw key data, the keys' implementation name or None for raw keys):
  what the partitioned op carries across its boundary, one key per batch
  element."""
  key = jnp.asarray(key) if not hasattr(key, "dtype") else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key), str(jax.random.key_impl(key))
  return key, None


def _wrap_key(key_data, static):
  if static.key_impl is None:
    return key_data
  return jax.random.wrap_key_data(key_data, impl=static.key_impl)


def int4_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                     step_lhs: jax.Array, step_rhs: jax.Array, key: jax.Array,
                     *, config: Int4Config = Int4Config(),
                     bias: Optional[jax.Array] = None,
                     hadamard_log2_block: Optional[jax.Array] = None,
                     precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.dot_general` with INT4 forward and backward matmuls.

  ``dimension_numbers = ((lhs_contracting, rhs_contracting), (lhs_batch,
  rhs_batch))`` as in `lax.dot_general`, and the same result layout: batch
  dims (in ``lhs_batch`` order), then lhs's free dims, then rhs's free dims
  (each in ascending axis order). rhs plays the part of `int4_matmul`'s
  kernel, lhs that of its activations.

  With B = prod(batch sizes), M = prod(lhs free sizes), K = prod(contracting
  sizes) and N = prod(rhs free sizes), the operands are flattened to

      X[b] = lhs  (batch, free, contracting dims)  ->  [B, M, K]
      W[b] = rhs  (batch, contracting, free dims)  ->  [B, K, N]

  with the contracting dims joined in the order given (so the Hadamard block
  runs along that joined K and must divide K), and

      Y[b] = int4_matmul(X[b], W[b], s_x, s_w, fold_in(key, b)) (+ bias)

  with ONE per-tensor step pair (s_x for all of lhs, s_w for all of rhs) and
  independent randomness per batch element. Without batch dims this is one
  `int4_matmul` call (B = 1, key as given), bit for bit.

  Step-size gradients: LSQ's gradient of one step over the whole operand,
  with T = X Hb (Hb along K) and delta as in `jint4.quant.lsq`,
      dL/ds_x = 1 / sqrt(Qp * B*M*K) * sum over all B*M*K elements of
                dL/dT_hat * delta
  (likewise s_w over the B*K*N elements of W Hb). Per batch element `int4_matmul` scales
  its sum by 1 / sqrt(Qp * M*K), so the batched op's step gradient is the sum
  of the B per-element step gradients times 1 / sqrt(B). dX, dW and the bias
  gradient are the per-element ones (the bias's summed over b).

  Args:
    lhs, rhs: float32 / bfloat16 / float16 operands.
    dimension_numbers: as `lax.dot_general`'s (negative axes allowed).
    step_lhs, step_rhs: scalar LSQ step sizes of lhs and rhs.
    key: a JAX PRNG key.
    config: the quantization recipe.
    bias: optional, of shape rhs's free dims, added in float32 in the
      forward GEMM's epilogue (broadcast over the batch and lhs free dims).
    hadamard_log2_block: log2 of the Hadamard block (int32 scalar, may be
      traced); required when ``config.hadamard_block == "auto"``.
    precision: accepted for `lax.dot_general` compatibility and ignored (the
      products are exact integer GEMMs).
    preferred_element_type: the result is cast to it (the result is
      otherwise in the promoted dtype of lhs and rhs).
  Returns:
    the product, shaped batch + lhs free + rhs free dims.
  """
  del precision
  if key is None:
    raise ValueError("int4_dot_general needs a PRNG key (jax.random.key(seed))"
                     " for its stochastic rounding and sampling.")
  ops = flatten_dot_general(lhs, rhs, dimension_numbers)
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != ops.rhs_free_shape:
      raise ValueError(
          f"bias must have the shape of rhs's free dims {ops.rhs_free_shape};"
          f" got {bias.shape}.")
    bias = bias.reshape(-1)
  if not ops.batched:
    y = int4_matmul(ops.x, ops.w, step_lhs, step_rhs, key, config=config,
                    bias=bias, hadamard_log2_block=hadamard_log2_block)
  else:
    y = _batched_int4_matmul(ops, step_lhs, step_rhs, key, config=config,
                             bias=bias, log2=hadamard_log2_block)
  y = y.reshape(ops.out_shape)
  if preferred_element_type is not None:
    y = y.astype(preferred_element_type)
  return y


@dataclasses.dataclass(frozen=True)
class DotGeneralOperands:
  """A dot_general's operands as `int4_matmul` takes them
  (`flatten_dot_general`)."""
  x: jax.Array            # [B, M, K] with batch dims, else [M, K]
  w: jax.Array            # [B, K, N] with batch dims, else [K, N]
  batched: bool
  batch_shape: Tuple[int, ...]
  lhs_free_shape: Tuple[int, ...]
  rhs_free_shape: Tuple[int, ...]

  @property
  def out_shape(self) -> Tuple[int, ...]:
    return self.batch_shape + self.lhs_free_shape + self.rhs_free_shape

  def init_view(self) -> Tuple[jax.Array, jax.Array]:
    """(x [B*M, K], kernel [K, B*N]): every element under each per-tensor
    step, in the layout `jint4.init_step_sizes` takes (Hadamard along K)."""
    k = self.x.shape[-1]
    if not self.batched:
      return self.x, self.w
    return self.x.reshape(-1, k), jnp.moveaxis(self.w, 0, 1).reshape(k, -1)


def flatten_dot_general(lhs, rhs, dimension_numbers) -> DotGeneralOperands:
  """Checks a dot_general's operands and dimension numbers and flattens them
  to x [B, M, K] / w [B, K, N] ([M, K] / [K, N] without batch dims): batch
  dims first, the contracting dims joined in the order given, the free dims
  in ascending axis order, as `lax.dot_general` orders its result."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  for name, t in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(t.dtype, jnp.floating):
      hint = (" Complex values are not supported." if
              jnp.issubdtype(t.dtype, jnp.complexfloating) else
              f" Cast it first, e.g. {name}.astype(jnp.float32).")
      raise TypeError(
          f"int4_dot_general takes float32/bfloat16/float16 {name}; got"
          f" {t.dtype}." + hint)
  lc, rc, lb, rb = _dimension_numbers(dimension_numbers, lhs.ndim, rhs.ndim)
  for kind, la, ra in (("contracting", lc, rc), ("batch", lb, rb)):
    if len(la) != len(ra):
      raise ValueError(
          f"int4_dot_general: lhs and rhs need as many {kind} dims; got lhs"
          f" {la}, rhs {ra} in {dimension_numbers}.")
    for a, b in zip(la, ra):
      if lhs.shape[a] != rhs.shape[b]:
        raise ValueError(
            f"int4_dot_general: {kind} dims differ in size: lhs {lhs.shape}"
            f" dim {a} ({lhs.shape[a]}) vs rhs {rhs.shape} dim {b}"
            f" ({rhs.shape[b]}); dimension_numbers {dimension_numbers}.")
  for name, t, used in (("lhs", lhs, lc + lb), ("rhs", rhs, rc + rb)):
    if len(set(used)) != len(used):
      raise ValueError(
          f"int4_dot_general: {name}'s contracting and batch dims must be"
          f" distinct; got {used} for shape {t.shape} in {dimension_numbers}.")
  lfree = [a for a in range(lhs.ndim) if a not in lc + lb]
  rfree = [a for a in range(rhs.ndim) if a not in rc + rb]
  sizes = lambda t, axes: tuple(t.shape[a] for a in axes)
  batch_shape = sizes(lhs, lb)
  k = _prod(sizes(lhs, lc))
  lead = (_prod(batch_shape),) if lb else ()
  x = jnp.transpose(lhs, lb + tuple(lfree) + lc).reshape(
      *lead, _prod(sizes(lhs, lfree)), k)
  w = jnp.transpose(rhs, rb + rc + tuple(rfree)).reshape(
      *lead, k, _prod(sizes(rhs, rfree)))
  return DotGeneralOperands(x, w, bool(lb), batch_shape, sizes(lhs, lfree),
                            sizes(rhs, rfree))


def _prod(sizes) -> int:
  return int(np.prod(sizes, dtype=np.int64))


# --- the product hook (jint4.diagnose) -----------------------------------------


@dataclasses.dataclass(frozen=True)
class ProductCall:
  """One INT4 product as every entry point hands it to the op: y[b] =
  x3[b] @ kernel3[b] (+ bias), x3 [B, N, D], kernel3 [B, D, C]. What a
  `product_hook` is shown."""
  name: str                   # the layer's path (`jint4.partition.layer_name`)
  x3: jax.Array
  kernel3: jax.Array
  step_x: jax.Array
  step_w: jax.Array
  config: Int4Config
  log2: Optional[jax.Array]   # hadamard_log2_block as given (None unless "auto")
  batched: bool               # a batched dot_general (key folded per element)
  bias: Optional[jax.Array]   # [C], added to every y[b] (None: no bias)


_PRODUCT_HOOK = contextvars.ContextVar("jint4_product_hook", default=None)


@contextlib.contextmanager
def product_hook(hook: Optional[Callable[[ProductCall, Callable], jax.Array]]):
  """While active, each INT4 product traced in this context calls
  ``hook(call, run)`` and returns what the hook returns, y3 [B, N, C]-shaped;
  ``run(config, x3, kernel3)`` computes the product of ``x3`` and
  ``kernel3`` (``call``'s operands or others of their shapes) with
  ``config``, its steps, key and bias, with no hook. The hook is read when a
  product is traced (inside `jax.jit`, at trace time), and is unset by
  default: then nothing changes. `jint4.diagnose` uses it to record each
  product's operands and add zero probes to its operands and its output,
  whose gradients are the product's dX, dW and output gradient G."""
  token = _PRODUCT_HOOK.set(hook)
  try:
    yield
  finally:
    _PRODUCT_HOOK.reset(token)


def _run_hooked(hook, x3, kernel3, step_x, step_w, key, *, config, bias, log2,
                batched):
  call = ProductCall(name=partition.layer_name(), x3=x3, kernel3=kernel3,
                     step_x=jnp.asarray(step_x), step_w=jnp.asarray(step_w),
                     config=config, log2=log2, batched=batched, bias=bias)

  def run(cfg: Int4Config, x3: jax.Array, kernel3: jax.Array) -> jax.Array:
    with product_hook(None):
      return _matmul3(x3, kernel3, step_x, step_w, key, config=cfg, bias=bias,
                      log2=log2, batched=batched)

  return hook(call, run)


def _dimension_numbers(dimension_numbers, lhs_ndim, rhs_ndim):
  """((lc, rc), (lb, rb)) as tuples of non-negative ints, range-checked."""
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(axes) for axes in (lc, rc, lb, rb))
    if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
               for a in lc + rc + lb + rb):
      raise TypeError
  except (TypeError, ValueError):
    raise ValueError(
        "int4_dot_general: dimension_numbers must be ((lhs_contracting,"
        " rhs_contracting), (lhs_batch, rhs_batch)), each a sequence of ints,"
        f" as lax.dot_general's; got {dimension_numbers!r}.") from None

  def norm(axes, ndim, name):
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(
            f"int4_dot_general: axis {a} is out of range for {name} with"
            f" {ndim} dims; dimension_numbers {dimension_numbers}.")
    return tuple(a % ndim for a in axes)

  return (norm(lc, lhs_ndim, "lhs"), norm(rc, rhs_ndim, "rhs"),
          norm(lb, lhs_ndim, "lhs"), norm(rb, rhs_ndim, "rhs"))


def _batched_int4_matmul(ops, step_x, step_w, key, *, config, bias, log2):
  """One INT4 product per batch element, as one op: one step pair shared by
  all elements, the batch index folded into the key, and the step gradients
  summed over the elements times 1 / sqrt(B), which makes them LSQ's
  gradient over the whole tensor."""
  b = ops.x.shape[0]
  if b == 0:
    # No batch elements: the float product has the right (empty) shapes.
    out_dtype = jnp.result_type(ops.x.dtype, ops.w.dtype)
    return jnp.zeros((0, ops.x.shape[1], ops.w.shape[2]), out_dtype)
  _check_inputs(ops.x[0], ops.w[0], step_x, step_w, key, config, log2)
  scale = 1.0 / float(np.sqrt(b))
  step_x = _scale_gradient(jnp.asarray(step_x), scale)
  step_w = _scale_gradient(jnp.asarray(step_w), scale)
  return _matmul3(ops.x, ops.w, step_x, step_w, key, config=config, bias=bias,
                  log2=log2, batched=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_gradient(t, scale):
  """t itself, with its gradient multiplied by ``scale``."""
  return t


def _scale_gradient_fwd(t, scale):
  return t, None


def _scale_gradient_bwd(scale, _, g):
  return (g * jnp.asarray(scale, g.dtype),)


_scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


@dataclasses.dataclass(frozen=True)
class _Static:
  config: Int4Config
  block: Optional[int]  # None: the traced log2 block is used
  x_dtype: np.dtype
  out_dtype: np.dtype
  bias_dtype: Optional[np.dtype]  # None: no bias (a zero bias is passed)
  key_impl: Optional[str] = None  # the key's PRNG implementation (None: raw)
  name: str = "int4_matmul"       # the layer, for errors raised when partitioned
  flat_residual: bool = False     # D % 8 != 0: the residual cannot split by rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _int4_matmul_3d(x3, kernel3, bias, sx, sw, key_data, log2, static):
  return _forward(x3, kernel3, bias, sx, sw, key_data, log2, static)[0]


def _block(static, log2):
  return static.block if static.block is not None else log2


def _forward(x3, kernel3, bias, sx, sw, key_data, log2, static):
  cfg = static.config
  if not cfg.quantizes_forward:
    y = jnp.einsum("bnd,bdc->bnc", x3, kernel3, precision=_HIGHEST,
                   preferred_element_type=jnp.float32)
    y = y + bias.astype(jnp.float32)
    return y.astype(static.out_dtype), (x3, kernel3, sx, sw)
  spec = partition.OpSpec(shard_fn=_forward_shard, layout_fn=_forward_layout,
                          shardings_fn=_forward_shardings, static=static)
  y, nibbles, flags, norms, qwt = _FORWARD[static.flat_residual](
      spec, x3, kernel3, bias, sx, sw, key_data, log2)
  return y, (nibbles, flags, norms, qwt, kernel3, sx, sw, key_data, log2)


def _forward_shard(spec, comm, x3, kernel3, bias, sx, sw, key_data, log2):
  """The forward on one shard: x3 [B, N, D] and kernel3 [B, D, C] local."""
  static = spec.static
  fn = functools.partial(_quantized_forward, static=static, comm=comm)

  def one(x2, kernel, key):
    return run_per_platform(static.config.engine, fn, x2, kernel, bias, sx, sw,
                            key, log2)

  keys = _wrap_key(key_data, static)
  y, res, qwt = _per_element(one, x3, kernel3, keys)
  nibbles, flags = _residual_grid(res, x3.shape, static)
  return y, nibbles, flags, res.norms, qwt


def _per_element(fn, a3, b3, keys):
  """``fn(a, b, key)`` per batch element (leading dim) of a3, b3, keys."""
  if jax.tree.leaves(a3)[0].shape[0] == 1:  # one element: no vmap around the op
    first = lambda tree: jax.tree.map(lambda t: t[0], tree)
    return jax.tree.map(lambda t: t[None], fn(first(a3), first(b3), first(keys)))
  return jax.vmap(fn)(a3, b3, keys)


def _residual_grid(res, x_shape, static):
  """The residual's packed bytes laid out by rows ([B, N, D/2] and
  [planes, B, N, D/8]), so that they shard like x; [B, N*D/2] and
  [planes, B, N*D/8] when D % 8 != 0 (rows then share bytes)."""
  b, n, d = x_shape
  if static.flat_residual:
    return res.nibbles, jnp.moveaxis(res.flags, 1, 0)
  return (res.nibbles.reshape(b, n, d // 2),
          jnp.moveaxis(res.flags, 1, 0).reshape(-1, b, n, d // 8))


def _residual_of(nibbles, flags, norms, i):
  """Batch element ``i``'s `contract.Residual` from the grid form."""
  return contract.Residual(nibbles[i].reshape(-1),
                           flags[:, i].reshape(flags.shape[0], -1), norms[i])


def _quantized_forward(eng: Engine, x2, kernel, bias, sx, sw, key, log2, *,
                       static, comm):
  cfg = static.config
  lay = comm.layout
  seeds = contract.seeds_from_key(comm.key_for(key, "n", "d"), _NUM_SEEDS)
  block = _block(static, log2)
  sx32, sw32 = sx.astype(jnp.float32), sw.astype(jnp.float32)
  qx, res_x = eng.hadamard_quantize(x2, sx32, block=block, qn=cfg.qn,
                                    qp=cfg.qp, seed=seeds[_SEED_RESIDUAL])
  # A row's norm (and its NaN flag) over the whole contraction dim.
  res_x = res_x._replace(norms=comm.row_norms(res_x.norms, "d"))
  # kernel[D, C] -> q_w[C, D] (this GEMM's operand) and q_w^T[D, C] (the dX
  # GEMM's), Hb along D, both K-major, in one pass; q_w^T is kept for the
  # backward (1 byte per weight) instead of quantizing the kernel again.
  # Rows of x (columns of the kernel) holding NaN/Inf give NaN rows (columns)
  # of y, through the epilogue: row scale 1 or NaN (the residual's row flag),
  # column bias 0 or NaN (col_poison, from the same pass over the kernel),
  # plus the layer's bias (added in float32 before the one rounding to
  # out_dtype, so no pass over y).
  qw, qwt, col_bias = eng.hadamard_quantize_weight(kernel, sw32, block=block,
                                                   qn=cfg.qn, qp=cfg.qp)
  # Sharded: the kernel's shard is quantized where it lives and its codes
  # move (packed) to x's grid; a column is poisoned by any shard of it.
  col_bias = comm.regrid(comm.psum(col_bias, "kd"), lay.kc, lay.c, 0)
  qw = comm.regrid_codes(qw, [(0, lay.kc, lay.c), (1, lay.kd, lay.d)],
                         pack_axis=1)
  partial = bool(lay.d)  # a shard of D: y is summed over the shards
  if static.bias_dtype is not None and not partial:
    col_bias = col_bias + bias.astype(jnp.float32)
  y = eng.int_gemm(qx, qw, scale=sx32 * sw32, row_scale=res_x.row_flag,
                   col_bias=col_bias,
                   out_dtype=jnp.float32 if partial else static.out_dtype)
  if partial:
    y = comm.psum(y, "d")
    if static.bias_dtype is not None:
      y = y + bias.astype(jnp.float32)
  return y.astype(static.out_dtype), res_x, qwt


_NUM_SEEDS = 5
_SEED_RESIDUAL, _SEED_SPLIT, _SEED_SAMPLE, _SEED_RESPLIT, _SEED_BASELINE = range(_NUM_SEEDS)


def _backward(static, res, g):
  cfg = static.config
  bias_grad = (None if static.bias_dtype is None else
               jnp.sum(g.astype(jnp.float32), axis=(0, 1)).astype(static.bias_dtype))
  if not cfg.quantizes_forward:
    x3, kernel3, sx, sw = res
    g32 = g.astype(jnp.float32)
    dx = jnp.einsum("bnc,bdc->bnd", g32, kernel3.astype(jnp.float32),
                    precision=_HIGHEST)
    dk = jnp.einsum("bnd,bnc->bdc", x3.astype(jnp.float32), g32,
                    precision=_HIGHEST)
    return (dx.astype(x3.dtype), dk.astype(kernel3.dtype), bias_grad,
            jnp.zeros_like(sx), jnp.zeros_like(sw), None, None)
  nibbles, flags, norms, qwt, kernel3, sx, sw, key_data, log2 = res
  spec = partition.OpSpec(shard_fn=_backward_shard, layout_fn=_backward_layout,
                          shardings_fn=_backward_shardings, static=static)
  dx, dk, dsx, dsw = _BACKWARD[static.flat_residual](
      spec, g, nibbles, flags, norms, qwt, kernel3, sx, sw, key_data, log2)
  return (dx, dk, bias_grad, jnp.sum(dsx).astype(sx.dtype).reshape(sx.shape),
          jnp.sum(dsw).astype(sw.dtype).reshape(sw.shape), None, None)


def _backward_shard(spec, comm, g3, nibbles, flags, norms, qwt3, kernel3, sx, sw,
                    key_data, log2):
  """The backward on one shard: dx, dk and the step gradients per batch
  element (their sum is the step's gradient)."""
  static = spec.static
  fn = functools.partial(_quantized_backward, static=static, comm=comm)
  keys = _wrap_key(key_data, static)
  index = jnp.arange(g3.shape[0])

  def one(i, qwt_kernel, key):
    qwt, kernel = qwt_kernel
    res_x = _residual_of(nibbles, flags, norms, i)
    return run_per_platform(static.config.engine, fn, g3[i], res_x, qwt, kernel,
                            sx, sw, key, log2)

  return _per_element(one, index, (qwt3, kernel3), keys)


def _quantized_backward(eng: Engine, g, res_x, qwt, kernel, sx, sw, key, log2,
                        *, static, comm):
  cfg = static.config
  lay = comm.layout
  # Randomness: per element of G from its (n, c) shard; the sampled rows are
  # one decision for every shard that holds a row (only n splits them).
  seeds = contract.seeds_from_key(comm.key_for(key, "n", "c"), _NUM_SEEDS)
  row_seeds = contract.seeds_from_key(comm.key_for(key, "n"), _NUM_SEEDS)
  block = _block(static, log2)
  qn, qp = cfg.qn, cfg.qp
  n, c = g.shape
  sx32, sw32 = sx.astype(jnp.float32), sw.astype(jnp.float32)
  # dX_hat leaves its GEMM in bfloat16 for bfloat16 activations (dX is
  # rounded to bfloat16 at the end anyway; half the bytes for the GEMM to
  # write and lsq_backward to read), else in float32; float32 where the
  # shards' partial products are still to be added.
  dxh_dtype = (jnp.bfloat16 if static.x_dtype == jnp.bfloat16 and not lay.c
               else jnp.float32)
  # Likewise dW_hat for a bfloat16 kernel (dK is rounded to it at the end).
  dwh_dtype = (jnp.bfloat16 if kernel.dtype == jnp.bfloat16 and not lay.n
               else jnp.float32)
  # The dX GEMM's operand q_w^T[D, C] (Hb along D), K-major over C, kept by
  # the forward on the kernel's grid; moved (packed) to G's grid.
  qwt = comm.regrid_codes(qwt, [(0, lay.kd, lay.d), (1, lay.kc, lay.c)],
                          pack_axis=0)
  d = qwt.shape[0]
  ctx = _Context(eng=eng, cfg=cfg, seeds=seeds, row_seeds=row_seeds, comm=comm,
                 res_x=res_x, shape_x=(n, d), sx=sx32, sw=sw32,
                 dxh_dtype=dxh_dtype, dwh_dtype=dwh_dtype)

  # Each mode gives dX_hat (as rows + optional token slots) and dW_hat[D, C],
  # both in the Hadamard domain, partial over the shards of C and of N.
  mode = backward_mode(cfg, engine=eng)
  dx_rows, slots, dwh_hat = _GRADIENT_PRODUCTS[mode](ctx, g, qwt)
  dx_rows = comm.psum(dx_rows, "c")

  # Activation side, one fused pass: gather the kept rows to their token, STE
  # mask and step gradient from the residual, then Hb^T.
  dx, delta_sum_x = eng.lsq_backward(dx_rows, res_x, qn=qn, qp=qp, slots=slots,
                                     block=block, out_dtype=static.x_dtype)
  numel_x = comm.global_size(n, "n") * comm.global_size(d, "d")
  dsx = lsq.grad_scale(numel_x, qp=qp) * comm.psum(delta_sum_x, "n", "d")
  # Weight side: dW_hat summed over the token shards onto the kernel's grid;
  # the kernel is kept, so its mask and delta are exact.
  dwh_hat = comm.reduce_regrid(dwh_hat, comm.axes("n"),
                               [(0, lay.d, lay.kd), (1, lay.c, lay.kc)])
  dk, delta_sum_w = eng.lsq_weight_backward(dwh_hat, kernel, sw32, block=block,
                                            qn=qn, qp=qp)
  numel_w = comm.global_size(kernel.shape[0], "kd") * comm.global_size(
      kernel.shape[1], "kc")
  dsw = lsq.grad_scale(numel_w, qp=qp) * comm.psum(delta_sum_w, "kd", "kc")
  return dx, dk, dsx, dsw


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every gradient-product mode may use."""
  eng: Engine
  cfg: Int4Config
  seeds: jax.Array           # per element of G (this shard's)
  row_seeds: jax.Array       # per row decision (the same on a row's shards)
  comm: partition.Comm
  res_x: contract.Residual   # the activation residual (codes, flags, norms)
  shape_x: Tuple[int, int]
  sx: jax.Array
  sw: jax.Array
  dxh_dtype: object      # dtype of the integer GEMMs' dX_hat
  dwh_dtype: object      # dtype of the integer GEMMs' dW_hat

  def qx(self, **kw):
    return self.eng.residual_values(self.res_x, self.shape_x, qn=self.cfg.qn,
                                    qp=self.cfg.qp, **kw)


def _products_float(ctx, gq, qwt):
  """Float G against the dequantized forward operands (baselines)."""
  w_hat = qwt.astype(jnp.float32) * ctx.sw                     # [D, C]
  x_hat = ctx.qx().astype(jnp.float32) * ctx.sx                # [N, D]
  dxh_hat = jnp.matmul(gq, w_hat.T, precision=_HIGHEST)
  dwh_hat = jnp.matmul(x_hat.T, gq, precision=_HIGHEST)
  return dxh_hat, None, dwh_hat


def _products_exact(ctx, g, qwt):
  return _products_float(ctx, g.astype(jnp.float32), qwt)


def _products_luq(ctx, g, qwt):
  u = contract.uniform(ctx.seeds[_SEED_BASELINE], g.shape)
  return _products_float(ctx, luq_quantize(g.astype(jnp.float32), u), qwt)


def _products_minmax(ctx, g, qwt):
  u = contract.uniform(ctx.seeds[_SEED_BASELINE], g.shape)
  return _products_float(ctx, minmax_quantize(g.astype(jnp.float32), u), qwt)


def _products_bitsplit(ctx, g, qwt):
  """Bit splitting, every row kept: one GEMM per gradient on joined digits.

  s_hi (hi A) + s_lo (lo A) = s_lo ((14 hi + lo) A): the two INT4 GEMMs of
  the hi and lo halves share A, so they run as one GEMM on v = 14 hi + lo
  (exact int32; `reference.bit_split_joined`).

  With ``split_scale="row"`` the dX GEMM's rows are split on their own
  M_i = max|G_i| (unit rows G_i / M_i, M_i in the epilogue's row scale): a
  token whose gradient is small next to the tensor's largest (the unmasked
  tokens of a masked-LM loss) keeps 98 levels of its own instead of the few
  lowest of max|G|. The dW GEMM reduces over the rows, where a per-row factor
  cannot leave the sum, so its operand is the split with one scale.
  """
  eng, comm = ctx.eng, ctx.comm
  seed = ctx.seeds[_SEED_SPLIT]
  if ctx.cfg.split_scale == "row":
    # One pass over G writes both operands: v from the unit rows (M = 1),
    # v^T with max|G|, taken over the rows' maxima (abs_max of those
    # non-negative values: the same value, NaN included).
    row_max, row_inv, poison = _row_scales(comm, g)
    abs_max = comm.pmax(bitsplit.abs_max(row_max), "n")
    v, vt, _, s_lo = eng.bit_split_joined(g, seed, abs_max=abs_max, row_inv=row_inv)
    dx_scale, row_scale = bitsplit.INV_RANGE * ctx.sw, row_max * poison
  else:
    # max|G| in XLA where the engine wants it there: it can then join the
    # fusion that produces G (one read of G fewer than the handler's own
    # pass); with G sharded, one max over the shards: every shard splits alike.
    abs_max = None
    if eng.abs_max_in_xla or not comm.trivial:
      abs_max = comm.pmax(bitsplit.abs_max(g), "n", "c")
    v, vt, _, s_lo = eng.bit_split_joined(g, seed, abs_max=abs_max)
    dx_scale, row_scale = s_lo * ctx.sw, None
  dxh_hat = eng.int_gemm(v, qwt, scale=dx_scale, row_scale=row_scale, int4=False,
                         out_dtype=ctx.dxh_dtype)                        # [N, D]
  qxt = ctx.qx(transpose=True)                                          # [D, N]
  dwh_hat = eng.int_gemm(qxt, vt, scale=s_lo * ctx.sx, int4=False,
                         out_dtype=ctx.dwh_dtype)                        # [D, C]
  return dxh_hat, None, dwh_hat


def _products_lss(ctx, g, qwt):
  """Bit splitting + leverage score sampling with static budgets.

  dW = G^T X sums over the 2N bit-split rows and samples ``lss_budget`` N
  of them; dX = G W samples ``lss_dx_budget`` N, or keeps all 2N (the
  default), where it is bit splitting's product on the joined digits.
  """
  eng, cfg, seeds, comm = ctx.eng, ctx.cfg, ctx.seeds, ctx.comm
  n = g.shape[0]
  if cfg.split_scale == "row":
    # The unit rows G_i / M_i, split with M = 1 as the handler reads G.
    row_scale, row_inv, poison = _row_scales(comm, g)
    abs_max = jnp.float32(1.0)
  else:
    row_scale, row_inv, poison = jnp.ones((n,), jnp.float32), None, jnp.float32(1.0)
    abs_max = None if comm.trivial else comm.pmax(bitsplit.abs_max(g), "n", "c")
  g2, s_hi, s_lo, g2_norm = eng.bit_split(g, seeds[_SEED_SPLIT], abs_max=abs_max,
                                          row_inv=row_inv)
  s_hi, s_lo = s_hi * poison, s_lo * poison
  # Per-row scales: the halves' norms and factors times the row's M_i.
  rows2 = jnp.concatenate([row_scale, row_scale])                 # [2N]
  g2_norm = comm.row_norms(g2_norm, "c") * rows2 * poison         # [2N]
  u = contract.uniform24(ctx.row_seeds[_SEED_SAMPLE], 2)

  def half_scale(index):
    return jnp.where(index >= n, s_lo, s_hi) * rows2[index]

  # Sharded rows: each shard samples its own rows with its share of a
  # budget (stratified sampling: still unbiased).
  dx_budget = lss.budget_rows(n, cfg.lss_dx_budget)
  if dx_budget == 2 * n:
    # dX keeps every row: s_hi hi + s_lo lo = s_lo (14 hi + lo), one GEMM on
    # the joined digits of the split that dW samples, rows in token order.
    v = bitsplit.join_halves(g2[:n], g2[n:])
    row_factor = row_scale if cfg.split_scale == "row" else None
    part = eng.int_gemm(v, qwt, scale=s_lo * ctx.sw, row_scale=row_factor,
                        int4=False, out_dtype=ctx.dxh_dtype)
    slots = None
  else:
    # dX: kept rows of G2 times W_hat; the factor s_half / p_i of a kept row
    # scales its output row, so it rides in the GEMM epilogue. The rows go
    # back to their token inside lsq_backward (slots: where token t's hi and
    # lo rows landed, -1 if not kept).
    index, weight = lss.sample_rows(g2_norm, dx_budget, u[0])
    part = eng.int_gemm(jnp.take(g2, index, axis=0), qwt, scale=ctx.sw,
                        row_scale=weight * half_scale(index),
                        out_dtype=ctx.dxh_dtype)
    # Empty slots (weight 0) point nowhere, unless G is non-finite: then
    # every row is NaN and must reach dX.
    target = jnp.where((weight > 0) | ~jnp.isfinite(s_hi), index, 2 * n)
    slots = jnp.full((2 * n,), -1, jnp.int32).at[target].set(
        jnp.arange(index.shape[0], dtype=jnp.int32), mode="drop").reshape(2, n)

  # dW: sum over kept rows of G2_i^T X_i / p_i. The per-row factors sit inside
  # the reduction, so the weighted kept rows are bit-split again (unbiased,
  # joined into one GEMM operand) and reduced in one GEMM over the kept rows.
  x_norm = ctx.res_x.norms
  index, weight = lss.sample_rows(g2_norm * jnp.concatenate([x_norm, x_norm]),
                                  lss.budget_rows(n, cfg.lss_budget), u[1])
  # The kept rows are this GEMM's reduction dim: padded to the engine's K tile.
  index, weight = lss.pad_slots(index, weight, eng.gemm_k_multiple)
  vt, _, s_lo2 = eng.resplit_rows(g2, index, weight * half_scale(index),
                                  seeds[_SEED_RESPLIT])                 # [C, S]
  qxt = ctx.qx(rows=index % n, transpose=True)                          # [D, S]
  dwh_hat = eng.int_gemm(qxt, vt, scale=s_lo2 * ctx.sx, int4=False,
                         out_dtype=ctx.dwh_dtype)                        # [D, C]
  return part, slots, dwh_hat


def _row_scales(comm, g):
  """The per-row bit split's scales (`bitsplit.bit_split_rows`): (M [N],
  1 / M [N], poison), M_i = max|G_i| over the row's shards along C, 1 / M_i
  by `bitsplit.row_reciprocals` (the split handlers scale the rows as they
  read G). poison is NaN when any row of the global G holds a NaN or Inf
  (counted before the max, which may drop NaN), so that every scale turns
  NaN as with one scale per tensor."""
  local = bitsplit.row_abs_max(g)
  poison = bitsplit.nonfinite_poison(
      comm.psum(jnp.sum(~jnp.isfinite(local)), "n", "c"))
  row_max = comm.pmax(local, "c")
  return row_max, bitsplit.row_reciprocals(row_max), poison


def backward_mode(config: Int4Config, platform: Optional[str] = None, *,
                  engine: Optional[Engine] = None) -> str:
  """The backward ``config`` runs: ``config.backward``, with ``"auto"``
  resolved to ``"lss"`` where INT4 tensor cores make the sampled half-size
  GEMMs pay (`Engine.int4_tensor_cores`), else ``"bitsplit"`` (the joined
  bit-split GEMM costs what the sampled one does on INT8 engines, with no
  sampling variance).

  Resolved per platform when the program is lowered; ``platform`` (default:
  the default backend's) or ``engine`` say which one to report.
  """
  if config.backward != "auto":
    return config.backward
  if engine is None:
    engine = get_engine(config.engine, platform)
  return "lss" if engine.int4_tensor_cores else "bitsplit"


_GRADIENT_PRODUCTS = {
    "exact": _products_exact,
    "luq": _products_luq,
    "minmax": _products_minmax,
    "bitsplit": _products_bitsplit,
    "lss": _products_lss,
}

_int4_matmul_3d.defvjp(
    lambda x3, kernel3, bias, sx, sw, key_data, log2, static: _forward(
        x3, kernel3, bias, sx, sw, key_data, log2, static),
    _backward)


# --- the partitioning rules (jint4.partition) ---------------------------------
# The residual of D % 8 != 0 ("flat") packs rows together: its rows cannot
# be sharded.

def _forward_layout(spec, mesh, arg_shapes):
  x, kernel = arg_shapes[0], arg_shapes[1]
  return _layout(spec, mesh, partition.spec_axes(x.sharding, 3), x.shape, kernel)


def _backward_layout(spec, mesh, arg_shapes):
  """x's grid is the residual's: (b, n, d) from the codes' sharding."""
  g, nibbles, kernel = arg_shapes[0], arg_shapes[1], arg_shapes[5]
  if spec.static.flat_residual:   # [B, N*D/2]: rows not split
    x_axes = partition.spec_axes(nibbles.sharding, 1) + [(), ()]
  else:
    x_axes = partition.spec_axes(nibbles.sharding, 3)
  return _layout(spec, mesh, x_axes, (g.shape[0], g.shape[1], kernel.shape[1]),
                 kernel)


def _layout(spec, mesh, x_axes, x_dims, kernel):
  layout = partition.read_layout(mesh, x_axes, x_dims, kernel,
                                 block=spec.static.block, name=spec.static.name)
  return _unsplit_flat_rows(spec, layout)


def _unsplit_flat_rows(spec, layout):
  if spec.static.flat_residual and (layout.n or layout.d):
    partition.warn_replicated(
        spec.static.name, "a contraction dim that is not a multiple of 8 packs"
        " several rows into one residual byte, so its rows are not split")
    layout = dataclasses.replace(layout, n=(), d=())
  return layout


def _residual_specs(layout, flat):
  b, n, d = (partition.entry(a) for a in (layout.b, layout.n, layout.d))
  if flat:
    return P(b, None), P(None, b, None)
  return P(b, n, d), P(None, b, n, d)


def _forward_shardings(spec, mesh, layout, arg_shapes):
  named = functools.partial(partition.named, mesh)
  nibbles, flags = _residual_specs(layout, spec.static.flat_residual)
  scalar = named(P())
  results = (named(layout.y_spec()), named(nibbles), named(flags),
             named(P(partition.entry(layout.b), partition.entry(layout.n))),
             named(layout.kernel_spec()))
  keys = named(P(partition.entry(layout.b), None))
  operands = (named(layout.x_spec()), named(layout.kernel_spec()),
              named(P(partition.entry(layout.c))), scalar, scalar, keys, scalar)
  return results, operands


def _backward_shardings(spec, mesh, layout, arg_shapes):
  named = functools.partial(partition.named, mesh)
  nibbles, flags = _residual_specs(layout, spec.static.flat_residual)
  scalar = named(P())
  kernel = named(layout.kernel_spec())
  per_b = named(P(partition.entry(layout.b)))
  results = (named(layout.x_spec()), kernel, per_b, per_b)
  operands = (named(layout.y_spec()), named(nibbles), named(flags),
              named(P(partition.entry(layout.b), partition.entry(layout.n))),
              kernel, kernel, scalar, scalar,
              named(P(partition.entry(layout.b), None)), scalar)
  return results, operands


# Where each operand / result holds the batch dim (None: it has none), for
# vmap, which folds its axis into that dim.
_FORWARD_B = ((0, 0, None, None, None, 0, None), (0, 0, 1, 0, 0))
_BACKWARD_B = ((0, 0, 1, 0, 0, 0, None, None, 0, None), (0, 0, 0, 0))

# Shardy factors: b batch, n token rows, c features; x's contraction dim is
# (f s t): f its residual flag bytes (D/8), (f s) its code bytes (D/2), so
# that the residual shards with x. The kernel's contraction dim (e) is not
# tied to x's: with FSDP it is sharded over the axis that shards x's tokens,
# and the partitioner is not to move x's sharding to follow it. Its features
# (c) are tied to y's (tensor parallelism). p: flag planes, k: key words.
_SIZES = {"s": 4, "t": 2}
_FORWARD = {
    False: partition.partitioned(
        "b n (f s t), b e c, c, , , b k, -> b n c, b n (f s), p b n f, b n, b e c",
        "jint4_int4_matmul_forward", *_FORWARD_B, factor_sizes=_SIZES),
    True: partition.partitioned(
        "b n d, b e c, c, , , b k, -> b n c, b h, p b g, b n, b e c",
        "jint4_int4_matmul_forward", *_FORWARD_B),
}
_BACKWARD = {
    False: partition.partitioned(
        "b n c, b n (f s), p b n f, b n, b e c, b e c, , , b k, -> b n (f s t), b e c, b, b",
        "jint4_int4_matmul_backward", *_BACKWARD_B, factor_sizes=_SIZES),
    True: partition.partitioned(
        "b n c, b h, p b g, b n, b e c, b e c, , , b k, -> b n d, b e c, b, b",
        "jint4_int4_matmul_backward", *_BACKWARD_B),
}


def _check_inputs(x, kernel, step_x, step_w, key, config, log2):
  if not isinstance(config, Int4Config):
    raise TypeError(f"config must be a jint4.Int4Config; got {type(config)}.")
  for name, t in (("x", x), ("kernel", kernel)):
    dtype = jnp.asarray(t).dtype if not hasattr(t, "dtype") else t.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      hint = (" Complex values are not supported." if
              jnp.issubdtype(dtype, jnp.complexfloating) else
              f" Cast it first, e.g. {name}.astype(jnp.float32).")
      raise TypeError(
          f"int4_matmul takes float32/bfloat16/float16 {name}; got {dtype}."
          + hint)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D [in_features, out_features]; got"
                     f" shape {kernel.shape}.")
  if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(
        f"x's last dim ({x.shape[-1] if x.ndim else 'scalar'}) must equal the"
        f" kernel's first dim ({kernel.shape[0]}); got x {x.shape}, kernel"
        f" {kernel.shape}.")
  for name, s in (("step_x", step_x), ("step_w", step_w)):
    s = jnp.asarray(s)
    if s.size != 1 or not jnp.issubdtype(s.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float scalar step size; got"
                       f" {s.dtype} of shape {s.shape}.")
  if key is None:
    raise ValueError("int4_matmul needs a PRNG key (jax.random.key(seed)) for"
                     " its stochastic rounding and sampling.")
  if config.uses_hadamard and config.hadamard_block == "auto" and log2 is None:
    raise ValueError(
        "Int4Config(hadamard_block='auto') needs hadamard_log2_block (from"
        " jint4.init_step_sizes); Int4Dense stores it in its quant_state.")
  check_contraction_dim(kernel.shape[0], config)


def check_contraction_dim(d: int, config: Int4Config) -> None:
  """Raises unless ``config``'s Hadamard block divides the contraction dim."""
  block = config.hadamard_block
  if config.uses_hadamard and block != "auto" and d % block:
    raise ValueError(
        f"The contraction dim D={d} is not a multiple of the Hadamard block"
        f" {block}. Pick a block that divides D (e.g."
        f" Int4Config(hadamard_block={2 ** hadamard.max_log2_block(d)})), use"
        " hadamard_block='auto', or pad the features to a multiple of"
        f" {block}.")
