"""Writing samples: video (mp4 via imageio-ffmpeg, gif via Pillow), per-frame steps JSON and a steps/confidence plot.

Every file is written under a temporary name in the target folder and renamed into place, so a reader (or a crash)
never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np

from dsa_jax.atomic import atomic_path, write_figure

VIDEO_FORMATS = ("mp4", "gif")


def slugify(text: str, max_len: int = 48) -> str:
  """'A red ball, bouncing!' -> 'a_red_ball_bouncing' (ASCII letters, digits, '_'; never empty)."""
  s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
  s = s[:max_len].rstrip("_")
  return s or "sample"


def quantize_frames(x, xp=np):
  """(..., 1 or 3) float32 pixels in [-1, 1] -> (..., 3) uint8 with `xp` = numpy (host) or jax.numpy (device, see
  `decode.pixels_to_uint8`): NaN -> 0, clipped, round half to even, 1 channel repeated."""
  if x.shape[-1] == 1:
    x = xp.repeat(x, 3, axis=-1)
  x = xp.nan_to_num(x, nan=0.0)
  return xp.round((xp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(xp.uint8)


def to_uint8(pixels) -> np.ndarray:
  """(T, H, W, C) floats in [-1, 1] -> (T, H, W, 3) uint8 (1 channel is repeated); uint8 frames pass through."""
  x = np.asarray(pixels)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"pixels: expected (T, H, W, 1 or 3), got {x.shape}")
  if x.dtype == np.uint8:
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
  return quantize_frames(x.astype(np.float32))


def _even(frames: np.ndarray) -> np.ndarray:
  """Pads H and W to even sizes (yuv420p needs them) by repeating the last row/column."""
  t, h, w, c = frames.shape
  ph, pw = h % 2, w % 2
  if ph or pw:
    frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
  return frames


def write_mp4(path: str, frames: np.ndarray, fps: float) -> str:
  """(T, H, W, 3) uint8 -> H.264 mp4."""
  import imageio.v2 as imageio
  frames = _even(np.asarray(frames, np.uint8))
  with atomic_path(path) as tmp, warnings.catch_warnings():
    # ffmpeg runs as a subprocess; Python warns that forking a multithreaded (JAX) process is risky, but the child
    # only execs ffmpeg.
    warnings.filterwarnings("ignore", message=".*fork.*", category=RuntimeWarning)
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=float(fps), codec="libx264", quality=8,
                                macro_block_size=2, ffmpeg_log_level="error")
    try:
      for f in frames:
        writer.append_data(f)
    finally:
      writer.close()
  return path


def write_gif(path: str, frames: np.ndarray, fps: float) -> str:
  """(T, H, W, 3) uint8 -> looping gif."""
  import imageio.v3 as iio
  frames = np.asarray(frames, np.uint8)
  with atomic_path(path) as tmp:
    iio.imwrite(tmp, frames, extension=".gif", duration=max(int(round(1000.0 / fps)), 10), loop=0)
  return path


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray) or type(x).__module__.startswith("jax"):  # numpy and jax arrays alike
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    x = float(x)
    if math.isnan(x):
      return None
    if math.isinf(x):
      return "inf" if x > 0 else "-inf"
    return x
  if isinstance(x, np.bool_):
    return bool(x)
  return x


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


def write_json(path: str, obj) -> str:
  """JSON with numpy values converted; nan -> null, +-inf -> "inf"/"-inf" (strict JSON)."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(_jsonable(obj), f, indent=2, allow_nan=False)
      f.write("\n")
  return path


def plot_steps(path: str, steps: Sequence[int], confidences: Sequence[float], *, chunk_frames: int,
               threshold: Optional[float] = None, min_steps: Optional[int] = None, max_steps: Optional[int] = None,
               title: str = "", stop_rule: str = "confidence") -> str:
  """Bar chart of denoising steps per latent frame (chunks shaded) and the final confidence per frame (under the
  x0-change rule the frame's last x0 change, on a scale of its own)."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  steps = np.asarray(steps)
  conf = np.asarray(confidences, np.float32)
  f = len(steps)
  frames = np.arange(f)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * f + 2.0), 3.6), dpi=100)
  try:
    colors = ["#4c72b0" if (i // chunk_frames) % 2 == 0 else "#6f9bd1" for i in frames]
    ax.bar(frames, steps, color=colors, label="steps")
    ax.set_xlabel("latent frame (chunks alternate shade)")
    ax.set_ylabel("denoising steps")
    top = int(max(int(steps.max()) if f else 1, max_steps or 1))
    ax.set_ylim(0, top + 0.5)
    ax.set_yticks(range(0, top + 1))
    if min_steps is not None:
      ax.axhline(min_steps, color="#999999", lw=0.8, ls=":")
    ax2 = ax.twinx()
    score = "confidence" if stop_rule == "confidence" else "x0 change"
    ax2.plot(frames, conf, color="#dd8452", marker="o", ms=3, lw=1.2, label=score)
    if stop_rule == "confidence":
      ax2.set_ylim(0, 1)
    else:
      finite = conf[np.isfinite(conf)]
      ax2.set_ylim(0, max(float(finite.max()) if finite.size else 0.0,
                          threshold if threshold is not None and np.isfinite(threshold) else 0.0, 1e-6) * 1.15)
    ax2.set_ylabel(f"{score} (last step)")
    if threshold is not None and np.isfinite(threshold):
      ax2.axhline(threshold, color="#dd8452", lw=0.8, ls="--", label=f"tau = {threshold:g}")
    mean = float(steps.mean()) if f else 0.0
    ax.set_title((title + "  " if title else "") + f"mean {mean:.2f} steps/frame", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7)
    write_figure(fig, path)
  finally:
    plt.close(fig)
  return path


def write_sample(out_dir: str, name: str, pixels, record: dict, *, fps: float, chunk_frames: int,
                 formats: Iterable[str] = VIDEO_FORMATS) -> dict:
  """Writes <name>.mp4/.gif (pixels (T, H, W, C) in [-1, 1], or uint8 frames), <name>.steps.json (`record`) and <name>.steps.png.

  `record` needs 'steps' and 'confidences' (per latent frame); 'threshold', 'min_steps', 'max_steps' are plotted
  when present, 'stop_rule' names the plotted score. Returns {kind: path}.
  """
  formats = list(formats)
  bad = [f for f in formats if f not in VIDEO_FORMATS]
  if bad:
    raise ValueError(f"video formats: expected some of {VIDEO_FORMATS}, got {bad}")
  # checked before anything is written: a bad record left a video without its JSON or plot
  missing = [k for k in ("steps", "confidences") if k not in record]
  if missing:
    raise ValueError(f"record: needs {missing} (per latent frame of this video)")
  steps, conf = np.asarray(record["steps"]), np.asarray(record["confidences"])
  if steps.ndim != 1 or conf.shape != steps.shape:
    raise ValueError(f"record: 'steps' and 'confidences' must be one value per latent frame of one video, shape (F,), "
                     f"got {steps.shape} and {conf.shape} (take sample i of a batch: out.steps[i])")
  record = {**record, "steps": steps, "confidences": conf}
  paths = {}
  frames = to_uint8(pixels)
  if "mp4" in formats:
    paths["mp4"] = write_mp4(os.path.join(out_dir, name + ".mp4"), frames, fps)
  if "gif" in formats:
    paths["gif"] = write_gif(os.path.join(out_dir, name + ".gif"), frames, fps)
  paths["json"] = write_json(os.path.join(out_dir, name + ".steps.json"), record)

  def scalar(v):
    return None if v is None or np.ndim(v) else float(v)

  th = record.get("threshold")
  paths["png"] = plot_steps(os.path.join(out_dir, name + ".steps.png"), record["steps"], record["confidences"],
                            chunk_frames=chunk_frames, threshold=scalar(th) if not isinstance(th, str) else None,
                            min_steps=scalar(record.get("min_steps")), max_steps=scalar(record.get("max_steps")),
                            title=name, stop_rule=str(record.get("stop_rule", "confidence")))
  return paths
