"""`dsa-jax data ...`: dataset generation commands.

  dsa-jax data digits --out DIR --num N [--split train|test] [--seed S] [--frames F] [--size S] [--digit-size D]
      [--preview K]

writes the moving-digits benchmark (ArrayRecord clips, prompts.txt, meta.json) and, so that people can look at
what they made, preview.gif (K clips side by side, a coloured strip under each marking its frame's event) and
preview.png (a filmstrip with the event names).
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


def main(args: argparse.Namespace) -> int:
  fn = getattr(args, "data_main", None)
  if fn is None:
    print("dsa-jax data: choose a dataset (digits)", file=sys.stderr)
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


def write_preview(clips, out_dir: str, *, fps: float = 8.0, scale: int = 2) -> list[str]:
  """Writes preview.gif and preview.png for a few clips; returns the paths written."""
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  from dsa_jax.data import digits  # pylint: disable=g-import-not-at-top

  frames = digits.preview_frames(clips, scale=scale)
  gif = os.path.join(out_dir, "preview.gif")
  tmp = gif + ".tmp.gif"
  imageio.mimsave(tmp, list(frames), duration=1000.0 / fps, loop=0)
  os.replace(tmp, gif)
  paths = [gif]
  try:
    paths.append(_write_filmstrip(clips, os.path.join(out_dir, "preview.png")))
  except ImportError:
    pass
  return paths


def _write_filmstrip(clips, path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from dsa_jax.data import digits  # pylint: disable=g-import-not-at-top

  n = len(clips)
  frames = max(c["video"].shape[0] for c in clips)
  fig, axes = plt.subplots(n, frames, figsize=(frames * 0.75, n * 0.95 + 0.3), squeeze=False)
  for r, c in enumerate(clips):
    for t in range(frames):
      ax = axes[r, t]
      ax.set_xticks([])
      ax.set_yticks([])
      if t >= c["video"].shape[0]:
        ax.axis("off")
        continue
      ax.imshow(c["video"][t, :, :, 0], cmap="gray", vmin=0, vmax=255)
      label = int(c["labels"][t])
      if label:
        color = digits.EVENT_COLORS[label] / 255.0
        for s in ax.spines.values():
          s.set_edgecolor(color)
          s.set_linewidth(2.5)
        ax.set_title(digits.EVENT_NAMES[label], fontsize=6, color=color, pad=1)
    axes[r, 0].set_ylabel(str(r), fontsize=7)
    text = c["prompt"] if len(c["prompt"]) < 140 else c["prompt"][:137] + "..."
    axes[r, 0].text(0, -0.45, f"{r}: {text}", transform=axes[r, 0].transAxes, fontsize=6, ha="left", va="bottom")
  fig.subplots_adjust(left=0.02, right=0.99, top=0.97, bottom=0.01, wspace=0.05, hspace=0.7)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path


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
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    print(f"dsa-jax data digits: --out {args.out!r} is a file, expected a folder", file=sys.stderr)
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
    for p in write_preview(clips, args.out):
      print(f"preview: {p}", file=sys.stderr)
  for name in (digits.CLIPS_FILE, digits.PROMPTS_FILE, digits.META_FILE):
    print(os.path.join(args.out, name))
  return 0


def _standalone(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="dsa-jax data")
  add_arguments(parser)
  return main(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(_standalone())
