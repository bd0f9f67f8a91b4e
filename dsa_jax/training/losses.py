"""Training objectives: teacher flow matching, ODE regression, DMD, critic, confidence; calibration.

Every loss is computed in float32 whatever the compute dtype (Self Forcing computes DMD in float64; fp32 is our
floor). Latents are channels-last (B, F, H, W, C); per-frame quantities are (B, F).

Guidance convention (`dmd.guidance`, `train.ode_guidance`): Self Forcing's, x_real = cond + g * (cond - uncond), so
g = 0 means no guidance (the unconditional forward is skipped) and the standard CFG scale is 1 + g (g = 3.0 is
standard scale 4, the published Self Forcing setting).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsa_jax.diffusion import flow
from dsa_jax.diffusion.guidance import guided_velocity as cfg_combine  # noqa: F401  (the one guidance rule)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _frame_mean(x):
  """(B, F, ...) -> (B, F): mean over everything after the frame axis."""
  return jnp.mean(_f32(x), axis=tuple(range(2, x.ndim)))


# ----------------------------------------------------------------------------------------------------------------------
# Flow matching (teacher stage, critic)


def flow_matching_loss(v_pred, x0, eps, weight=None):
  """Mean over the batch of the per-sample velocity MSE (v = eps - x0)."""
  return jnp.mean(flow.flow_matching_loss(v_pred, x0, eps, weight))


def critic_loss(v_pred, x0_gen, eps):
  """The fake score's flow-matching loss on the generator's (stop-gradient) samples."""
  return flow_matching_loss(v_pred, jax.lax.stop_gradient(x0_gen), eps)


# ----------------------------------------------------------------------------------------------------------------------
# ODE regression (CausVid initialisation)


def ode_regression_loss(x0_pred, x0_target, weight=None):
  """MSE between the student's x0 at a ladder sigma and the teacher trajectory's end, per frame then averaged."""
  per_frame = _frame_mean(jnp.square(_f32(x0_pred) - _f32(x0_target)))
  if weight is not None:
    per_frame = per_frame * weight
  return jnp.mean(per_frame)


# ----------------------------------------------------------------------------------------------------------------------
# DMD (generator)


def dmd_direction(x0, x0_real, x0_fake):
  """Self Forcing's normalised KL gradient g = (x0_fake - x0_real) / mean|x0 - x0_real| (per sample, over F,C,H,W).

  Returns (g, per-frame discrepancy d_f = mean over the frame of (x0_fake - x0_real)^2, normaliser (B,)).
  All inputs are treated as constants (the caller passes stop-gradient values).
  """
  x0, x0_real, x0_fake = (jax.lax.stop_gradient(_f32(a)) for a in (x0, x0_real, x0_fake))
  diff = x0_fake - x0_real
  norm = jnp.mean(jnp.abs(x0 - x0_real), axis=tuple(range(1, x0.ndim)))
  g = diff / jnp.maximum(norm, 1e-12).reshape((-1,) + (1,) * (x0.ndim - 1))
  g = jnp.nan_to_num(g)
  return g, _frame_mean(jnp.square(diff)), norm


def dmd_loss(x0, g):
  """0.5 * mean (x0 - sg(x0 - g))^2: its gradient with respect to x0 is g / numel (Self Forcing's form)."""
  x0 = _f32(x0)
  target = jax.lax.stop_gradient(x0 - _f32(g))
  return 0.5 * jnp.mean(jnp.square(x0 - target))


# ----------------------------------------------------------------------------------------------------------------------
# Confidence head


def discrepancy_targets(d, d_bar):
  """Soft targets y = exp(-d / d_bar) from a per-frame discrepancy and its running mean (both stop-gradient)."""
  d = jax.lax.stop_gradient(_f32(d))
  d_bar = jax.lax.stop_gradient(_f32(d_bar))
  return jnp.exp(-d / jnp.maximum(d_bar, 1e-12))


def consistency_discrepancy(x0_exit, x0_last):
  """Per-frame mean squared distance between the exit step's x0 and the rollout continued to the last step."""
  return _frame_mean(jnp.square(_f32(x0_exit) - _f32(x0_last)))


def remaining_targets(r, log_range):
  """Soft targets from a frame's x0 change r ('remaining': to the last ladder step; 'gain': of one more step): 1 at
  and below the running 10th percentile of log r, 0 at and above the 90th, linear in log r between. The remaining
  change shrinks to 0 at the last step, so the target rises with every step a frame gets; the log scale spreads
  frames whose changes differ by orders of magnitude. log_range (2,): running (10th, 90th) percentiles of log r,
  stop-gradient."""
  lo, hi = jax.lax.stop_gradient(_f32(log_range[0])), jax.lax.stop_gradient(_f32(log_range[1]))
  log_r = jnp.log(jax.lax.stop_gradient(_f32(r)) + 1e-12)
  return jnp.clip((hi - log_r) / jnp.maximum(hi - lo, 1e-3), 0.0, 1.0)


def update_log_range(log_range, r, decay: float, valid):
  """EMA of the batch's (10th, 90th) percentiles of log r; skipped when `valid` is false (the exit step is the last
  one, so r = 0 everywhere); the first update (range still 0) starts from the batch's percentiles."""
  log_r = jnp.log(jax.lax.stop_gradient(_f32(r)).reshape(-1) + 1e-12)
  batch = jnp.stack([jnp.percentile(log_r, 10.0), jnp.percentile(log_r, 90.0)])
  log_range = _f32(log_range)
  fresh = jnp.all(log_range == 0)
  new = jnp.where(fresh, batch, decay * log_range + (1.0 - decay) * batch)
  return jnp.where(valid, new, log_range)


def update_running_mean(d_bar, d, decay: float):
  """EMA of the mean discrepancy; the first update (d_bar == 0) starts from the batch mean, not from 0."""
  m = jnp.mean(jax.lax.stop_gradient(_f32(d)))
  d_bar = _f32(d_bar)
  return jnp.where(d_bar > 0, decay * d_bar + (1.0 - decay) * m, m)


def confidence_loss(logits, targets, weight=None):
  """Binary cross-entropy with soft targets, averaged over frames (optionally weighted)."""
  bce = optax.sigmoid_binary_cross_entropy(_f32(logits), jax.lax.stop_gradient(_f32(targets)))
  if weight is None:
    return jnp.mean(bce)
  weight = _f32(weight)
  return jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1e-12)


def calibration_metrics(logits, targets, num_bins: int = 10) -> dict:
  """Mean |sigmoid(logit) - target|, expected calibration error over `num_bins` confidence bins, means of both.

  ECE with soft targets: sum over bins of (bin share) * |mean confidence - mean target| in the bin.
  """
  p = jax.nn.sigmoid(_f32(logits)).reshape(-1)
  y = _f32(targets).reshape(-1)
  bins = jnp.clip((p * num_bins).astype(jnp.int32), 0, num_bins - 1)
  one_hot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)
  count = one_hot.sum(0)
  p_sum = (one_hot * p[:, None]).sum(0)
  y_sum = (one_hot * y[:, None]).sum(0)
  ece = jnp.sum(jnp.abs(p_sum - y_sum)) / jnp.maximum(p.shape[0], 1)
  return {"conf_abs_err": jnp.mean(jnp.abs(p - y)), "conf_ece": ece, "conf_mean": jnp.mean(p),
          "conf_target_mean": jnp.mean(y)}
