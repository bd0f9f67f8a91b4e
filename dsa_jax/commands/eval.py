"""Evaluates a digits model on held-out prompts: Fréchet distance to real clips, prompt agreement, steps, FPS.

Three actions (a positional word; `run` when omitted):

  dsa-jax eval --config configs/digits.py --ckpt runs/digits/dsa/model --out out/eval [--num 256]
      [--thresholds 0.5 0.8 inf] [--fixed 1 4] [--evaluator DIR]
    samples N test-split prompts once per threshold (and per fixed step count) and writes OUT/eval.json (metrics per
    run), OUT/samples.gif (a grid of samples of the first run; the strip under each frame shows its steps, green =
    1 ... red = max) and OUT/steps_by_event.png (steps per frame against the frames' event labels, as predicted
    by the evaluator on the generated frames, and per frame index).

  dsa-jax eval sweep --config configs/digits.py --ckpt DMD_MODEL --ckpt-consistency CONS_MODEL --out docs/claim
      [--num 256] [--thresholds ...] [--deltas ...]
    the quality-vs-steps comparison (also `--sweep`): fixed 1-5 steps, DSA (dmd and consistency targets) at >= 5
    thresholds and the x0-change heuristic at several deltas; writes claim.md, claim.json, claim.png,
    steps_by_event.png (see dsa_jax/eval/claim.py).

  dsa-jax eval train-evaluator --out dsa_jax/assets/evaluator [--steps 1200] [--size 32 --frames 16]
    trains the evaluator once on the real training split (see dsa_jax/eval/evaluator.py); the repo ships its output.

The evaluator defaults to the shipped one (dsa_jax/assets/evaluator). Metrics: FD between the evaluator's 64-d clip
features of generated and real test clips (with the FD of a disjoint real set as the floor a perfect model reaches
with N samples); agreement = fraction of clips whose predicted digit set equals the prompt's, and per-clip F1;
FPS = frames per second of steady-state sampling (compilation excluded), one video at a time over the first
--fps-prompts prompts (batch 1: where DSA's savings show) and at --batch. For a stable FD use --num >= 256: with
fewer samples than feature dimensions (64) the FD is dominated by estimation bias (see the real-data floor).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

HELP = "FD, prompt agreement, steps and FPS on held-out digits prompts; the claim sweep; the evaluator"

ACTIONS = ("run", "sweep", "train-evaluator")


def add_arguments(p):
  p.add_argument("action", nargs="?", default="run", choices=ACTIONS,
                 help="run (default): evaluate one checkpoint; sweep: the claim table; train-evaluator")
  p.add_argument("--sweep", action="store_true", help="same as the action 'sweep'")
  p.add_argument("--config", default=None, help="config file (path[:arg]); required for run and sweep")
  p.add_argument("--ckpt", default=None, help="model checkpoint folder or training workdir (default: "
                 "config.sampling.checkpoint; empty string: random weights); the dmd-target model for sweep")
  p.add_argument("--ckpt-consistency", default=None, help="sweep: the consistency-target model (optional)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--num", type=int, default=256, help="held-out prompts to sample (default 256)")
  p.add_argument("--thresholds", nargs="+", default=None, help="confidence thresholds (numbers, inf, -inf); run: "
                 "default config.sampling.threshold; sweep: default picked from a max-steps run")
  p.add_argument("--fixed", nargs="+", type=int, default=None, help="run: also sample with these fixed step "
                 "counts; sweep: default 1 2 3 4 5")
  p.add_argument("--deltas", nargs="+", type=float, default=None, help="sweep: x0-change thresholds of the heuristic")
  p.add_argument("--evaluator", default=None, help="evaluator checkpoint (default: dsa_jax/assets/evaluator)")
  p.add_argument("--batch", type=int, default=32, help="prompts per compiled sampling batch (default 32)")
  p.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt (prompt i gets seed+i)")
  p.add_argument("--data-seed", type=int, default=0, help="seed of the test-split clips (prompts and references)")
  p.add_argument("--num-real", type=int, default=1000, help="real test clips for the FD reference (default 1000)")
  p.add_argument("--gif-clips", type=int, default=16, help="samples shown in samples.gif (default 16)")
  p.add_argument("--fps-prompts", type=int, default=8, help="prompts sampled one at a time for the batch-1 FPS "
                 "(default 8; 0: skip)")
  # train-evaluator
  p.add_argument("--steps", type=int, default=1200, help="train-evaluator: training steps (default 1200)")
  p.add_argument("--train-batch", type=int, default=16, help="train-evaluator: clips per step (default 16)")
  p.add_argument("--size", type=int, default=None, help="train-evaluator: canvas size (default: --config's, else 32)")
  p.add_argument("--frames", type=int, default=None, help="train-evaluator: clip frames (default: --config's, else 16)")
  p.add_argument("--num-train", type=int, default=6000, help="train-evaluator: training clips generated (default 6000)")


def parse_thresholds(values) -> list[float]:
  out = []
  for text in values:
    try:
      v = float(text)
    except (TypeError, ValueError):
      raise ValueError(f"--thresholds: expected numbers (inf and -inf allowed), got {text!r}") from None
    if math.isnan(v):
      raise ValueError(f"--thresholds: expected numbers (inf and -inf allowed), got {text!r}")
    out.append(v)
  return out


def _say(msg):
  print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


STEP_COLORS = np.array([[40, 180, 60], [150, 200, 40], [240, 200, 30], [245, 130, 30], [220, 40, 40],
                        [150, 20, 120], [90, 20, 160], [40, 40, 160]], np.uint8)


def grid_frames(video, steps, *, max_steps: int, cols: int = 8, scale: int = 3, strip: int = 3, pad: int = 2
                ) -> np.ndarray:
  """(N, F, H, W, 1) in [-1, 1] + steps (N, F) -> (F, H', W', 3) uint8 grid; a strip under each tile coloured by
  the frame's steps (green = 1 step ... red = max_steps)."""
  video = np.asarray(video, np.float32)
  n, f, h, w, _ = video.shape
  cols = min(cols, n)
  rows = -(-n // cols)
  th, tw = h * scale + strip, w * scale
  out = np.full((f, rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, np.uint8)
  px = np.round((np.clip(video, -1, 1) + 1) * 127.5).astype(np.uint8)
  px = np.repeat(np.repeat(px, scale, axis=2), scale, axis=3)
  for i in range(n):
    r, c = divmod(i, cols)
    y, x = pad + r * (th + pad), pad + c * (tw + pad)
    out[:, y:y + h * scale, x:x + tw] = px[i]
    k = np.clip(np.asarray(steps[i]) - 1, 0, len(STEP_COLORS) - 1)
    if max_steps <= 5:
      k = np.clip(np.round((np.asarray(steps[i]) - 1) * 4 / max(max_steps - 1, 1)), 0, 4).astype(int)
    out[:, y + h * scale:y + th, x:x + tw] = STEP_COLORS[k][:, None, None, :]
  return out


def write_outputs(out_dir: str, runs: list[dict], bench, config, *, gif_clips: int = 16) -> dict[str, str]:
  from dsa_jax.eval import claim
  from dsa_jax.sampling import outputs

  paths = {}
  first = runs[0]
  n = min(gif_clips, first["_arrays"]["video"].shape[0])
  frames = grid_frames(first["_arrays"]["video"][:n], first["_arrays"]["steps"][:n],
                       max_steps=int(first.get("max_steps") or len(config.sampling.ladder)))
  paths["gif"] = outputs.write_gif(os.path.join(out_dir, "samples.gif"), frames, config.video.fps)
  varied = [r for r in runs if r.get("group") != "fixed"] or runs  # fixed-step bars are flat: show DSA runs
  paths["events"] = claim.plot_steps_by_event(os.path.join(out_dir, "steps_by_event.png"), varied, bench.event_names,
                                              title=f"{config.name}: steps per frame against event labels")
  return paths


# ----------------------------------------------------------------------------------------------------------------------
# Actions


def evaluate(config, ckpt: str, out_dir: str, *, num: int = 256, thresholds=None, fixed=None, evaluator=None,
             batch: int = 32, seed: int = 0, data_seed: int = 0, num_real: int = 1000, gif_clips: int = 16,
             fps_prompts: int = 8, log=_say) -> dict:
  """Samples `num` held-out prompts per setting, scores them and writes eval.json, samples.gif, steps_by_event.png."""
  import jax
  import jax.numpy as jnp

  from dsa_jax.eval import claim
  from dsa_jax.models.dit import _DTYPES
  from dsa_jax.sampling import outputs
  from dsa_jax.sampling import sampler as sampler_lib

  claim.check_pixel_config(config)
  thresholds = [float(config.sampling.threshold)] if not thresholds else list(thresholds)
  L = len(config.sampling.ladder)
  for k in fixed or ():
    if not 1 <= k <= L:
      raise ValueError(f"--fixed: step counts must lie in [1, {L}] (sampling.ladder), got {k}")
  os.makedirs(out_dir, exist_ok=True)
  warn = lambda m: print(m, file=sys.stderr, flush=True)
  params, source = sampler_lib.load_sampler_params(config, ckpt, warn=warn)
  dtype = _DTYPES[config.compute.dtype]
  if dtype != jnp.float32:
    params["generator"] = sampler_lib.cast_params_for_inference(params["generator"], dtype)
  bench = claim.Benchmark(config, num=num, evaluator=evaluator, data_seed=data_seed, num_real=num_real, batch=batch,
                          seed=seed, fps_prompts=fps_prompts, log=log)
  sampler = sampler_lib.make_sampler(config)
  log(f"sampling on {jax.devices()[0].device_kind}, weights: {source.get('path', 'random')}")
  runs = []
  for tau in thresholds:
    runs.append(bench.run(sampler, params, name=f"dsa-tau{tau:g}", threshold=tau, extra={"group": "dsa"}))
  for k in fixed or ():
    runs.append(bench.run(sampler, params, name=f"fixed-{k}", threshold=float("inf"), min_steps=1, max_steps=k,
                          extra={"group": "fixed"}))
  paths = write_outputs(out_dir, runs, bench, config, gif_clips=gif_clips)
  result = {"config": config.name, "checkpoint": source, "benchmark": bench.describe(),
            "runs": [claim.public(r) for r in runs]}
  paths["json"] = outputs.write_json(os.path.join(out_dir, "eval.json"), result)
  log(f"wrote {', '.join(paths.values())}")
  result["paths"] = paths
  return result


def _train_evaluator(args, config):
  from dsa_jax.eval import evaluator as ev_lib
  size = args.size or (config.video.height if config is not None else 32)
  frames = args.frames or (config.video.num_frames if config is not None else 16)
  summary = ev_lib.train_evaluator(args.out, steps=args.steps, batch=args.train_batch, seed=args.seed, size=size,
                                   frames=frames, num_train=args.num_train)
  summary.pop("params", None)
  _say(f"evaluator: held-out set accuracy {summary['test']['set_acc']:.4f}, {summary['bytes'] / 1e6:.2f} MB at "
       f"{summary['path']}")
  return 0


def main(args):
  from dsa_jax.config_lib import get_config

  action = "sweep" if args.sweep else args.action
  if args.sweep and args.action not in ("run", "sweep"):
    raise ValueError(f"--sweep conflicts with the action {args.action!r}")
  if args.num < 2:
    raise ValueError(f"--num: need at least 2 prompts, got {args.num}")
  if args.batch < 1:
    raise ValueError(f"--batch: must be >= 1, got {args.batch}")
  config = get_config(args.config, args.overrides) if args.config else None
  if action == "train-evaluator":
    return _train_evaluator(args, config)
  if config is None:
    raise ValueError(f"--config: required for the action {action!r}")
  ckpt = config.sampling.checkpoint if args.ckpt is None else args.ckpt
  thresholds = parse_thresholds(args.thresholds) if args.thresholds else None
  common = dict(num=args.num, evaluator=args.evaluator, batch=args.batch, seed=args.seed, data_seed=args.data_seed,
                num_real=args.num_real, fps_prompts=args.fps_prompts)
  if action == "sweep":
    from dsa_jax.eval.claim import run_claim
    run_claim(config, ckpt, args.ckpt_consistency, args.out, thresholds=thresholds, deltas=args.deltas,
              fixed=tuple(args.fixed) if args.fixed else (1, 2, 3, 4, 5), **common)
    return 0
  evaluate(config, ckpt, args.out, thresholds=thresholds, fixed=args.fixed, gif_clips=args.gif_clips, **common)
  return 0
