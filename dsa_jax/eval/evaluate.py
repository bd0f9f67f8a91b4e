"""`dsa-jax eval`'s run: samples held-out digits prompts per threshold (and fixed step counts), scores them with
the evaluator (FD, prompt agreement, steps, FPS: see `claim.Benchmark`) and writes eval.json, samples.gif (a grid
whose strip under each frame shows its steps) and steps_by_event.png.
"""

from __future__ import annotations

import os
import sys


def _say(msg):
  print(msg, flush=True)


def write_outputs(out_dir: str, runs: list[dict], bench, config, *, gif_clips: int = 16) -> dict[str, str]:
  from dsa_jax.eval import claim
  from dsa_jax.sampling import outputs

  paths = {}
  first = runs[0]
  n = min(gif_clips, first["_arrays"]["video"].shape[0])
  if n > 0:  # --gif-clips 0: no samples.gif
    frames = outputs.grid_frames(first["_arrays"]["video"][:n], first["_arrays"]["steps"][:n],
                                 max_steps=int(first.get("max_steps") or len(config.sampling.ladder)))
    paths["gif"] = outputs.write_gif(os.path.join(out_dir, "samples.gif"), frames, config.video.fps)
  varied = [r for r in runs if r.get("group") != "fixed"] or runs  # fixed-step bars are flat: show DSA runs
  paths["events"] = claim.plot_steps_by_event(os.path.join(out_dir, "steps_by_event.png"), varied, bench.event_names,
                                              title=f"{config.name}: steps per frame against event labels")
  return paths


def evaluate(config, ckpt: str, out_dir: str, *, num: int = 256, thresholds=None, fixed=None, evaluator=None,
             batch: int = 32, seed: int = 0, data_seed: int = 0, num_real: int = 1000, gif_clips: int = 16,
             fps_prompts: int = 8, log=_say) -> dict:
  """Samples `num` held-out prompts per setting, scores them and writes eval.json, samples.gif, steps_by_event.png."""
  import jax

  from dsa_jax.checkpoint.loading import load_sampler_params
  from dsa_jax.eval import claim
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
  params, source = load_sampler_params(config, ckpt, warn=warn, cast=True)
  bench = claim.Benchmark(config, num=num, evaluator=evaluator, data_seed=data_seed, num_real=num_real, batch=batch,
                          seed=seed, fps_prompts=fps_prompts, log=log)
  sampler = sampler_lib.make_sampler(config)
  log(f"sampling on {jax.devices()[0].device_kind}, weights: {source.get('path', 'random')}")
  runs = []
  for tau in thresholds:
    runs.append(bench.run(sampler, params, name=f"dsa-tau{tau:g}", threshold=tau, extra={"group": "dsa"}))
  for k in fixed or ():
    runs.append(bench.run_fixed(sampler, params, k, extra={"group": "fixed"}))
  result = {"config": config.name, "checkpoint": source, "benchmark": bench.describe(),
            "runs": [claim.public(r) for r in runs]}
  # the scores first: they cost the sampling, the pictures are cheap to redo
  paths = {"json": outputs.write_json(os.path.join(out_dir, "eval.json"), result)}
  paths.update(write_outputs(out_dir, runs, bench, config, gif_clips=gif_clips))
  log(f"wrote {', '.join(paths.values())}")
  result["paths"] = paths
  return result
