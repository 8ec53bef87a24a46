"""The quick-start example, at a tiny size: on one device and on a mesh of 8
CPU host devices (data + tensor + FSDP parallel), whose compiled train step
gathers no float matrix that the float model's does not."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint4
from tests.test_partition import _matrix_gathers

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--steps", "6", "--batch", "8", "--seq-len", "32", "--eval-batches", "1", "--layers", "1",
        "--log-every", "3"]


def _example():
  if "train_transformer" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "train_transformer", ROOT / "examples" / "train_transformer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses (Flax modules) look it up
    spec.loader.exec_module(module)
  return sys.modules["train_transformer"]


def test_example_trains_on_one_device(capsys):
  assert _example().main(TINY) == 0
  out = capsys.readouterr().out
  assert "linear-like layers in INT4" in out and "final eval loss" in out


@pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices"
                    " (tests/conftest.py sets them up)")
def test_example_trains_on_a_data_tensor_fsdp_mesh(capsys):
  argv = TINY + ["--mesh", "data=4,model=2", "--fsdp", "--d-model", "128"]
  assert _example().main(argv) == 0
  assert "mesh: {'data': 4, 'model': 2} over 8 cpu devices; FSDP: on" in (
      capsys.readouterr().out)


@pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices"
                    " (tests/conftest.py sets them up)")
def test_example_train_step_gathers_no_float_matrix_the_float_model_does_not():
  ex = _example()
  mesh = ex.make_mesh((("data", 4), ("model", 2)))
  model = ex.GPT(d_model=128, num_layers=1, num_heads=4, max_len=32)
  tokens = jnp.zeros((8, 32), jnp.int32)
  batch = jax.device_put(tokens, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  hlo = {}
  for name, m in (("float", model), ("int4", jint4.int4ify(model, keep="lm_head"))):
    params = jax.jit(m.init)(jax.random.key(0), tokens)["params"]
    params = jax.device_put(params, ex.param_sharding(params, mesh, fsdp=True))
    tx = ex.make_optimizer(1e-3, 10)
    train_step, _ = ex.make_steps(m, tx)
    opt = jax.jit(tx.init)(params)
    hlo[name] = train_step.lower(params, opt, batch, batch, jax.random.key(1)).compile(
        ).as_text()
  floats = lambda gs: sorted(g for g in gs if g[0] in ("f32", "bf16", "f16"))
  int4, ref = _matrix_gathers(hlo["int4"]), _matrix_gathers(hlo["float"])
  extra = list(floats(int4))
  for g in floats(ref):
    if g in extra:
      extra.remove(g)
  # The float model gathers its FSDP-sharded kernels; the INT4 model gathers
  # those it converts as 4-bit codes, and only the LM head (kept float) as is.
  assert not extra, extra
  assert any(t == "u8" for t, _ in int4)
  kernels = [np.prod(s) for t, s in floats(int4)]
  assert len(kernels) < len(floats(ref)), (int4, ref)
