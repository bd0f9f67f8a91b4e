"""Previews of generated clips: an animated GIF and a filmstrip PNG with each frame's event label."""

from __future__ import annotations

import os

from dsa_jax.atomic import atomic_path, write_figure


def write_preview(clips, out_dir: str, *, fps: float = 8.0, scale: int = 2) -> list[str]:
  """Writes preview.gif and preview.png for a few clips; returns the paths written."""
  import imageio.v2 as imageio
  from dsa_jax.data import digits

  frames = digits.preview_frames(clips, scale=scale)
  gif = os.path.join(out_dir, "preview.gif")
  with atomic_path(gif) as tmp:
    imageio.mimsave(tmp, list(frames), duration=1000.0 / fps, loop=0)
  paths = [gif]
  try:
    paths.append(_write_filmstrip(clips, os.path.join(out_dir, "preview.png")))
  except ImportError:
    pass
  return paths


def _write_filmstrip(clips, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from dsa_jax.data import digits

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
  write_figure(fig, path, layout=False, dpi=110)
  plt.close(fig)
  return path
