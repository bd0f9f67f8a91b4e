"""Classifier-free guidance, one convention everywhere: Self Forcing's.

  guided = cond + g * (cond - uncond)

g = 0 is no guidance (callers skip the unconditional forward), and g corresponds to the standard CFG scale 1 + g
(uncond + s * (cond - uncond) with s = 1 + g). `sampling.guidance`, `dmd.guidance` and `train.ode_guidance` all use
it; Self Forcing's published DMD setting g = 3 is standard scale 4.
"""

from __future__ import annotations

import jax.numpy as jnp

OFF = 0.0


def is_on(guidance) -> bool:
  """Whether a (host) guidance value needs the unconditional branch."""
  return float(guidance) != OFF


def guided_velocity(cond, uncond, guidance):
  """cond + g (cond - uncond) in float32; `guidance` is a scalar or per sample / per frame, broadcast over the
  trailing axes of `cond` (e.g. (B,) against (B, F, H, W, C))."""
  cond = jnp.asarray(cond, jnp.float32)
  uncond = jnp.asarray(uncond, jnp.float32)
  g = jnp.asarray(guidance, jnp.float32)
  g = g.reshape(g.shape + (1,) * (cond.ndim - g.ndim))
  return cond + g * (cond - uncond)
