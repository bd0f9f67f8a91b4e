"""The XLA flags the `dsa-jax` executable sets by default (dsa_jax/xla_flags.py)."""

import os
import subprocess
import sys

import pytest

from dsa_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_gpu_enable_triton_gemm=false"


def test_defaults_join_the_users_flags_and_leave_named_ones_alone():
  env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
  assert xla_flags.apply(env) == [FLAG] and env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {FLAG}"
  assert xla_flags.apply(env) == [] and env["XLA_FLAGS"].count(FLAG) == 1  # once
  mine = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  assert xla_flags.apply(mine) == [] and mine["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
  # a longer flag name that starts with the same words is another flag
  other = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm_any=true"}
  assert xla_flags.apply(other) == [FLAG]
  empty = {}
  assert xla_flags.apply(empty) == [FLAG] and empty["XLA_FLAGS"] == FLAG
  for value in ("0", "false", "Off"):
    off = {xla_flags.OPT_OUT: value}
    assert xla_flags.apply(off) == [] and "XLA_FLAGS" not in off
  assert xla_flags.apply({xla_flags.OPT_OUT: "yes"}) == [FLAG]
  with pytest.raises(ValueError, match="DSA_JAX_XLA_DEFAULTS='maybe': expected 1 .* or 0"):
    xla_flags.apply({xla_flags.OPT_OUT: "maybe"})


def test_too_late_once_jax_has_started_its_backend(monkeypatch):
  import jax
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  with pytest.raises(RuntimeError, match="before the first jax computation"):
    xla_flags.apply()


@pytest.mark.parametrize("given,want", [("", FLAG), ("--xla_gpu_enable_triton_gemm=true",
                                                     "--xla_gpu_enable_triton_gemm=true")])
def test_the_executable_sets_them_before_jax_starts(given, want):
  code = ("import os, sys\nsys.argv = ['dsa-jax', 'info', '--help']\nfrom dsa_jax.cli import console_main\n"
          "try:\n  console_main()\nexcept SystemExit:\n  pass\nprint('XLA_FLAGS=' + os.environ['XLA_FLAGS'])")
  env = dict(os.environ, XLA_FLAGS=given, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop(xla_flags.OPT_OUT, None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == f"XLA_FLAGS={want}"
