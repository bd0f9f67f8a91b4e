"""The environment of a test worker subprocess that simulates 8 devices on the CPU."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eight_device_env(**extra) -> dict:
  """os.environ plus 8 simulated CPU devices, beside the suite's XLA flags (conftest.py). NPROC sizes XLA:CPU's
  thread pools (default: the core count, at least the device count): XLA:CPU runs independent parts of a program
  concurrently, so 8 devices can block more than 8 threads in collectives at once and starve the devices they wait
  for (seen as "Termination timeout for all gather ..." aborts on a busy 2-core machine)."""
  return dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
              JAX_PLATFORMS="cpu", NPROC="64", PYTHONPATH=ROOT, **extra)
