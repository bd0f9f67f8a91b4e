"""The moving-digits benchmark harness and the paper's claim measured: quality vs. average steps per frame.

`Benchmark` holds what every run shares: the held-out prompts (test split of `dsa_jax.data.digits`), their text
contexts and event labels, the evaluator and the Fréchet statistics of real test clips. `Benchmark.run` samples
the prompts with one sampler at one setting and scores the result (FD, prompt agreement, steps and confidences per
frame and per event label, FPS).

`run_claim` is the sweep that tests the claim, all on the same prompts, seeds and evaluator:
  * fixed 1..len(ladder) steps (tau = +inf, max_steps = k) with the first model's generator (Self Forcing's sampler);
  * DSA with each given model (one per confidence target) at >= 5 thresholds, and what its head's confidence
    means on full-ladder rollouts (`oracle.head_report`);
  * the training-free x0-change early exit (`heuristic.py`) at several deltas;
  * at fixed budgets the per-frame oracle (greedy by each frame's own gain on the full-ladder rollout) and the video
    oracle (steps per chunk, every candidate judged by re-rolling the whole video towards the max-step video; it
    sees that an early chunk's steps change all later chunks), and DSA's allocation efficiency against each.
Thresholds and deltas default to values picked from a max-steps trace so that their average steps spread over
[1, max_steps] (`heuristic.pick_thresholds`); pass them to pin them. Outputs in `out_dir`: claim.md (tables and a
verdict computed from them), claim.json, claim.png (FD and agreement vs. average steps), steps_by_event.png (DSA
steps per frame by event label), steps_by_place.png (first chunk / event / plain frames: DSA vs. oracle).

  dsa-jax eval sweep --config configs/digits.py --model remaining=runs/digits/dsa/model \\
      --model dmd=runs/digits/dsa_dmd/model --out docs/claim --num 512
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from dsa_jax.eval import metrics

FD_BOOTSTRAP = 50
DEFAULT_TARGETS = (1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
DEFAULT_BUDGETS = (1.5, 2.0, 2.5, 3.0)  # of the oracles
TRACE_KEYS = ("conf", "remaining", "gain")  # what a full-ladder trace keeps per frame and step


class BenchmarkError(ValueError):
  """The config or a checkpoint does not fit the moving-digits benchmark; the message says what is expected."""


def _say(msg: str) -> None:
  print(msg, flush=True)


def check_pixel_config(config) -> tuple[int, int]:
  """(frames, size) of a pixel-space digits config; clear errors for anything else."""
  v = config.video
  if config.vae.kind != "identity":
    raise BenchmarkError(f"config.vae.kind: the digits benchmark scores pixel-space models ('identity'), got "
                         f"{config.vae.kind!r}")
  if tuple(v.vae_stride) != (1, 1, 1) or v.latent_channels != 1:
    raise BenchmarkError(f"config.video: expected vae_stride (1, 1, 1) and latent_channels 1 (grayscale pixels), got "
                         f"{tuple(v.vae_stride)} and {v.latent_channels}")
  if v.height != v.width:
    raise BenchmarkError(f"config.video: digits canvases are square, got {v.height}x{v.width}")
  return int(v.num_frames), int(v.height)


def latents_to_video(latents) -> np.ndarray:
  """(N, F, H, W, 1) pixel latents -> float32 in [-1, 1] (clipped; nan -> -1) for the evaluator."""
  x = np.nan_to_num(np.asarray(latents, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
  return np.clip(x, -1.0, 1.0)


def frame_change(video) -> np.ndarray:
  """(N, F, H, W, C) -> (N, F) mean |frame_t - frame_{t-1}| (0 for the first frame): how much a frame is new."""
  v = np.asarray(video, np.float32)
  d = np.zeros(v.shape[:2], np.float32)
  d[:, 1:] = np.mean(np.abs(v[:, 1:] - v[:, :-1]), axis=(2, 3, 4))
  return d


def _corr(a, b) -> float:
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.size < 2 or a.std() == 0 or b.std() == 0:
    return float("nan")
  return float(np.corrcoef(a, b)[0, 1])


def _rank(a) -> np.ndarray:
  a = np.asarray(a, np.float64).ravel()
  order = np.argsort(a, kind="stable")
  ranks = np.empty_like(order, dtype=np.float64)
  ranks[order] = np.arange(a.size)
  # average ties
  _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
  sums = np.bincount(inv, weights=ranks)
  return sums[inv] / counts[inv]


def _binomial_std(p: float, n: int) -> float:
  """Standard error of a proportion, Agresti-Coull style (not 0 at p = 0 or 1 with few samples)."""
  pt = (p * n + 2.0) / (n + 4.0)
  return math.sqrt(pt * (1.0 - pt) / (n + 4.0))


def spearman(a, b) -> float:
  return _corr(_rank(a), _rank(b))


class Benchmark:
  """Prompts, contexts, real statistics and the evaluator of one benchmark run; `run` scores one sampler setting."""

  def __init__(self, config, *, num: int = 256, evaluator=None, data_seed: int = 0, num_real: int = 1000,
               batch: int = 32, seed: int = 0, fps_prompts: int = 8, log: Callable[[str], None] = _say):
    from dsa_jax.data import digits
    from dsa_jax.data.text_context import make_text_encoder
    from dsa_jax.eval import evaluator as ev_lib

    if num < 2:
      raise BenchmarkError(f"num: need at least 2 prompts for a Fréchet distance, got {num}")
    if batch < 1:
      raise BenchmarkError(f"batch: must be >= 1, got {batch}")
    if num_real < 2:
      raise BenchmarkError(f"num_real (--num-real): need at least 2 real clips for the FD reference, got {num_real}")
    if fps_prompts < 0:
      raise BenchmarkError(f"fps_prompts (--fps-prompts): expected 0 (skip the batch-1 FPS) or more prompts, got "
                           f"{fps_prompts}")
    self.config, self.log = config, log
    self.frames, self.size = check_pixel_config(config)
    self.num, self.batch, self.seed, self.data_seed = int(num), int(min(batch, num)), int(seed), int(data_seed)
    self.fps_prompts = min(int(fps_prompts), self.num)
    self.evaluator = evaluator if isinstance(evaluator, ev_lib.Evaluator) else ev_lib.load_evaluator(evaluator)
    if self.evaluator.cfg.size != self.size:
      raise BenchmarkError(f"evaluator at {self.evaluator.path!r} was trained on {self.evaluator.cfg.size}px "
                           f"canvases; config.video is {self.size}px (train one: dsa-jax eval train-evaluator "
                           f"--size {self.size} --frames {self.frames})")
    t0 = time.time()
    clips = [digits.make_clip(i, split="test", seed=data_seed, frames=self.frames, size=self.size)
             for i in range(self.num)]
    self.prompts = [c["prompt"] for c in clips]
    self.prompt_labels = np.stack([c["labels"] for c in clips])  # (N, F) event labels of the prompt's real clip
    self.prompt_sets = metrics.prompts_multi_hot(self.prompts)
    self.event_names = list(digits.EVENT_NAMES)
    encode = make_text_encoder(config)
    self.context = np.asarray(encode(self.prompts), np.float32)
    guidance = float(config.sampling.guidance)
    self.negative_context = np.asarray(encode([config.text.negative_prompt]), np.float32)
    self.uncond = self.negative_context if guidance != 0.0 else None
    # Real reference: `num_real` test clips (the FD reference), and a disjoint real set of `num` clips whose FD to the
    # reference is the floor a perfect generator would reach with this many samples.
    num_real = int(num_real)
    real = ev_lib.make_clip_arrays(num_real + self.num, split="test", seed=data_seed, frames=self.frames,
                                   size=self.size)
    feats = self.evaluator.features(real["video"][:num_real])
    self.real_mu, self.real_cov = metrics.feature_stats(feats)
    self.num_real = num_real
    floor_video = real["video"][num_real:]
    floor_out = self.evaluator.outputs(floor_video)
    self.real_floor = {
        "fd": metrics.frechet_from_stats(*metrics.feature_stats(floor_out["features"]), self.real_mu, self.real_cov),
        **{f"agreement_{k}": v for k, v in metrics.prompt_agreement(
            floor_out["digit_logits"] > 0, real["digits"][num_real:] > 0.5).items()},
    }
    real_prompt_out = self.evaluator.outputs(
        np.stack([c["video"] for c in clips]))  # the prompts' own real clips: the agreement ceiling
    self.real_agreement = metrics.prompt_agreement(real_prompt_out["digit_logits"] > 0, self.prompt_sets)
    self._warm: set = set()
    log(f"benchmark: {self.num} test prompts, {num_real} real reference clips ({self.frames}x{self.size}x"
        f"{self.size}); real-data floor FD {self.real_floor['fd']:.3f}, real agreement "
        f"{self.real_agreement['set_agreement']:.3f} ({time.time() - t0:.1f}s)")

  def describe(self) -> dict:
    return {"num_prompts": self.num, "num_real": self.num_real, "data_seed": self.data_seed, "seed": self.seed,
            "batch": self.batch, "fps_prompts": self.fps_prompts, "frames": self.frames, "size": self.size,
            "split": "test",
            "evaluator": {"path": self.evaluator.path, "test": self.evaluator.meta.get("evaluator", {}).get("test")},
            "real_floor": self.real_floor, "real_agreement": self.real_agreement}

  # -- sampling ------------------------------------------------------------------------------------------------------

  def sample(self, sampler, params, *, threshold: float, min_steps=None, max_steps=None,
             time_batch1: bool = True) -> dict[str, Any]:
    """Samples all prompts in batches of `batch` (last one padded); returns arrays and the steady-state time.

    min_steps / max_steps: ints, or (num, F) arrays of per-frame bounds (a forced step allocation)."""
    import jax

    cfg = self.config.sampling
    per_frame = np.ndim(min_steps) == 2 or np.ndim(max_steps) == 2
    min_steps = cfg.min_steps if min_steps is None else (np.asarray(min_steps) if per_frame else int(min_steps))
    max_steps = cfg.max_steps if max_steps is None else (np.asarray(max_steps) if per_frame else int(max_steps))
    b = self.batch
    key = (id(sampler), b, self.uncond is not None)
    uc = None if self.uncond is None else np.broadcast_to(self.uncond, (b,) + self.uncond.shape[1:])
    outs, seconds = [], 0.0

    def batch_args(start):
      idx = np.minimum(np.arange(start, start + b), self.num - 1)
      rows = (lambda a: a[idx] if np.ndim(a) == 2 else a)
      controls = sampler.make_controls(b, threshold=threshold, min_steps=rows(min_steps), max_steps=rows(max_steps),
                                       guidance=cfg.guidance, seed=self.seed + np.arange(start, start + b))
      return self.context[idx], controls

    if key not in self._warm:  # compile outside the timed region (thresholds are traced: once per sampler)
      ctx, controls = batch_args(0)
      t0 = time.perf_counter()
      jax.block_until_ready(sampler.sample(params, ctx, controls, uncond_context=uc).latents)
      self._warm.add(key)
      self.log(f"  compiled and ran the first batch in {time.perf_counter() - t0:.1f}s")
    for start in range(0, self.num, b):
      ctx, controls = batch_args(start)
      t0 = time.perf_counter()
      out = jax.device_get(sampler.sample(params, ctx, controls, uncond_context=uc))
      seconds += time.perf_counter() - t0
      n = min(b, self.num - start)
      outs.append({"latents": np.asarray(out.latents)[:n], "steps": np.asarray(out.steps)[:n],
                   "confidences": np.asarray(out.confidences)[:n], "conf_trace": np.asarray(out.conf_trace)[:n],
                   "chunk_iters": np.asarray(out.chunk_iters)})
    res = {k: np.concatenate([o[k] for o in outs]) for k in ("latents", "steps", "confidences", "conf_trace")}
    res["chunk_iters"] = np.stack([o["chunk_iters"] for o in outs])  # (batches, chunks)
    res["seconds"] = seconds
    res["batches"] = len(outs)
    res["seconds_b1"] = self._time_batch1(sampler, params, threshold, min_steps, max_steps) if (
        time_batch1 and not per_frame) else None
    return res

  def sample_teacher(self, params, num_steps: int, guidance: float | None = None) -> dict[str, Any]:
    """The bidirectional teacher as a many-step sampler: `num_steps` Euler steps of its guided flow ODE through the
    ladder sigmas (the trajectories the ODE stage regresses on), Self Forcing's guidance `dmd.guidance` by default.
    The quality ceiling of every distilled student."""
    import jax
    import jax.numpy as jnp

    from dsa_jax.models import factory
    from dsa_jax.training import ode_pairs, rollout

    cfg = self.config
    spec = rollout.RolloutSpec.from_config(cfg)
    tcfg = factory.dit_config(cfg, "teacher")
    g = float(cfg.dmd.guidance if guidance is None else guidance)
    grid, pos = ode_pairs.ode_grid(spec.sigmas, int(num_steps))
    uncond = self.negative_context
    shape = (spec.num_frames, spec.height, spec.width, spec.channels)

    @jax.jit
    def run(p, ctx, seeds):
      noise = jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)
      return ode_pairs.teacher_trajectory(tcfg, p, noise, ctx, jnp.asarray(uncond), grid, pos, g,
                                          cfg.diffusion.num_train_timesteps)[1]

    b, outs, seconds = self.batch, [], 0.0
    for start in range(0, self.num, b):
      idx = np.minimum(np.arange(start, start + b), self.num - 1)
      seeds = (self.seed + np.arange(start, start + b)).astype(np.uint32)
      if start == 0:
        jax.block_until_ready(run(params, self.context[idx], seeds))  # compile outside the timed region
      t0 = time.perf_counter()
      outs.append(np.asarray(jax.device_get(run(params, self.context[idx], seeds)))[:min(b, self.num - start)])
      seconds += time.perf_counter() - t0
    latents = np.concatenate(outs)
    n, f = latents.shape[:2]
    L = len(cfg.sampling.ladder)
    return {"latents": latents, "steps": np.full((n, f), int(num_steps), np.int32),
            "confidences": np.full((n, f), np.nan), "conf_trace": np.zeros((n, f, L), np.float32),
            "chunk_iters": np.full((len(outs), spec.num_chunks), int(num_steps), np.int32), "seconds": seconds,
            "seconds_b1": None}

  def run_teacher(self, params, num_steps: int, guidance: float | None = None) -> dict[str, Any]:
    """Samples every prompt with the teacher at `num_steps` Euler steps and scores it."""
    g = float(self.config.dmd.guidance if guidance is None else guidance)
    name = f"teacher-{num_steps}" if g == float(self.config.dmd.guidance) else f"teacher-{num_steps}-g{g:g}"
    r = self.score(self.sample_teacher(params, num_steps, g), name=name,
                   extra={"group": "teacher", "teacher_steps": int(num_steps), "guidance": g})
    self.log(f"  {r['name']:<28} {_fd_text(r)}  agreement {r['agreement']:.3f}  "
             f"F1 {r['digit_f1']:.3f}  ({r['seconds']:.1f}s)")
    return r

  def trace(self, sampler, params) -> dict[str, np.ndarray]:
    """Full-ladder rollouts of every prompt with every step's confidence, remaining and next-step x0 change
    (`dsa_jax.eval.oracle.trace_rollout`; no guidance): {'conf', 'remaining', 'gain'} of shape (N, F, L)."""
    from dsa_jax.eval import oracle

    b, L, outs = self.batch, len(self.config.sampling.ladder), []
    for start in range(0, self.num, b):
      idx = np.minimum(np.arange(start, start + b), self.num - 1)
      controls = sampler.make_controls(b, threshold=float("inf"), min_steps=L, max_steps=L, guidance=0.0,
                                       seed=self.seed + np.arange(start, start + b))
      t = oracle.trace_rollout(sampler, params, self.context[idx], controls)
      n = min(b, self.num - start)
      outs.append({k: t[k][:n] for k in TRACE_KEYS})
    return {k: np.concatenate([o[k] for o in outs]) for k in TRACE_KEYS}

  def run_fixed(self, sampler, params, k: int, *, extra: dict | None = None) -> dict[str, Any]:
    """The fixed-steps baseline 'fixed-k': floor = ceiling = k, so every frame takes k steps under any stop rule (the
    x0-change rule would stop every frame at once at tau = inf)."""
    return self.run(sampler, params, name=f"fixed-{k}", threshold=float("inf"), min_steps=k, max_steps=k, extra=extra)

  def run_allocation(self, sampler, params, steps: np.ndarray, *, name: str, extra: dict | None = None
                     ) -> dict[str, Any]:
    """Samples every prompt with a given number of steps per frame (steps (N, F): min = max = steps) and scores it."""
    steps = np.asarray(steps, np.int32)
    if steps.shape != (self.num, self.frames):
      raise BenchmarkError(f"allocation: expected steps of shape ({self.num}, {self.frames}), got {steps.shape}")
    r = self.score(self.sample(sampler, params, threshold=float("inf"), min_steps=steps, max_steps=steps),
                   name=name, extra=extra)
    self.log(f"  {name:<28} avg steps {r['avg_steps']:.3f}  {_fd_text(r)}  agreement {r['agreement']:.3f}")
    return r

  def _time_batch1(self, sampler, params, threshold, min_steps, max_steps) -> float | None:
    """Seconds to sample the first `fps_prompts` prompts one at a time (batch 1, the paper's latency setting).

    In a batch, the denoising loop of a chunk runs until its slowest frame is done, so batch FPS hides what DSA
    saves; at batch 1 it does not. Videos do not depend on the batch (per-sample noise), so quality is measured
    on the big batches and speed here.
    """
    import jax

    if not self.fps_prompts:
      return None
    cfg = self.config.sampling
    uc = None if self.uncond is None else self.uncond[:1]
    key = (id(sampler), 1, self.uncond is not None)

    def one(i):
      controls = sampler.make_controls(1, threshold=threshold, min_steps=min_steps, max_steps=max_steps,
                                       guidance=cfg.guidance, seed=np.array([self.seed + i]))
      return sampler.sample(params, self.context[i:i + 1], controls, uncond_context=uc).latents

    if key not in self._warm:
      jax.block_until_ready(one(0))
      self._warm.add(key)
    t0 = time.perf_counter()
    for i in range(self.fps_prompts):
      jax.block_until_ready(one(i))
    return time.perf_counter() - t0

  # -- scoring -------------------------------------------------------------------------------------------------------

  def score(self, sample: dict[str, Any], *, name: str, extra: dict | None = None) -> dict[str, Any]:
    """Metrics of one sampled set (JSON-able dict); per-clip arrays are kept under the '_arrays' key."""
    video = latents_to_video(sample["latents"])
    o = self.evaluator.outputs(video)
    feats = o["features"].astype(np.float64)
    mu, cov = metrics.feature_stats(feats)
    fd = metrics.frechet_from_stats(mu, cov, self.real_mu, self.real_cov)
    # The same resampled prompt indices for every run (fixed seed, same prompt count): replicate b of one run and
    # replicate b of another score the same prompts with the same noise, so differences between runs can be judged
    # against their paired spread (`verdict`), which is much tighter than the two runs' spreads combined.
    idx = bootstrap_indices(len(feats))
    boots = [metrics.frechet_from_stats(*metrics.feature_stats(feats[i]), self.real_mu, self.real_cov) for i in idx]
    pred = o["digit_logits"] > 0
    agreement = metrics.prompt_agreement(pred, self.prompt_sets)
    clip_agrees = metrics.clip_set_agreement(pred, self.prompt_sets)
    steps = np.asarray(sample["steps"])
    conf = np.asarray(sample["confidences"], np.float64)
    pred_events = np.argmax(o["event_logits"], -1)
    change = frame_change(video)
    n_frames = steps.size
    L = sample["conf_trace"].shape[-1]
    frames_total = n_frames  # pixel frames (identity VAE: one per latent frame)
    fps = frames_total / sample["seconds"] if sample["seconds"] > 0 else float("nan")
    s1 = sample.get("seconds_b1")
    fps_b1 = self.fps_prompts * self.frames / s1 if s1 else float("nan")
    iters = np.asarray(sample["chunk_iters"], np.float64)
    res = {
        "name": name,
        **(extra or {}),
        "avg_steps": float(steps.mean()),
        "fd": fd,
        "fd_bootstrap_std": float(np.std(boots)),
        # FD split into the mean shift and the rest, and the feature spread relative to the real clips'
        **{f"fd_{k}": v for k, v in metrics.frechet_terms(mu, cov, self.real_mu, self.real_cov).items()},
        "agreement": agreement["set_agreement"],
        "agreement_std": _binomial_std(agreement["set_agreement"], len(pred)),
        "fd_bootstrap": [float(b) for b in boots],
        "agreement_bootstrap": [float(clip_agrees[i].mean()) for i in idx],
        "digit_f1": agreement["digit_f1"],
        "agreement_detail": agreement,
        "fps_batch1": fps_b1,  # frames per second sampling one video at a time
        "latency_batch1": s1 / self.fps_prompts if s1 else float("nan"),  # seconds per video at batch 1
        "fps": fps,  # frames per second at `batch` videos per call
        "seconds": sample["seconds"],
        "batch": self.batch,
        "steps_hist": {str(k): int(np.sum(steps == k)) for k in range(1, L + 1)},
        "steps_by_frame": metrics.by_frame(steps),
        "conf_by_frame": metrics.by_frame(np.nan_to_num(conf, nan=0.0)),
        "chunk_forwards": float(iters.mean()),  # denoising forwards per chunk (max over the batch's frames)
        "steps_by_event_pred": metrics.by_event(steps, pred_events, self.event_names),
        "steps_by_event_prompt_clip": metrics.by_event(steps, self.prompt_labels, self.event_names),
        "conf_by_event_pred": metrics.by_event(np.nan_to_num(conf, nan=0.0), pred_events, self.event_names),
        "steps_vs_frame_change": {"pearson": _corr(steps[:, 1:], change[:, 1:]),
                                  "spearman": spearman(steps[:, 1:], change[:, 1:])},
        "_arrays": {"video": video, "steps": steps, "confidences": conf, "pred_events": pred_events,
                    "conf_trace": sample["conf_trace"], "frame_change": change},
    }
    return res

  def run(self, sampler, params, *, name: str, threshold: float, min_steps: int | None = None,
          max_steps: int | None = None, extra: dict | None = None) -> dict[str, Any]:
    """Samples every prompt at one setting and scores it."""
    s = self.sample(sampler, params, threshold=threshold, min_steps=min_steps, max_steps=max_steps)
    extra = dict(extra or {})
    extra.setdefault("threshold", threshold)
    extra.setdefault("min_steps", self.config.sampling.min_steps if min_steps is None else min_steps)
    extra.setdefault("max_steps", self.config.sampling.max_steps if max_steps is None else max_steps)
    r = self.score(s, name=name, extra=extra)
    self.log(f"  {name:<28} avg steps {r['avg_steps']:.3f}  {_fd_text(r)}  "
             f"agreement {r['agreement']:.3f}  F1 {r['digit_f1']:.3f}  {r['fps_batch1']:.1f} FPS (batch 1)  "
             f"{r['fps']:.1f} FPS (batch {self.batch})")
    return r


def _fd_text(r: dict) -> str:
  """'FD <fd> (+-<bootstrap std>; mean <mean term> + cov <covariance term>, spread <spread>)' for the logs."""
  return (f"FD {r['fd']:.3f} (+-{r['fd_bootstrap_std']:.3f}; mean {r['fd_mean']:.1f} + cov {r['fd_cov']:.1f}, "
          f"spread {r['fd_spread']:.2f})")


def public(result: dict) -> dict:
  """A run's result without its arrays (for JSON)."""
  return {k: v for k, v in result.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------------------------
# The sweep


def bootstrap_indices(n: int, replicates: int = FD_BOOTSTRAP, seed: int = 0) -> np.ndarray:
  """(replicates, n) resampled prompt indices; the same for every run of a benchmark (paired replicates)."""
  return np.random.default_rng(seed).integers(0, n, (replicates, n))


def _interp(x, xs, ys) -> float:
  """Linear interpolation on a curve given at xs (sorted); nan outside its range."""
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  order = np.argsort(xs)
  xs, ys = xs[order], ys[order]
  if x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
    return float("nan")
  return float(np.interp(x, xs, ys))


def verdict(groups: dict[str, list[dict]], metric: str = "fd", lower_is_better: bool = True) -> dict[str, Any]:
  """For every DSA point: the baseline curves' metric at the same average steps (linear interpolation), and
  whether DSA is better, and significantly so, two ways:
  * `significant`: by more than 2 standard errors of two independent estimates (FD's bootstrap std, agreement's
    binomial std, combined with the baseline's, interpolated likewise): conservative, as if the runs shared nothing;
  * `significant_paired`: by more than 2 standard errors of the *difference*, from paired bootstrap replicates
    (every run is scored on the same resampled prompts, `bootstrap_indices`; replicate b's difference uses the
    baseline curve interpolated from its replicates b). Runs that sample the same prompts with the same noise share
    most of their sampling error, so this is the standard error that fits a comparison of methods.
  A curve "dominates" a baseline when it is better at every point inside the baseline's range of average steps."""
  out = {}
  sign = 1.0 if lower_is_better else -1.0
  std_key = {"fd": "fd_bootstrap_std"}.get(metric, f"{metric}_std")
  boot_key = f"{metric}_bootstrap"

  def replicates(points):
    reps = [p.get(boot_key) for p in points]
    if not reps or any(r is None for r in reps) or len({len(r) for r in reps}) != 1:
      return None
    return np.asarray(reps, np.float64)  # (points, replicates)
  for dsa_name in [g for g in groups if g.startswith("dsa_")]:
    pts = groups.get(dsa_name) or []
    if not pts:
      continue
    per = {}
    for base in ("fixed", "heuristic", "oracle", "oracle_video"):
      bpts = groups.get(base) or []
      if len(bpts) < 2:
        continue
      xs, ys = [p["avg_steps"] for p in bpts], [p[metric] for p in bpts]
      ss = [p.get(std_key, 0.0) for p in bpts]
      base_reps = replicates(bpts)
      rows = []
      for p in pts:
        ref = _interp(p["avg_steps"], xs, ys)
        ref_std = _interp(p["avg_steps"], xs, ss)
        better = significant = paired = None
        paired_se = math.nan
        if not math.isnan(ref):
          gain = sign * (ref - p[metric])  # > 0: DSA better
          se = math.sqrt(p.get(std_key, 0.0) ** 2 + ref_std ** 2)
          better, significant = bool(gain > 0), bool(gain > 2 * se)
          own = p.get(boot_key)
          if base_reps is not None and own is not None and len(own) == base_reps.shape[1]:
            diffs = [sign * (_interp(p["avg_steps"], xs, base_reps[:, b]) - own[b]) for b in range(len(own))]
            paired_se = float(np.std(diffs))
            paired = bool(gain > 2 * paired_se)
        rows.append({"name": p["name"], "avg_steps": p["avg_steps"], metric: p[metric], f"{base}_{metric}": ref,
                     "better": better, "significant": significant, "paired_se": paired_se,
                     "significant_paired": paired})
      inside = [r for r in rows if r["better"] is not None]
      have_paired = bool(inside) and all(r["significant_paired"] is not None for r in inside)
      per[base] = {"points": rows, "compared": len(inside), "better": sum(r["better"] for r in inside),
                   "significant": sum(r["significant"] for r in inside),
                   "significant_paired": sum(r["significant_paired"] for r in inside) if have_paired else None,
                   "dominates": bool(inside) and all(r["better"] for r in inside)}
    out[dsa_name] = per
  return out


def _fmt(x, nd=3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  if isinstance(x, float) and math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def group_label(g: str) -> str:
  """Display name of a result group: 'fixed', 'heuristic', 'oracle', 'oracle_video' or 'dsa_<confidence target>'."""
  if g.startswith("dsa_"):
    return f"DSA, {g[4:]} target"
  return {"fixed": "fixed steps", "heuristic": "x0-change heuristic", "oracle": "per-frame oracle",
          "oracle_video": "video oracle (re-rolled)"}.get(g, g)


def markdown_table(groups: dict[str, list[dict]], bench: Benchmark | None = None,
                   verdicts: dict | None = None) -> str:
  """The claim table (markdown); `verdicts` maps a metric name to `verdict(...)`'s output."""
  labels = {g: group_label(g) for g in groups}
  lines = ["| method | setting | avg steps/frame | FD (lower better) | agreement | digit F1 | FPS (batch 1) | "
           "FPS (batch B) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for g in groups:
    for r in groups.get(g) or []:
      if g == "fixed":
        setting = f"{r['max_steps']} steps"
      elif g in ("oracle", "oracle_video"):
        setting = f"budget {r['budget']:g}"
      elif g == "heuristic":
        setting = f"delta = {_fmt(r['threshold'], 4)}"
      else:
        setting = f"tau = {_fmt(r['threshold'], 3)}"
      lines.append(f"| {labels[g]} | {setting} | {r['avg_steps']:.3f} | {r['fd']:.3f} +- {r['fd_bootstrap_std']:.3f} "
                   f"| {r['agreement']:.3f} | {r['digit_f1']:.3f} | {_fmt(r['fps_batch1'], 1)} | {_fmt(r['fps'], 1)} |")
  if bench is not None:
    lines.append(f"| real test clips | {bench.num} clips | - | {bench.real_floor['fd']:.3f} (floor) | "
                 f"{bench.real_agreement['set_agreement']:.3f} | {bench.real_agreement['digit_f1']:.3f} | - | - |")
  return "\n".join(lines) + "\n" + verdict_text(verdicts or {})


def verdict_text(verdicts: dict) -> str:
  """The verdicts (`verdict(...)` per metric name) as markdown lines."""
  text = ""
  for metric, per_metric in verdicts.items():
    what = {"fd": "lower FD", "agreement": "higher agreement"}.get(metric, metric)
    text += (f"\nVerdict on {metric} (DSA point vs. the baseline curve linearly interpolated at the same average "
             f"steps; 'better' = {what}; points outside a baseline's range are not compared):\n\n")
    for dsa_name, per in per_metric.items():
      for base, v in per.items():
        paired = ("" if v.get("significant_paired") is None
                  else f", {v['significant_paired']} by more than 2 paired standard errors")
        text += (f"- {group_label(dsa_name)} vs {group_label(base)}: better at {v['better']} of {v['compared']} comparable "
                 f"points ({v['significant']} by more than 2 standard errors{paired})"
                 f"{'; dominates' if v['dominates'] else ''}\n")
  return text


def plot_claim(path: str, groups: dict[str, list[dict]], bench: Benchmark | None = None) -> str:
  """FD and agreement vs. average steps per frame, one curve per method (PNG)."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  from dsa_jax.atomic import write_figure

  palette = iter(["#c44e52", "#8172b2", "#dd8452", "#4c72b0"])
  style = {}
  for g in groups:
    if g == "fixed":
      style[g] = (group_label(g), "k", "s", "-")
    elif g == "heuristic":
      style[g] = (group_label(g), "#55a868", "D", "--")
    elif g == "oracle":
      style[g] = (group_label(g), "#937860", "*", ":")
    elif g == "oracle_video":
      style[g] = (group_label(g), "#e377c2", "P", ":")
    else:
      style[g] = (group_label(g), next(palette, "#64b5cd"), "o", "-")
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
  try:
    for g, (label, color, marker, ls) in style.items():
      pts = sorted(groups.get(g) or [], key=lambda r: r["avg_steps"])
      if not pts:
        continue
      xs = [p["avg_steps"] for p in pts]
      axes[0].errorbar(xs, [p["fd"] for p in pts], yerr=[p["fd_bootstrap_std"] for p in pts], color=color,
                       marker=marker, ls=ls, label=label, capsize=2, ms=4)
      axes[1].plot(xs, [p["agreement"] for p in pts], color=color, marker=marker, ls=ls, label=label, ms=4)
    if bench is not None:
      axes[0].axhline(bench.real_floor["fd"], color="#999999", ls=":", lw=1, label="real clips (floor)")
      axes[1].axhline(bench.real_agreement["set_agreement"], color="#999999", ls=":", lw=1, label="real clips")
    axes[0].set_ylabel("Fréchet distance to real test clips (lower is better)")
    axes[1].set_ylabel("prompt agreement (digit set exact)")
    for ax in axes:
      ax.set_xlabel("average denoising steps per frame")
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("moving digits: quality vs. steps", fontsize=10)
    write_figure(fig, path)
  finally:
    plt.close(fig)
  return path


def plot_steps_by_event(path: str, runs: Sequence[dict], event_names: Sequence[str], *,
                        key: str = "steps_by_event_pred", title: str = "") -> str:
  """Mean steps per frame by event label (bars per run), with frame counts; labels from the evaluator's event head on
  the generated frames (key 'steps_by_event_pred') or the prompt's real clip ('steps_by_event_prompt_clip')."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  from dsa_jax.atomic import write_figure

  fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), dpi=110, gridspec_kw={"width_ratios": [1.2, 1]})
  try:
    ax = axes[0]
    n = max(len(runs), 1)
    width = 0.8 / n
    x = np.arange(len(event_names))
    for i, r in enumerate(runs):
      stats = r[key]
      means = [np.nan if stats[e]["mean"] is None else stats[e]["mean"] for e in event_names]
      ax.bar(x + (i - (n - 1) / 2) * width, means, width)
    counts = [runs[0][key][e]["count"] for e in event_names] if runs else [0] * len(event_names)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{e}\n(n={c})" for e, c in zip(event_names, counts)], fontsize=7)
    ax.set_ylabel("mean steps per frame")
    ax.set_title("steps by event label" + (" (evaluator-predicted on generated frames)" if key.endswith("pred")
                                          else " (prompt's real clip)"), fontsize=8)
    ax = axes[1]
    for r in runs:  # same colour order as the bars
      ax.plot(np.arange(len(r["steps_by_frame"])), r["steps_by_frame"], marker="o", ms=3,
              label=f"{r['name']} (avg {r['avg_steps']:.2f})")
    ax.set_xlabel("frame")
    ax.set_ylabel("mean steps")
    ax.set_title("steps by frame index", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
      fig.suptitle(title, fontsize=9)
    write_figure(fig, path)
  finally:
    plt.close(fig)
  return path


def _pick(trace, rule, targets, min_steps, max_steps, fallback) -> list[float]:
  from dsa_jax.eval import heuristic
  try:
    picked = heuristic.pick_thresholds(trace, targets, rule=rule, min_steps=min_steps, max_steps=max_steps)
  except ValueError:
    picked = []
  if len(picked) < 5:  # degenerate trace (e.g. an untrained head): top up with the fixed list
    picked = sorted(set(picked) | set(fallback))
  return picked


def run_claim(config, models: dict[str, str | tuple[str, str]], out_dir: str, num: int = 256, *,
              thresholds: Sequence[float] | None = None, deltas: Sequence[float] | None = None,
              fixed: Sequence[int] | None = None, budgets: Sequence[float] | None = None,
              evaluator=None, batch: int = 32, seed: int = 0, data_seed: int = 0, num_real: int = 1000,
              fps_prompts: int = 8, targets: Sequence[float] = DEFAULT_TARGETS,
              log: Callable[[str], None] = _say, bench: Benchmark | None = None,
              video_oracle: bool = True) -> dict[str, Any]:
  """Quality vs. average steps: fixed steps, DSA for each model in `models` ({confidence target: checkpoint, or
  (checkpoint, head folder) for a head stored apart from its generator}; the first one's generator also serves the
  baselines), the x0-change heuristic, the per-frame oracle and (with
  `video_oracle`, which samples the prompts about num_chunks x (max budget - min_steps) x num_chunks times) the
  re-rolled video oracle at `budgets` (default: those of DEFAULT_BUDGETS within the config's step range);
  the head report of each model and DSA's allocation efficiency. Writes claim.md / claim.json / claim.png /
  steps_by_event.png / steps_by_place.png into `out_dir`."""
  import jax.numpy as jnp

  from dsa_jax.atomic import write_text
  from dsa_jax.checkpoint import loading
  from dsa_jax.config_lib import CONF_TARGETS
  from dsa_jax.eval import heuristic
  from dsa_jax.eval import oracle
  from dsa_jax.models.dit import _DTYPES
  from dsa_jax.sampling import outputs
  from dsa_jax.sampling import sampler as sampler_lib

  if not models:
    raise BenchmarkError("models: give at least one DSA checkpoint")
  t_all = time.time()
  L = len(config.sampling.ladder)
  fixed = tuple(range(1, L + 1)) if fixed is None else tuple(fixed)  # default: every step count of the ladder
  mn, mx = int(config.sampling.min_steps), int(config.sampling.max_steps)
  check_fixed_steps(fixed, L, "fixed")
  if budgets is None:
    budgets = tuple(b for b in DEFAULT_BUDGETS if mn <= b <= mx)
  bad = [b for b in budgets if not mn <= float(b) <= mx]
  if bad:
    raise BenchmarkError(f"--budgets: the oracle budgets must lie in [sampling.min_steps, sampling.max_steps] = "
                         f"[{mn}, {mx}], got {bad}")
  os.makedirs(out_dir, exist_ok=True)  # after the checks: a refused sweep leaves no folder behind
  dtype = _DTYPES[config.compute.dtype]

  def load(spec):
    ckpt, head = spec if isinstance(spec, tuple) else (spec, None)
    params, source = loading.load_sampler_params(config, ckpt, warn=log, head=head)
    if dtype != jnp.float32:
      params["generator"] = loading.cast_params_for_inference(params["generator"], dtype)
    return params, source

  sampler = sampler_lib.make_sampler(config)
  names = list(models)
  groups: dict[str, list[dict]] = {"fixed": [], **{f"dsa_{n}": [] for n in names}, "heuristic": [], "oracle": [],
                                   "oracle_video": []}
  sources, heads, traces = {}, {}, {}
  params = {}
  for n in names:
    params[n], sources[n] = load(models[n])
    kind = (sources[n].get("conf_target") or {}).get("kind")
    if n in CONF_TARGETS and kind and kind != n:
      # the name labels every row, plot and verdict of the claim: a target name must be the head's own target
      raise BenchmarkError(f"--model {n}={models[n]}: the name is a confidence target but this head was trained on "
                           f"{kind!r}; name it {kind}= (or give the {n!r} head as {n}=MODEL+HEAD)")
  primary = params[names[0]]
  bench = bench or Benchmark(config, num=num, evaluator=evaluator, data_seed=data_seed, num_real=num_real,
                             batch=batch, seed=seed, fps_prompts=fps_prompts, log=log)

  log("fixed steps")
  for k in sorted({int(k) for k in fixed}):
    groups["fixed"].append(bench.run_fixed(sampler, primary, k, extra={"group": "fixed"}))
  fallback_tau = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95)
  for n in names:
    log(f"DSA, {n} target: full-ladder trace (head report)")
    traces[n] = bench.trace(sampler, params[n])
    conf_target = sources[n].get("conf_target") or {}
    heads[n] = oracle.head_report(traces[n], conf_target.get("log_range"), conf_target.get("kind", n))
    h = heads[n]
    log(f"  median confidence by step {[round(c, 3) for c in h['median_conf_by_step']]}; step-1 spread "
        f"{h['step1_spread']:.3f}; ECE vs the {h['calibrated_against']} target {h['ece']:.3f}")
    taus = list(thresholds) if thresholds else _pick(traces[n]["conf"], "confidence", targets, mn, mx, fallback_tau)
    log(f"  thresholds {[round(t, 4) for t in taus]}")
    for tau in taus:
      groups[f"dsa_{n}"].append(bench.run(sampler, params[n], name=f"dsa_{n}-tau{tau:.3g}", threshold=float(tau),
                                          min_steps=mn, max_steps=mx, extra={"group": f"dsa_{n}"}))

  log("x0-change heuristic")
  hsampler = heuristic.make_heuristic_sampler(config)
  if deltas:
    ds = list(deltas)
  else:
    never = bench.run(hsampler, primary, name="heuristic-delta0", threshold=0.0, min_steps=mn, max_steps=mx,
                      extra={"group": "heuristic_reference"})
    ds = _pick(never["_arrays"]["conf_trace"], heuristic.RULE, targets, mn, mx, (0.005, 0.01, 0.02, 0.04, 0.08))
  log(f"  deltas {[round(d, 5) for d in ds]}")
  for d in ds:
    groups["heuristic"].append(bench.run(hsampler, primary, name=f"heuristic-delta{d:.3g}", threshold=float(d),
                                         min_steps=mn, max_steps=mx, extra={"group": "heuristic"}))

  log("per-frame oracle (greedy by each frame's measured gain of one more step, on the full-ladder rollout)")
  for budget in budgets:
    alloc = oracle.oracle_allocation(traces[names[0]]["remaining"], float(budget), mn, mx)
    groups["oracle"].append(bench.run_allocation(sampler, primary, alloc, name=f"oracle-{budget:g}",
                                                 extra={"group": "oracle", "budget": float(budget),
                                                        "threshold": float("nan"), "min_steps": mn,
                                                        "max_steps": mx}))

  if video_oracle and budgets:
    log("video oracle (steps per chunk; every candidate judged by re-rolling the whole video towards the max-step "
        "video)")

    def sample_latents(steps):
      return bench.sample(sampler, primary, threshold=float("inf"), min_steps=steps, max_steps=steps,
                          time_batch1=False)["latents"]

    plans = oracle.video_oracle(sample_latents, bench.num, bench.frames, int(config.video.chunk_frames), budgets,
                                mn, mx, log=log)
    for budget in budgets:
      plan = plans[float(budget)]
      groups["oracle_video"].append(bench.run_allocation(
          sampler, primary, plan["steps"], name=f"video-oracle-{budget:g}",
          extra={"group": "oracle_video", "budget": float(budget), "threshold": float("nan"), "min_steps": mn,
                 "max_steps": mx, "distance_to_max_steps": float(np.mean(plan["distance"]))}))

  verdicts = {"fd": verdict(groups, "fd", True), "agreement": verdict(groups, "agreement", False)}
  efficiency = {n: [row for og in ("oracle_video", "oracle") if groups[og]
                    for row in allocation_efficiency(groups, f"dsa_{n}", budgets, oracle_group=og)] for n in names}
  table = markdown_table(groups, bench, verdicts)
  paths = {"md": os.path.join(out_dir, "claim.md"), "json": os.path.join(out_dir, "claim.json"),
           "plot": os.path.join(out_dir, "claim.png"), "events": os.path.join(out_dir, "steps_by_event.png"),
           "places": os.path.join(out_dir, "steps_by_place.png")}
  plot_claim(paths["plot"], groups, bench)
  ev_runs = groups[f"dsa_{names[0]}"] or groups["fixed"]
  plot_steps_by_event(paths["events"], ev_runs, bench.event_names,
                      title=f"DSA ({names[0]} target): where the steps go")
  places = {g: steps_by_place(_closest(runs, 2.5), bench) for g, runs in groups.items()
            if runs and (g.startswith("dsa_") or g.startswith("oracle"))}
  plot_steps_by_place(paths["places"], places)
  header = (f"# Moving digits: quality vs. average steps per frame\n\n"
            f"{bench.num} held-out test prompts, {bench.num_real} real test clips as the FD reference, evaluator "
            f"`{bench.evaluator.path}` (held-out set accuracy "
            f"{_fmt((bench.evaluator.meta.get('evaluator', {}).get('test') or {}).get('set_acc'))}), batch "
            f"{bench.batch}, config `{config.name}`, checkpoints {_sources_text(sources)}.\n"
            f"FD +- is the std over {FD_BOOTSTRAP} bootstrap resamples of the generated set (the same resampled "
            f"prompts for every run, so differences are also judged against their paired std). FPS: frames per second "
            f"of steady-state sampling (compilation excluded), one video at a time over the first {bench.fps_prompts} "
            f"prompts (batch 1) and at batch B = {bench.batch} (where a chunk's loop runs until its slowest frame is "
            f"done, so DSA saves less).\n\n")
  text = header + table + head_table(heads) + efficiency_table(efficiency) + places_table(places)
  write_text(paths["md"], text)
  result = {"benchmark": bench.describe(), "sources": sources, "config": config.name,
            "groups": {g: [public(r) for r in rs] for g, rs in groups.items()}, "verdict": verdicts,
            "heads": heads, "efficiency": efficiency, "steps_by_place": places, "seconds": time.time() - t_all}
  outputs.write_json(paths["json"], result)
  log(text)
  log(f"wrote {', '.join(paths.values())}")
  result["paths"] = paths
  return result


def _sources_text(sources: dict) -> str:
  """Where each model came from, for claim.md: a calibration table is named by its size (claim.json keeps it)."""
  def one(src):
    if not isinstance(src, dict):
      return repr(src)
    src = dict(src)
    cal = src.get("calibration")
    if isinstance(cal, dict):
      src["calibration"] = f"{len(cal.get('thresholds', ()))} thresholds on {cal.get('num_prompts')} prompts"
    if isinstance(src.get("calibration_ranges"), dict):
      src["calibration_ranges"] = "tables for " + ", ".join(sorted(src["calibration_ranges"])) + " steps"
    return ", ".join(f"{k}: {v}" for k, v in src.items())
  return "; ".join(f"{name} ({one(src)})" for name, src in sources.items())


def allocation_efficiency(groups: dict[str, list[dict]], dsa_group: str, budgets: Sequence[float],
                          oracle_group: str = "oracle") -> list[dict]:
  """At each budget: (FD gain of DSA over fixed steps) / (FD gain of the oracle over fixed steps), with fixed steps
  and DSA linearly interpolated at the budget's average steps and the oracle (`oracle_group`) run at the budget
  itself; undefined (nan) where the oracle does not beat fixed steps."""
  rows = []
  fixed = sorted(groups.get("fixed") or [], key=lambda r: r["avg_steps"])
  dsa = sorted(groups.get(dsa_group) or [], key=lambda r: r["avg_steps"])
  oracle = {r["budget"]: r for r in groups.get(oracle_group) or []}
  for b in budgets:
    f = _interp(b, [r["avg_steps"] for r in fixed], [r["fd"] for r in fixed]) if len(fixed) > 1 else math.nan
    d = _interp(b, [r["avg_steps"] for r in dsa], [r["fd"] for r in dsa]) if len(dsa) > 1 else math.nan
    o = oracle.get(float(b), {}).get("fd", math.nan)
    eff = (f - d) / (f - o) if (f - o) > 0 else math.nan
    rows.append({"oracle": oracle_group, "budget": float(b), "fd_fixed": f, "fd_dsa": d, "fd_oracle": o,
                 "efficiency": eff})
  return rows


def _closest(runs: Sequence[dict], avg: float) -> dict:
  return min(runs, key=lambda r: abs(r["avg_steps"] - avg))


def steps_by_place(run: dict, bench: Benchmark) -> dict[str, Any]:
  """Mean steps in the first chunk, on frames of later chunks with an event in the prompt's clip, and on plain
  later frames (events from the real clip's labels: enter, swap, cut, ...)."""
  steps = np.asarray(run["_arrays"]["steps"], np.float64)
  labels = np.asarray(bench.prompt_labels)
  c = bench.config.video.chunk_frames
  later = np.zeros_like(steps, bool)
  later[:, c:] = True
  event = later & (labels > 0)
  plain = later & (labels == 0)
  mean = lambda m: float(steps[m].mean()) if m.any() else math.nan
  return {"run": run["name"], "avg_steps": run["avg_steps"], "first_chunk": mean(~later), "event_frames": mean(event),
          "plain_frames": mean(plain), "event_count": int(event.sum()), "plain_count": int(plain.sum())}


def plot_steps_by_place(path: str, places: dict[str, dict]) -> str:
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  from dsa_jax.atomic import write_figure

  keys = ("first_chunk", "event_frames", "plain_frames")
  fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
  try:
    n = max(len(places), 1)
    w = 0.8 / n
    for i, (g, p) in enumerate(places.items()):
      ax.bar(np.arange(3) + (i - (n - 1) / 2) * w, [p[k] for k in keys], w,
             label=f"{group_label(g)} ({p['run']}, avg {p['avg_steps']:.2f})")
    ax.set_xticks(np.arange(3))
    ax.set_xticklabels(["first chunk", "event frames", "plain frames"])
    ax.set_ylabel("mean steps per frame")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, axis="y")
    write_figure(fig, path)
  finally:
    plt.close(fig)
  return path


def head_table(heads: dict[str, dict]) -> str:
  if not heads:
    return ""
  L = len(next(iter(heads.values()))["median_conf_by_step"])
  text = ("\nWhat the head's confidence means (full-ladder rollouts of the same prompts: median confidence after each "
          "step, its 10th-90th percentile spread at step 1, and its calibration on the same steps against its own "
          "target where the trace can compute it, 'gain' for a gain head, else 'remaining'):\n\n| target | "
          + " | ".join(f"median c, step {k + 1}" for k in range(L))
          + " | rises | step-1 spread | ECE | against |\n|---|" + "---:|" * (L + 3) + "---|\n")
  for n, h in heads.items():
    text += (f"| {n} | " + " | ".join(f"{c:.3f}" for c in h["median_conf_by_step"])
             + f" | {'yes' if h['conf_rises'] else 'no'} | {h['step1_spread']:.3f} | {h['ece']:.3f}"
             f" | {h['calibrated_against']} |\n")
  return text


def efficiency_table(efficiency: dict[str, list[dict]]) -> str:
  text = ("\nAllocation efficiency = (FD gain of DSA over fixed steps) / (FD gain of the oracle over fixed steps) at "
          "the same average steps:\n\n| target | oracle | budget | FD fixed | FD DSA | FD oracle | efficiency |\n"
          "|---|---|---:|---:|---:|---:|---:|\n")
  for n, rows in efficiency.items():
    for r in rows:
      text += (f"| {n} | {group_label(r.get('oracle', 'oracle'))} | {r['budget']:g} | {_fmt(r['fd_fixed'], 1)} | "
               f"{_fmt(r['fd_dsa'], 1)} | "
               f"{_fmt(r['fd_oracle'], 1)} | {_fmt(r['efficiency'], 2)} |\n")
  return text


def places_table(places: dict[str, dict]) -> str:
  text = ("\nWhere the steps go (the run closest to 2.5 average steps; events from the prompt's real clip):\n\n"
          "| method | run | avg steps | first chunk | event frames | plain frames |\n|---|---|---:|---:|---:|---:|\n")
  for g, p in places.items():
    text += (f"| {group_label(g)} | {p['run']} | {p['avg_steps']:.2f} | {_fmt(p['first_chunk'], 2)} | "
             f"{_fmt(p['event_frames'], 2)} | {_fmt(p['plain_frames'], 2)} |\n")
  return text


def check_fixed_steps(fixed: Sequence[int], num_steps: int, name: str):
  """Raises, naming the option `name`, when a fixed-steps baseline's step count lies outside the ladder's."""
  bad = [k for k in fixed if not 1 <= int(k) <= num_steps]
  if bad:
    raise BenchmarkError(f"{name}: step counts must lie in [1, {num_steps}] (sampling.ladder), got {bad}")


def bracketing_steps(budgets: Sequence[float], num_steps: int) -> tuple[int, ...]:
  """The fixed step counts a budget is compared with: the whole numbers on either side of each budget (1.5 -> 1, 2;
  a whole budget, which needs a second point for the curve: 2 -> 2, 3), within the ladder's 1..num_steps."""
  ks = set()
  for m in budgets:
    lo, hi = int(math.floor(float(m) + 1e-9)), int(math.ceil(float(m) - 1e-9))
    ks.update((lo, hi) if lo != hi else (lo, lo + 1 if lo < num_steps else lo - 1))
  return tuple(sorted(k for k in ks if 1 <= k <= num_steps))


def check_budget_values(budgets: Sequence[float], num_steps: int, name: str = "--budgets"):
  """Raises, naming the option `name`, unless every budget is a finite average within [1, num_steps] (the most any
  step range of the ladder allows; each budget's table then checks its own [min_steps, max_steps])."""
  if not budgets:
    raise BenchmarkError(f"{name}: give the average steps per frame to check, e.g. {name} 1.5 2 2.5 3")
  bad = [b for b in budgets if not (math.isfinite(float(b)) and 1.0 <= float(b) <= num_steps)]
  if bad:
    raise BenchmarkError(f"{name}: expected finite average steps per frame within [1, {num_steps}] (1 to the "
                         f"{num_steps} steps of sampling.ladder; the calibration table each budget uses then "
                         f"requires its own [min_steps, max_steps]), got {[float(b) for b in bad]}")


def check_budgets(config, ckpt: str, out_dir: str, budgets: Sequence[float], *, num: int = 512, evaluator=None,
                  batch: int = 32, seed: int = 0, data_seed: int = 0, num_real: int = 1000,
                  fixed: Sequence[int] | None = None, log: Callable[[str], None] = _say) -> dict[str, Any]:
  """The step budget on held-out prompts: for each requested average (`--mean-steps`), tau from the model's
  calibration table (made on training prompts), then the achieved average steps, FD and agreement on `num`
  test-split prompts, and both against fixed steps at the same average (`fixed`: the step counts to sample, default
  those bracketing the budgets; empty: none), with the paired standard error of the difference (every run is scored
  on the same bootstrap resamples of the prompts). Writes budget_check.json into `out_dir`."""
  from dsa_jax.checkpoint import loading
  from dsa_jax.sampling import budget as budget_lib
  from dsa_jax.sampling import outputs
  from dsa_jax.sampling import sampler as sampler_lib

  L = len(config.sampling.ladder)
  check_budget_values(budgets, L)
  fixed = bracketing_steps(budgets, L) if fixed is None else tuple(sorted({int(k) for k in fixed}))
  check_fixed_steps(fixed, L, "--fixed")
  params, source = loading.load_sampler_params(config, ckpt, warn=log, cast=True)
  owner = loading.calibration_owner(source, f"--ckpt {ckpt or config.sampling.checkpoint}")
  # each budget with the table of the step range that covers it; a missing table or an out-of-range request fails
  # before any sampling
  controls = [budget_lib.controls_for_budget(source, float(m), config, source_name=owner) for m in budgets]
  bench = Benchmark(config, num=num, evaluator=evaluator, data_seed=data_seed, num_real=num_real, batch=batch,
                    seed=seed, fps_prompts=0, log=log)
  sampler = sampler_lib.make_sampler(config)
  runs = []
  for m, ctl in zip(budgets, controls):  # a table's taus give its averages under its own step range
    runs.append(bench.run(sampler, params, name=f"mean-steps-{float(m):g}", **ctl))
  fixed_runs = [bench.run_fixed(sampler, params, k) for k in fixed]
  groups = {"fixed": fixed_runs, "dsa_budget": runs}
  against = {metric: (verdict(groups, metric, lower)["dsa_budget"].get("fixed") or {}).get("points")
             for metric, lower in (("fd", True), ("agreement", False))}
  rows = []
  for i, (m, ctl, r) in enumerate(zip(budgets, controls, runs)):
    row = {"requested": float(m), "tau": ctl["threshold"], "min_steps": ctl["min_steps"], "max_steps": ctl["max_steps"],
           "achieved": r["avg_steps"], "error": r["avg_steps"] - float(m), "fd": r["fd"],
           "fd_bootstrap_std": r["fd_bootstrap_std"], "agreement": r["agreement"]}
    for metric, points in against.items():
      p = points[i] if points else None
      if p is not None and p["better"] is not None:  # inside the fixed counts' range
        row[f"fixed_{metric}"] = p[f"fixed_{metric}"]
        row[f"{metric}_better_than_fixed"] = (p[f"fixed_{metric}"] - p[metric]) * (1 if metric == "fd" else -1)
        row[f"{metric}_paired_se"] = p["paired_se"]
        row[f"{metric}_significant_paired"] = p["significant_paired"]
    rows.append(row)
  worst = max(abs(r["error"]) for r in rows)
  log("requested -> achieved average steps: " + ", ".join(f"{r['requested']:g} -> {r['achieved']:.2f}" for r in rows)
      + f"  (largest error {worst:.3f})")
  for r in rows:
    if "fixed_fd" in r:
      log(f"  {r['requested']:g} ({r['min_steps']}-{r['max_steps']} steps table): FD {r['fd']:.1f} vs fixed steps "
          f"{r['fixed_fd']:.1f} at {r['achieved']:.2f} steps: better by {r['fd_better_than_fixed']:.1f} (paired SE "
          f"{r['fd_paired_se']:.1f}); agreement {r['agreement']:.3f} vs {r['fixed_agreement']:.3f}")
  os.makedirs(out_dir, exist_ok=True)
  result = {"config": config.name, "checkpoint": source, "benchmark": bench.describe(), "rows": rows,
            "max_abs_error": worst, "runs": [public(r) for r in runs + fixed_runs]}
  log(f"wrote {outputs.write_json(os.path.join(out_dir, 'budget_check.json'), result)}")
  return result


def evaluate_teacher(config, ckpt: str, out_dir: str, steps: Sequence[int], *, guidances: Sequence[float] | None = None,
                     num: int = 256, evaluator=None, batch: int = 32, seed: int = 0, data_seed: int = 0,
                     num_real: int = 1000, fps_prompts: int = 0, log: Callable[[str], None] = _say) -> dict[str, Any]:
  """Scores a teacher-stage model as a many-step sampler at each of `steps` and each guidance scale of `guidances`
  (default: dmd.guidance, the scale its students are distilled against); writes teacher.json into `out_dir`."""
  del fps_prompts
  from dsa_jax.sampling import outputs
  from dsa_jax.training import checkpointing

  if not ckpt:
    raise BenchmarkError("--ckpt: the teacher model folder (or teacher-stage workdir) to score is required")
  params, meta = checkpointing.load_model_from_workdir(ckpt, config, ("teacher",))
  bench = Benchmark(config, num=num, evaluator=evaluator, data_seed=data_seed, num_real=num_real, batch=batch,
                    seed=seed, fps_prompts=0, log=log)
  runs = [bench.run_teacher(params["teacher"], int(k), g) for g in (guidances or [None]) for k in steps]
  os.makedirs(out_dir, exist_ok=True)
  result = {"config": config.name, "checkpoint": {"path": ckpt, "step": meta.get("step")},
            "benchmark": bench.describe(), "runs": [public(r) for r in runs]}
  log(f"wrote {outputs.write_json(os.path.join(out_dir, 'teacher.json'), result)}")
  return result
