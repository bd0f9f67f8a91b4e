"""`dsa-jax data ...`: dataset generation commands.

  dsa-jax data digits --out DIR --num N [--split train|test] [--seed S] [--frames F] [--size S] [--digit-size D]
      [--preview K]

writes the moving-digits benchmark (ArrayRecord clips, prompts.txt, meta.json) and, so that people can look at
what they made, preview.gif (K clips side by side, a coloured strip under each marking its frame's event) and
preview.png (a filmstrip with the event names).

  dsa-jax data ode-pairs --config CFG --out FILE [--num N] [--batch B] [--seed S] [--config.FIELD=VALUE ...]

solves the teacher's ODE (`train.teacher_from`, `train.ode_steps`, `train.ode_guidance`) once for the config's
prompts and stores the trajectories, so that the ode stage reads them (`--config.train.ode_pairs=FILE`) instead of
running the teacher in every step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HELP = "write datasets: moving handwritten digits (clips, prompts, preview)"

def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `data` subcommands to the `data` subparser."""
  sub = parser.add_subparsers(dest="data_command", metavar="DATASET")
  sub.required = True
  p = sub.add_parser("digits", help="write the moving handwritten digits dataset (sklearn digits, no download)",
                     description="Moving handwritten digits: clips with per-frame event labels and prompts.")
  p.add_argument("--out", required=True, help="output directory (one per split)")
  p.add_argument("--num", type=int, required=True, help="number of clips")
  p.add_argument("--split", choices=("train", "test"), default="train",
                 help="which source images to use (train and test images are disjoint)")
  p.add_argument("--seed", type=int, default=0, help="clip seed (the image split does not depend on it)")
  p.add_argument("--frames", type=int, default=16, help="frames per clip (16-32 recommended)")
  p.add_argument("--size", type=int, default=64, help="canvas side in pixels (e.g. 32 or 64)")
  p.add_argument("--digit-size", type=int, default=None, help="digit side in pixels (default 3/8 of --size)")
  p.add_argument("--preview", type=int, default=8, help="clips shown in preview.gif / preview.png (0: none)")
  p.set_defaults(data_main=_digits_main)
  p = sub.add_parser("ode-pairs", help="store the teacher's ODE trajectories for the ode stage (train.ode_pairs)",
                     description="Runs the teacher of a config on its prompts and writes (trajectory, x0) pairs.")
  p.add_argument("--config", required=True, help="config file (path[:arg]); train.teacher_from names the teacher")
  p.add_argument("--out", required=True, help="ArrayRecord file to write (then train with --config.train.ode_pairs)")
  p.add_argument("--num", type=int, default=None, help="number of prompts (default: all of data.prompts)")
  p.add_argument("--batch", type=int, default=1, help="prompts per teacher call")
  p.add_argument("--seed", type=int, default=0, help="noise seed")
  p.set_defaults(data_main=_ode_pairs_main)


def main(args: argparse.Namespace) -> int:
  fn = getattr(args, "data_main", None)
  if fn is None:
    print("dsa-jax data: choose a dataset (digits, ode-pairs)", file=sys.stderr)
    return 2
  return fn(args)


class _Progress:
  """One self-overwriting progress line on stderr (a plain line per 10% when stderr is not a terminal)."""

  def __init__(self, label: str):
    self.label, self.t0, self.last = label, time.time(), -1.0
    self.tty = sys.stderr.isatty()

  def __call__(self, done: int, total: int) -> None:
    frac = done / total
    now = time.time()
    if self.tty:
      if now - self.last < 0.1 and done != total:
        return
      self.last = now
      bar = "#" * int(30 * frac)
      rate = done / max(now - self.t0, 1e-9)
      eta = (total - done) / max(rate, 1e-9)
      end = "\n" if done == total else ""
      print(f"\r{self.label} [{bar:<30}] {done}/{total} {rate:.0f} clips/s eta {eta:.0f}s", end=end,
            file=sys.stderr, flush=True)
    else:
      step = max(total // 10, 1)
      if done % step == 0 or done == total:
        print(f"{self.label}: {done}/{total} ({now - self.t0:.1f}s)", file=sys.stderr, flush=True)


def _digits_main(args: argparse.Namespace) -> int:
  from dsa_jax.data import digits  # pylint: disable=g-import-not-at-top

  try:
    spec = digits.DigitsSpec(frames=args.frames, size=args.size, digit_size=args.digit_size)
  except digits.DigitsConfigError as e:
    print(f"dsa-jax data digits: {e}", file=sys.stderr)
    return 2
  if args.num <= 0:
    print(f"dsa-jax data digits: --num must be positive, got {args.num}", file=sys.stderr)
    return 2
  from dsa_jax.atomic import nearest_existing
  parent = nearest_existing(args.out)
  if not os.path.isdir(parent):
    print(f"dsa-jax data digits: --out {args.out!r}: {parent!r} is a file, expected a folder", file=sys.stderr)
    return 2
  print(f"writing {args.num} {args.split} clips of {spec.frames}x{spec.size}x{spec.size} "
        f"(digits {spec.resolved_digit_size}px, seed {args.seed}) to {args.out}", file=sys.stderr)
  t0 = time.time()
  meta = digits.write_digits(args.out, args.num, split=args.split, seed=args.seed, frames=spec.frames,
                             size=spec.size, digit_size=args.digit_size, progress=_Progress("digits"))
  dt = time.time() - t0
  counts = meta["label_counts"]
  total = sum(counts.values())
  print(f"done in {dt:.1f}s; frames by event: " + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)"
                                                           for k, v in counts.items()), file=sys.stderr)
  print("clips by opening motion: " + ", ".join(f"{k} {v}" for k, v in meta["kind_counts"].items()),
        file=sys.stderr)
  if args.preview > 0:
    source = digits.digits_source(args.out)
    clips = [source[i] for i in range(min(args.preview, len(source)))]
    from dsa_jax.data.preview import write_preview
    for p in write_preview(clips, args.out):
      print(f"preview: {p}", file=sys.stderr)
  for name in (digits.CLIPS_FILE, digits.PROMPTS_FILE, digits.META_FILE):
    print(os.path.join(args.out, name))
  return 0


def _ode_pairs_main(args: argparse.Namespace) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from dsa_jax.config_lib import get_config  # pylint: disable=g-import-not-at-top
  from dsa_jax.training import checkpointing, ode_pairs, trainer  # pylint: disable=g-import-not-at-top
  config = get_config(args.config, args.overrides)
  if not config.train.teacher_from:
    raise ValueError("config.train.teacher_from is empty: ODE pairs need a trained teacher (workdir or model folder)")
  if args.batch < 1 or (args.num is not None and args.num < 1):
    raise ValueError(f"--batch and --num must be positive, got {args.batch} and {args.num}")
  prompt_config = config.copy_and_resolve_references()
  prompt_config.train.update(stage="ode", ode_pairs="")  # the prompts the ode stage would draw
  source = trainer.make_source(prompt_config)
  if getattr(source, "name", None) == trainer.BUILTIN_PROMPTS:
    print(f"dsa-jax data ode-pairs: WARNING: config.data.prompts.path is empty: pairs for {len(source)} built-in "
          "synthetic prompts (fine for smoke tests only)", file=sys.stderr)
  prompts = [source[i] for i in range(min(len(source), args.num or len(source)))]
  if not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"config.data.prompts.kind={config.data.prompts.kind!r}: ODE pairs need text prompts")
  teacher = checkpointing.load_model_from_workdir(config.train.teacher_from, config, ("teacher",))[0]["teacher"]
  text_encoder = trainer.make_text_encoder(config)
  uncond = np.asarray(text_encoder([config.text.negative_prompt]), np.float32)
  t0 = time.time()
  print(f"dsa-jax data ode-pairs: {len(prompts)} prompts, teacher {config.train.teacher_from}, "
        f"{config.train.ode_steps} Euler steps", file=sys.stderr)
  ode_pairs.generate_ode_pairs(config, teacher, prompts, args.out, text_encoder=text_encoder, uncond=uncond,
                               batch_size=args.batch, seed=args.seed)
  print(f"wrote {len(prompts)} pairs in {time.time() - t0:.1f}s; train with --config.train.ode_pairs={args.out}",
        file=sys.stderr)
  print(args.out)
  return 0
