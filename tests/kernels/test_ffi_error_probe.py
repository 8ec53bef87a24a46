"""tools/ffi_error_probe on this jaxlib's CPU backend.

A failing XLA FFI handler must come back as a Python exception whatever way
its message was built (a jaxlib that crashed the process instead is why the
handlers build messages by plain string concatenation: docs/HOPPER.md). The
probe compiles its own tiny handlers with g++ against the running jaxlib's
headers; tools/gpu_test.sh runs it on the GPU too.
"""

import importlib.util
import json
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _probe():
  spec = importlib.util.spec_from_file_location(
      "ffi_error_probe", os.path.join(ROOT, "tools", "ffi_error_probe", "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the probe")
def test_failing_handlers_raise_on_the_cpu(tmp_path):
  assert _probe().main(["--platforms", "cpu", "--out", str(tmp_path)]) == 0
  with open(tmp_path / "ffi_error_probe.json") as f:
    rows = {r["case"]: r for r in json.load(f)["rows"]}
  assert rows["probe_stream_no_error"]["verdict"] == "ok"
  for case in ("probe_literal_message", "probe_string_message", "probe_stream_message"):
    assert rows[case]["verdict"] == "raised", rows[case]
    assert "INVALID_ARGUMENT" in rows[case]["detail"] and "probe:" in rows[case]["detail"]
