"""jint4.diagnose: per-layer forward error, gradient estimators, step sizes."""

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jint4
from jint4.matmul import product_hook

diagnose_lib = sys.modules["jint4.diagnosis"]

D = 64
ESTIMATORS = ("lss", "bitsplit", "luq", "exact")


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(D, name="fc1")(x)))


def _outlier_batch(seed=0):
  """Tokens [4, 16, D] with three outlier channels (60x), and targets."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 16, D)).astype(np.float32)
  x[..., [3, 17, 40]] *= 60.0
  return jnp.asarray(x), jnp.asarray(rng.normal(size=(4, 16, D)), jnp.float32)


def _mse(out, targets):
  return jnp.mean((out - targets) ** 2)


@pytest.fixture(scope="module")
def mlp_rows():
  """Both layers share one shape, so the per-layer analysis compiles once.
  fc2's step_size_w is doubled after init (its drift is 2), and fc1 gets a
  large bias."""
  x, t = _outlier_batch()
  # dX sampled too (the paper's LSS), so that both products' sampling shows.
  model = jint4.int4ify(Mlp(), jint4.Int4Config(lss_dx_budget=1.0))
  initial = jax.jit(model.init)(jax.random.key(1), x)
  params = jax.tree.map(lambda a: a, initial["params"])
  params["fc2"]["step_size_w"] = 2.0 * initial["params"]["fc2"]["step_size_w"]
  params["fc1"]["bias"] = jnp.full((D,), 30.0)  # not part of the forward error
  rows = jint4.diagnose(model, {"params": params}, x, _mse, t,
                        key=jax.random.key(2), samples=16, estimators=ESTIMATORS,
                        initial_variables=initial)
  return model, rows


def test_one_row_per_int4_layer_named_as_the_report(mlp_rows):
  model, rows = mlp_rows
  converted = [r.path for r in jint4.int4ify_report(model) if r.converted]
  assert [r.path for r in rows] == converted == ["fc1", "fc2"]
  assert all(r.shape == (1, 64, D, D) and r.block == 32 and not r.skipped
             for r in rows)
  json.dumps(dataclasses.asdict(rows[0]))  # JSON-friendly


def test_hadamard_beats_lsq_on_outlier_channels(mlp_rows):
  first = mlp_rows[1][0]
  assert 0 < first.fwd_error_hq_init < 0.7 * first.fwd_error_lsq_init
  # Steps at their init values: the model's forward is HQ at the init rule
  # (the op's output less its bias against jint4.quant's quantizers, to
  # float rounding).
  np.testing.assert_allclose(first.fwd_error, first.fwd_error_hq_init, rtol=1e-4)


def test_step_sizes_against_the_init_rule_and_init(mlp_rows):
  fc1, fc2 = mlp_rows[1]
  # The init batch is this batch: the init rule gives the initial steps
  # (fc2's input changed with fc1's bias; its kernel did not).
  for ratio in (fc1.step_x_vs_init, fc1.step_w_vs_init, fc1.drift_x, fc1.drift_w,
                fc2.drift_x):
    assert ratio == pytest.approx(1.0, rel=1e-5)
  assert fc2.step_w_vs_init == pytest.approx(2.0, rel=1e-5)
  assert fc2.drift_w == pytest.approx(2.0, rel=1e-6)
  assert fc2.step_w == pytest.approx(2.0 * fc2.initial_step_w, rel=1e-6)


def test_estimators_unbiased_lss_noisier_than_bitsplit(mlp_rows):
  for row in mlp_rows[1]:
    for grads in (row.dx, row.dw):
      assert list(grads) == list(ESTIMATORS)
      for name in ("lss", "bitsplit", "luq"):
        s = grads[name]
        assert s.unbiased and s.z < diagnose_lib.UNBIASED_Z, (row.path, name, s)
        assert 0 < s.bias and 0 < s.noise
        assert 0 < s.cos <= 1 + 1e-6
      assert grads["lss"].rel_var > grads["bitsplit"].rel_var > 0
      assert grads["lss"].cos < grads["bitsplit"].cos
      exact = grads["exact"]
      assert exact.bias < 1e-6 and exact.rel_var < 1e-10 and exact.unbiased
      assert exact.cos == pytest.approx(1.0, abs=1e-5)
    # Budget N of the 2N bit-split rows, every row of G non-zero.
    assert row.lss_kept_dx == pytest.approx(0.5, abs=1 / 128)
    assert row.lss_kept_dw == pytest.approx(0.5, abs=1 / 128)
    assert 0 <= row.lss_sure_dx <= row.lss_kept_dx


def test_lss_keeping_every_dx_row_reports_bitsplits_dx():
  """The default lss_dx_budget=2: dX keeps every bit-split row, so its
  estimator is bit splitting's (the same digits for the same keys) and the
  kept fraction is 1; dW is still sampled at the budget."""
  x, t = _outlier_batch()
  model = jint4.int4ify(Mlp(), jint4.Int4Config())
  variables = jax.jit(model.init)(jax.random.key(1), x)
  rows = jint4.diagnose(model, variables, x, _mse, t, key=jax.random.key(2),
                        samples=8, estimators=("lss", "bitsplit"))
  for row in rows:
    assert row.dx["lss"].rel_var == pytest.approx(row.dx["bitsplit"].rel_var, rel=1e-6)
    assert row.dw["lss"].rel_var > row.dw["bitsplit"].rel_var
    assert row.lss_kept_dx == pytest.approx(1.0) and row.lss_sure_dx == pytest.approx(1.0)
    assert row.lss_kept_dw == pytest.approx(0.5, abs=1 / 128)


def test_a_biased_estimator_is_flagged():
  rng = np.random.default_rng(0)
  exact = rng.normal(size=(32, 16)).astype(np.float32)
  noise = 0.05 * rng.normal(size=(64, 32, 16)).astype(np.float32)
  fair = diagnose_lib.estimator_stats(exact + noise, exact)
  assert fair.unbiased and fair.z < 3
  assert fair.rel_var == pytest.approx(0.05 ** 2, rel=0.1)
  biased = diagnose_lib.estimator_stats(1.05 * exact + noise, exact)
  # bias 0.05 against a noise level of 0.05 / sqrt(64) per element: z ~ 8.
  assert not biased.unbiased and biased.z > 6
  assert biased.bias == pytest.approx(0.05, rel=0.1)
  nan = diagnose_lib.estimator_stats(np.full((4, 3), np.nan, np.float32),
                                     np.ones(3, np.float32))
  assert np.isnan(nan.bias) and not nan.unbiased  # NaN stays visible


def _probe(model, variables, x, loss):
  """The probe run's products (call, y3, G, exact dX, dW)."""
  forward = lambda v, arrays: model.apply(v, arrays[0])
  return diagnose_lib._output_gradients(  # pylint: disable=protected-access
      forward, lambda out, arrays: loss(out), variables, [x])


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="fc2")(nn.Dense(D, name="fc1")(x))


def test_output_gradient_is_dl_dy():
  x, _ = _outlier_batch()
  c = jax.random.normal(jax.random.key(3), (4, 16, 8))
  model = jint4.Int4Dense(8)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  (p,) = _probe(model, variables, x, lambda y: jnp.sum(y * c))
  assert p.call.name == "Int4Dense"
  np.testing.assert_array_equal(p.g3, c.reshape(1, 64, 8))
  np.testing.assert_array_equal(p.call.x3, x.reshape(1, 64, D))
  # The exact dX, dW: backward="exact" with G as cotangent.
  _, vjp = jax.vjp(lambda x, w: jint4.int4_matmul(
      x, w, p.call.step_x, p.call.step_w, jax.random.key(0),
      config=jint4.Int4Config(backward="exact")), x.reshape(64, D),
      variables["params"]["kernel"])
  dx, dw = vjp(c.reshape(64, 8))
  np.testing.assert_allclose(p.dx3[0], dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p.dw3[0], dw, rtol=1e-5, atol=1e-6)
  # Through a float layer after it: dL/dy1 = c @ W2^T.
  model = jint4.int4ify(Stack(), jint4.Int4Config(), keep="fc2")
  variables = jax.jit(model.init)(jax.random.key(0), x)
  c = jax.random.normal(jax.random.key(4), (4, 16, D))
  (p,) = _probe(model, variables, x, lambda y: jnp.sum(y * c))
  assert p.call.name == "fc1"
  w2 = variables["params"]["fc2"]["kernel"]
  np.testing.assert_allclose(p.g3[0], (c @ w2.T).reshape(64, D), rtol=1e-5,
                             atol=1e-5)


def test_paths_are_the_report_paths():
  names = ["attn/query/Int4DotGeneral_0", "fc", "fc", "attn/qk_product"]
  assert diagnose_lib._paths(names) == [  # pylint: disable=protected-access
      "attn/query", "fc", "fc#2", "attn/qk_product"]


def test_table_and_plot(mlp_rows, tmp_path):
  rows = mlp_rows[1]
  table = jint4.format_diagnosis(rows)
  lines = table.splitlines()
  for name in ("fc1", "fc2", "LSQ(init)", "lss dX", "bitsplit dW", "luq dX",
               "kept dX/dW", "step/init", "drift"):
    assert name in table
  assert lines[3].startswith("fc1 ") and lines[4].startswith("fc2 ")
  pytest.importorskip("matplotlib")
  path = tmp_path / "diag.png"
  jint4.plot_diagnosis(rows, str(path))
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


class BatchedProduct(nn.Module):
  """An ``nn.Einsum`` with a batch dim: one batched INT4 product."""
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((4, D, 8), "bnd,bdc->bnc", name="bmm")(x)


def test_batched_products():
  """A batched product (as attention's Q K^T and P V, DenseGeneral with
  batch dims): per-tensor steps over the batch, one row."""
  x, _ = _outlier_batch()
  model = jint4.int4ify(BatchedProduct(), jint4.Int4Config())
  variables = jax.jit(model.init)(jax.random.key(1), x)
  rows = jint4.diagnose(model, variables, x, lambda y, _: jnp.sum(y ** 2),
                        key=jax.random.key(2), samples=4,
                        estimators=("bitsplit",))
  assert [r.path for r in rows] == ["bmm"] == [
      r.path for r in jint4.int4ify_report(model)]
  (row,) = rows
  assert row.shape == (4, 16, D, 8) and row.block == 32
  for s in (row.dx["bitsplit"], row.dw["bitsplit"]):
    assert s.unbiased and 0.99 < s.cos <= 1 + 1e-6, s
  assert 0 < row.fwd_error_hq_init < row.fwd_error_lsq_init
  assert "bmm" in jint4.format_diagnosis(rows)


def test_no_int4_layer_is_a_clear_error():
  x, t = _outlier_batch()
  variables = jax.eval_shape(Mlp().init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"no INT4 product.*jint4\.int4ify"):
    jint4.diagnose(Mlp(), variables, x, _mse, t, key=jax.random.key(0))


class Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.remat(nn.Dense)(D, name="fc")(x)


def test_layers_inside_transforms_are_a_clear_error():
  x, t = _outlier_batch()
  model = jint4.int4ify(Remat())
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                           jax.eval_shape(model.init, jax.random.key(0), x))
  with pytest.raises(ValueError, match="nn.remat"):
    jint4.diagnose(model, variables, x, _mse, t, key=jax.random.key(0))


def test_bad_arguments():
  x, t = _outlier_batch()
  model = jint4.int4ify(Mlp())
  with pytest.raises(TypeError, match="NNX"):
    jint4.diagnose(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), None, x, _mse,
                   key=jax.random.key(0))
  with pytest.raises(ValueError, match="samples"):
    jint4.diagnose(model, {}, x, _mse, t, key=jax.random.key(0), samples=1)
  with pytest.raises(ValueError, match="estimators"):
    jint4.diagnose(model, {}, x, _mse, t, key=jax.random.key(0),
                   estimators=("auto",))


def test_hook_is_transparent():
  """A hook that only runs the product changes nothing, and none is set
  outside its context."""
  x, _ = _outlier_batch()
  w = jax.random.normal(jax.random.key(1), (D, 8)) / 8
  f = lambda: jint4.int4_matmul(x, w, jnp.float32(0.5), jnp.float32(0.03),
                                jax.random.key(0))
  seen = []
  with product_hook(lambda call, run: seen.append(call.name)
                    or run(call.config, call.x3, call.kernel3)):
    hooked = f()
  np.testing.assert_array_equal(hooked, f())
  assert seen == ["int4_matmul"]


def test_lss_fractions_follow_the_split_scale():
  """The fractions come from the split the layer's config runs: on rows whose
  sizes span decades the two scales give different scores (with one scale
  per tensor the small rows' high halves are zero), the same budget."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 64, D)), jnp.float32)
  sizes = 10.0 ** rng.uniform(-3, 0, (2, 64, 1))
  g = jnp.asarray(rng.normal(size=(2, 64, D)) * sizes, jnp.float32)
  frac = {}
  for scale in ("tensor", "row"):
    cfg = jint4.Int4Config(backward="lss", split_scale=scale, lss_dx_budget=1.0)
    frac[scale] = diagnose_lib._lss_fractions(x, jnp.float32(0.3), g, 5, cfg,
                                              jax.random.key(0))
  for which in ("dx", "dw"):
    tensor, row = (float(frac[s][f"lss_sure_{which}"]) for s in ("tensor", "row"))
    assert abs(row - tensor) > 0.01, (which, tensor, row)
    for s in ("tensor", "row"):
      assert float(frac[s][f"lss_kept_{which}"]) == pytest.approx(0.5, abs=1 / 64)
