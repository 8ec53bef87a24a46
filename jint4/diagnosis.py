"""`diagnose`: where an INT4 model loses accuracy against its float twin,
one row per INT4 product.

Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers" (NeurIPS
2023) split the error of an INT4 linear layer Y = X W^T in two: the forward
quantizer (Sec. 4: the Hadamard quantizer HQ, LSQ step sizes) and the
gradient estimators (Sec. 5: bit splitting, leverage score sampling), which
must be unbiased with a small variance. For one batch and loss, `diagnose`
measures both for every product that runs through `jint4.int4_matmul` /
`jint4.int4_dot_general` (`Int4Dense`, layers converted by `jint4.int4ify`,
the product hooks), with the library's own quantizers and backward:

  forward     e = ||Q(X) Q(W)^T - X W^T||_F / ||X W^T||_F of the layer's
              forward with its learned steps, of HQ with the init rule's
              steps (`jint4.init_step_sizes`) on this batch, and of LSQ
              without the Hadamard transform (the paper's LSQ baseline)
  gradients   per estimator, dX and dW over ``samples`` keys against the
              exact gradient (``backward="exact"``: float G against the
              quantized forward operands): relative bias and its noise
              level, z = bias / noise, the relative mean squared error and
              the mean cosine
  LSS         the expected fraction of the 2N bit-split rows that leverage
              score sampling keeps for this G
  steps       learned s_x, s_w against the init rule on this batch, and
              against ``initial_variables`` (their drift since init)

The output gradient G of each product is the true dL/dY of the INT4-forward
model on this batch: zero probes are added to each product's output and
operands (`jint4.matmul.product_hook`) and the loss is differentiated with
respect to them, with the exact backward through every product. So G is
deterministic, each estimator is judged on its own layer, and the probes on
the operands give that layer's exact dX and dW. docs/DIAGNOSTICS.md says
how to read the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jint4.config import Int4Config
from jint4.config import fit_hadamard_block
from jint4.matmul import ProductCall
from jint4.matmul import int4_dot_general
from jint4.matmul import int4_matmul
from jint4.matmul import product_hook
from jint4.quant import bitsplit
from jint4.quant import hadamard
from jint4.quant import lsq
from jint4.quant import lss
from jint4.quant_init import init_step_sizes

ESTIMATORS = ("lss", "bitsplit", "luq", "minmax", "exact")
# An estimator is reported unbiased when its bias is below this many noise
# levels (z < UNBIASED_Z).
UNBIASED_Z = 4.0
# Relative float32 rounding allowed between two computations of one gradient:
# added (in quadrature) to the noise level, so that a deterministic estimator
# equal to the exact gradient up to rounding does not read as biased.
FLOAT_FLOOR = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST
_BATCHED_DIMS = (((2,), (1,)), ((0,), (0,)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EstimatorStats:
  """One gradient estimator against the exact gradient E over S keys.

  With d_k = est_k - E (k = 1..S), all relative to ||E||_F:

    bias      ||mean_k d_k||
    noise     sqrt(sum_elements Var_k[est] / S): the size ``bias`` has for an
              unbiased estimator (the standard error of the mean)
    z         bias / sqrt(noise^2 + FLOAT_FLOOR^2)
    unbiased  z < UNBIASED_Z
    rel_var   mean_k ||d_k||^2 (the mean squared error: variance + bias^2)
    cos       mean_k cos(est_k, E)
  """
  bias: float
  noise: float
  z: float
  unbiased: bool
  rel_var: float
  cos: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerDiagnosis:
  """One INT4 product of the model on one batch (see the module doc).

  ``shape`` is (B, N, D, C): y[b] = x[b] (N x D) @ kernel[b] (D x C), B = 1
  for a dense layer. ``dx`` / ``dw`` map each estimator to its
  `EstimatorStats`. ``lss_kept_*``: the expected fraction of the 2N
  bit-split rows that the dX / dW sampling keeps (sum of the inclusion
  probabilities over 2N), ``lss_sure_*``: the fraction kept with
  probability 1 (None without "lss"). ``*_vs_init``: learned step / init
  rule on this batch; ``drift_*``: learned step / the layer's
  ``step_size_x`` / ``step_size_w`` in ``initial_variables`` (None without
  them). ``forward``, ``backward``, ``block``: the layer's config and its
  Hadamard block. ``skipped`` says why a row has no numbers (its numeric
  fields are then NaN).
  """
  path: str
  shape: Tuple[int, int, int, int]
  forward: str
  backward: str
  block: Optional[int]
  samples: int
  fwd_error: float
  fwd_error_hq_init: float
  fwd_error_lsq_init: float
  dx: Dict[str, EstimatorStats]
  dw: Dict[str, EstimatorStats]
  lss_kept_dx: Optional[float]
  lss_kept_dw: Optional[float]
  lss_sure_dx: Optional[float]
  lss_sure_dw: Optional[float]
  step_x: float
  step_w: float
  init_step_x: float
  init_step_w: float
  step_x_vs_init: float
  step_w_vs_init: float
  initial_step_x: Optional[float] = None
  initial_step_w: Optional[float] = None
  drift_x: Optional[float] = None
  drift_w: Optional[float] = None
  skipped: str = ""


def diagnose(model: Any, variables: Any, inputs: Any,
             loss_fn: Callable[[Any, Any], jax.Array], targets: Any = None, *,
             key: jax.Array, samples: int = 32,
             estimators: Sequence[str] = ("lss", "bitsplit", "luq"),
             initial_variables: Any = None,
             apply_kwargs: Optional[Dict[str, Any]] = None
             ) -> List[LayerDiagnosis]:
  """Forward error, gradient estimators and step sizes of every INT4 product.

  Args:
    model: a Linen model: what ``jint4.int4ify(linen_module, config)``
      returns, or a ``flax.linen.Module`` with `jint4.Int4Dense` layers or
      INT4 product hooks. NNX models are not supported (TypeError).
    variables: the model's variables, as for ``model.apply``.
    inputs: the positional arguments of ``model.apply`` after the
      variables: one array, or a tuple of them.
    loss_fn: ``loss_fn(outputs, targets) -> scalar``, with ``outputs`` what
      ``model.apply`` returns.
    targets: passed to ``loss_fn`` as given.
    key: a PRNG key for the estimators' samples.
    samples: keys per estimator (>= 2).
    estimators: backward modes to compare with the exact gradient, from
      ``"lss"``, ``"bitsplit"``, ``"luq"``, ``"minmax"``, ``"exact"``
      (each run as ``Int4Config(backward=...)`` of the layer's config).
    initial_variables: the variables at init, for the step sizes' drift.
    apply_kwargs: keyword arguments of ``model.apply`` (``rngs``,
      ``deterministic=True``, ...).
  Returns:
    one `LayerDiagnosis` per INT4 product, in call order; ``path`` is the
    layer's path as `jint4.int4ify_report` writes it (``#2``, ``#3`` for
    further calls of one layer).
  Raises:
    ValueError: the model runs no INT4 product (int4ify it first), or the
      loss is not a scalar.
  """
  _check_model(model)
  estimators = _check_estimators(estimators)
  if not isinstance(samples, int) or samples < 2:
    raise ValueError(f"diagnose: samples must be an int >= 2; got {samples!r}.")
  inputs = inputs if isinstance(inputs, tuple) else (inputs,)
  # The arrays among the arguments are jit arguments (not constants).
  arrays, rebuild = _split_arrays((inputs, targets, dict(apply_kwargs or {})))

  def forward(variables, arrays):
    inputs, _, kwargs = rebuild(arrays)
    return model.apply(variables, *inputs, **kwargs)

  loss = lambda out, arrays: loss_fn(out, rebuild(arrays)[1])
  products = _output_gradients(forward, loss, variables, arrays)
  paths = _paths(p.call.name for p in products)
  rows = []
  keys = jax.random.split(key, len(products))
  for product, path, k in zip(products, paths, keys):
    initial = (None if initial_variables is None else
               _initial_steps(initial_variables, product.call.name))
    rows.append(_diagnose_product(product, path, k, samples, estimators,
                                  initial))
  return rows


def format_diagnosis(rows: Sequence[LayerDiagnosis]) -> str:
  """A plain-text table of ``rows``: one line per product, then a legend.

  Columns: the forward errors (the layer's own forward, HQ and LSQ with
  init-rule steps), per estimator and gradient z (``*``: biased), rel_var
  and cos, the LSS kept fractions (dX/dW), the learned steps over the init
  rule, and their drift since init.
  """
  rows = list(rows)
  estimators = []
  for r in rows:
    estimators += [e for e in r.dx if e not in estimators]
  column = lambda attr, spec: [_num(getattr(r, attr), spec) for r in rows]
  cols: List[Tuple[str, str, List[str]]] = [
      ("", "layer", [r.path for r in rows]),
      ("", "B,N,D,C", [",".join(map(str, r.shape)) for r in rows]),
      ("forward error", "model", column("fwd_error", "{:.4f}")),
      ("forward error", "HQ(init)", column("fwd_error_hq_init", "{:.4f}")),
      ("forward error", "LSQ(init)", column("fwd_error_lsq_init", "{:.4f}")),
  ]
  for est in estimators:
    for grad in ("dx", "dw"):
      group = f"{est} {grad[0]}{grad[1].upper()}"
      stats = [getattr(r, grad).get(est) for r in rows]
      cols += [
          (group, "z", [_z(s) for s in stats]),
          (group, "rel_var", [_num(s and s.rel_var, "{:.2e}") for s in stats]),
          (group, "cos", [_num(s and s.cos, "{:.4f}") for s in stats]),
      ]
  if any(r.lss_kept_dx is not None for r in rows):
    cols.append(("LSS", "kept dX/dW", [
        "-" if r.lss_kept_dx is None else
        f"{_num(r.lss_kept_dx, '{:.3f}')}/{_num(r.lss_kept_dw, '{:.3f}')}"
        for r in rows]))
  cols += [("step/init", "s_x", column("step_x_vs_init", "{:.3f}")),
           ("step/init", "s_w", column("step_w_vs_init", "{:.3f}"))]
  if any(r.drift_x is not None for r in rows):
    cols += [("drift", "s_x", column("drift_x", "{:.3f}")),
             ("drift", "s_w", column("drift_w", "{:.3f}"))]
  lines = _render(cols, rows)
  samples = "/".join(map(str, sorted({r.samples for r in rows if not r.skipped})))
  lines += [
      "",
      "forward error: ||Q(x)Q(w) - xw|| / ||xw|| with the learned steps (model)"
      " and the init rule's (HQ, LSQ without Hadamard).",
      f"z: bias / noise level of an unbiased estimator over {samples or '-'}"
      f" samples (*: z >= {UNBIASED_Z:g}, biased).  rel_var: E||est -"
      " exact||^2 / ||exact||^2.  cos: mean cosine with exact.",
      "step/init: learned step / init rule on this batch.  drift: learned"
      " step / step in initial_variables.",
  ]
  return "\n".join(lines)


def plot_diagnosis(rows: Sequence[LayerDiagnosis], path: str) -> None:
  """Writes a PNG of ``rows`` to ``path``: the forward errors per layer (the
  layer's, HQ and LSQ at the init rule), the relative variance (log scale)
  and cosine of each estimator's dX and dW, and the step-size ratios.
  Needs matplotlib (imported here, not by jint4)."""
  try:
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError("jint4.plot_diagnosis needs matplotlib: pip install"
                      " matplotlib (format_diagnosis needs nothing).") from e
  rows = [r for r in rows if not r.skipped]
  if not rows:
    raise ValueError("plot_diagnosis: no diagnosed rows to plot.")
  names = [r.path for r in rows]
  pos = list(range(len(rows)))
  fig = Figure(figsize=(max(10.0, 0.6 * len(rows) + 6.0), 9.0))
  axes = fig.subplots(2, 2)
  fwd = axes[0][0]
  for j, (label, attr) in enumerate((("model (learned steps)", "fwd_error"),
                                     ("HQ (init rule)", "fwd_error_hq_init"),
                                     ("LSQ, no Hadamard (init rule)",
                                      "fwd_error_lsq_init"))):
    fwd.bar([p + (j - 1) * 0.27 for p in pos], [getattr(r, attr) for r in rows],
            width=0.27, label=label)
  fwd.set_title("forward error ||Q(x)Q(w) - xw|| / ||xw||")
  fwd.legend(fontsize=7)
  estimators = []
  for r in rows:
    estimators += [e for e in r.dx if e not in estimators]
  var, cos = axes[0][1], axes[1][0]
  for est in estimators:
    for grad, marker in (("dx", "o"), ("dw", "s")):
      stats = [getattr(r, grad).get(est) for r in rows]
      label = f"{est} {grad}"
      var.plot(pos, [s.rel_var if s else math.nan for s in stats], marker=marker,
               label=label)
      cos.plot(pos, [s.cos if s else math.nan for s in stats], marker=marker,
               label=label)
  var.set_yscale("log")
  var.set_title("relative variance E||est - exact||^2 / ||exact||^2")
  cos.set_title("mean cosine with the exact gradient")
  for ax in (var, cos):
    ax.legend(fontsize=7)
  steps = axes[1][1]
  series = [("s_x / init rule", [r.step_x_vs_init for r in rows]),
            ("s_w / init rule", [r.step_w_vs_init for r in rows])]
  if any(r.drift_x is not None for r in rows):
    series += [("s_x / initial", [_nan(r.drift_x) for r in rows]),
               ("s_w / initial", [_nan(r.drift_w) for r in rows])]
  for label, values in series:
    steps.plot(pos, values, marker="o", label=label)
  steps.axhline(1.0, color="gray", linewidth=0.8)
  steps.set_title("step sizes: learned / reference")
  steps.legend(fontsize=7)
  for ax in (fwd, var, cos, steps):
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, format="png", dpi=100)


def estimator_stats(estimates: jax.Array, exact: jax.Array) -> EstimatorStats:
  """`EstimatorStats` of ``estimates`` [S, ...] (one per key) against
  ``exact`` [...]."""
  return _finish(jax.device_get(_stats_of_samples(
      jnp.asarray(estimates, jnp.float32), jnp.asarray(exact, jnp.float32))))


@jax.jit
def _stats_of_samples(estimates, exact):
  sums, _ = jax.lax.scan(lambda sums, est: (_add_sample(sums, est, exact), None),
                         _zero_sums(exact), estimates)
  return _relative(sums, exact, estimates.shape[0])


# --- the probe runs -----------------------------------------------------------


class _Recorder:
  """The product hook of one traced run: records each product's call and
  output shape; given probes (px, pk, py) per product, runs it with the
  exact backward on (x3 + px, kernel3 + pk) and adds py to its output."""

  def __init__(self, probes=None):
    self.probes = probes
    self.calls: List[ProductCall] = []
    self.outputs: List[jax.Array] = []

  def __call__(self, call: ProductCall, run) -> jax.Array:
    i = len(self.calls)
    self.calls.append(call)
    if self.probes is None:
      y = run(call.config, call.x3, call.kernel3)
    else:
      px, pk, py = self.probes[i] if i < len(self.probes) else (None,) * 3
      if px is None or (px.shape, pk.shape) != (call.x3.shape, call.kernel3.shape):
        raise RuntimeError(
            f"diagnose: {call.name}: the model ran other INT4 products when"
            " traced again; it must run the same products on every call.")
      y = run(dataclasses.replace(call.config, backward="exact"),
              call.x3 + px.astype(call.x3.dtype),
              call.kernel3 + pk.astype(call.kernel3.dtype))
      y = y + py.astype(y.dtype)
    self.outputs.append(y)
    return y

  def operands(self):
    """Per product (x3, kernel3, step_x, step_w, log2, bias, y3), without
    gradients."""
    stop = lambda t: None if t is None else jax.lax.stop_gradient(jnp.asarray(t))
    return [(stop(c.x3), stop(c.kernel3), stop(c.step_x), stop(c.step_w),
             stop(c.log2), stop(c.bias), stop(y))
            for c, y in zip(self.calls, self.outputs)]


def _output_gradients(forward, loss_fn, variables, arrays):
  """Per product: its call (concrete operands), its output y3, and the
  gradients of the loss with respect to its output (G), its x3 and its
  kernel3 (the product's exact dX, dW, with G as cotangent)."""
  shapes = _Recorder()
  with product_hook(shapes):
    jax.eval_shape(forward, variables, arrays)
  if not shapes.calls:
    raise ValueError(
        "diagnose: the model ran no INT4 product, so there is nothing to"
        " diagnose. Convert its linear layers first, e.g. model ="
        " jint4.int4ify(model, jint4.Int4Config()), or use jint4.Int4Dense;"
        " jint4.int4ify_report(model) lists the layers kept in float and why.")
  zeros = lambda t: jnp.zeros(t.shape, jnp.float32)
  probes = [(zeros(c.x3), zeros(c.kernel3), zeros(y))
            for c, y in zip(shapes.calls, shapes.outputs)]
  traced: List[_Recorder] = []

  def loss_of(probes, variables, arrays):
    recorder = _Recorder(probes)
    traced.append(recorder)
    with product_hook(recorder):
      out = forward(variables, arrays)
    loss = jnp.asarray(loss_fn(out, arrays))
    if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
      raise ValueError(
          f"diagnose: loss_fn must return a float scalar; got {loss.dtype}"
          f" of shape {loss.shape}.")
    return loss, recorder.operands()

  try:
    (_, operands), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(
        probes, variables, arrays)
  except jax.errors.UnexpectedTracerError as e:
    raise ValueError(
        "diagnose: an INT4 product runs inside a transform that traces it on"
        " its own (nn.remat, nn.scan, nn.vmap, jax.checkpoint, ...), so its"
        " operands cannot be read out. Diagnose the model without that"
        " transform (the same variables apply).") from e
  out = []
  for c, (x, k, sx, sw, lg, bias, y), (dx, dw, g) in zip(traced[-1].calls,
                                                         operands, grads):
    call = dataclasses.replace(c, x3=x, kernel3=k, step_x=sx, step_w=sw, log2=lg,
                               bias=bias)
    out.append(_Product(call=call, y3=y, g3=g, dx3=dx, dw3=dw))
  return out


@dataclasses.dataclass(frozen=True)
class _Product:
  """One product of the probe run: its call, output and exact gradients."""
  call: ProductCall
  y3: jax.Array
  g3: jax.Array
  dx3: jax.Array
  dw3: jax.Array


def _initial_steps(initial_variables, name):
  """(step_size_x, step_size_w) of the layer ``name`` (its "/"-joined scope
  path) in ``initial_variables``, or None where it holds none."""
  node = initial_variables
  if isinstance(node, Mapping) and "params" in node:
    node = node["params"]
  for part in name.split("/"):
    node = node.get(part) if isinstance(node, Mapping) else None
  names = ("step_size_x", "step_size_w")
  if not isinstance(node, Mapping) or not set(names) <= set(node):
    return None
  return tuple(float(jnp.asarray(nn.unbox(node[k]))) for k in names)


def _split_arrays(tree):
  """(the array leaves of ``tree``, rebuild(arrays) -> tree): other leaves
  (flags, strings) stay Python values."""
  leaves, treedef = jax.tree.flatten(tree)
  is_array = [isinstance(t, (jax.Array, np.ndarray)) for t in leaves]

  def rebuild(arrays):
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if a else t
                                        for t, a in zip(leaves, is_array)])

  return [t for t, a in zip(leaves, is_array) if a], rebuild


def _paths(names) -> List[str]:
  """Layer paths as `int4ify_report` writes them: a product hook's path
  without its ``Int4DotGeneral_<i>`` submodule; ``#k`` for the k-th call."""
  out, seen = [], {}
  for name in names:
    path = re.sub(r"/Int4DotGeneral_\d+$", "", name)
    seen[path] = seen.get(path, 0) + 1
    out.append(path if seen[path] == 1 else f"{path}#{seen[path]}")
  return out


# --- one product -------------------------------------------------------------


def _diagnose_product(product: _Product, path, key, samples, estimators,
                      initial) -> LayerDiagnosis:
  call = product.call
  config = call.config
  b, n, d = call.x3.shape
  c = call.kernel3.shape[2]
  common = dict(path=path, shape=(b, n, d, c), forward=config.forward,
                backward=config.backward, samples=samples,
                block=_block(config, call.log2))
  why = ""
  if not config.quantizes_forward:
    why = "forward='none': the product runs in float"
  elif n == 0 or c == 0 or d == 0:
    why = "empty product"
  if why:
    nan = math.nan
    return LayerDiagnosis(
        **common, fwd_error=nan, fwd_error_hq_init=nan, fwd_error_lsq_init=nan,
        dx={}, dw={}, lss_kept_dx=None, lss_kept_dw=None, lss_sure_dx=None,
        lss_sure_dw=None, step_x=float(call.step_x), step_w=float(call.step_w),
        init_step_x=nan, init_step_w=nan, step_x_vs_init=nan,
        step_w_vs_init=nan, skipped=why)
  out = jax.device_get(_analyze(
      call.x3, call.kernel3, call.step_x, call.step_w, call.log2, call.bias,
      product.y3, product.g3, product.dx3, product.dw3, key, config=config,
      batched=call.batched, estimators=estimators, samples=samples))
  f = lambda t: float(t)
  step_x, step_w = f(call.step_x), f(call.step_w)
  init_x, init_w = f(out["init_step_x"]), f(out["init_step_w"])
  lss_fields = {k: None for k in ("lss_kept_dx", "lss_kept_dw", "lss_sure_dx",
                                  "lss_sure_dw")}
  lss_fields.update({k: f(v) for k, v in out["lss"].items()})
  drift = {}
  if initial is not None:
    drift = dict(initial_step_x=initial[0], initial_step_w=initial[1],
                 drift_x=_ratio(step_x, initial[0]),
                 drift_w=_ratio(step_w, initial[1]))
  return LayerDiagnosis(
      **common, fwd_error=f(out["fwd_model"]),
      fwd_error_hq_init=f(out["fwd_hq_init"]),
      fwd_error_lsq_init=f(out["fwd_lsq_init"]),
      dx={e: _finish(out["dx"][e]) for e in estimators},
      dw={e: _finish(out["dw"][e]) for e in estimators},
      **lss_fields, step_x=step_x, step_w=step_w, init_step_x=init_x,
      init_step_w=init_w, step_x_vs_init=_ratio(step_x, init_x),
      step_w_vs_init=_ratio(step_w, init_w), **drift)


@functools.partial(jax.jit, static_argnames=("config", "batched", "estimators",
                                             "samples"))
def _analyze(x3, kernel3, step_x, step_w, log2, bias, y_model, g3, exact_dx,
             exact_dw, key, *, config, batched, estimators, samples):
  """Every number of one product's row, as arrays (see `LayerDiagnosis`),
  from its operands, its output (with ``bias``), G and its exact dX, dW."""
  d = x3.shape[2]

  def product(cfg, sx, sw, lg, k, x, w):
    if batched:
      return int4_dot_general(x, w, _BATCHED_DIMS, sx, sw, k, config=cfg,
                              hadamard_log2_block=lg)
    return int4_matmul(x[0], w[0], sx, sw, k, config=cfg,
                       hadamard_log2_block=lg)[None]

  # Gradients: vjp of the library's op with G, per backward mode and key.
  out_dtype = jnp.result_type(x3.dtype, kernel3.dtype)
  cotangent = g3.astype(out_dtype)

  def grads(mode, k):
    cfg = dataclasses.replace(config, backward=mode)
    _, vjp = jax.vjp(lambda x, w: product(cfg, step_x, step_w, log2, k, x, w),
                     x3, kernel3)
    dx, dw = vjp(cotangent)
    return dx.astype(jnp.float32), dw.astype(jnp.float32)

  grad_keys = jax.random.split(jax.random.fold_in(key, 1), samples)
  exact = (exact_dx.astype(jnp.float32), exact_dw.astype(jnp.float32))
  out = {"dx": {}, "dw": {}}
  for mode in estimators:
    def step(sums, k, mode=mode):
      dx, dw = grads(mode, k)
      return (_add_sample(sums[0], dx, exact[0]),
              _add_sample(sums[1], dw, exact[1])), None
    (sums_x, sums_w), _ = jax.lax.scan(
        step, (_zero_sums(exact[0]), _zero_sums(exact[1])), grad_keys)
    out["dx"][mode] = _relative(sums_x, exact[0], samples)
    out["dw"][mode] = _relative(sums_w, exact[1], samples)

  # Forward: the op's own output (the model's, less its bias), and Q(x) Q(w)
  # of HQ and of LSQ with the init rule's steps on this batch (jint4.quant's
  # quantizers).
  y_model = y_model.astype(jnp.float32)
  if bias is not None:
    y_model = y_model - bias.astype(jnp.float32)
  y_ref = jnp.einsum("bnd,bdc->bnc", x3.astype(jnp.float32),
                     kernel3.astype(jnp.float32), precision=_HIGHEST)
  error = lambda y: (jnp.linalg.norm(y.astype(jnp.float32) - y_ref)
                     / jnp.linalg.norm(y_ref))
  x_view = x3.reshape(-1, d)
  w_view = jnp.moveaxis(kernel3, 0, 1).reshape(d, -1)

  def init_error(cfg):
    if cfg is None:  # no Hadamard block fits the contraction dim
      return jnp.float32(jnp.nan)
    own = cfg.hadamard_block == "auto" and config.hadamard_block == "auto"
    qi = init_step_sizes(x_view, w_view, cfg, log2_block=log2 if own else None)
    return error(_fake_quantized_product(x3, kernel3, qi, cfg))

  rule = init_step_sizes(x_view, w_view, config, log2_block=log2)
  out.update({
      "fwd_model": error(y_model),
      "fwd_hq_init": init_error(fit_hadamard_block(
          dataclasses.replace(config, forward="hq"), d)[0]),
      "fwd_lsq_init": init_error(dataclasses.replace(config, forward="lsq")),
      "init_step_x": rule.step_x, "init_step_w": rule.step_w,
  })

  out["lss"] = {}
  if "lss" in estimators:
    out["lss"] = _lss_fractions(x3, step_x, g3, log2, config,
                                jax.random.fold_in(key, 2))
  return out


def _fake_quantized_product(x3, kernel3, qi, cfg):
  """s_x s_w int(X Hb) int(W Hb)^T in float (the value the op computes),
  with the steps and block of ``qi`` (a `jint4.QuantInit`)."""
  block = 1
  if cfg.uses_hadamard:
    block = qi.log2_block if cfg.hadamard_block == "auto" else cfg.hadamard_block
  quantize = lambda t, s, axis: lsq.fake_quantize_value(
      hadamard.apply_block_hadamard(t, block, axis=axis), s, qn=cfg.qn, qp=cfg.qp)
  return jnp.einsum("bnd,bdc->bnc", quantize(x3, qi.step_x, -1),
                    quantize(kernel3, qi.step_w, 1), precision=_HIGHEST)


def _zero_sums(exact):
  zero = jnp.zeros((), jnp.float32)
  return (jnp.zeros_like(exact), jnp.zeros_like(exact), zero)


def _add_sample(sums, est, exact):
  """Running sums of d = est - exact, d^2 and cos(est, exact)."""
  d = est - exact
  cos = jnp.vdot(est, exact) / (jnp.linalg.norm(est) * jnp.linalg.norm(exact))
  return (sums[0] + d, sums[1] + d * d, sums[2] + cos)


def _relative(sums, exact, samples):
  """bias, noise, rel_var, cos (relative to ||exact||) from the sums."""
  sum_d, sum_d2, sum_cos = sums
  norm = jnp.linalg.norm(exact)
  mean_d = sum_d / samples
  var = (sum_d2 - samples * mean_d * mean_d) / (samples - 1)
  noise = jnp.sqrt(jnp.maximum(jnp.sum(var), 0.0) / samples)
  return {"bias": jnp.linalg.norm(mean_d) / norm, "noise": noise / norm,
          "rel_var": jnp.sum(sum_d2) / samples / (norm * norm),
          "cos": sum_cos / samples}


def _finish(s) -> EstimatorStats:
  bias, noise = float(s["bias"]), float(s["noise"])
  z = bias / math.hypot(noise, FLOAT_FLOOR) if math.isfinite(noise) else math.nan
  return EstimatorStats(bias=bias, noise=noise, z=z, unbiased=bool(z < UNBIASED_Z),
                        rel_var=float(s["rel_var"]), cos=float(s["cos"]))


def _lss_fractions(x3, step_x, g3, log2, config, key):
  """The expected fractions of the 2N bit-split rows that leverage score
  sampling keeps, sum_i p_i / 2N, and keeps for sure (p_i = 1), for dX
  (scores ||G2_i||) and dW (||G2_i|| ||X_i||, X_i the row's LSQ codes), per
  batch element as the op samples them, with the layer's budgets and split
  scale (``lss_dx_budget=2`` keeps every nonzero row of dX); for one draw of
  the bit split's stochastic rounding."""
  n = g3.shape[1]
  budgets = (lss.budget_rows(n, config.lss_dx_budget),
             lss.budget_rows(n, config.lss_budget))
  block = log2 if config.hadamard_block == "auto" else config.hadamard_block
  if not config.uses_hadamard:
    block = 1
  codes = lsq.quantize(hadamard.apply_block_hadamard(x3, block), step_x,
                       qn=config.qn, qp=config.qp)
  x_norm = jnp.linalg.norm(codes, axis=-1)                       # [B, N]

  def one(g, xn, key):
    split = (bitsplit.bit_split_rows if config.split_scale == "row"
             else bitsplit.bit_split)
    hi, lo, s_hi, s_lo = split(g, jax.random.uniform(key, g.shape))
    # A scale per tensor (a scalar) or per row ([N]) as a column.
    s_hi, s_lo = jnp.reshape(s_hi, (-1, 1)), jnp.reshape(s_lo, (-1, 1))
    g2 = jnp.concatenate([s_hi * hi, s_lo * lo]).astype(jnp.float32)
    g2_norm = jnp.linalg.norm(g2, axis=-1)
    out = []
    for scores, budget in zip((g2_norm, g2_norm * jnp.concatenate([xn, xn])), budgets):
      p = lss.inclusion_probabilities(scores, budget)
      out += [jnp.sum(p) / (2 * n), jnp.mean(p >= 1.0)]
    return jnp.stack(out)

  keys = jax.random.split(key, g3.shape[0])
  frac = jnp.mean(jax.vmap(one)(g3, x_norm, keys), axis=0)
  # Sampling drops non-finite scores; the fractions are then meaningless.
  frac = jnp.where(jnp.all(jnp.isfinite(g3)) & jnp.all(jnp.isfinite(x_norm)),
                   frac, jnp.nan)
  return {"lss_kept_dx": frac[0], "lss_sure_dx": frac[1],
          "lss_kept_dw": frac[2], "lss_sure_dw": frac[3]}


# --- helpers ------------------------------------------------------------------


def _check_model(model):
  if isinstance(model, nnx.Module):
    raise TypeError(
        "jint4.diagnose supports Linen models (jint4.int4ify(linen_module),"
        " modules with jint4.Int4Dense or the INT4 product hooks); NNX models"
        " are not supported yet.")
  if not callable(getattr(model, "apply", None)):
    raise TypeError(
        "jint4.diagnose takes a Linen model with .apply (what"
        f" jint4.int4ify(linen_module) returns); got {type(model)}.")


def _check_estimators(estimators) -> Tuple[str, ...]:
  if isinstance(estimators, str):
    estimators = (estimators,)
  estimators = tuple(estimators)
  bad = [e for e in estimators if e not in ESTIMATORS]
  if bad or not estimators:
    raise ValueError(f"diagnose: estimators must be a non-empty subset of"
                     f" {ESTIMATORS}; got {estimators!r}.")
  return tuple(dict.fromkeys(estimators))


def _block(config: Int4Config, log2) -> Optional[int]:
  """The product's Hadamard block (1: none; None: float forward)."""
  if not config.quantizes_forward:
    return None
  if not config.uses_hadamard:
    return 1
  if config.hadamard_block == "auto":
    return 2 ** int(log2)
  return config.hadamard_block


def _ratio(a: float, b: float) -> float:
  return a / b if b != 0 else math.nan


def _nan(v):
  return math.nan if v is None else v


def _num(v, fmt: str) -> str:
  return "-" if v is None else fmt.format(v)


def _z(s: Optional[EstimatorStats]) -> str:
  if s is None:
    return "-"
  return f"{s.z:.1f}" + ("" if s.unbiased else "*")


def _render(cols, rows) -> List[str]:
  """Fixed-width lines: a group header, the column names, a rule, the rows
  (a skipped row shows its reason after the layer's shape)."""
  widths = [max(len(name), *(len(v) for v in values)) if values else len(name)
            for _, name, values in cols]
  spans: List[List[int]] = []  # [first column, last column] of each group
  for i, (group, _, _) in enumerate(cols):
    if spans and cols[spans[-1][0]][0] == group:
      spans[-1][1] = i
    else:
      spans.append([i, i])
  for first, last in spans:  # widen a group's last column to fit its label
    group = cols[first][0]
    total = sum(widths[first:last + 1]) + 2 * (last - first)
    if len(group) > total:
      widths[last] += len(group) - total
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  head = []
  for first, last in spans:
    total = sum(widths[first:last + 1]) + 2 * (last - first)
    head.append(cols[first][0].ljust(total))
  out = ["  ".join(head).rstrip(), line([name for _, name, _ in cols]),
         line(["-" * w for w in widths])]
  for i, r in enumerate(rows):
    if r.skipped:
      out.append(line([cols[0][2][i], cols[1][2][i]]) + f"  skipped: {r.skipped}")
    else:
      out.append(line([values[i] for _, _, values in cols]))
  return out
