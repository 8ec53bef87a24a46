"""The examples' shared loop: a checkpoint saved on one set of devices loads
its params on another (a GPU run's checkpoint fine-tuned or diagnosed on a
CPU), here a checkpoint written from the second of two CPU devices read by a
process that has only one."""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SAVE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, optax
    sys.path.insert(0, {examples!r})
    import trainer
    second = jax.devices()[1]
    params = {{"dense": {{"kernel": jax.device_put(jnp.arange(6.0).reshape(2, 3), second)}}}}
    state = {{}}
    opt_state = jax.device_put(optax.adam(1e-3).init(params), second)
    manager = trainer._checkpointer({out!r})
    trainer.save_checkpoint(manager, 5, params, state, opt_state)
    manager.wait_until_finished()
""")

LOAD = textwrap.dedent("""
    import sys, jax, numpy as np
    sys.path.insert(0, {examples!r})
    import trainer
    assert len(jax.devices()) == 1
    params = trainer.load_params({out!r})
    kernel = params["dense"]["kernel"]
    assert kernel.devices() == {{jax.devices()[0]}}
    np.testing.assert_array_equal(np.asarray(kernel), np.arange(6.0).reshape(2, 3))
    print("loaded")
""")


def _python(code, devices, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)


def test_params_saved_from_other_devices_load_on_this_one(tmp_path):
  fmt = dict(examples=str(ROOT / "examples"), out=str(tmp_path / "run"))
  saved = _python(SAVE.format(**fmt), 2, tmp_path)
  assert saved.returncode == 0, saved.stderr[-3000:]
  loaded = _python(LOAD.format(**fmt), 1, tmp_path)
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  assert "loaded" in loaded.stdout
