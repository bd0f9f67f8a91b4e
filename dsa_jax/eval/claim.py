"""The moving-digits benchmark harness and the paper's claim measured: quality vs. average steps per frame.

`Benchmark` holds what every run shares: the held-out prompts (test split of `dsa_jax.data.digits`), their text
contexts and event labels, the evaluator and the Fréchet statistics of real test clips. `Benchmark.run` samples
the prompts with one sampler at one setting and scores the result (FD, prompt agreement, steps and confidences per
frame and per event label, FPS).

`run_claim` is the sweep that tests the claim, all on the same prompts, seeds and evaluator:
  (a) fixed 1..5 steps (tau = +inf, max_steps = k) with the DMD-target checkpoint (Self Forcing's sampler);
  (b) DSA with the 'dmd'-target head at >= 5 thresholds;
  (c) DSA with the 'consistency'-target checkpoint at >= 5 thresholds;
  (d) the training-free x0-change early exit (`heuristic.py`) at several deltas.
Thresholds and deltas default to values picked from a max-steps run's per-step trace so that their average steps
spread over [1, max_steps] (`heuristic.pick_thresholds`); pass them to pin them. Outputs in `out_dir`: claim.md
(the table and a verdict computed from it), claim.json, claim.png (FD and agreement vs. average steps),
steps_by_event.png (DSA steps per frame by event label).

  dsa-jax eval sweep --config configs/digits.py --ckpt runs/digits/dsa/model \\
      --ckpt-consistency runs/digits/dsa_consistency/model --out docs/claim --num 256
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from dsa_jax.eval import metrics

FD_BOOTSTRAP = 20
DEFAULT_TARGETS = (1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)


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
    self.config, self.log = config, log
    self.frames, self.size = check_pixel_config(config)
    self.num, self.batch, self.seed, self.data_seed = int(num), int(min(batch, num)), int(seed), int(data_seed)
    self.fps_prompts = max(0, min(int(fps_prompts), self.num))
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
    num_real = max(int(num_real), 2)
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

  def sample(self, sampler, params, *, threshold: float, min_steps: int | None = None,
             max_steps: int | None = None) -> dict[str, Any]:
    """Samples all prompts in batches of `batch` (last one padded); returns arrays and the steady-state time."""
    import jax

    cfg = self.config.sampling
    min_steps = cfg.min_steps if min_steps is None else int(min_steps)
    max_steps = cfg.max_steps if max_steps is None else int(max_steps)
    b = self.batch
    key = (id(sampler), b, self.uncond is not None)
    uc = None if self.uncond is None else np.broadcast_to(self.uncond, (b,) + self.uncond.shape[1:])
    outs, seconds = [], 0.0

    def batch_args(start):
      idx = np.minimum(np.arange(start, start + b), self.num - 1)
      controls = sampler.make_controls(b, threshold=threshold, min_steps=min_steps, max_steps=max_steps,
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
    res["seconds_b1"] = self._time_batch1(sampler, params, threshold, min_steps, max_steps)
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
    r = self.score(self.sample_teacher(params, num_steps, g), name=f"teacher-{num_steps}",
                   extra={"group": "teacher", "teacher_steps": int(num_steps), "guidance": g})
    self.log(f"  {r['name']:<28} FD {r['fd']:.3f} (+-{r['fd_bootstrap_std']:.3f})  agreement {r['agreement']:.3f}  "
             f"F1 {r['digit_f1']:.3f}  ({r['seconds']:.1f}s)")
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
    rng = np.random.default_rng(0)
    boots = [metrics.frechet_from_stats(*metrics.feature_stats(feats[rng.integers(0, len(feats), len(feats))]),
                                        self.real_mu, self.real_cov) for _ in range(FD_BOOTSTRAP)]
    pred = o["digit_logits"] > 0
    agreement = metrics.prompt_agreement(pred, self.prompt_sets)
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
        "agreement": agreement["set_agreement"],
        "agreement_std": _binomial_std(agreement["set_agreement"], len(pred)),
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
    self.log(f"  {name:<28} avg steps {r['avg_steps']:.3f}  FD {r['fd']:.3f} (+-{r['fd_bootstrap_std']:.3f})  "
             f"agreement {r['agreement']:.3f}  F1 {r['digit_f1']:.3f}  {r['fps_batch1']:.1f} FPS (batch 1)  "
             f"{r['fps']:.1f} FPS (batch {self.batch})")
    return r


def public(result: dict) -> dict:
  """A run's result without its arrays (for JSON)."""
  return {k: v for k, v in result.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------------------------
# The sweep


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
  whether DSA is better, and significantly so (by more than 2 standard errors: FD's bootstrap std, agreement's
  binomial std, combined with the baseline's, interpolated likewise). A curve "dominates" a baseline when it is
  better at every point inside the baseline's range of average steps."""
  out = {}
  sign = 1.0 if lower_is_better else -1.0
  std_key = {"fd": "fd_bootstrap_std"}.get(metric, f"{metric}_std")
  for dsa_name in ("dsa_dmd", "dsa_consistency"):
    pts = groups.get(dsa_name) or []
    if not pts:
      continue
    per = {}
    for base in ("fixed", "heuristic"):
      bpts = groups.get(base) or []
      if len(bpts) < 2:
        continue
      xs, ys = [p["avg_steps"] for p in bpts], [p[metric] for p in bpts]
      ss = [p.get(std_key, 0.0) for p in bpts]
      rows = []
      for p in pts:
        ref = _interp(p["avg_steps"], xs, ys)
        ref_std = _interp(p["avg_steps"], xs, ss)
        if math.isnan(ref):
          better = significant = None
        else:
          gain = sign * (ref - p[metric])  # > 0: DSA better
          se = math.sqrt(p.get(std_key, 0.0) ** 2 + ref_std ** 2)
          better, significant = bool(gain > 0), bool(gain > 2 * se)
        rows.append({"name": p["name"], "avg_steps": p["avg_steps"], metric: p[metric], f"{base}_{metric}": ref,
                     "better": better, "significant": significant})
      inside = [r for r in rows if r["better"] is not None]
      per[base] = {"points": rows, "compared": len(inside), "better": sum(r["better"] for r in inside),
                   "significant": sum(r["significant"] for r in inside),
                   "dominates": bool(inside) and all(r["better"] for r in inside)}
    out[dsa_name] = per
  return out


def _fmt(x, nd=3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  if isinstance(x, float) and math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown_table(groups: dict[str, list[dict]], bench: Benchmark | None = None,
                   verdicts: dict | None = None) -> str:
  """The claim table (markdown); `verdicts` maps a metric name to `verdict(...)`'s output."""
  labels = {"fixed": "(a) fixed steps", "dsa_dmd": "(b) DSA, dmd target", "dsa_consistency": "(c) DSA, consistency "
            "target", "heuristic": "(d) x0-change heuristic"}
  lines = ["| method | setting | avg steps/frame | FD (lower better) | agreement | digit F1 | FPS (batch 1) | "
           "FPS (batch B) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for g in ("fixed", "dsa_dmd", "dsa_consistency", "heuristic"):
    for r in groups.get(g) or []:
      if g == "fixed":
        setting = f"{r['max_steps']} steps"
      elif g == "heuristic":
        setting = f"delta = {_fmt(r['threshold'], 4)}"
      else:
        setting = f"tau = {_fmt(r['threshold'], 3)}"
      lines.append(f"| {labels[g]} | {setting} | {r['avg_steps']:.3f} | {r['fd']:.3f} +- {r['fd_bootstrap_std']:.3f} "
                   f"| {r['agreement']:.3f} | {r['digit_f1']:.3f} | {_fmt(r['fps_batch1'], 1)} | {_fmt(r['fps'], 1)} |")
  if bench is not None:
    lines.append(f"| real test clips | {bench.num} clips | - | {bench.real_floor['fd']:.3f} (floor) | "
                 f"{bench.real_agreement['set_agreement']:.3f} | {bench.real_agreement['digit_f1']:.3f} | - | - |")
  text = "\n".join(lines) + "\n"
  for metric, per_metric in (verdicts or {}).items():
    what = {"fd": "lower FD", "agreement": "higher agreement"}.get(metric, metric)
    text += (f"\nVerdict on {metric} (DSA point vs. the baseline curve linearly interpolated at the same average "
             f"steps; 'better' = {what}; points outside a baseline's range are not compared):\n\n")
    for dsa_name, per in per_metric.items():
      for base, v in per.items():
        text += (f"- {labels[dsa_name]} vs {labels[base]}: better at {v['better']} of {v['compared']} comparable "
                 f"points ({v['significant']} by more than 2 standard errors)"
                 f"{'; dominates' if v['dominates'] else ''}\n")
  return text


def plot_claim(path: str, groups: dict[str, list[dict]], bench: Benchmark | None = None) -> str:
  """FD and agreement vs. average steps per frame, one curve per method (PNG)."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  from dsa_jax.atomic import atomic_path

  style = {"fixed": ("(a) fixed steps", "k", "s", "-"), "dsa_dmd": ("(b) DSA (dmd)", "#c44e52", "o", "-"),
           "dsa_consistency": ("(c) DSA (consistency)", "#8172b2", "^", "-"),
           "heuristic": ("(d) x0-change heuristic", "#55a868", "D", "--")}
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
      fig.savefig(tmp, format="png")
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

  from dsa_jax.atomic import atomic_path

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
    fig.tight_layout()
    with atomic_path(path) as tmp:
      fig.savefig(tmp, format="png")
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


def run_claim(config, ckpt_dmd: str, ckpt_consistency: str | None, out_dir: str, num: int = 256, *,
              thresholds: Sequence[float] | None = None, deltas: Sequence[float] | None = None,
              fixed: Sequence[int] = (1, 2, 3, 4, 5), evaluator=None, batch: int = 32, seed: int = 0,
              data_seed: int = 0, num_real: int = 1000, fps_prompts: int = 8,
              targets: Sequence[float] = DEFAULT_TARGETS,
              log: Callable[[str], None] = _say, bench: Benchmark | None = None) -> dict[str, Any]:
  """The claim sweep (see the module docstring); writes claim.md / claim.json / claim.png / steps_by_event.png into `out_dir`."""
  import jax.numpy as jnp

  from dsa_jax.eval import heuristic
  from dsa_jax.models.dit import _DTYPES
  from dsa_jax.sampling import outputs
  from dsa_jax.checkpoint import loading
  from dsa_jax.sampling import sampler as sampler_lib

  os.makedirs(out_dir, exist_ok=True)
  t_all = time.time()
  bench = bench or Benchmark(config, num=num, evaluator=evaluator, data_seed=data_seed, num_real=num_real,
                             batch=batch, seed=seed, fps_prompts=fps_prompts, log=log)
  L = len(config.sampling.ladder)
  mn, mx = int(config.sampling.min_steps), int(config.sampling.max_steps)
  bad = [k for k in fixed if not 1 <= int(k) <= L]
  if bad:
    raise BenchmarkError(f"fixed: step counts must lie in [1, {L}] (sampling.ladder), got {bad}")
  dtype = _DTYPES[config.compute.dtype]

  def load(ckpt):
    params, source = loading.load_sampler_params(config, ckpt, warn=log)
    if dtype != jnp.float32:
      params["generator"] = loading.cast_params_for_inference(params["generator"], dtype)
    return params, source

  sampler = sampler_lib.make_sampler(config)
  groups: dict[str, list[dict]] = {"fixed": [], "dsa_dmd": [], "dsa_consistency": [], "heuristic": []}
  sources = {}
  params_dmd, sources["dmd"] = load(ckpt_dmd)

  log("(a) fixed steps")
  max_run_dmd = None  # a max-steps run: its confidence trace picks the thresholds when none are given
  for k in sorted({int(k) for k in fixed} | (set() if thresholds else {mx})):
    r = bench.run(sampler, params_dmd, name=f"fixed-{k}", threshold=float("inf"), min_steps=1, max_steps=k,
                  extra={"group": "fixed"})
    if k in {int(f) for f in fixed}:
      groups["fixed"].append(r)
    if k == mx:
      max_run_dmd = r
  fallback_tau = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95)

  def dsa(params, group, max_run, label):
    taus = list(thresholds) if thresholds else _pick(max_run["_arrays"]["conf_trace"], "confidence", targets, mn, mx,
                                                     fallback_tau)
    log(f"{label}: thresholds {[round(t, 4) for t in taus]}")
    for tau in taus:
      groups[group].append(bench.run(sampler, params, name=f"{group}-tau{tau:.3g}", threshold=float(tau),
                                     min_steps=mn, max_steps=mx, extra={"group": group}))

  dsa(params_dmd, "dsa_dmd", max_run_dmd, "(b) DSA, dmd target")
  if ckpt_consistency:
    params_c, sources["consistency"] = load(ckpt_consistency)
    max_run_c = None if thresholds else bench.run(
        sampler, params_c, name=f"consistency-fixed-{mx}", threshold=float("inf"), min_steps=1, max_steps=mx,
        extra={"group": "consistency_reference"})
    dsa(params_c, "dsa_consistency", max_run_c, "(c) DSA, consistency target")
    del params_c
  else:
    log("(c) skipped: no consistency-target checkpoint given")

  log("(d) x0-change heuristic")
  hsampler = heuristic.make_heuristic_sampler(config)
  if deltas:
    ds = list(deltas)
  else:
    never = bench.run(hsampler, params_dmd, name="heuristic-delta0", threshold=0.0, min_steps=mn, max_steps=mx,
                      extra={"group": "heuristic_reference"})
    ds = _pick(never["_arrays"]["conf_trace"], heuristic.RULE, targets, mn, mx, (0.005, 0.01, 0.02, 0.04, 0.08))
  log(f"  deltas {[round(d, 5) for d in ds]}")
  for d in ds:
    groups["heuristic"].append(bench.run(hsampler, params_dmd, name=f"heuristic-delta{d:.3g}", threshold=float(d),
                                         min_steps=mn, max_steps=mx, extra={"group": "heuristic"}))

  verdicts = {"fd": verdict(groups, "fd", True), "agreement": verdict(groups, "agreement", False)}
  table = markdown_table(groups, bench, verdicts)
  paths = {"md": os.path.join(out_dir, "claim.md"), "json": os.path.join(out_dir, "claim.json"),
           "plot": os.path.join(out_dir, "claim.png"), "events": os.path.join(out_dir, "steps_by_event.png")}
  plot_claim(paths["plot"], groups, bench)
  ev_runs = groups["dsa_dmd"] or groups["fixed"]
  plot_steps_by_event(paths["events"], ev_runs, bench.event_names, title="DSA (dmd target): where the steps go")
  header = (f"# Moving digits: quality vs. average steps per frame\n\n"
            f"{bench.num} held-out test prompts, {bench.num_real} real test clips as the FD reference, evaluator "
            f"`{bench.evaluator.path}` (held-out set accuracy "
            f"{_fmt((bench.evaluator.meta.get('evaluator', {}).get('test') or {}).get('set_acc'))}), batch "
            f"{bench.batch}, config `{config.name}`, checkpoints {sources}.\n"
            f"FD +- is the std over {FD_BOOTSTRAP} bootstrap resamples of the generated set. FPS: frames per second "
            f"of steady-state sampling (compilation excluded), one video at a time over the first {bench.fps_prompts} "
            f"prompts (batch 1) and at batch B = {bench.batch} (where a chunk's loop runs until its slowest frame is "
            f"done, so DSA saves less).\n\n")
  with outputs.atomic_path(paths["md"]) as tmp:
    with open(tmp, "w") as f:
      f.write(header + table)
  result = {"benchmark": bench.describe(), "sources": sources, "config": config.name,
            "groups": {g: [public(r) for r in rs] for g, rs in groups.items()}, "verdict": verdicts,
            "seconds": time.time() - t_all}
  outputs.write_json(paths["json"], result)
  log(table)
  log(f"wrote {', '.join(paths.values())}")
  result["paths"] = paths
  return result


def evaluate_teacher(config, ckpt: str, out_dir: str, steps: Sequence[int], *, num: int = 256, evaluator=None,
                     batch: int = 32, seed: int = 0, data_seed: int = 0, num_real: int = 1000, fps_prompts: int = 0,
                     log: Callable[[str], None] = _say) -> dict[str, Any]:
  """Scores a teacher-stage model as a many-step sampler at each of `steps`; writes teacher.json into `out_dir`."""
  del fps_prompts
  from dsa_jax.sampling import outputs
  from dsa_jax.training import checkpointing

  if not ckpt:
    raise BenchmarkError("--ckpt: the teacher model folder (or teacher-stage workdir) to score is required")
  params, meta = checkpointing.load_model_from_workdir(ckpt, config, ("teacher",))
  bench = Benchmark(config, num=num, evaluator=evaluator, data_seed=data_seed, num_real=num_real, batch=batch,
                    seed=seed, fps_prompts=0, log=log)
  runs = [bench.run_teacher(params["teacher"], int(k)) for k in steps]
  os.makedirs(out_dir, exist_ok=True)
  result = {"config": config.name, "checkpoint": {"path": ckpt, "step": meta.get("step")},
            "benchmark": bench.describe(), "runs": [public(r) for r in runs]}
  log(f"wrote {outputs.write_json(os.path.join(out_dir, 'teacher.json'), result)}")
  return result
