"""Which failing XLA FFI handler crashes the process, on this jaxlib?

Compiles probe.cc (or takes --lib), then calls each probe handler in its own
child process, on each platform given, and prints one line per case: whether
the failure came back as a Python exception (``raised``), the handler ran
fine (``ok``), or the process died (``crashed``, with the signal and the end
of its stderr). Exit status 1 when any case crashed.

  python tools/ffi_error_probe/run.py [--lib probe.so] [--platforms cpu,cuda]
      [--ffi-include DIR] [--out DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("probe_literal_message", "probe_string_message", "probe_stream_no_error",
         "probe_stream_message")

CHILD = r"""
import ctypes, sys
import jax, jax.numpy as jnp
lib_path, name, platform = sys.argv[1:4]
lib = ctypes.cdll.LoadLibrary(lib_path)
jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                            platform="CUDA" if platform == "cuda" else "cpu")
device = jax.devices(platform)[0]
x = jax.device_put(jnp.ones((4,), jnp.float32), device)
call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((4,), jnp.float32))
try:
  jax.block_until_ready(jax.jit(call)(x))
  print("RESULT ok")
except Exception as e:  # the failure we want: a Python exception
  print("RESULT raised", type(e).__name__, str(e).splitlines()[0][:200])
"""


def compile_probe(ffi_include: str, out_dir: str) -> str:
  lib = os.path.join(out_dir, "ffi_error_probe.so")
  cmd = ["g++", "-std=c++17", "-O2", "-w", "-shared", "-fPIC", "-I", ffi_include,
         os.path.join(HERE, "probe.cc"), "-o", lib]
  subprocess.run(cmd, check=True)
  return lib


def run_case(lib: str, name: str, platform: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu" if platform == "cpu" else "cuda,cpu"}
  proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, lib, name, platform],
                        capture_output=True, text=True, timeout=300, env=env)
  result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode == 0 and result:
    verdict, _, detail = result[-1][len("RESULT "):].partition(" ")
  else:
    verdict = "crashed"
    detail = (f"exit {proc.returncode}"
              + (f" (signal {-proc.returncode})" if proc.returncode < 0 else "")
              + ": " + " | ".join(proc.stderr.strip().splitlines()[-6:]))
  return {"case": name, "platform": platform, "verdict": verdict, "detail": detail}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--lib", help="a prebuilt probe library (default: compile probe.cc)")
  p.add_argument("--ffi-include", help="XLA FFI headers (default: the running jaxlib's)")
  p.add_argument("--platforms", default="cpu")
  p.add_argument("--out", help="write results.json here")
  args = p.parse_args(argv)
  import jax
  import jaxlib
  work = args.out or tempfile.mkdtemp()
  os.makedirs(work, exist_ok=True)
  lib = args.lib or compile_probe(args.ffi_include or jax.ffi.include_dir(), work)
  rows = [run_case(os.path.abspath(lib), name, platform)
          for platform in args.platforms.split(",") for name in CASES]
  print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}")
  for r in rows:
    print(f"{r['platform']:5s} {r['case']:24s} {r['verdict']:8s} {r['detail']}")
  if args.out:
    with open(os.path.join(args.out, "ffi_error_probe.json"), "w") as f:
      json.dump({"jax": jax.__version__, "jaxlib": jaxlib.__version__, "rows": rows}, f, indent=1)
  return int(any(r["verdict"] == "crashed" for r in rows))


if __name__ == "__main__":
  sys.exit(main())
