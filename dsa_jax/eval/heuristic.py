"""A training-free early exit, the baseline (d) of the claim: stop a frame when its x0 prediction stops changing.

Rule: after step k >= 2 (two predictions exist) and k >= min_steps, a frame is done when the mean absolute change of
its x0 prediction between consecutive steps is below `delta`: mean_{H,W,C} |x0_k - x0_{k-1}| < delta. It needs no
confidence head, so it isolates what the learned head adds over "the prediction has converged".

The sampler is told which rule to use by a static switch. Until `dsa_jax/sampling/sampler.py` carries one
(`config.sampling.stop_rule = 'x0_delta'`, see `sampler_has_stop_rule`), `X0DeltaSampler` subclasses the DSA sampler
and replaces only the stopping test of its per-chunk while-loop; everything else (noise, frozen frames, cache,
controls, one compiled program) is inherited, so FPS and quality are comparable with the DSA runs. In both, the
threshold control carries delta (traced: a sweep over deltas does not recompile), and the `confidences` /
`conf_trace` outputs carry the measured x0 change instead of a confidence (nan at step 1, which has no previous
prediction).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.diffusion import flow
from dsa_jax.sampling import sampler as sampler_lib

RULE = "x0_delta"


def x0_delta(prev_x0, x0):
  """Mean absolute change of each frame's x0 between consecutive steps: (B, F, H, W, C) x2 -> (B, F) float32."""
  if prev_x0.shape != x0.shape or x0.ndim < 3:
    raise ValueError(f"x0_delta: expected two (B, F, ...) arrays of one shape, got {prev_x0.shape} and {x0.shape}")
  d = jnp.abs(x0.astype(jnp.float32) - prev_x0.astype(jnp.float32))
  return jnp.mean(d, axis=tuple(range(2, x0.ndim)))


def x0_delta_stop(prev_x0, x0, delta):
  """(B, F) bool: frames whose x0 changed by less than `delta` (scalar, (B,) per sample, or (B, F))."""
  d = x0_delta(prev_x0, x0)
  delta = jnp.asarray(delta, jnp.float32)
  if delta.ndim == 1:
    delta = delta[:, None]
  return d < delta


def sampler_has_stop_rule(config) -> bool:
  """True when the DSA sampler itself implements `config.sampling.stop_rule` (the hook asked of the lead)."""
  return "stop_rule" in config.sampling and RULE in getattr(sampler_lib, "STOP_RULES", ())


class X0DeltaSampler(sampler_lib.Sampler):
  """The DSA sampler with the x0-change stopping rule instead of the confidence head (the head is not called)."""

  def denoise_chunk(self, params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg: bool):
    c, L = self.chunk_frames, self.num_steps
    b = context.shape[0]
    offset = jnp.asarray(chunk_index, jnp.int32) * c
    sig = jnp.asarray(np.append(self.sigmas, np.float32(0.0)))
    max_s = jnp.clip(jax.lax.dynamic_slice_in_dim(controls.max_steps, offset, c, axis=1), 1, L)
    min_s = jnp.clip(jax.lax.dynamic_slice_in_dim(controls.min_steps, offset, c, axis=1), 1, max_s)
    delta = controls.threshold[:, None]
    ckeys = sampler_lib.chunk_keys(keys, chunk_index)
    tn = self.num_train_timesteps
    gen = params["generator"]
    bcast = sampler_lib._bcast  # pylint: disable=protected-access

    def body(s: sampler_lib.SamplerState) -> sampler_lib.SamplerState:
      active = ~s.done
      a5 = bcast(active, s.x)
      sigma_k = sig[s.k]
      if self.frozen_mode == "clean":
        frozen_x = self.context_input(s.x0, ckeys)
        frozen_t = jnp.full((b, c), self.context_noise, jnp.float32)
      else:
        frozen_x = s.x
        frozen_t = tn * sig[jnp.maximum(s.steps - 1, 0)]
      x_in = jnp.where(a5, s.x, frozen_x)
      t_in = jnp.where(active, tn * sigma_k, frozen_t)
      v, _, cache = self.forward(gen, x_in, t_in, context, uncond_context, controls.guidance, s.cache, offset,
                                 use_cfg)
      x0_new = flow.x0_from_velocity(s.x, v, sigma_k)
      change = jnp.where(s.k > 0, x0_delta(s.x0, x0_new), jnp.nan)  # no previous prediction at the first step
      steps = jnp.where(active, s.k + 1, s.steps)
      ready = (steps >= 2) & (change < delta)
      stop = active & (((steps >= min_s) & ready) | (steps >= max_s))
      x0 = jnp.where(a5, x0_new, s.x0)
      conf = jnp.where(active, change, s.conf)
      trace = jax.lax.dynamic_update_slice_in_dim(
          s.trace, jnp.where(active, change, jnp.nan)[:, :, None], s.k, axis=2)
      eps = sampler_lib.slot_noise(ckeys, s.k + 1, s.x.shape[1:])
      x_next = flow.renoise(x0_new, eps, sig[s.k + 1])
      x = jnp.where(bcast(active & ~stop, s.x), x_next, s.x)
      return sampler_lib.SamplerState(k=s.k + 1, x=x, x0=x0, steps=steps, done=s.done | stop, conf=conf,
                                      trace=trace, keys=s.keys, cache=cache)

    def cond(s):
      return (s.k < L) & ~jnp.all(s.done)

    shape = (b,) + self.chunk_shape
    state = sampler_lib.SamplerState(
        k=jnp.zeros((), jnp.int32), x=sampler_lib.slot_noise(ckeys, 0, self.chunk_shape),
        x0=jnp.zeros(shape, jnp.float32), steps=jnp.zeros((b, c), jnp.int32), done=jnp.zeros((b, c), bool),
        conf=jnp.zeros((b, c), jnp.float32), trace=jnp.full((b, c, L), jnp.nan, jnp.float32), keys=ckeys,
        cache=cache)
    return jax.lax.while_loop(cond, body, state)


def make_heuristic_sampler(config):
  """A sampler that stops frames by the x0-change rule (threshold control = delta)."""
  if sampler_has_stop_rule(config):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.sampling.stop_rule = RULE
    return sampler_lib.make_sampler(config)
  return X0DeltaSampler(config)


def simulate_stops(trace, threshold, *, rule: str = "confidence", min_steps: int = 1, max_steps: int | None = None
                   ) -> np.ndarray:
  """Steps per frame that a threshold would give, read off a per-step trace (N, F, L) of a max-steps run.

  rule 'confidence': stop at the first step k >= min_steps with trace >= threshold; 'x0_delta': the first k >= 2
  with trace < threshold. Only an estimate (stopping earlier changes what later chunks see), used to pick
  thresholds that spread the sweep's average steps over [1, max_steps].
  """
  trace = np.asarray(trace, np.float64)
  L = trace.shape[-1] if max_steps is None else int(max_steps)
  k = np.arange(1, trace.shape[-1] + 1)
  with np.errstate(invalid="ignore"):
    if rule == "confidence":
      hit = trace >= threshold
    elif rule == RULE:
      hit = (trace < threshold) & (k >= 2)
    else:
      raise ValueError(f"rule: expected 'confidence' or {RULE!r}, got {rule!r}")
  hit &= (k >= min_steps) & (k <= L)
  hit[..., L - 1:] = True  # max_steps always stops
  return np.argmax(hit, axis=-1) + 1


def pick_thresholds(trace, targets, *, rule: str = "confidence", min_steps: int = 1, max_steps: int | None = None
                    ) -> list[float]:
  """Thresholds whose simulated average steps per frame come closest to each target (deduplicated, sorted)."""
  vals = np.asarray(trace, np.float64)
  vals = np.unique(vals[np.isfinite(vals)])
  if vals.size == 0:
    raise ValueError("pick_thresholds: the trace holds no finite values")
  if vals.size > 400:
    vals = np.quantile(vals, np.linspace(0, 1, 400))
  # candidates between observed values, so `>=` / `<` splits land where intended
  mids = np.concatenate([[vals[0] - 1e-6], (vals[1:] + vals[:-1]) / 2, [vals[-1] + 1e-6]])
  avg = np.array([simulate_stops(trace, t, rule=rule, min_steps=min_steps, max_steps=max_steps).mean()
                  for t in mids])
  out = []
  for target in targets:
    t = float(mids[int(np.argmin(np.abs(avg - target)))])
    if t not in out:
      out.append(t)
  return sorted(out)
