"""What each extra step is worth to each frame, and the allocation that knows it (the oracle).

`trace_rollout` runs the sampler's own chunk program at the full ladder (every frame takes every step) and records
every step's x0 prediction and head confidence. From it:
  * the frame's *remaining change* after k steps, r_k = mean (x0_k - x0_last)^2 (0 at the last step);
  * the marginal gain of step k+1, r_{k-1} - r_k;
  * the oracle allocation at an average budget: every frame starts at min_steps, and the next step always goes to
    the frame whose next step gains the most (greedy by marginal gain) until the budget is spent;
  * what the head says about the same steps: the median confidence per step (it must rise), its spread at step 1,
    and its calibration against the 'remaining' target computed from the trace.
The oracle is computed on the full-ladder rollout: a frame given fewer steps becomes slightly different context for
later chunks, which this per-frame oracle ignores. On the digits model that makes it worse than fixed steps, so
`video_oracle` is the reference that sees propagation: it allocates steps chunk by chunk and judges every candidate
by re-rolling the whole video with it (greedy by the whole video's distance to the max-step video).
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.diffusion import flow
from dsa_jax.sampling.sampler import Sampler, chunk_keys, sample_keys, slot_noise


def _trace_program(sampler: Sampler):
  c, L = sampler.chunk_frames, sampler.num_steps
  tn = sampler.num_train_timesteps
  sig = jnp.asarray(np.append(sampler.sigmas, np.float32(0.0)))

  def program(params, context, controls, rng):
    b = context.shape[0]
    keys = sample_keys(rng, controls.seed)
    params = {**params, "generator": sampler.generator_variables(params["generator"])}  # once, before the loops
    gen, hp = params["generator"], params["head"]

    def chunk(cache, i):
      ckeys = chunk_keys(keys, i)
      offset = i * c

      def step(carry, k):
        x, cache = carry
        t = jnp.full((b, c), tn * sig[k], jnp.float32)
        v, feats, cache = sampler.forward(gen, x, t, context, None, controls.guidance, cache, offset, False,
                                          sampler.placement(i))
        x0 = flow.x0_from_velocity(x, v, sig[k])
        conf = sampler.confidence(hp, feats, jnp.full((b, c), k, jnp.int32), t)
        x_next = flow.renoise(x0, slot_noise(ckeys, k + 1, x.shape[1:]), sig[k + 1])
        return (x_next, cache), (x0, conf)

      (_, cache), (x0s, confs) = jax.lax.scan(step, (slot_noise(ckeys, 0, sampler.chunk_shape), cache),
                                              jnp.arange(L, dtype=jnp.int32))
      cache = sampler.fill_cache(params, context, None, controls, x0s[-1], ckeys, cache, i, False)
      return cache, (x0s, confs)

    _, (x0s, confs) = jax.lax.scan(chunk, sampler.new_cache(b), jnp.arange(sampler.num_chunks, dtype=jnp.int32))
    # (N, L, B, c, ...) -> (B, N*c, L, ...)
    x0s = jnp.moveaxis(x0s, 2, 0)  # (B, N, L, c, ...)
    x0s = jnp.swapaxes(x0s, 2, 3).reshape((b, sampler.num_frames, L) + x0s.shape[4:])
    confs = jnp.swapaxes(jnp.moveaxis(confs, 2, 0), 2, 3).reshape((b, sampler.num_frames, L))
    return x0s, confs

  return jax.jit(program)


_PROGRAMS: dict = {}


def trace_rollout(sampler: Sampler, params, context, controls, rng=None) -> dict[str, np.ndarray]:
  """Full-ladder rollout without guidance -> {'x0': (B, F, L, H, W, C), 'conf', 'remaining', 'gain': (B, F, L)}.

  Equal to `sampler.sample` at threshold +inf and max_steps = L: the x0 of the last step is its output and the
  confidences its conf_trace (tests check both)."""
  params, context, _ = sampler._check_inputs(params, context, controls, None)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if id(sampler) not in _PROGRAMS:
    _PROGRAMS[id(sampler)] = (sampler, _trace_program(sampler))
  x0s, confs = jax.device_get(_PROGRAMS[id(sampler)][1](params, context, controls, rng))
  x0s = np.asarray(x0s, np.float32)
  return {"x0": x0s, "conf": np.asarray(confs, np.float32), "remaining": remaining_change(x0s),
          "gain": next_step_change(x0s)}


def next_step_change(x0s: np.ndarray) -> np.ndarray:
  """(B, F, L, ...) x0 per step -> (B, F, L): mean squared change of each step's x0 by one more step (0 at the last
  step): what the 'gain' confidence target measures."""
  d = np.concatenate([x0s[:, :, 1:] - x0s[:, :, :-1], np.zeros_like(x0s[:, :, :1])], axis=2)
  return np.mean(np.square(d), axis=tuple(range(3, d.ndim)))


def remaining_change(x0s: np.ndarray) -> np.ndarray:
  """(B, F, L, ...) x0 per step -> (B, F, L): mean squared distance of each step's x0 to the last step's."""
  d = x0s - x0s[:, :, -1:]
  return np.mean(np.square(d), axis=tuple(range(3, d.ndim)))


def oracle_allocation(remaining: np.ndarray, budget: float, min_steps: int = 1, max_steps: int | None = None
                      ) -> np.ndarray:
  """Steps per frame (same shape as remaining[..., 0]) with mean `budget`, greedy by marginal gain.

  remaining (..., L): remaining change after 1..L steps. Every frame starts at `min_steps`; each further step goes to
  the frame whose next step lowers its remaining change the most (ties: the earlier frame)."""
  r = np.asarray(remaining, np.float64)
  shape, L = r.shape[:-1], r.shape[-1]
  max_steps = L if max_steps is None else int(max_steps)
  if not 1 <= min_steps <= max_steps <= L:
    raise ValueError(f"oracle: need 1 <= min_steps ({min_steps}) <= max_steps ({max_steps}) <= ladder ({L})")
  if not min_steps <= budget <= max_steps:
    raise ValueError(f"oracle: budget {budget} outside [min_steps, max_steps] = [{min_steps}, {max_steps}]")
  flat = r.reshape(-1, L)
  n = flat.shape[0]
  steps = np.full(n, min_steps, np.int64)
  extra = int(round(budget * n)) - steps.sum()
  heap = [(-(flat[i, min_steps - 1] - flat[i, min_steps]), i) for i in range(n) if min_steps < max_steps]
  heapq.heapify(heap)
  while extra > 0 and heap:
    _, i = heapq.heappop(heap)
    steps[i] += 1
    extra -= 1
    s = steps[i]
    if s < max_steps:
      heapq.heappush(heap, (-(flat[i, s - 1] - flat[i, s]), i))
  return steps.reshape(shape).astype(np.int32)


def video_oracle(sample_latents: Callable[[np.ndarray], np.ndarray], num_prompts: int, num_frames: int,
                 chunk_frames: int, budgets: Sequence[float], min_steps: int, max_steps: int,
                 log: Callable[[str], None] = lambda s: None) -> dict[float, dict[str, Any]]:
  """Per-prompt step schedules (one step count per chunk) at each average budget, chosen with propagation in view.

  `sample_latents(steps)` samples every prompt with the forced per-frame schedule `steps` (num_prompts, num_frames)
  and returns its latents (num_prompts, num_frames, ...). The reference is the video at max_steps everywhere. Every
  chunk starts at min_steps; each round gives every prompt one more step on the chunk whose increment brings its
  *whole re-rolled video* closest to the reference (mean squared distance over all frames), so a step on an early
  chunk is credited with what it does to every later chunk. One round adds chunk_frames steps per prompt, so budget b
  is reached after round((b - min_steps) * num_chunks) rounds; every round samples the video once per chunk.
  Returns {budget: {'steps': (num_prompts, num_frames) int32, 'avg_steps', 'distance': (num_prompts,)}}."""
  if num_frames % chunk_frames:
    raise ValueError(f"video oracle: {num_frames} frames do not split into chunks of {chunk_frames}")
  n_chunks = num_frames // chunk_frames
  rounds = {}
  for b in budgets:
    if not min_steps <= float(b) <= max_steps:
      raise ValueError(f"video oracle: budget {b} outside [min_steps, max_steps] = [{min_steps}, {max_steps}]")
    rounds[float(b)] = int(round((float(b) - min_steps) * n_chunks))
  expand = lambda s: np.repeat(s, chunk_frames, axis=1).astype(np.int32)
  ref = np.asarray(sample_latents(np.full((num_prompts, num_frames), max_steps, np.int32)), np.float64)

  def distance(s):
    v = np.asarray(sample_latents(expand(s)), np.float64)
    return np.mean(np.square(v - ref).reshape(num_prompts, -1), axis=1)

  s = np.full((num_prompts, n_chunks), min_steps, np.int64)
  cur = distance(s)
  out = {}

  def record(r):
    for b, want in rounds.items():
      if want == r:
        out[b] = {"steps": expand(s), "avg_steps": float(expand(s).mean()), "distance": cur.copy()}

  record(0)
  for r in range(1, max(rounds.values(), default=0) + 1):
    best_d = np.full(num_prompts, np.inf)
    best_c = np.full(num_prompts, -1)
    for c in range(n_chunks):
      cand = s.copy()
      can = cand[:, c] < max_steps
      if not can.any():
        continue
      cand[can, c] += 1
      d = distance(cand)
      better = can & (d < best_d)
      best_d[better], best_c[better] = d[better], c
    rows = np.nonzero(best_c >= 0)[0]
    s[rows, best_c[rows]] += 1
    cur[rows] = best_d[rows]
    log(f"  video oracle round {r}: {float(expand(s).mean()):.3f} steps/frame, mean distance to the max-step video "
        f"{float(cur.mean()):.4g}")
    record(r)
  return out


def remaining_log_range(remaining: np.ndarray) -> tuple[float, float]:
  """(10th, 90th) percentiles of log remaining (or next-step) change over all steps but the last (where it is 0):
  the normalisation of the 'remaining' / 'gain' target when the model does not record the one it was trained with."""
  r = np.asarray(remaining)[..., :-1].reshape(-1)
  lr = np.log(r + 1e-12)
  return float(np.percentile(lr, 10)), float(np.percentile(lr, 90))


def remaining_target(remaining: np.ndarray, log_range) -> np.ndarray:
  """The 'remaining' training target (see `dsa_jax.training.losses.remaining_targets`), in numpy."""
  lo, hi = float(log_range[0]), float(log_range[1])
  lr = np.log(np.asarray(remaining, np.float64) + 1e-12)
  return np.clip((hi - lr) / max(hi - lo, 1e-3), 0.0, 1.0)


def expected_calibration_error(conf: np.ndarray, target: np.ndarray, bins: int = 10) -> float:
  """Sum over confidence bins of (share) * |mean confidence - mean target| (soft targets)."""
  p = np.asarray(conf, np.float64).reshape(-1)
  y = np.asarray(target, np.float64).reshape(-1)
  idx = np.clip((p * bins).astype(int), 0, bins - 1)
  err = 0.0
  for b in range(bins):
    m = idx == b
    if m.any():
      err += m.mean() * abs(p[m].mean() - y[m].mean())
  return float(err)


def head_report(trace: dict[str, np.ndarray], log_range=None, target_kind: str = "remaining") -> dict[str, Any]:
  """What the head's confidence means on a full-ladder trace: per-step medians (should rise), the 10th-90th
  percentile spread at step 1, and calibration against its own target on the same steps where the trace can compute
  it without a teacher ('gain': the next-step change; every other head against 'remaining'). `log_range`: the
  target's normalisation as the model recorded it (else the eval set's)."""
  against = "gain" if target_kind == "gain" else "remaining"
  conf, rem = trace["conf"], trace[against]
  L = conf.shape[-1]
  source = "model" if log_range is not None else "eval set"
  log_range = remaining_log_range(rem) if log_range is None else tuple(log_range)
  target = remaining_target(rem, log_range)
  med = [float(np.median(conf[..., k])) for k in range(L)]
  first = conf[..., 0].reshape(-1)
  return {
      "median_conf_by_step": med,
      "conf_rises": bool(all(b > a for a, b in zip(med, med[1:]))),
      "step1_p10": float(np.percentile(first, 10)), "step1_p90": float(np.percentile(first, 90)),
      "step1_spread": float(np.percentile(first, 90) - np.percentile(first, 10)),
      "median_target_by_step": [float(np.median(target[..., k])) for k in range(L)],
      "calibrated_against": against, "ece": expected_calibration_error(conf, target),
      "log_range": list(map(float, log_range)), "log_range_from": source,
      f"median_{against}_by_step": [float(np.median(rem[..., k])) for k in range(L)],
  }
