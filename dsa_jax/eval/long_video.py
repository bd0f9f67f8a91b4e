"""Measurements of long videos: time per chunk and peak memory against the length (random weights, any config), and
quality along a long digits video (FD and prompt agreement per window of frames, plotted against time).

  python -m dsa_jax.eval.long_video speed --config wan_1_3b --frames 21,102,204 --window 18 --sink 3 --json s.json
  python -m dsa_jax.eval.long_video drift --out docs/long_video --frames 160 --num 24 --settings 16:0,14:2

`speed` streams one video per length in a fresh process (so peak memory is per length; the per-chunk function is
compiled once per cache shape and shared through the compilation cache) with every frame taking --steps steps.
`drift` samples the shipped digits model for --frames latent frames per setting (whole-video cache, window, window
with sinks) and scores every window of --clip frames (the evaluator's clip length) against real clips.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from dsa_jax.atomic import write_figure, write_text


def _speed_one(config_name: str, frames: int, window: int, sink: int, steps: int) -> dict:
  import jax

  from dsa_jax.config_lib import get_config
  from dsa_jax.data.text_context import make_text_encoder
  from dsa_jax.sampling import sampler as sampler_lib
  from dsa_jax.sampling import stream as stream_lib

  config = get_config(config_name)
  config.sampling.update(window_frames=window, sink_frames=sink)
  sampler = sampler_lib.make_sampler(config, num_frames=frames)
  t0 = time.perf_counter()
  params = sampler.init_params(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda a: a.astype(sampler.dcfg.param_dtype), params)
  context = make_text_encoder(config)(["a long video"])
  controls = sampler.make_controls(1, threshold=np.inf, max_steps=steps, seed=0)
  init_s = time.perf_counter() - t0
  secs = []
  for ch in stream_lib.stream(sampler, params, context, controls):
    secs.append(ch.seconds)
  stats = jax.devices()[0].memory_stats() or {}
  cache = sampler.new_cache(1)
  warm = secs[1:] or secs
  return {"latent_frames": frames, "pixel_frames": 1 + (frames - 1) * int(config.video.vae_stride[0]),
          "chunks": sampler.num_chunks, "window_frames": window, "sink_frames": sink, "steps": steps,
          "cache_frames": sampler.cache_frames, "cache_gib": sum(a.nbytes for a in cache.values()) / 2**30,
          "first_chunk_s": secs[0], "chunk_s_median": statistics.median(warm),
          "chunk_s_last10": statistics.median(secs[-10:]), "chunk_s": secs, "init_s": init_s,
          "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30, "device": jax.devices()[0].device_kind,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # host memory (KiB on Linux)


def speed(args) -> int:
  rows = []
  for window, sink in ((args.window, args.sink), (0, 0)) if args.whole and args.window else ((args.window, args.sink),):
    for f in [int(x) for x in args.frames.split(",")]:
      cmd = [sys.executable, "-m", "dsa_jax.eval.long_video", "_speed_one", "--config", args.config, "--frames",
             str(f), "--window", str(window), "--sink", str(sink), "--steps", str(args.steps)]
      env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                                      "/tmp/dsa_jax_long_video_xla"))
      p = subprocess.run(cmd, capture_output=True, text=True, env=env)
      if p.returncode:
        rows.append({"latent_frames": f, "window_frames": window, "sink_frames": sink,
                     "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"})
      else:
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
      r = rows[-1]
      print(f"window {window:3d} sink {sink}: {f:4d} latent frames: " + (
          f"cache {r['cache_frames']} frames ({r['cache_gib']:.2f} GiB), chunk {r['chunk_s_median'] * 1e3:.0f} ms "
          f"(last 10: {r['chunk_s_last10'] * 1e3:.0f} ms), peak device {r['peak_gib']:.2f} GiB, host RSS "
          f"{r['peak_rss_gib']:.2f} GiB" if "error" not in r
          else r["error"]), flush=True)
      if args.json:  # after every row: a run cut short keeps what it measured
        write_text(args.json, json.dumps(rows, indent=1))
  failed = [r for r in rows if "error" in r]
  if args.json:
    if len(failed) < len(rows):
      plot_speed(rows, os.path.splitext(args.json)[0] + ".png")
    else:
      print("no length ran: no plot", flush=True)
  if failed:
    print(f"{len(failed)} of {len(rows)} runs failed (their errors are above and in the JSON)", flush=True)
  return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------------
# Drift along a long digits video


def drift(args) -> int:
  import jax

  from dsa_jax.checkpoint.loading import load_sampler_params
  from dsa_jax.config_lib import get_config
  from dsa_jax.data import digits
  from dsa_jax.data.text_context import make_text_encoder
  from dsa_jax.eval import claim, metrics
  from dsa_jax.eval import evaluator as ev_lib
  from dsa_jax.sampling import sampler as sampler_lib

  base = get_config("digits")
  clip = int(base.video.num_frames)
  ev = ev_lib.load_evaluator()
  clips = [digits.make_clip(i, split="test", seed=0, frames=clip, size=base.video.height) for i in range(args.num)]
  prompts = [c["prompt"] for c in clips]
  target = metrics.prompts_multi_hot(prompts)
  real = ev_lib.make_clip_arrays(args.num_real, split="test", seed=1, frames=clip, size=base.video.height)
  real_mu, real_cov = metrics.feature_stats(ev.features(real["video"]))
  context = np.asarray(make_text_encoder(base)(prompts), np.float32)
  params, source = load_sampler_params(base, base.sampling.checkpoint, cast=True)
  if args.threshold is None:  # the model's default step budget, picked as `dsa-jax sample` picks it
    from dsa_jax.commands.sample import resolve_budget
    args.threshold, _ = resolve_budget(base, argparse.Namespace(threshold=None, mean_steps=None),
                                       float(base.sampling.threshold), source, base.sampling.checkpoint,
                                       warn=lambda m: print(m, file=sys.stderr, flush=True),
                                       step_range=(int(base.sampling.min_steps), int(base.sampling.max_steps)))
  settings = []
  for item in args.settings.split(","):
    window, sink = (int(v) for v in item.split(":"))
    name = "whole video" if not window else f"window {window}" + (f" + {sink} sinks" if sink else "")
    settings.append((name, window, sink))
  # The FD a perfect generator would get with this many clips (the estimate is biased upward at small n).
  floor = ev_lib.make_clip_arrays(args.num, split="test", seed=2, frames=clip, size=base.video.height)
  floor_fd = metrics.frechet_from_stats(*metrics.feature_stats(ev.features(floor["video"])), real_mu, real_cov)
  results = {"frames": args.frames, "clip": clip, "num": args.num, "stride": args.stride, "threshold": args.threshold,
             "real_floor_fd": floor_fd, "settings": []}
  for name, window, sink in settings:
    config = get_config("digits")
    config.sampling.update(window_frames=window, sink_frames=sink)
    sampler = sampler_lib.make_sampler(config, num_frames=args.frames)
    t0 = time.perf_counter()
    lats, steps = [], []
    for s in range(0, args.num, args.batch):
      ctx = context[s:s + args.batch]
      out = sampler.sample(params, ctx, sampler.make_controls(len(ctx), threshold=args.threshold, seed=s))
      lats.append(np.asarray(out.latents))
      steps.append(np.asarray(out.steps))
    video = claim.latents_to_video(np.concatenate(lats))
    steps = np.concatenate(steps)
    row = {"name": name, "window_frames": window, "sink_frames": sink, "seconds": time.perf_counter() - t0,
           "start": [], "fd": [], "agreement": [], "digit_f1": [], "mean_steps": []}
    for a in range(0, args.frames - clip + 1, args.stride):
      out = ev.outputs(video[:, a:a + clip])
      row["start"].append(a)
      row["fd"].append(metrics.frechet_from_stats(*metrics.feature_stats(out["features"]), real_mu, real_cov))
      agree = metrics.prompt_agreement(out["digit_logits"] > 0, target)
      row["agreement"].append(agree["set_agreement"])
      row["digit_f1"].append(agree["digit_f1"])
      row["mean_steps"].append(float(steps[:, a:a + clip].mean()))
    print(f"{name}: {row['seconds']:.0f} s; FD per window {np.round(row['fd'], 0).tolist()}; agreement "
          f"{np.round(row['agreement'], 2).tolist()}", flush=True)
    results["settings"].append(row)
    if args.gif:
      from dsa_jax.sampling import outputs
      os.makedirs(args.out, exist_ok=True)
      frames = outputs.grid_frames(video[:8], steps[:8], max_steps=len(config.sampling.ladder), cols=8)
      outputs.write_gif(os.path.join(args.out, f"drift_{window}_{sink}.gif"), frames, config.video.fps)
  os.makedirs(args.out, exist_ok=True)
  write_text(os.path.join(args.out, "drift.json"), json.dumps(results, indent=1))
  _plot(results, os.path.join(args.out, "drift.png"))
  return 0


def plot_speed(rows: list, path: str):
  """Median seconds per chunk and KV-cache size against the video length, one line per setting."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  groups = {}
  for r in rows:
    if "chunk_s" in r:
      groups.setdefault((r["window_frames"], r["sink_frames"]), []).append(r)
  for (w, sk), rs in groups.items():
    name = "whole-video cache" if not w else f"window {w}" + (f" + {sk} sinks" if sk else "")
    x = [r["latent_frames"] for r in rs]
    axes[0].plot(x, [r["chunk_s_median"] for r in rs], marker="o", label=name)
    axes[1].plot(x, [r["cache_gib"] * 1024 for r in rs], marker="o", label=name)
  for ax, label in zip(axes, ("median seconds per chunk", "KV cache (MiB, batch 1)")):
    ax.set_xlabel("video length (latent frames)")
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
  axes[0].legend(fontsize=8)
  ok = next(r for r in rows if "error" not in r)
  fig.suptitle(f"{ok['device']}, {ok['steps']} steps per frame", fontsize=9)
  write_figure(fig, path, dpi=110)
  plt.close(fig)


def _plot(results: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for row in results["settings"]:
    x = np.asarray(row["start"]) + results["clip"] / 2
    for ax, key in zip(axes, ("fd", "digit_f1", "mean_steps")):
      ax.plot(x, row[key], marker="o", ms=3, label=row["name"])
  for ax, title in zip(axes, ("FD to real clips (lower is better)", "prompt agreement (digit-set F1)",
                              "mean denoising steps per frame")):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"latent frame (centre of a {results['clip']}-frame window)")
  axes[0].axhline(results["real_floor_fd"], color="#2ca02c", lw=0.8, ls="--", label="real clips")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"digits model, {results['frames']}-frame videos ({results['frames'] // results['clip']}x the trained "
               f"length), {results['num']} prompts, tau {results['threshold']:g}", fontsize=10)
  write_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m dsa_jax.eval.long_video", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("speed")
  s.add_argument("--config", default="wan_1_3b")
  s.add_argument("--frames", default="21,102,204", help="latent frame counts, comma-separated")
  s.add_argument("--window", type=int, default=18)
  s.add_argument("--sink", type=int, default=3)
  s.add_argument("--steps", type=int, default=4)
  s.add_argument("--whole", action="store_true", help="also measure the whole-video cache (no window)")
  s.add_argument("--json", default=None)
  one = sub.add_parser("_speed_one")
  for a, t in (("--config", str), ("--frames", int), ("--window", int), ("--sink", int), ("--steps", int)):
    one.add_argument(a, type=t, required=True)
  d = sub.add_parser("drift")
  d.add_argument("--out", required=True)
  d.add_argument("--frames", type=int, default=160)
  d.add_argument("--num", type=int, default=64)
  d.add_argument("--num-real", type=int, default=500)
  d.add_argument("--batch", type=int, default=32)
  d.add_argument("--settings", default="16:0,14:2", help="window_frames:sink_frames per setting, comma-separated "
                 "(0:0 = the whole-video cache)")
  d.add_argument("--stride", type=int, default=8)
  d.add_argument("--threshold", type=float, default=None,
                 help="confidence threshold (default: the model's step budget, config.sampling.mean_steps)")
  d.add_argument("--gif", action="store_true")
  args = p.parse_args(argv)
  if args.cmd == "_speed_one":
    print(json.dumps(_speed_one(args.config, args.frames, args.window, args.sink, args.steps)))
    return 0
  return speed(args) if args.cmd == "speed" else drift(args)


if __name__ == "__main__":
  sys.exit(main())
