"""Eight CPU devices for the multi-device tests (test_partition.py).

Set before JAX initialises its backends, i.e. before any test module imports
jax; an XLA_FLAGS the caller already set is kept, with the device count added.
Single-device tests run on the first device as before.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
