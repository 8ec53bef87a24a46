"""Tests for the block-diagonal Hadamard transform (jint4.quant.hadamard).

Oracles are float64 numpy: Sylvester's recursion and a dense BlockDiag(H).
CPU compile time dominates this file, so transforms run under a few shared
`jax.jit` wrappers (one compile per shape and static argument set).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jint4.quant import hadamard

BLOCKS = [2 ** k for k in range(hadamard.MAX_LOG2_BLOCK + 1)]  # 1 .. 1024
TOL = dict(rtol=1e-5, atol=1e-5)

ht = jax.jit(hadamard.hadamard_transform,
             static_argnames=("block", "axis", "method"))


def sylvester(block):
  """float64 oracle: H_0 = [1], H_k = [[H, H], [H, -H]] / sqrt(2)."""
  h = np.ones((1, 1))
  while h.shape[0] < block:
    h = np.block([[h, h], [h, -h]]) / math.sqrt(2.0)
  return h


def block_diag(h, d):
  """Dense BlockDiag(h, ..., h) of size d x d."""
  return np.kron(np.eye(d // h.shape[0]), h)


def rand(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape),
                     jnp.float32)


def f64(a):
  return np.asarray(a, np.float64)


# --------------------------------------------------------------- the matrix --

@pytest.mark.parametrize("block", BLOCKS)
def test_matrix_properties(block):
  h = hadamard.hadamard_matrix(block)
  assert h.shape == (block, block) and h.dtype == jnp.float32
  h = f64(h)
  # Entries are exactly +-1/sqrt(b) (as float32), both signs occur for b > 1.
  mag = np.float64(np.float32(1.0 / math.sqrt(block)))
  assert (np.abs(h) == mag).all()
  if block > 1:
    assert (h > 0).any() and (h < 0).any()
  np.testing.assert_array_equal(h, h.T)                          # symmetric
  np.testing.assert_allclose(h @ h.T, np.eye(block), atol=1e-6)  # orthonormal
  np.testing.assert_allclose(h, sylvester(block), rtol=0, atol=1e-7)


def test_matrix_dtype_argument():
  h = hadamard.hadamard_matrix(8, dtype=jnp.bfloat16)
  assert h.dtype == jnp.bfloat16
  np.testing.assert_allclose(f64(h), sylvester(8), rtol=1e-2)


@pytest.mark.parametrize("block", [0, -4, 3, 6, 12, 2.0])
def test_matrix_rejects_non_power_of_two(block):
  with pytest.raises(ValueError, match="power of two"):
    hadamard.hadamard_matrix(block)


# ------------------------------------------------------------ the transform --

def test_matmul_and_butterfly_agree_for_every_block():
  x = rand(0, (2, 1024))

  @jax.jit
  def both(x):
    out = []
    for b in BLOCKS:
      out.append([hadamard.hadamard_transform(t, b, axis=axis, method=m)
                  for axis, t in ((-1, x), (0, x.T))
                  for m in ("matmul", "butterfly")])
    return out

  for block, (mm, bf, mm0, bf0) in zip(BLOCKS, both(x)):
    msg = f"block {block}"
    assert mm.dtype == bf.dtype == mm0.dtype == bf0.dtype == jnp.float32
    assert mm.shape == bf.shape == x.shape
    assert mm0.shape == bf0.shape == x.T.shape
    np.testing.assert_allclose(np.asarray(mm), np.asarray(bf), **TOL,
                               err_msg=msg)
    np.testing.assert_allclose(np.asarray(mm0), np.asarray(bf0), **TOL,
                               err_msg=msg)
    # Along axis 0 of x^T it is the same transform.
    np.testing.assert_allclose(np.asarray(mm0).T, np.asarray(mm), **TOL,
                               err_msg=msg)
    if block > 1:   # the transform actually changes x
      assert np.max(np.abs(np.asarray(mm) - np.asarray(x))) > 0.1


def test_equals_dense_block_diagonal():
  d = 16
  x = rand(1, (5, d))
  blocks = [1, 4, 16]

  @jax.jit
  def run(x):
    return [[(hadamard.hadamard_transform(x, b, method=m),
              hadamard.hadamard_transform(x.T, b, axis=0, method=m))
             for m in ("matmul", "butterfly")] for b in blocks]

  for block, per_method in zip(blocks, run(x)):
    hb = block_diag(sylvester(block), d)
    for y, y0 in per_method:
      np.testing.assert_allclose(np.asarray(y), f64(x) @ hb, **TOL)
      # Along axis 0: Hb^T X^T (= Hb X^T, Hb symmetric).
      np.testing.assert_allclose(np.asarray(y0), hb.T @ f64(x).T, **TOL)


def test_eager_call_and_middle_axis_of_3d_input():
  x = rand(2, (3, 32, 5))
  y = hadamard.hadamard_transform(x, 8, axis=1)     # eager, default method
  hb = block_diag(sylvester(8), 32)
  expect = np.einsum("adc,de->aec", f64(x), hb)
  np.testing.assert_allclose(np.asarray(y), expect, **TOL)


@pytest.mark.parametrize("method", ["matmul", "butterfly"])
@pytest.mark.parametrize("block", [1, 2, 32, 1024])
def test_self_inverse_and_norm_preserving(method, block):
  x = rand(3, (2, 1024), scale=3.0)
  y = ht(x, block=block, method=method)
  z = ht(y, block=block, method=method)
  np.testing.assert_allclose(np.asarray(z), np.asarray(x), **TOL)
  # Orthonormal blocks: every block (hence every row) keeps its norm.
  xb = f64(x).reshape(2, -1, block)
  yb = f64(y).reshape(2, -1, block)
  np.testing.assert_allclose(np.linalg.norm(yb, axis=-1),
                             np.linalg.norm(xb, axis=-1), rtol=1e-5)


def test_bfloat16_input_returns_float32():
  x = rand(4, (2, 64)).astype(jnp.bfloat16)
  y = ht(x, block=16, method="matmul")
  assert y.dtype == jnp.float32
  expect = f64(x) @ block_diag(sylvester(16), 64)
  np.testing.assert_allclose(np.asarray(y), expect, **TOL)


# The transforms are linear, so finite differences are exact up to float32
# rounding; a large eps (1e-2) keeps that rounding small.

def test_check_grads():
  x = rand(5, (2, 8))
  check_grads(jax.jit(lambda t: hadamard.hadamard_transform(t, 4)), (x,),
              order=2, modes=("fwd", "rev"), eps=1e-2)
  check_grads(jax.jit(lambda t: hadamard.hadamard_transform(
      t, 4, method="butterfly")), (x[:1, :4],), order=1, modes=("rev",),
              eps=1e-2)


def test_check_grads_dynamic():
  # D = 4: two butterfly stages, the first applied, the second masked out.
  x = rand(6, (1, 4))
  check_grads(jax.jit(lambda t: hadamard.hadamard_transform_dynamic(
      t, jnp.int32(1))), (x,), order=2, modes=("fwd", "rev"), eps=1e-2)


@pytest.mark.parametrize("d, axis", [(1024, -1), (24, 0)])
def test_dynamic_under_jit_equals_static(d, axis):
  x = rand(7, (2, d))
  xin = x.T if axis == 0 else x
  dyn = jax.jit(lambda t, k: hadamard.hadamard_transform_dynamic(t, k,
                                                                 axis=axis))
  kmax = hadamard.max_log2_block(d)
  assert d % 2 ** kmax == 0 and (2 ** kmax == 1024 or d % 2 ** (kmax + 1))
  for k in range(kmax + 1):
    got = np.asarray(dyn(xin, jnp.int32(k)))      # one compile, traced k
    if axis == 0:
      got = got.T
    want = f64(x) @ block_diag(sylvester(2 ** k), d)
    np.testing.assert_allclose(got, want, **TOL, err_msg=f"block {2 ** k}")
    if d == 1024 and 2 ** k in (1, 2, 32, 1024):   # already compiled
      np.testing.assert_allclose(
          got, np.asarray(ht(x, block=2 ** k, method="matmul")), **TOL)


def test_max_log2_block():
  for d, k in [(1, 0), (3, 0), (6, 1), (96, 5), (768, 8), (1024, 10),
               (4096, 10), (3 * 2 ** 12, 10)]:
    assert hadamard.max_log2_block(d) == k
    assert d % 2 ** k == 0


@pytest.mark.parametrize("block", [2, 32, 1024])
def test_outlier_is_spread_over_its_block(block):
  d, col, big = 1024, 37, 1000.0
  x = jnp.zeros((2, d)).at[0, col].set(big).at[1, d - 1 - col].set(-big)
  for method in ("matmul", "butterfly"):
    y = np.asarray(ht(x, block=block, method=method))
    # max|x| drops by exactly sqrt(b) ...
    np.testing.assert_allclose(np.max(np.abs(y), axis=1),
                               big / math.sqrt(block), rtol=1e-5)
    # ... because the outlier's whole block gets the same magnitude and
    # nothing leaks outside that block.
    start = (col // block) * block
    np.testing.assert_allclose(np.abs(y[0, start:start + block]),
                               big / math.sqrt(block), rtol=1e-5)
    outside = np.ones(d, bool)
    outside[start:start + block] = False
    assert (y[0, outside] == 0).all()


def test_outlier_column_with_gaussian_background():
  x = rand(8, (64, 512), scale=0.1).at[:, 100].set(50.0)
  y = ht(x, block=256, method="matmul")
  ratio = float(jnp.max(jnp.abs(x)) / jnp.max(jnp.abs(y)))
  assert 0.8 * 16 < ratio < 1.2 * 16    # ~ sqrt(256)


@pytest.mark.parametrize("method", ["matmul", "butterfly"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_block_not_dividing_raises(method, axis):
  x = jnp.ones((48, 48))
  with pytest.raises(ValueError) as err:
    hadamard.hadamard_transform(x, 32, axis=axis, method=method)
  msg = str(err.value)
  assert "32" in msg and "48" in msg
  assert "hadamard_block" in msg and "pad" in msg   # says how to fix it


def test_bad_method_and_bad_block():
  with pytest.raises(ValueError, match="method"):
    hadamard.hadamard_transform(jnp.ones((2, 8)), 4, method="fft")
  with pytest.raises(ValueError, match="power of two"):
    hadamard.hadamard_transform(jnp.ones((2, 12)), 3)


# ------------------------------------------------------------- block search --

def np_roundtrip_error(t, block, axis, qn, qp):
  """float64 oracle of ||T_bar - T||_F, T_bar = s int_s(T Hb) Hb^T."""
  t = f64(t)
  if axis == 0:
    t = t.T
  hb = block_diag(sylvester(block), t.shape[-1])
  th = t @ hb
  s = 2.0 * np.mean(np.abs(th)) / math.sqrt(qp)
  t_bar = (s * np.clip(np.round(th / s), -qn, qp)) @ hb.T
  return float(np.linalg.norm(t_bar - t))


def np_search_errors(x, w, qn, qp, max_log2):
  """The objective ||X_bar - X|| ||W_bar - W|| of every candidate block."""
  x = f64(x).reshape(-1, x.shape[-1])
  kmax = min(max_log2, hadamard.max_log2_block(x.shape[-1]))
  return np.array([np_roundtrip_error(x, 2 ** k, -1, qn, qp)
                   * np_roundtrip_error(w, 2 ** k, 0, qn, qp)
                   for k in range(kmax + 1)])


def outlier_data(seed, d=32, c=16):
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 0.1, (2, 16, d))
  cols = rng.choice(d, 3, replace=False)
  x[..., cols] += rng.normal(0, 1, 3) * 40.0   # a few huge columns
  w = rng.normal(0, 0.05, (d, c))
  return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def gaussian_data(seed, d=32, c=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(0, 1, (2, 16, d)), jnp.float32),
          jnp.asarray(rng.normal(0, 1, (d, c)), jnp.float32))


search_jit = jax.jit(hadamard.search_hadamard_block,
                     static_argnames=("qn", "qp", "max_log2"))


# Two compiled configurations: D = 24 with max_log2 = 10 (blocks 1..8,
# limited by D) and D = 32 with max_log2 = 1 (blocks 1, 2, limited by max_log2).
SEARCH_CONFIGS = {24: (7, 7, 10), 32: (8, 7, 1)}


@pytest.mark.parametrize("make, seed, d", [
    (outlier_data, 0, 24), (gaussian_data, 1, 24), (gaussian_data, 3, 24),
    (outlier_data, 1, 32), (gaussian_data, 1, 32)])
def test_search_picks_min_of_independent_errors(make, seed, d):
  qn, qp, max_log2 = SEARCH_CONFIGS[d]
  x, w = make(seed, d=d)
  k = search_jit(x, w, qn=qn, qp=qp, max_log2=max_log2)
  assert k.dtype == jnp.int32 and k.shape == ()
  errors = np_search_errors(x, w, qn, qp, max_log2)
  assert len(errors) == {24: 4, 32: 2}[d]
  k = int(k)
  assert 0 <= k < len(errors)
  # The picked error is the smallest, up to float32 noise of the computation
  # (on Gaussian data candidates can lie within 0.5% of each other).
  assert errors[k] <= errors.min() * (1 + 1e-4), (k, errors)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_search_prefers_a_block_for_outliers(seed):
  x, w = outlier_data(seed, d=24)
  errors = np_search_errors(x, w, 7, 7, 10)
  assert np.argmin(errors) > 0 and errors.min() < 0.5 * errors[0]  # sanity
  assert int(search_jit(x, w, qn=7, qp=7, max_log2=10)) > 0


def test_search_rejects_mismatched_kernel():
  with pytest.raises(ValueError, match="features"):
    hadamard.search_hadamard_block(jnp.ones((4, 16)), jnp.ones((8, 3)))


@pytest.mark.parametrize("block", [1, 2, 8, 32, 128, 1024])
def test_unnormalized_butterfly_times_scale_is_hb(block):
  """The engines' contract: +-1 butterflies, then one factor 2^(-L/2)."""
  x = jax.random.normal(jax.random.key(3), (4, 2048), jnp.float32)
  pm = hadamard.hadamard_transform(x, block, method="butterfly", normalized=False)
  # The +-1 matrix exactly (integer inputs: every partial sum is exact).
  xi = jnp.round(x * 8)
  pm_i = hadamard.hadamard_transform(xi, block, method="butterfly", normalized=False)
  h = np.asarray(hadamard.hadamard_matrix(block, jnp.float32)) * math.sqrt(block)
  ref = (np.asarray(xi).reshape(4, -1, block) @ np.round(h)).reshape(4, 2048)
  np.testing.assert_array_equal(np.asarray(pm_i), ref)
  scale = hadamard.hadamard_scale(block, 2048)
  assert scale.dtype == jnp.float32
  np.testing.assert_allclose(float(scale), block ** -0.5, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(pm * scale),
                             np.asarray(hadamard.hadamard_transform(x, block)),
                             rtol=1e-5, atol=1e-5)
  # Traced log2 (clamped to the reachable stages) gives the same factor.
  log2 = int(math.log2(block))
  assert float(jax.jit(hadamard.hadamard_scale, static_argnums=1)(
      jnp.int32(log2), 2048)) == float(scale)
  assert float(hadamard.hadamard_scale(jnp.int32(log2 + 20), 2048)) == float(
      hadamard.hadamard_scale(1024, 2048))
  with pytest.raises(ValueError, match="butterfly"):
    hadamard.hadamard_transform(x, block, method="matmul", normalized=False)
