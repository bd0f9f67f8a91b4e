import os
import sys

# Tests run on the CPU even where a GPU is visible, and never preallocate.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One persistent compilation cache, outside the home folder, for every test from its first compile on and for every
# subprocess a test starts (the environment is set before jax is imported). `dsa-jax sample` used to turn it on
# half-way through a worker's tests; with it on from the start, a program already compiled by an earlier run or by
# another module (the tiny config's sampler and training steps are built by many) is loaded instead of compiled.
os.environ.setdefault("DSA_JAX_CACHE", os.path.join(__import__("tempfile").gettempdir(), "dsa_jax_test_xla_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["DSA_JAX_CACHE"])
# Every program is cached, also those compiling in under a second (the two workers and the subprocesses build many
# of the same small ones): the whole suite 11:09 instead of 11:29 from an empty cache on a 2-core machine.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite is compile-bound on a CPU: XLA's backend optimisation level 0 halves the compile of the tiny training
# steps (36 -> 23 s) and takes the whole suite from 11:00 to under 9 minutes on a 2-core machine. What the tests check
# (parity within float tolerances, equalities between code paths, shapes, control flow, errors) holds at any level;
# DSA_JAX_TEST_FULL_OPT=1 runs them at XLA's default level instead.
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("DSA_JAX_TEST_FULL_OPT") != "1" and "xla_backend_optimization_level" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
# The flags the `dsa-jax` executable adds (dsa_jax/xla_flags.py), here too: the CLI subprocesses of the tests then
# run with the XLA flags of the tests' own programs and load those from the compilation cache (the flags are part of
# its key).
from dsa_jax import xla_flags  # noqa: E402

xla_flags.apply()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def repo_root():
  return ROOT


@pytest.fixture(scope="session")
def tiny_config():
  from dsa_jax.config_lib import get_config
  return get_config(os.path.join(ROOT, "configs", "tiny.py"))


@pytest.fixture(scope="module")
def sampler(tiny_config):
  """The tiny config's sampler (one per test module, so each module compiles its own programs)."""
  from dsa_jax.sampling.sampler import make_sampler
  return make_sampler(tiny_config)


@pytest.fixture(scope="module")
def params(sampler):
  import jax
  return sampler.init_params(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def context():
  """Two prompts' worth of random text context in the tiny config's shape (text_len 8, text_dim 32)."""
  import numpy as np
  return np.random.RandomState(0).standard_normal((2, 8, 32)).astype(np.float32)


