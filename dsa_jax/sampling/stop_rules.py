"""When a frame stops denoising: the rules the sampler's loop calls (and the reference sampler and the threshold
simulation of the evaluation reuse), written once.

Each rule maps a per-frame score after step `steps` (1-based) and a threshold tau to "ready":
  'confidence': the head's confidence c >= tau (the DSA rule);
  'x0_delta':   the training-free baseline, mean |x0_k - x0_{k-1}| < tau once two predictions exist (steps >= 2).
A frame is done when it is ready and has taken min_steps, or has taken max_steps. The functions use only array
operators, so they work on jax arrays inside the compiled loop and on numpy arrays on the host.
"""

from __future__ import annotations

import jax.numpy as jnp

STOP_RULES = ("confidence", "x0_delta")


def config_stop_rule(config) -> str:
  """config.sampling.stop_rule, 'confidence' where the config predates the field (one read back from an older
  checkpoint)."""
  return str(config.sampling.get("stop_rule", "confidence"))


def config_first_chunk_floor(config) -> int:
  """config.sampling.first_chunk_min_steps, 0 (no floor of its own) where the config predates the field."""
  return int(config.sampling.get("first_chunk_min_steps", 0))


def confidence_ready(score, tau, steps):
  """The confidence head's rule: c >= tau (a nan score is never ready)."""
  del steps
  return score >= tau


def x0_delta_ready(score, tau, steps):
  """The x0-change rule: the prediction moved by less than tau since the previous step (needs two predictions)."""
  return (steps >= 2) & (score < tau)


READY = {"confidence": confidence_ready, "x0_delta": x0_delta_ready}


def frame_done(active, steps, min_steps, max_steps, ready):
  """Active frames that stop now: ready after at least min_steps, or at max_steps whatever the score."""
  return active & (((steps >= min_steps) & ready) | (steps >= max_steps))


def x0_delta(prev_x0, x0):
  """Mean absolute change of each frame's x0 between consecutive steps: (B, F, H, W, C) x2 -> (B, F) float32."""
  if prev_x0.shape != x0.shape or x0.ndim < 3:
    raise ValueError(f"x0_delta: expected two (B, F, ...) arrays of one shape, got {prev_x0.shape} and {x0.shape}")
  d = jnp.abs(x0.astype(jnp.float32) - prev_x0.astype(jnp.float32))
  return jnp.mean(d, axis=tuple(range(2, x0.ndim)))
