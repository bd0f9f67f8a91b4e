"""A training-free early exit, the baseline (d) of the claim: stop a frame when its x0 prediction stops changing.

Rule: after step k >= 2 (two predictions exist) and k >= min_steps, a frame is done when the mean absolute change of
its x0 prediction between consecutive steps is below `delta`: mean_{H,W,C} |x0_k - x0_{k-1}| < delta. It needs no
confidence head, so it isolates what the learned head adds over "the prediction has converged".

The sampler is told which rule to use by a static switch, `config.sampling.stop_rule = 'x0_delta'`: only the
stopping test of its per-chunk while-loop changes; everything else (noise, frozen frames, cache, controls, one
compiled program) is the DSA sampler's, so FPS and quality are comparable with the DSA runs. The
threshold control carries delta (traced: a sweep over deltas does not recompile), and the `confidences` /
`conf_trace` outputs carry the measured x0 change instead of a confidence (nan at step 1, which has no previous
prediction).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dsa_jax.sampling import sampler as sampler_lib
from dsa_jax.sampling import stop_rules
from dsa_jax.sampling.stop_rules import x0_delta  # noqa: F401  (the sampler's rule, tested here)

RULE = "x0_delta"


def x0_delta_stop(prev_x0, x0, delta):
  """(B, F) bool: frames whose x0 changed by less than `delta` (scalar, (B,) per sample, or (B, F)), by the rule the
  sampler's loop applies (after the second step)."""
  d = x0_delta(prev_x0, x0)
  delta = jnp.asarray(delta, jnp.float32)
  if delta.ndim == 1:
    delta = delta[:, None]
  return stop_rules.x0_delta_ready(d, delta, 2)


def make_heuristic_sampler(config):
  """A sampler that stops frames by the x0-change rule (`sampling.stop_rule='x0_delta'`; threshold control = delta)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sampling.stop_rule = RULE
  return sampler_lib.make_sampler(config)


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
  if rule not in stop_rules.READY:
    raise ValueError(f"rule: expected one of {stop_rules.STOP_RULES}, got {rule!r}")
  with np.errstate(invalid="ignore"):
    hit = np.asarray(stop_rules.READY[rule](trace, threshold, k))
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
