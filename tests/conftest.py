import os
import sys

# Tests run on the CPU even where a GPU is visible, and never preallocate.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def repo_root():
  return ROOT


@pytest.fixture(scope="session")
def tiny_config():
  from dsa_jax.config_lib import get_config
  return get_config(os.path.join(ROOT, "configs", "tiny.py"))


# `dsa-jax sample` turns on jax's persistent compilation cache; tests keep it out of the home folder.
os.environ.setdefault("DSA_JAX_CACHE", os.path.join(__import__("tempfile").gettempdir(), "dsa_jax_test_xla_cache"))
