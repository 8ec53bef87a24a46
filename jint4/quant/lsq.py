"""Learned step size quantization (LSQ; Esser et al., ICLR 2020), as used by the
paper's forward pass (Xi et al. 2023, Sec. 4.1).

With one learned scalar step s per tensor and v = T / s:

    int_s(T) = clamp(round(v), -Qn, Qp),        T_hat = s * int_s(T).

Gradients (straight-through estimator inside the range):

    dL/dT = 1[-Qn <= v <= Qp] * dL/dT_hat
    dL/ds = g * sum(dL/dT_hat * delta),   g = 1 / sqrt(Qp * numel(T)),
    delta = -Qn if v < -Qn,  Qp if v > Qp,  round(v) - v otherwise.

Init (and the paper's pre-training warm-up value): s0 = 2 mean|T| / sqrt(Qp).

The backward of `jint4.int4_matmul` does not keep T. It keeps, per element, the
4-bit code int_s(T) plus one bit (`encode_backward_state`): inside the range
the bit is an unbiased one-bit stochastic encoding of delta (delta_hat =
bit - 1/2, P(bit = 1) = delta + 1/2, so E[delta_hat] = delta); outside the
range, when Qn <= 7, the unused 4-bit code -8 marks the clip and the bit gives
its side. With Qn = 8 every 4-bit code is taken and a second bit marks the
clip. That is 5 bits (0.625 bytes) per element for [-7, 7], 6 bits (0.75 bytes)
for [-8, 7], against 2 bytes for a saved bfloat16 activation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CLIP_CODE = -8  # the 4-bit code [-7, 7] never uses


def init_step_size(t: jax.Array, *, qp: int) -> jax.Array:
  """s0 = 2 mean|T| / sqrt(Qp) in float32; 1.0 for an all-zero or empty
  tensor (no scale to learn from).

  A NaN or Inf in T gives a NaN / Inf step, so it stays visible.
  """
  if t.size == 0:
    return jnp.ones((), jnp.float32)
  s = 2.0 * jnp.mean(jnp.abs(t.astype(jnp.float32))) / jnp.sqrt(jnp.float32(qp))
  return jnp.where(s == 0, jnp.ones_like(s), s)


# The factors of the LSQ rule that `mse_step_size` tries: 0.10, 0.125, ..., 1.20.
MSE_SEARCH_FACTORS = tuple(0.1 + 0.025 * i for i in range(45))


def mse_step_size(t: jax.Array, *, qn: int, qp: int) -> jax.Array:
  """The step s minimising the quantization error sum (s int_s(T) - T)^2,
  searched over `MSE_SEARCH_FACTORS` times LSQ's rule (`init_step_size`).

  LSQ's rule 2 mean|T| / sqrt(Qp) is tuned for no particular distribution:
  for a Gaussian T (what a Hadamard transform makes of a layer's input) and
  Qp = 7 it is about 0.6 sigma, which clips almost nothing but rounds
  coarsely; the error-minimising step is about 0.34 sigma, with about 2.4x
  less squared error. Heavy-tailed tensors get larger factors. Same
  conventions as `init_step_size`: 1.0 for an all-zero or empty tensor,
  NaN / Inf stay visible. One pass over T per factor (`jax.lax.map`), so the
  memory is one T.
  """
  base = init_step_size(t, qp=qp)
  if t.size == 0:
    return base
  t = t.astype(jnp.float32)
  factors = jnp.asarray(MSE_SEARCH_FACTORS, jnp.float32)

  def error(factor):
    s = base * factor
    return jnp.sum(jnp.square(quantize(t, s, qn=qn, qp=qp) * s - t))

  best = factors[jnp.argmin(jax.lax.map(error, factors))]
  zero = jnp.max(jnp.abs(t)) == 0
  return jnp.where(zero, base, base * best)


def step_size_rule(t: jax.Array, rule: str, *, qn: int, qp: int) -> jax.Array:
  """The initial step of T by ``rule``: "lsq" (`init_step_size`) or "mse"
  (`mse_step_size`)."""
  if rule == "mse":
    return mse_step_size(t, qn=qn, qp=qp)
  return init_step_size(t, qp=qp)


def grad_scale(numel: int, *, qp: int) -> float:
  """LSQ's step-size gradient scale g = 1 / sqrt(Qp * numel(T))."""
  return float(1.0 / (qp * numel) ** 0.5)


def quantize(t: jax.Array, s: jax.Array, *, qn: int, qp: int) -> jax.Array:
  """int_s(T) = clamp(round(T / s), -Qn, Qp) as float (integer values)."""
  return jnp.clip(jnp.round(t / s), -qn, qp)


def fake_quantize_value(t, s, *, qn: int, qp: int):
  """s * int_s(T), with no custom gradient."""
  return s * quantize(t, s, qn=qn, qp=qp)


def in_range(v: jax.Array, *, qn: int, qp: int) -> jax.Array:
  """The STE mask 1[-Qn <= v <= Qp]."""
  return (v >= -qn) & (v <= qp)


def delta(v: jax.Array, *, qn: int, qp: int) -> jax.Array:
  """LSQ's d int_s / d s factor: -Qn / Qp outside the range, round(v) - v inside."""
  return jnp.where(v < -qn, -float(qn),
                   jnp.where(v > qp, float(qp), jnp.round(v) - v))


def fake_quantize(t: jax.Array, s: jax.Array, *, qn: int = 7, qp: int = 7
                  ) -> jax.Array:
  """T_hat = s * int_s(T) with LSQ's gradients for T and for the step s."""
  return _fake_quantize(t, s, qn, qp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fake_quantize(t, s, qn, qp):
  return fake_quantize_value(t, s, qn=qn, qp=qp).astype(t.dtype)


def _fake_quantize_fwd(t, s, qn, qp):
  return _fake_quantize(t, s, qn, qp), (t, s)


def _fake_quantize_bwd(qn, qp, res, g_out):
  t, s = res
  v = t.astype(jnp.float32) / s
  g_out32 = g_out.astype(jnp.float32)
  dt = jnp.where(in_range(v, qn=qn, qp=qp), g_out32, 0.0).astype(t.dtype)
  ds = grad_scale(t.size, qp=qp) * jnp.sum(g_out32 * delta(v, qn=qn, qp=qp))
  return dt, ds.astype(jnp.result_type(s)).reshape(jnp.shape(s))


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def encode_backward_state(v: jax.Array, u: jax.Array, *, qn: int, qp: int):
  """Encodes what LSQ's backward needs in 5 (or 6) bits per element.

  Args:
    v: T / s (float).
    u: uniform noise in [0, 1) of v's shape (the caller's counter-based RNG).
  Returns:
    (code, flags): ``code`` int8 in [-8, 7], ``flags`` uint8 with bit 0 the
    delta / clip-side bit and (only when qn == 8) bit 1 the clip flag.
    `decode_backward_state` inverts it (its q is the backward GEMMs'
    operand).
  """
  q = quantize(v, 1.0, qn=qn, qp=qp)
  inside = in_range(v, qn=qn, qp=qp)
  frac_bit = u < (q - v + 0.5)           # P = delta + 1/2, delta in [-1/2, 1/2]
  side_bit = v > 0
  bit0 = jnp.where(inside, frac_bit, side_bit)
  if qn <= 7:
    code = jnp.where(inside, q, CLIP_CODE)
    flags = bit0.astype(jnp.uint8)
  else:
    code = jnp.where(inside, q, jnp.where(side_bit, qp, -qn))  # NaN -> -qn
    flags = bit0.astype(jnp.uint8) | ((~inside).astype(jnp.uint8) << 1)
  return code.astype(jnp.int8), flags


def decode_backward_state(code: jax.Array, flags: jax.Array, *, qn: int,
                          qp: int):
  """Returns (q int8, STE mask bool, delta_hat float32) from the encoding."""
  bit0 = (flags & 1).astype(jnp.bool_)
  if qn <= 7:
    clipped = code == CLIP_CODE
    q = jnp.where(clipped, jnp.where(bit0, qp, -qn), code).astype(jnp.int8)
  else:
    clipped = ((flags >> 1) & 1).astype(jnp.bool_)
    q = code
  delta_hat = jnp.where(clipped, q.astype(jnp.float32),
                        bit0.astype(jnp.float32) - 0.5)
  return q, ~clipped, delta_hat
