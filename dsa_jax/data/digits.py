"""Moving handwritten digits: a small real-data video benchmark whose difficulty varies within and across clips.

The digits are the 1797 real 8x8 handwritten digits that scikit-learn ships (`load_digits`, no download),
upsampled and moved over a grayscale canvas with wall bounces. DSA needs frames of known difficulty, so clips mix
easy frames (static or slow scenes) with events that make a frame hard to predict from the previous ones:

  label 0 none    nothing new happens
  label 1 enter   a new digit enters from an edge
  label 2 swap    two digits exchange positions (a teleport)
  label 3 cut     a cut to a new scene (new digits, places, speed)
  label 4 speed   a digit suddenly speeds up, slows down, stops or starts
  label 5 bounce  a digit bounces off a wall

A frame carries the label of its hardest event (cut > swap > enter > speed > bounce). Each clip has a prompt in a
small closed grammar, e.g. "digits 3 and 7 move slowly; then an 8 enters; then cut to digit 2 moving fast".
Train and test use disjoint sets of source images (a fixed stratified 80/20 partition of the sklearn images that
does not depend on the clip seed). Clip i of (split, seed) is a pure function of (split, seed, i, sizes), so
`MovingDigitsSource` generates clips on the fly and `write_digits` writes the same clips to ArrayRecord.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence, SupportsIndex

import grain
import numpy as np

from dsa_jax import atomic
from dsa_jax.data import videos

EVENT_NAMES = ("none", "enter", "swap", "cut", "speed", "bounce")
NONE, ENTER, SWAP, CUT, SPEED, BOUNCE = range(6)
_PRIORITY = (CUT, SWAP, ENTER, SPEED, BOUNCE)  # hardest first
KINDS = ("static", "slow", "normal", "fast")  # the clip's opening motion
_KIND_PROBS = (0.2, 0.25, 0.3, 0.25)
# Speed ranges as fractions of the canvas size per frame (so clips look alike at 32 and 64 pixels).
_SPEEDS = {"static": (0.0, 0.0), "slow": (0.004, 0.012), "normal": (0.025, 0.04), "fast": (0.06, 0.09)}
_MAX_SPEED = 0.15
MAX_DIGITS = 3
SPLITS = ("train", "test")
SPLIT_SEED = 20240611  # fixes the partition of the source images; never tied to the clip seed
TEST_FRACTION = 0.2
FORMAT_VERSION = 1
CLIPS_FILE, PROMPTS_FILE, META_FILE = "clips.array_record", "prompts.txt", "meta.json"

# Every word the prompt grammar can produce (for the bag-of-words text encoder).
PROMPT_VOCAB = tuple(sorted(set(
    [str(d) for d in range(10)] +
    "digit digits and stands stand still moves move slowly fast then a an enters the swap places cut to moving "
    "standing speeds up slows down stops starts".split())))


class DigitsConfigError(ValueError):
  """A moving-digits parameter is out of range; the message names it."""


# ----------------------------------------------------------------------------------------------------------------------
# Source images


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
  return images, d.target.astype(np.int32)


def source_images() -> tuple[np.ndarray, np.ndarray]:
  """All sklearn digit images (N, 8, 8) float32 in [0, 1] and their classes (N,)."""
  return _load()


@functools.lru_cache(maxsize=2)
def source_indices(split: str) -> np.ndarray:
  """Indices (into `source_images()`) of the images a split may use; train and test are disjoint.

  Stratified: each class is split 80/20 by a fixed permutation, so every digit class appears in both splits.
  """
  _check_split(split)
  _, labels = _load()
  rng = np.random.default_rng(SPLIT_SEED)
  chosen = []
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    n_test = int(round(TEST_FRACTION * len(idx)))
    chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
  out = np.sort(np.concatenate(chosen))
  out.setflags(write=False)
  return out


def _check_split(split: str):
  if split not in SPLITS:
    raise DigitsConfigError(f"split: expected one of {SPLITS}, got {split!r}")


def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) linear-interpolation matrix (pixel centres aligned)."""
  pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  pos = np.clip(pos, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = pos - lo
  m = np.zeros((n_out, n_in), np.float64)
  m[np.arange(n_out), lo] += 1 - w
  m[np.arange(n_out), hi] += w
  return m


def upsample(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear upsampling of a square image to (size, size), values kept in [0, 1]."""
  m = _resize_matrix(size, image.shape[0])
  return np.clip(m @ image.astype(np.float64) @ m.T, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Clip generation


@dataclasses.dataclass
class _Digit:
  cls: int
  src: int
  sprite: np.ndarray
  x: float
  y: float
  vx: float
  vy: float

  @property
  def speed(self) -> float:
    return float(np.hypot(self.vx, self.vy))


@dataclasses.dataclass(frozen=True)
class DigitsSpec:
  """Sizes of a moving-digits dataset (validated)."""
  frames: int = 16
  size: int = 64
  digit_size: int | None = None  # default: 3/8 of the canvas (24 px at 64, 12 px at 32)

  def __post_init__(self):
    if not (isinstance(self.frames, (int, np.integer)) and 2 <= self.frames <= 1024):
      raise DigitsConfigError(f"frames: expected an int in [2, 1024], got {self.frames!r}")
    if not (isinstance(self.size, (int, np.integer)) and 16 <= self.size <= 1024):
      raise DigitsConfigError(f"size: expected an int in [16, 1024] (canvas side in pixels), got {self.size!r}")
    ds = self.resolved_digit_size
    if not 8 <= ds <= self.size // 2:
      raise DigitsConfigError(f"digit_size: expected an int in [8, size/2={self.size // 2}], got {ds}")

  @property
  def resolved_digit_size(self) -> int:
    return int(self.digit_size) if self.digit_size is not None else max(8, int(round(self.size * 3 / 8)))


def _number_word(c: int) -> str:
  return "an" if c == 8 else "a"


def _digit_list(classes: Sequence[int]) -> str:
  names = [str(c) for c in classes]
  if len(names) == 1:
    return f"digit {names[0]}"
  return "digits " + ", ".join(names[:-1]) + " and " + names[-1]


def _opening_phrase(classes: Sequence[int], kind: str) -> str:
  one = len(classes) == 1
  verb = {"static": "stands still" if one else "stand still",
          "slow": "moves slowly" if one else "move slowly",
          "normal": "moves" if one else "move",
          "fast": "moves fast" if one else "move fast"}[kind]
  return f"{_digit_list(classes)} {verb}"


def _cut_phrase(classes: Sequence[int], kind: str) -> str:
  how = {"static": "standing still", "slow": "moving slowly", "normal": "moving", "fast": "moving fast"}[kind]
  return f"cut to {_digit_list(classes)} {how}"


class _ClipMaker:
  """Builds clip i of a split; all randomness comes from `rng`, seeded by (seed, split, index)."""

  def __init__(self, spec: DigitsSpec, split: str):
    self.spec = spec
    self.size = spec.size
    self.ds = spec.resolved_digit_size
    self.max_pos = float(self.size - self.ds)
    images, labels = _load()
    idx = source_indices(split)
    self.by_class = {c: idx[labels[idx] == c] for c in range(10)}
    self.images = images
    self._sprites: dict[int, np.ndarray] = {}

  def sprite(self, src: int) -> np.ndarray:
    if src not in self._sprites:
      self._sprites[src] = upsample(self.images[src], self.ds)
    return self._sprites[src]

  def speed_for(self, kind: str, rng) -> float:
    lo, hi = _SPEEDS[kind]
    return float(rng.uniform(lo, hi)) * self.size

  def new_digit(self, cls: int, rng, speed: float, x=None, y=None) -> _Digit:
    src = int(rng.choice(self.by_class[cls]))
    x = float(rng.uniform(0, self.max_pos)) if x is None else x
    y = float(rng.uniform(0, self.max_pos)) if y is None else y
    angle = rng.uniform(0, 2 * np.pi)
    return _Digit(cls, src, self.sprite(src), float(x), float(y), float(speed * np.cos(angle)),
                  float(speed * np.sin(angle)))

  def new_scene(self, rng, kind: str, n: int) -> list[_Digit]:
    """`n` digits of distinct classes, placed apart (a digit size between corners if possible) so each is legible
    at first (they may overlap later as they move)."""
    classes = rng.choice(10, size=n, replace=False)
    placed: list[tuple[float, float]] = []
    scene = []
    for c in classes:
      best, best_gap = None, -1.0
      for _ in range(100):
        x, y = (float(v) for v in rng.uniform(0, self.max_pos, size=2))
        gap = min((max(abs(x - px), abs(y - py)) for px, py in placed), default=np.inf)
        if gap > best_gap:
          best, best_gap = (x, y), gap
        if gap >= self.ds:
          break
      x, y = best
      placed.append((x, y))
      scene.append(self.new_digit(int(c), rng, self.speed_for(kind, rng), x=x, y=y))
    return scene

  def render(self, scene: Sequence[_Digit]) -> np.ndarray:
    canvas = np.zeros((self.size, self.size), np.float32)
    for d in scene:
      _paste_max(canvas, d.sprite, d.x, d.y)
    return canvas

  def event_frames(self, rng, n_events: int) -> list[int]:
    frames = self.spec.frames
    candidates = list(range(2, frames - 1))
    for _ in range(50):
      if len(candidates) < n_events:
        break
      chosen = sorted(int(t) for t in rng.choice(candidates, size=n_events, replace=False))
      if all(b - a >= 3 for a, b in zip(chosen, chosen[1:])):
        return chosen
    return sorted(int(t) for t in rng.choice(candidates, size=min(1, len(candidates)), replace=False))

  def make(self, rng: np.random.Generator) -> dict[str, Any]:
    frames = self.spec.frames
    kind = str(rng.choice(KINDS, p=_KIND_PROBS))
    n = int(rng.integers(1, MAX_DIGITS + 1))
    scene = self.new_scene(rng, kind, n)
    phrases = [_opening_phrase([d.cls for d in scene], kind)]
    event_log: list[tuple[int, str]] = []
    if kind == "static" or frames < 6:
      event_at = []
    else:
      max_events = max(1, (frames - 3) // 5)
      n_events = int(rng.choice(4, p=(0.25, 0.4, 0.25, 0.1)))
      event_at = self.event_frames(rng, min(n_events, max_events)) if n_events else []

    video = np.zeros((frames, self.size, self.size, 1), np.uint8)
    labels = np.zeros((frames,), np.int32)
    digit_cls = np.full((frames, MAX_DIGITS), -1, np.int32)
    digit_src = np.full((frames, MAX_DIGITS), -1, np.int32)
    speed = np.zeros((frames,), np.float32)
    scene_kind = kind
    for t in range(frames):
      events: set[int] = set()
      if t in event_at:
        ev, phrase, scene, scene_kind = self.apply_event(rng, scene, scene_kind)
        events.add(ev)
        phrases.append(phrase)
        event_log.append((t, EVENT_NAMES[ev]))
      if t > 0:
        for d in scene:
          d.x += d.vx
          d.y += d.vy
          if _bounce(d, self.max_pos):
            events.add(BOUNCE)
      frame = self.render(scene)
      video[t, :, :, 0] = np.round(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)
      labels[t] = next((e for e in _PRIORITY if e in events), NONE)
      for k, d in enumerate(scene):
        digit_cls[t, k], digit_src[t, k] = d.cls, d.src
      speed[t] = max((d.speed for d in scene), default=0.0)
    return {
        "video": video,
        "prompt": "; then ".join(phrases),
        "labels": labels,
        "digits": digit_cls,
        "sources": digit_src,
        "speed": speed,
        "kind": np.int32(KINDS.index(kind)),
        "_events": event_log,
        "_kind": kind,
    }

  def apply_event(self, rng, scene: list[_Digit], scene_kind: str):
    inside = [d for d in scene if 0.0 <= d.x <= self.max_pos and 0.0 <= d.y <= self.max_pos]
    options = [CUT, SPEED]
    if len(scene) < MAX_DIGITS:
      options.append(ENTER)
    if len(inside) >= 2:
      options.append(SWAP)
    ev = int(rng.choice(options))
    if ev == CUT:
      new_kind = str(rng.choice(KINDS, p=_KIND_PROBS))
      n = int(rng.integers(1, MAX_DIGITS + 1))
      scene = self.new_scene(rng, new_kind, n)
      return ev, _cut_phrase([d.cls for d in scene], new_kind), scene, new_kind
    if ev == ENTER:
      present = {d.cls for d in scene}
      cls = int(rng.choice([c for c in range(10) if c not in present]))
      speed = max(self.speed_for(scene_kind, rng), self.speed_for("normal", rng))
      d = self.new_digit(cls, rng, speed)
      side = int(rng.integers(4))
      outside = -0.6 * self.ds  # 40% of the digit visible on its first frame
      along = float(rng.uniform(0, self.max_pos))
      spread = rng.uniform(-0.5, 0.5)  # direction mostly inward, up to ~30 degrees off the normal
      inward = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]][side], np.float64)
      tangent = np.array([inward[1], inward[0]])
      v = speed * (np.cos(spread) * inward + np.sin(spread) * tangent)
      d.vx, d.vy = float(v[0]), float(v[1])
      if side == 0:
        d.x, d.y = outside, along
      elif side == 1:
        d.x, d.y = self.max_pos - outside, along
      elif side == 2:
        d.x, d.y = along, outside
      else:
        d.x, d.y = along, self.max_pos - outside
      return ev, f"{_number_word(cls)} {cls} enters", scene + [d], scene_kind
    if ev == SWAP:
      i, j = rng.choice(len(inside), size=2, replace=False)
      a, b = inside[int(i)], inside[int(j)]
      a.x, b.x = b.x, a.x
      a.y, b.y = b.y, a.y
      return ev, f"the {a.cls} and the {b.cls} swap places", scene, scene_kind
    # SPEED: a sudden change of one digit's speed (direction kept unless it starts from rest).
    d = scene[int(rng.integers(len(scene)))]
    s = d.speed
    cap = _MAX_SPEED * self.size
    if s < 1e-6:
      new = max(self.speed_for("normal", rng), self.speed_for(str(rng.choice(["normal", "fast"])), rng))
      angle = rng.uniform(0, 2 * np.pi)
      d.vx, d.vy = float(new * np.cos(angle)), float(new * np.sin(angle))
      return ev, f"the {d.cls} starts moving", scene, scene_kind
    choice = str(rng.choice(["up", "down", "stop"], p=(0.5, 0.3, 0.2)))
    if choice == "up" and min(s * 3.0, cap) < 1.5 * s:
      choice = "down"
    if choice == "up":
      factor = min(float(rng.uniform(2.5, 4.0)) * s, cap) / s
      phrase = f"the {d.cls} speeds up"
    elif choice == "down":
      factor = float(rng.uniform(0.1, 0.3))
      phrase = f"the {d.cls} slows down"
    else:
      factor = 0.0
      phrase = f"the {d.cls} stops"
    d.vx, d.vy = float(d.vx * factor), float(d.vy * factor)
    return ev, phrase, scene, scene_kind


def _bounce(d: _Digit, max_pos: float) -> bool:
  """Reflects a digit that moves out through a wall; digits entering from outside move inward and pass."""
  hit = False
  if d.x < 0 and d.vx < 0:
    d.x, d.vx, hit = -d.x, -d.vx, True
  elif d.x > max_pos and d.vx > 0:
    d.x, d.vx, hit = 2 * max_pos - d.x, -d.vx, True
  if d.y < 0 and d.vy < 0:
    d.y, d.vy, hit = -d.y, -d.vy, True
  elif d.y > max_pos and d.vy > 0:
    d.y, d.vy, hit = 2 * max_pos - d.y, -d.vy, True
  return hit


def _paste_max(canvas: np.ndarray, sprite: np.ndarray, x: float, y: float) -> None:
  """Max-composites `sprite` with its top-left corner at sub-pixel (x, y) (bilinear shift), clipped to the canvas."""
  x, y = float(x), float(y)
  ix, iy = int(np.floor(x)), int(np.floor(y))
  fx, fy = x - ix, y - iy
  h, w = sprite.shape
  shifted = np.zeros((h + 1, w + 1), np.float32)
  # float32 weights: the same position must render to the same bytes whatever scalar type it arrived as
  for (dy, dx), wgt in (((0, 0), (1 - fy) * (1 - fx)), ((0, 1), (1 - fy) * fx), ((1, 0), fy * (1 - fx)),
                        ((1, 1), fy * fx)):
    shifted[dy:dy + h, dx:dx + w] += np.float32(wgt) * sprite
  H, W = canvas.shape
  y0, x0 = max(iy, 0), max(ix, 0)
  y1, x1 = min(iy + h + 1, H), min(ix + w + 1, W)
  if y1 <= y0 or x1 <= x0:
    return
  part = shifted[y0 - iy:y1 - iy, x0 - ix:x1 - ix]
  np.maximum(canvas[y0:y1, x0:x1], part, out=canvas[y0:y1, x0:x1])


_SPLIT_IDS = {"train": 0, "test": 1}


def make_clip(index: int, *, split: str = "train", seed: int = 0, frames: int = 16, size: int = 64,
              digit_size: int | None = None, with_info: bool = False) -> dict[str, Any]:
  """Clip `index` of the (split, seed) dataset.

  Returns `video` (F, size, size, 1) uint8, `prompt` str, `labels` (F,) int32 event labels, `digits` (F, 3) int32
  digit classes per slot (-1 = empty), `sources` (F, 3) int32 sklearn image indices per slot, `speed` (F,)
  float32 fastest digit's speed in px/frame, `kind` () int32 index into KINDS. With `with_info`, also
  `events` [(frame, name)] and `kind_name`.
  """
  _check_split(split)
  spec = DigitsSpec(frames=frames, size=size, digit_size=digit_size)
  if not (isinstance(index, (int, np.integer)) and index >= 0):
    raise DigitsConfigError(f"index: expected a non-negative int, got {index!r}")
  return _make(_maker(spec, split), index, split, seed, with_info)


@functools.lru_cache(maxsize=8)
def _maker(spec: DigitsSpec, split: str) -> _ClipMaker:
  return _ClipMaker(spec, split)


def _make(maker: _ClipMaker, index: int, split: str, seed: int, with_info: bool) -> dict[str, Any]:
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _SPLIT_IDS[split], int(index), FORMAT_VERSION])
  clip = maker.make(rng)
  events, kind = clip.pop("_events"), clip.pop("_kind")
  if with_info:
    clip["events"], clip["kind_name"] = events, kind
  return clip


class MovingDigitsSource(grain.sources.RandomAccessDataSource):
  """`num` moving-digits clips generated on the fly (same clips as `write_digits` with the same arguments)."""

  def __init__(self, num: int, *, split: str = "train", seed: int = 0, frames: int = 16, size: int = 64,
               digit_size: int | None = None):
    _check_split(split)
    if not (isinstance(num, (int, np.integer)) and num > 0):
      raise DigitsConfigError(f"num: expected a positive int, got {num!r}")
    self.num, self.split, self.seed = int(num), split, int(seed)
    self.spec = DigitsSpec(frames=frames, size=size, digit_size=digit_size)

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, record_key: SupportsIndex) -> dict[str, Any]:
    i = record_key.__index__()
    if i < 0:
      i += self.num
    if not 0 <= i < self.num:
      raise IndexError(f"MovingDigitsSource: index {i} out of range for {self.num} clips")
    return _make(_maker(self.spec, self.split), i, self.split, self.seed, False)

  def __getitems__(self, record_keys: Sequence[SupportsIndex]) -> list[dict[str, Any]]:
    return [self[k] for k in record_keys]

  def __repr__(self) -> str:
    return (f"MovingDigitsSource(num={self.num}, split={self.split!r}, seed={self.seed}, frames={self.spec.frames}, "
            f"size={self.spec.size})")


class DigitsPromptSource(MovingDigitsSource):
  """The prompts of `MovingDigitsSource` clips (data-free distillation stages train on prompts only)."""

  def __getitem__(self, record_key: SupportsIndex) -> str:
    return super().__getitem__(record_key)["prompt"]


# ----------------------------------------------------------------------------------------------------------------------
# Writing and reading


def write_digits(out_dir: str | os.PathLike, num: int, split: str = "train", seed: int = 0, frames: int = 16,
                 size: int = 64, *, digit_size: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
  """Writes `num` clips to `out_dir/clips.array_record`, their prompts to `prompts.txt`, and `meta.json`.

  Use one directory per split. Files are written atomically (meta.json last, so its presence marks a complete
  dataset). Returns the metadata dict. `progress(done, total)` is called after each clip.
  """
  _check_split(split)
  if not (isinstance(num, (int, np.integer)) and num > 0):
    raise DigitsConfigError(f"num: expected a positive int, got {num!r}")
  spec = DigitsSpec(frames=frames, size=size, digit_size=digit_size)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  maker = _maker(spec, split)
  prompts, clips_info = [], []
  label_counts = np.zeros(len(EVENT_NAMES), np.int64)
  kind_counts = {k: 0 for k in KINDS}
  with videos.VideoRecordWriter(os.path.join(out_dir, CLIPS_FILE)) as writer:
    for i in range(int(num)):
      clip = _make(maker, i, split, seed, True)
      extras = {k: clip[k] for k in ("digits", "sources", "speed", "kind")}
      writer.write(clip["video"], clip["prompt"], clip["labels"], extras)
      prompts.append(clip["prompt"])
      clips_info.append({"prompt": clip["prompt"], "kind": clip["kind_name"],
                         "events": [[t, name] for t, name in clip["events"]]})
      label_counts += np.bincount(clip["labels"], minlength=len(EVENT_NAMES))
      kind_counts[clip["kind_name"]] += 1
      if progress is not None:
        progress(i + 1, int(num))
  atomic.write_text(os.path.join(out_dir, PROMPTS_FILE), "\n".join(prompts) + "\n")
  meta = {
      "dataset": "moving_digits",
      "format_version": FORMAT_VERSION,
      "split": split,
      "num": int(num),
      "seed": int(seed),
      "frames": spec.frames,
      "size": spec.size,
      "digit_size": spec.resolved_digit_size,
      "channels": 1,
      "dtype": "uint8",
      "files": {"clips": CLIPS_FILE, "prompts": PROMPTS_FILE},
      "record_keys": ["video", "prompt", "labels", "digits", "sources", "speed", "kind"],
      "event_names": list(EVENT_NAMES),
      "kinds": list(KINDS),
      "label_counts": {name: int(c) for name, c in zip(EVENT_NAMES, label_counts)},
      "kind_counts": kind_counts,
      "source_images": {"dataset": "sklearn.datasets.load_digits", "split_seed": SPLIT_SEED,
                        "test_fraction": TEST_FRACTION, "num_images": int(len(source_indices(split)))},
      "prompt_vocab": list(PROMPT_VOCAB),
      "clips": clips_info,
  }
  atomic.write_text(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=1) + "\n")
  return meta


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
  """The meta.json of a written digits dataset (FileNotFoundError naming the path if absent)."""
  path = os.path.join(os.fspath(data_dir), META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} not found: not a complete moving-digits dataset (run `dsa-jax data digits`)")
  with open(path, encoding="utf-8") as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise DigitsConfigError(f"{path!r}: invalid JSON ({e})") from None
  if meta.get("dataset") != "moving_digits":
    raise DigitsConfigError(f"{path!r}: dataset {meta.get('dataset')!r}, expected 'moving_digits'")
  return meta


def digits_source(data_dir: str | os.PathLike) -> videos.VideoClipSource:
  """The clips of a written digits dataset directory, as a grain source."""
  read_meta(data_dir)
  return videos.VideoClipSource(os.path.join(os.fspath(data_dir), CLIPS_FILE))


# ----------------------------------------------------------------------------------------------------------------------
# Preview

EVENT_COLORS = np.array([[60, 60, 60], [40, 200, 60], [255, 150, 0], [230, 30, 30], [40, 120, 255], [230, 220, 40]],
                        np.uint8)  # indexed by label


def preview_frames(clips: Sequence[dict[str, Any]], *, scale: int = 2, strip: int = 4, pad: int = 2
                   ) -> np.ndarray:
  """(F, H, W, 3) uint8 frames showing clips side by side, each over a strip coloured by its frame's event label."""
  if not clips:
    raise ValueError("preview_frames: no clips")
  frames = max(c["video"].shape[0] for c in clips)
  tiles = []
  for c in clips:
    v = c["video"]
    if v.dtype != np.uint8:
      v = np.clip((v.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    v = np.repeat(np.repeat(v, scale, axis=1), scale, axis=2)
    v = np.broadcast_to(v, v.shape[:3] + (3,)) if v.shape[-1] == 1 else v[..., :3]
    labels = c.get("labels")
    labels = np.zeros(v.shape[0], np.int32) if labels is None else np.asarray(labels)
    bar = np.broadcast_to(EVENT_COLORS[np.clip(labels, 0, len(EVENT_COLORS) - 1)][:, None, None, :],
                          (v.shape[0], strip * scale // 2 + 1, v.shape[2], 3))
    tile = np.concatenate([v, bar], axis=1)
    if tile.shape[0] < frames:  # hold the last frame
      tile = np.concatenate([tile, np.repeat(tile[-1:], frames - tile.shape[0], axis=0)], axis=0)
    tiles.append(np.pad(tile, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=255))
  h = max(t.shape[1] for t in tiles)
  tiles = [np.pad(t, ((0, 0), (0, h - t.shape[1]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
  return np.concatenate(tiles, axis=2)
