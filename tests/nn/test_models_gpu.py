"""The general layers and attention's products on the CUDA engine (GPU only).

The toy ViT and BERT of test_standard_models.py (patch-embedding Conv,
attention projections and products, Dense MLPs, LSQ embeddings) int4ified
with the paper's recipe: one loss and gradient on the GPU, whose jitted
program must call the CUDA handlers, against the pure-JAX engine on the CPU.
Their quantizers are twins (bit-identical integers), but the float work around
them (LayerNorm, softmax) rounds differently on the two backends, which can
move a value across a rounding boundary: hence tolerances, not equality. Both
runs pass the same ``'quant'`` rng: without one, each layer derives its key
from the bits of its input, which that float drift changes, so the two
backends would draw independent stochastic roundings and samples, and only
their expectations would agree. Both run their float matmuls (the kept
heads, and the ViT's P V product, whose 17 keys no Hadamard block divides)
at float32 precision: XLA:GPU's default for them is TF32, whose 1e-3
relative error would move far more values across the INT4 rounding
boundaries than the backends' ulp drift. And
the partitioned op (`jint4.partition`) under a one-GPU mesh against the same
program without one: the same integer GEMMs, so the forward bit for bit.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jint4
from tests.nn.test_standard_models import PAPER, Bert, ViT, _bert_data, _vit_data


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _gpus(), reason="needs a CUDA GPU")]


# One key for both backends: the same draws, so only float drift differs.
QUANT_KEY = jax.random.key(7)
# lss: keys of the reference's own spread over draws (its step sizes' scalar
# gradients change sign from one draw to the next).
SPREAD_KEYS = 8


def _vit_case():
  images, labels = _vit_data()

  def loss(model, params, key, images, labels):
    logits = model.apply({"params": params}, images, rngs={"quant": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ViT(), "head", (images, labels), loss


def _bert_case():
  tokens, padding, labels = _bert_data()

  def loss(model, params, key, tokens, padding, labels):
    logits, mlm = model.apply({"params": params}, tokens, padding, rngs={"quant": key})
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(mlm, tokens).mean())
  return Bert(), "classifier", (tokens, padding, labels), loss


@pytest.mark.parametrize("backward", ["bitsplit", "lss"])
@pytest.mark.parametrize("case", [_vit_case, _bert_case], ids=["vit", "bert"])
def test_standard_model_on_cuda_matches_reference_on_cpu(case, backward):
  float_model, keep, data, loss = case()
  results, programs, spread = {}, {}, None
  for engine, device in (("auto", _gpus()[0]), ("reference", jax.devices("cpu")[0])):
    config = dataclasses.replace(PAPER, engine=engine, backward=backward)
    model = jint4.int4ify(float_model, config, keep=keep)
    with jax.default_device(jax.devices("cpu")[0]):
      params = jax.jit(model.init)(jax.random.key(2), *data[:-1])["params"]
    args = jax.device_put((params, QUANT_KEY, *data), device)
    f = jax.jit(jax.value_and_grad(lambda p, k, *d: loss(model, p, k, *d)))
    with jax.default_matmul_precision("float32"):
      programs[engine] = set(re.findall(r"jint4_[a-z_]+", f.lower(*args).as_text()))
      results[engine] = jax.device_get(f(*args))
      if engine == "reference" and backward == "lss":
        draws = [jax.device_get(f(args[0], jax.device_put(jax.random.key(100 + i), device),
                                  *args[2:])[1]) for i in range(SPREAD_KEYS)]
        spread = [np.std(np.stack(leaves), axis=0) for leaves in
                  zip(*(jax.tree_util.tree_leaves(d) for d in draws))]
  # No silent fallback: the GPU program runs the CUDA GEMM and quantizers.
  assert {"jint4_int_gemm", "jint4_hadamard_quantize", "jint4_lsq_backward"} <= programs["auto"]
  assert not programs["reference"]
  (l_gpu, g_gpu), (l_cpu, g_cpu) = results["auto"], results["reference"]
  assert np.isfinite(l_gpu) and abs(l_gpu - l_cpu) <= 1e-2 * abs(l_cpu), (l_gpu, l_cpu)
  flat_gpu = jax.tree_util.tree_flatten_with_path(g_gpu)[0]
  flat_cpu = jax.tree_util.tree_leaves(g_cpu)
  for i, ((path, a), b) in enumerate(zip(flat_gpu, flat_cpu)):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    assert np.all(np.isfinite(a)), path
    if np.linalg.norm(b) == 0:
      continue
    if a.size == 1 and spread is None:   # bitsplit's step sizes: near-deterministic
      assert np.sign(a[0]) == np.sign(b[0]) or abs(a[0] - b[0]) <= 0.5 * abs(b[0]), path
      continue
    if a.size == 1:   # lss: a kept row moved by drift moves the sum by 1/p of it
      sd = float(spread[i])
      assert abs(a[0] - b[0]) <= 5 * sd + 1e-6 * abs(b[0]), (jax.tree_util.keystr(path),
                                                            a[0], b[0], sd)
      continue
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    # lss: drift can move a keep probability across its uniform draw, and a
    # row kept or dropped moves by 1/p of itself.
    assert cos > (0.999 if backward == "bitsplit" else 0.9), (jax.tree_util.keystr(path), cos)


def test_partitioned_op_on_a_one_gpu_mesh_equals_no_mesh():
  gpu = _gpus()[0]
  mesh = Mesh(np.array([gpu]).reshape(1, 1), ("data", "model"))
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (256, 512), jnp.float32)
  w = jax.random.normal(kw, (512, 256), jnp.float32) / np.sqrt(512)
  ct = jax.random.normal(kg, (256, 256), jnp.float32)
  config = jint4.Int4Config(backward="exact")

  def loss(x, w, sx, sw):
    y = jint4.int4_matmul(x, w, sx, sw, jax.random.key(1), config=config)
    return jnp.sum(y * ct), y
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  sx, sw = jnp.float32(0.35), jnp.float32(0.03)
  (_, y1), g1 = f(*jax.device_put((x, w), gpu), sx, sw)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  args = (put(x, P("data", None)), put(w, P(None, "model")))
  (_, y), g = f(*args, sx, sw)
  assert "jint4_int_gemm" in f.lower(*args, sx, sw).as_text()
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y1))
  for a, b in ((g[0], g1[0]), (g[1], g1[1]), (g[3], g1[3])):
    assert float(jnp.max(jnp.abs(a - b))) <= 2e-6 * float(jnp.max(jnp.abs(b)))
