"""Flow matching as Wan2.1 uses it.

x_sigma = (1 - sigma) * x0 + sigma * eps, the network predicts v = eps - x0, t = 1000 * sigma, and a shift s warps
sigmas as s*sigma / (1 + (s - 1)*sigma). All functions broadcast: sigma may be a scalar, per sample or per frame.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def shift_sigma(sigma, shift: float):
  """Wan's timestep shift; shift > 1 spends more of a ladder at high noise."""
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def warp_ladder(ladder: Sequence[float], shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
  """Self Forcing's `warp_denoising_step`: ladder timesteps (before warping) -> shifted sigmas.

  Self Forcing indexes a 1000-entry grid sigma = linspace(1, 0, 1001)[:-1] (shifted) at 1000 - t; for integer
  ladders that is exactly the shift applied to t / 1000, which is what we compute (in float64, then float32).
  [1000, 750, 500, 250] -> t = [1000, 937.5, 833.3, 625.0].
  """
  sig = np.asarray(ladder, np.float64) / num_train_timesteps
  return shift_sigma(sig, shift).astype(np.float32)


def expand_per_frame(sigma, x):
  """Broadcasts sigma of shape (), (B,) or (B, F) against latents x of shape (B, F, H, W, C)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  while sigma.ndim < x.ndim:
    sigma = sigma[..., None]
  return sigma


def add_noise(x0, eps, sigma):
  """x_sigma = (1 - sigma) x0 + sigma eps (per frame when sigma is (B, F))."""
  s = expand_per_frame(sigma, x0)
  return ((1.0 - s) * x0.astype(jnp.float32) + s * eps.astype(jnp.float32)).astype(x0.dtype)


def velocity_target(x0, eps):
  """The flow-matching regression target v = eps - x0."""
  return eps.astype(jnp.float32) - x0.astype(jnp.float32)


def x0_from_velocity(x_t, v, sigma):
  """x0 = x_sigma - sigma v."""
  s = expand_per_frame(sigma, x_t)
  return x_t.astype(jnp.float32) - s * v.astype(jnp.float32)


def velocity_from_x0(x_t, x0, sigma):
  """v = (x_sigma - x0) / sigma (sigma > 0); used to turn an x0 guess back into a velocity."""
  s = expand_per_frame(sigma, x_t)
  return (x_t.astype(jnp.float32) - x0.astype(jnp.float32)) / jnp.maximum(s, 1e-6)


def renoise(x0, eps, sigma_next):
  """Consistency-style step between ladder entries: fresh noise at the next sigma (Self Forcing)."""
  return add_noise(x0, eps, sigma_next)


def sample_train_sigma(key, shape, shift: float, sampler: str = "uniform", t_min: float = 0.0, t_max: float = 1000.0,
                       num_train_timesteps: int = 1000):
  """Training sigmas: u ~ U[0,1) (or logit-normal), shifted, clamped to [t_min, t_max] in timestep units."""
  if sampler == "uniform":
    u = jax.random.uniform(key, shape)
  elif sampler == "logit_normal":
    u = jax.nn.sigmoid(jax.random.normal(key, shape))
  else:
    raise ValueError(f"diffusion.train_t_sampler: expected 'uniform' or 'logit_normal', got {sampler!r}")
  sigma = shift_sigma(u, shift)
  return jnp.clip(sigma, t_min / num_train_timesteps, t_max / num_train_timesteps)


def flow_matching_loss(v_pred, x0, eps, weight=None):
  """Mean squared error of the velocity, per sample (B,); `weight` optionally per frame (B, F)."""
  err = jnp.square(v_pred.astype(jnp.float32) - velocity_target(x0, eps))
  per_frame = jnp.mean(err, axis=tuple(range(2, err.ndim)))
  if weight is not None:
    per_frame = per_frame * weight
  return jnp.mean(per_frame, axis=1)
