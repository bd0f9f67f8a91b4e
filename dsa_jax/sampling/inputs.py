"""What a long or continued video starts from: given frames (a video or an image, read, fitted to the config's size
and encoded to latents) and a prompt schedule (which prompt from which frame on).

Given frames are fitted by scaling to cover the config's height x width and cropping the centre. They are encoded by
`config.vae.kind`: 'identity' (pixel-space recipes: the frames are the latents, grey for 1 channel) or 'wan' (the
Wan2.1 VAE: 1 + 4k pixel frames give 1 + k latent frames; extra frames are dropped from the start, so the video
continues from the last given frame). 'none' has no encoder: pass latents to the Python API instead.

A schedule is "FRAME:PROMPT; FRAME:PROMPT; ..." or a JSON file (an object {"FRAME": "PROMPT", ...} or a list of
{"frame": FRAME, "prompt": PROMPT}). FRAMEs are latent frame indices, multiples of video.chunk_frames, increasing,
starting at 0: the prompt switches at the chunk that starts there.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
VIDEO_EXTS = (".mp4", ".gif")


# ----------------------------------------------------------------------------------------------------------------------
# Given frames


def read_frames(path: str, flag: str) -> np.ndarray:
  """An mp4/gif/png/jpg file -> (T, H, W, 3) uint8; unreadable or empty files are a ValueError naming `flag`."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in IMAGE_EXTS + VIDEO_EXTS:
    raise ValueError(f"{flag}: {path!r}: expected an mp4, gif, png or jpg file")
  if not os.path.isfile(path):
    raise ValueError(f"{flag}: {path!r} does not exist")
  try:
    if ext == ".mp4":
      import imageio_ffmpeg
      gen = imageio_ffmpeg.read_frames(path)
      meta = next(gen)
      w, h = meta["size"]
      frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen]
    else:
      from PIL import Image, ImageSequence
      with Image.open(path) as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
  except Exception as e:  # noqa: BLE001 - any decoder failure is the same user error
    raise ValueError(f"{flag}: cannot read {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})"
                     ) from None
  if not frames:
    raise ValueError(f"{flag}: {path!r} holds zero frames")
  if ext in IMAGE_EXTS:
    frames = frames[:1]
  return np.stack(frames).astype(np.uint8)


def fit_frames(frames, height: int, width: int) -> tuple[np.ndarray, Optional[str]]:
  """(T, H, W, 3) uint8 -> ((T, height, width, 3) float32 in [-1, 1], a message when the size changed): scaled to
  cover height x width, then centre-cropped."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f"frames: expected (T, H, W, 3) with T >= 1, got {frames.shape}")
  t, h, w, _ = frames.shape
  note = None
  if (h, w) != (height, width):
    from PIL import Image
    scale = max(height / h, width / w)
    sh, sw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (sh - height) // 2, (sw - width) // 2
    out = []
    for f in frames:
      im = Image.fromarray(f.astype(np.uint8)).resize((sw, sh), Image.BICUBIC)
      out.append(np.asarray(im)[top:top + height, left:left + width])
    frames = np.stack(out)
    note = f"resized {w}x{h} to cover {width}x{height} and cropped the centre"
  return frames.astype(np.float32) / 127.5 - 1.0, note


def encode_frames(config, pixels, vae=None) -> tuple[np.ndarray, Optional[str]]:
  """(T, H, W, 3) in [-1, 1] at the config's size -> ((P, h, w, C) latents, a message when frames were dropped).

  vae: (WanVAE, params) for vae.kind 'wan' (the sampling decoder's); loaded from config.vae.path when None.
  """
  kind = config.vae.kind
  pixels = np.asarray(pixels, np.float32)
  if kind == "identity":
    c = config.video.latent_channels
    return (pixels.mean(-1, keepdims=True) if c == 1 else pixels), None
  if kind != "wan":
    raise ValueError(f"config.vae.kind={kind!r} has no encoder for given frames (use a config with vae.kind "
                     f"'identity' or 'wan', or pass latents to the Python API)")
  if vae is None:
    from dsa_jax.checkpoint.loading import load_vae
    from dsa_jax.models import vae as vae_lib
    from dsa_jax.models.dit import _DTYPES
    vcfg, params = load_vae(config.vae.path)
    vae = (vae_lib.WanVAE(vcfg, dtype=_DTYPES[config.compute.dtype]), params)
  model, params = vae
  tf = int(config.video.vae_stride[0])
  t = pixels.shape[0]
  keep = 1 + (t - 1) // tf * tf
  note = None if keep == t else f"dropped the first {t - keep} of {t} frames (the VAE takes 1 + {tf}k frames)"
  import jax
  lat = model.encode(params, jax.numpy.asarray(pixels[t - keep:][None]), chunked=True)
  return np.asarray(lat[0], np.float32), note


def load_init(config, path: str, flag: str, vae=None, say: Callable[[str], None] = print) -> np.ndarray:
  """A video/image file -> (P, h, w, C) latents to continue from, with a message for what was changed."""
  frames = read_frames(path, flag)
  pixels, note = fit_frames(frames, config.video.height, config.video.width)
  latents, dropped = encode_frames(config, pixels, vae)
  notes = "; ".join(n for n in (note, dropped) if n)
  say(f"{flag}: {len(frames)} frame(s) from {path} -> {latents.shape[0]} latent frame(s)" +
      (f" ({notes})" if notes else ""))
  return latents


# ----------------------------------------------------------------------------------------------------------------------
# Prompt schedule


def parse_schedule(text: str, flag: str = "--prompt-schedule") -> list[tuple[int, str]]:
  """'0:digit 3 moves fast; 8:an 8 enters' or a .json file -> [(0, 'digit 3 moves fast'), (8, 'an 8 enters')]."""
  if text.strip().lower().endswith(".json"):
    def no_repeats(pairs):
      keys = [k for k, _ in pairs]
      repeated = sorted({k for k in keys if keys.count(k) > 1})
      if repeated:  # json keeps the last of a repeated key without a word
        raise ValueError(f"{flag}: {text.strip()!r}: frame {repeated[0]!r} is given more than once")
      return dict(pairs)

    try:
      with open(text.strip()) as f:
        data = json.load(f, object_pairs_hook=no_repeats)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{flag}: cannot read {text.strip()!r} as JSON ({e})") from None
    if isinstance(data, dict):
      items = list(data.items())
    elif isinstance(data, list) and all(isinstance(d, dict) and set(d) == {"frame", "prompt"} for d in data):
      items = [(d["frame"], d["prompt"]) for d in data]
    else:
      raise ValueError(f"{flag}: {text.strip()!r}: expected an object {{\"FRAME\": \"PROMPT\"}} or a list of "
                       f"{{\"frame\": FRAME, \"prompt\": PROMPT}}")
  else:
    items = []
    for part in text.split(";"):
      if not part.strip():
        continue
      frame, sep, prompt = part.partition(":")
      if not sep:
        raise ValueError(f"{flag}: expected 'FRAME:PROMPT; FRAME:PROMPT; ...', got {part.strip()!r}")
      items.append((frame.strip(), prompt))
  out = []
  for frame, prompt in items:
    if isinstance(frame, str):  # from the text form or a JSON object's keys
      frame = frame.strip()
      f = int(frame) if frame.lstrip("-").isdigit() else None
    else:  # a JSON number: 8, not 8.5 or true
      f = frame if isinstance(frame, int) and not isinstance(frame, bool) else None
    if f is None:
      raise ValueError(f"{flag}: frame {frame!r} is not a whole number")
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"{flag}: the prompt at frame {f} is empty")
    out.append((f, prompt.strip()))
  if not out:
    raise ValueError(f"{flag}: the schedule is empty")
  return out


def schedule_index(schedule, num_frames: int, chunk_frames: int, flag: str = "--prompt-schedule") -> np.ndarray:
  """[(frame, prompt), ...] -> (num_chunks,) int32: the schedule entry of each chunk (checked: chunk-aligned,
  increasing, starting at 0, inside the video)."""
  frames = [f for f, _ in schedule]
  if frames[0] != 0:
    raise ValueError(f"{flag}: the schedule must start at frame 0, got {frames[0]}")
  for a, b in zip(frames, frames[1:]):
    if b <= a:
      raise ValueError(f"{flag}: frames must increase, got {a} then {b}")
  for f in frames:
    if f % chunk_frames or f >= num_frames:
      raise ValueError(f"{flag}: frame {f} must be a multiple of video.chunk_frames = {chunk_frames} below the "
                       f"video's {num_frames} latent frames")
  starts = np.arange(num_frames // chunk_frames) * chunk_frames
  return (np.searchsorted(np.asarray(frames), starts, side="right") - 1).astype(np.int32)
