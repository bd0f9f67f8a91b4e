"""XLA flags that the `dsa-jax` command line sets before jax starts a backend.

`--xla_gpu_enable_triton_gemm=false`: without it, XLA:GPU fuses some matmuls with their neighbours into Triton GEMM
kernels and autotunes their tilings at compile time. On an NVIDIA H200 (jax 0.11.2), with cuBLAS instead:
- the 1.3B sampler's DiT ran 3 % faster in bf16 (forced 2.5 steps: 61.9 / 40.05 FPS DiT / DiT + VAE, against 60.1 / 39.4);
- with calibrated fp8 layers it ran at the same speed (66.8 / 42.2 against 66.3 / 42.0);
- the programs compiled in about half the time: whole video in bf16 28 s against 35 s, with fp8 46 s against 82-100 s;
  the fp8 calibration pass took 33 s against 45 s;
- training was unchanged: 42.1 % against 41.8 % MFU (the teacher-like DSA step).
(`docs/bench/*no_triton_gemm.json` against the earlier runs of the same commands.) Other backends ignore the flag.

A flag that XLA_FLAGS already names is left as the user set it. DSA_JAX_XLA_DEFAULTS=0 (or false) sets none. In Python (a
notebook), call `apply()` before the first jax computation: XLA reads its flags once, when the backend starts.
"""

from __future__ import annotations

import os
import re
import sys

DEFAULTS = ("--xla_gpu_enable_triton_gemm=false",)
OPT_OUT = "DSA_JAX_XLA_DEFAULTS"


def _named(flag: str, flags: str) -> bool:
  name = flag.split("=", 1)[0]
  return re.search(re.escape(name) + r"(=|\s|$)", flags) is not None


def defaults_wanted(env) -> bool:
  """DSA_JAX_XLA_DEFAULTS: unset, 1/true/yes/on -> the defaults are set; 0/false/no/off -> not."""
  value = env.get(OPT_OUT, "").strip().lower()
  if value in ("", "1", "true", "yes", "on"):
    return True
  if value in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"{OPT_OUT}={env[OPT_OUT]!r}: expected 1 (set the default XLA flags, the default) or 0 (leave "
                   "XLA_FLAGS as it is)")


def apply(environ=None) -> list[str]:
  """Adds the DEFAULTS that XLA_FLAGS does not name yet to XLA_FLAGS (in `environ`, default os.environ) and returns
  them. Raises if jax has already started a backend in this process, where the flags would silently do nothing."""
  env = os.environ if environ is None else environ
  if not defaults_wanted(env):
    return []
  current = env.get("XLA_FLAGS", "")
  added = [f for f in DEFAULTS if not _named(f, current)]
  if not added:
    return []
  if environ is None and "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      raise RuntimeError(f"dsa_jax.xla_flags.apply: jax has already started its backend, so XLA_FLAGS {added} would "
                         "not take effect; call it before the first jax computation (or set XLA_FLAGS yourself)")
  env["XLA_FLAGS"] = (current + " " + " ".join(added)).strip()
  return added
