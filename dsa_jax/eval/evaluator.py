"""The moving-digits evaluator: a small video classifier whose features and logits score generated clips.

Trained once on the real training split (clips generated on the fly by `dsa_jax.data.digits`) and shipped in
`dsa_jax/assets/evaluator/`, so every model is scored by the same fixed network (as FID scores with a fixed
Inception). It gives two things:
  * `features`: a 64-d clip embedding (the penultimate layer) for the Fréchet distance between real and generated
    clips (quality). Auxiliary heads (per-frame event label, opening motion kind) make these features depend on
    motion and temporal consistency, not only on which digits are drawn.
  * `digit_logits`: 10 multi-label logits, "digit d appears somewhere in the clip", for the agreement of a
    generated clip with its prompt (semantics).

Input convention: video float in [-1, 1] (the pixel-space digits latents), shape (B, F, H, W, 1) channels-last;
uint8 clips are converted inside (`to_float`). Network: a per-frame CNN (3 convs of stride 2, GroupNorm) -> a
presence feature (spatial max + mean pooling; per-frame digit logits) and a position feature (a coarse 4x4 map,
so motion is visible) -> the features and their frame-to-frame change through two residual temporal convs ->
mean+max pooling over frames -> 64-d clip feature -> clip heads (digits, motion kind); per-frame event logits.

Training (about 4 minutes on 2 CPU cores): the CNN learns per-frame digit presence on random, augmented frames
(affine warps, contrast, noise) of many clips; the temporal part and the clip heads learn on whole clips above a
stop-gradient (see `EvaluatorConfig.trunk_grad_scale`). The shipped checkpoint's held-out (test-split) numbers are
in its dsa_meta.json under evaluator.test.

  dsa-jax eval train-evaluator --out dsa_jax/assets/evaluator --steps 1200
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETWORK = "evaluator"
NUM_DIGITS = 10
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "evaluator")


class EvaluatorError(ValueError):
  """The evaluator checkpoint or its input does not fit; the message names what was expected."""


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
  """Architecture of the evaluator (stored as meta['arch']['evaluator'])."""
  size: int = 32          # canvas side the network was trained on
  frames: int = 16        # clip length it was trained on (other lengths work: temporal ops are length-free)
  channels: tuple = (32, 64, 128)
  strides: tuple = (2, 2, 2)
  frame_dim: int = 128
  pos_channels: int = 16
  pos_dim: int = 64
  feature_dim: int = 64
  num_events: int = 6
  num_kinds: int = 4
  # How much of the clip-level losses' gradient reaches the per-frame encoder. A clip is 16 near-copies of a frame;
  # gradients from clip batches kept the CNN from learning the digits (measured: frame digit loss stuck at the prior
  # for 300 steps), so the encoder learns from decorrelated random frames and the clip heads sit on top of it.
  trunk_grad_scale: float = 0.0

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["channels"], d["strides"] = list(self.channels), list(self.strides)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "EvaluatorConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise EvaluatorError(f"evaluator arch: unknown fields {unknown}")
    d = dict(d)
    for k in ("channels", "strides"):
      if k in d:
        d[k] = tuple(d[k])
    return cls(**d)


def _dense(n: int, names: tuple, name: str) -> nn.Dense:
  return nn.Dense(n, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]), name=name)


def _norm_inits(axis: str) -> dict:
  return {"scale_init": nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
          "bias_init": nn.with_logical_partitioning(nn.initializers.zeros, (axis,))}


def _max_over(x, axis: int):
  """The max over `axis` with its gradient routed to the (first) arg-max by a gather. `jnp.max`'s gradient finds the
  maximum again by comparing the operand with the result and divides by the number of matches: where the compiler
  recomputes the operand with other rounding in the backward pass (XLA:CPU without backend optimisation does), no
  element matches and the gradient is 0 / 0 = NaN."""
  idx = jax.lax.stop_gradient(jnp.argmax(x, axis=axis, keepdims=True))
  return jnp.squeeze(jnp.take_along_axis(x, idx, axis=axis), axis)


class DigitsEvaluator(nn.Module):
  cfg: EvaluatorConfig

  @nn.compact
  def __call__(self, video):
    """video (B, F, H, W, 1) in [-1, 1] -> dict(features (B, D), digit_logits (B, 10), kind_logits (B, 4),
    event_logits (B, F, 6), frame_digit_logits (B, F, 10))."""
    c = self.cfg
    if video.ndim != 5:
      raise EvaluatorError(f"evaluator input: expected (B, F, H, W, C), got shape {video.shape}")
    b, f, h, w, ch = video.shape
    x = video.reshape(b * f, h, w, ch).astype(jnp.float32)
    for i, (n, stride) in enumerate(zip(c.channels, c.strides)):
      x = nn.Conv(n, (3, 3), strides=(stride, stride), padding="SAME", name=f"conv{i}",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                           (None, None, "conv_in", "conv_out")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))(x)
      x = nn.gelu(nn.GroupNorm(num_groups=8, name=f"gn{i}", **_norm_inits("conv_out"))(x))
    # presence branch (translation-invariant pooling: which digits are drawn) -> per-frame digit logits
    pooled = jnp.concatenate([_max_over(x.reshape(x.shape[0], -1, x.shape[-1]), 1), jnp.mean(x, axis=(1, 2))], -1)
    zp = _dense(c.frame_dim, (None, "embed"), "frame_proj")(pooled)
    zp = nn.gelu(nn.LayerNorm(name="frame_norm", **_norm_inits("embed"))(zp)).reshape(b, f, c.frame_dim)
    frame_digit_logits = _dense(NUM_DIGITS, ("embed", None), "frame_digit_head")(zp)
    # clip-level losses reach the shared CNN only scaled by trunk_grad_scale (see EvaluatorConfig)
    g = c.trunk_grad_scale
    x = g * x + (1.0 - g) * jax.lax.stop_gradient(x)
    zp = g * zp + (1.0 - g) * jax.lax.stop_gradient(zp)
    # position branch (a coarse map of where things are): lets the temporal part see motion
    q = nn.Conv(c.pos_channels, (1, 1), name="pos_reduce",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, "conv_in", "conv_out")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))(x)
    zq = _dense(c.pos_dim, (None, "embed"), "pos_proj")(q.reshape(b * f, -1))
    zq = nn.gelu(nn.LayerNorm(name="pos_norm", **_norm_inits("embed"))(zq)).reshape(b, f, c.pos_dim)
    z = jnp.concatenate([zp, zq], -1)
    # temporal part: frame features and their change from the previous frame, two residual convs over frames
    # (kernel 3: together they see 5 frames, enough for a change of velocity)
    d = z.shape[-1]
    diff = z - jnp.concatenate([z[:, :1], z[:, :-1]], axis=1)
    h = _dense(d, (None, "embed"), "temporal_in")(jnp.concatenate([z, diff], -1))
    for i in range(2):
      t = nn.LayerNorm(name=f"temporal_norm{i}", **_norm_inits("embed"))(h)
      t = nn.Conv(d, (3,), padding="SAME", name=f"temporal{i}",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed", "mlp")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(t)
      h = h + nn.gelu(t)
    z = nn.LayerNorm(name="norm", **_norm_inits("embed"))(h)
    event_logits = _dense(c.num_events, ("embed", None), "event_head")(z)
    clip = jnp.concatenate([jnp.mean(z, axis=1), _max_over(z, 1)], -1)
    feats = _dense(c.feature_dim, (None, "embed"), "feature_proj")(clip)
    hfeat = nn.gelu(feats)
    return {
        "features": feats,
        "digit_logits": _dense(NUM_DIGITS, ("embed", None), "digit_head")(hfeat),
        "kind_logits": _dense(c.num_kinds, ("embed", None), "kind_head")(hfeat),
        "event_logits": event_logits,
        "frame_digit_logits": frame_digit_logits,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Data


def to_input(video) -> np.ndarray:
  """uint8 (.., H, W, C) in [0, 255] -> float32 in [-1, 1]; float input is taken to be in [-1, 1] already."""
  v = np.asarray(video)
  if v.dtype == np.uint8:
    return v.astype(np.float32) / 127.5 - 1.0
  return v.astype(np.float32)


def digit_set_target(digits: np.ndarray) -> np.ndarray:
  """(F, 3) per-frame digit slots (-1 = empty) -> (10,) float32 multi-hot of the digits the clip shows."""
  present = np.unique(np.asarray(digits))
  out = np.zeros((NUM_DIGITS,), np.float32)
  present = present[(present >= 0) & (present < NUM_DIGITS)]
  out[present] = 1.0
  return out


def frame_digit_targets(digits: np.ndarray) -> np.ndarray:
  """(F, 3) per-frame digit slots -> (F, 10) float32 multi-hot per frame (a dense training signal)."""
  d = np.asarray(digits)
  out = np.zeros((d.shape[0], NUM_DIGITS), np.float32)
  rows, cols = np.nonzero((d >= 0) & (d < NUM_DIGITS))
  out[rows, d[rows, cols]] = 1.0
  return out


def _clip_record(clip: dict) -> tuple:
  return (clip["video"], digit_set_target(clip["digits"]), np.asarray(clip["labels"], np.int32),
          np.int32(clip["kind"]), frame_digit_targets(clip["digits"]))


def _make_range(split: str, seed: int, frames: int, size: int, start: int, stop: int) -> dict[str, np.ndarray]:
  from dsa_jax.data import digits
  recs = [_clip_record(digits.make_clip(i, split=split, seed=seed, frames=frames, size=size))
          for i in range(start, stop)]
  return {k: np.stack([r[j] for r in recs]) for j, k in enumerate(_RECORD_KEYS)}


_RECORD_KEYS = ("video", "digits", "labels", "kind", "frame_digits")


def make_clip_arrays(num: int, *, split: str, seed: int, frames: int, size: int, workers: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
  """`num` real clips of a split as arrays: video (N, F, H, W, 1) uint8, digits (N, 10) multi-hot, labels (N, F)
  event labels, kind (N,), frame_digits (N, F, 10) multi-hot per frame.

  Generation costs ~8 ms a clip in Python, so large pools are split over `workers` child processes (fresh
  interpreters started with `python -m dsa_jax.eval.evaluator --_gen`, which neither fork a process that runs XLA
  threads nor re-import the caller's main module as multiprocessing's spawn would). Same clips either way.
  """
  if num <= 0:
    raise EvaluatorError(f"num: expected a positive number of clips, got {num}")
  workers = min(os.cpu_count() or 1, 4) if workers is None else max(1, int(workers))
  if workers <= 1 or num < 1000:
    out = _make_range(split, seed, frames, size, 0, num)
    if progress:
      progress(num, num)
    return out
  import subprocess
  import tempfile
  bounds = np.linspace(0, num, workers + 1).astype(int)
  with tempfile.TemporaryDirectory(prefix="dsa_eval_clips_") as tmp:
    procs = []
    for w in range(workers):
      path = os.path.join(tmp, f"part{w}.npz")
      cmd = [sys.executable, "-m", "dsa_jax.eval.evaluator", "--_gen", split, str(seed), str(frames), str(size),
             str(bounds[w]), str(bounds[w + 1]), path]
      env = dict(os.environ, JAX_PLATFORMS="cpu")
      root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
      procs.append((subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE), path))
    parts = []
    for p, path in procs:
      _, err = p.communicate()
      if p.returncode != 0:
        raise RuntimeError(f"clip generation worker failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
      with np.load(path) as z:
        parts.append({k: z[k] for k in _RECORD_KEYS})
      if progress:
        progress(sum(len(q["kind"]) for q in parts), num)
  return {k: np.concatenate([q[k] for q in parts]) for k in _RECORD_KEYS}


def _gen_main(argv: Sequence[str]) -> int:
  """Worker entry: writes clips [start, stop) of (split, seed) to an .npz."""
  split, seed, frames, size, start, stop, path = argv
  arrays = _make_range(split, int(seed), int(frames), int(size), int(start), int(stop))
  from dsa_jax.atomic import atomic_path
  with atomic_path(path) as tmp:
    np.savez(tmp, **arrays)
  return 0


# ----------------------------------------------------------------------------------------------------------------------
# Training


def augment_frames(key, frames, *, max_rot: float = 0.2, scale=(0.85, 1.15), max_shear: float = 0.15,
                   max_shift: float = 2.0, contrast=(0.7, 1.0), max_noise: float = 0.08):
  """Random affine warp (rotation, scale, shear, shift), contrast and Gaussian noise of (N, H, W, 1) frames in [-1, 1].

  The training split has ~1400 source images; warping them is what makes the evaluator recognise the unseen
  writers of the test split, and noise/contrast make it tolerant of imperfect generated frames.
  """
  n, h, w, _ = frames.shape
  ks = jax.random.split(key, 7)
  u = lambda k, lo, hi, shape=(n,): jax.random.uniform(k, shape, jnp.float32, lo, hi)
  rot, sc, sh = u(ks[0], -max_rot, max_rot), u(ks[1], *scale), u(ks[2], -max_shear, max_shear)
  shift = u(ks[3], -max_shift, max_shift, (n, 2))
  cos, sin = jnp.cos(rot), jnp.sin(rot)
  # forward map A = scale * R(rot) @ Shear; sample the input at A^-1 (p - centre) + centre - shift
  a = jnp.stack([jnp.stack([cos, cos * sh - sin], -1), jnp.stack([sin, sin * sh + cos], -1)], -2) * sc[:, None, None]
  a_inv = jnp.linalg.inv(a)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
  p = jnp.stack([yy.ravel(), xx.ravel()])  # (2, H*W)
  src = jnp.einsum("nij,jk->nik", a_inv, p) + jnp.array([cy, cx])[None, :, None] - shift[:, :, None]

  def warp(img, coords):
    return jax.scipy.ndimage.map_coordinates(img, [coords[0], coords[1]], order=1, mode="constant", cval=-1.0)

  out = jax.vmap(warp)(frames[..., 0].astype(jnp.float32), src).reshape(n, h, w, 1)
  out = -1.0 + (out + 1.0) * u(ks[4], *contrast)[:, None, None, None]
  noise = u(ks[5], 0.0, max_noise)[:, None, None, None] * jax.random.normal(ks[6], out.shape)
  return out + noise


def _loss_fn(params, model, video, digits, labels, kind, frames, frames_digits, aux_weight, event_weights):
  """Per-frame digit BCE on random frames of many clips (trains the frame encoder) + clip digit-set BCE and aux
  motion-kind / per-frame event CE on a batch of clips (train the temporal part and the heads; see
  `EvaluatorConfig.trunk_grad_scale`)."""
  out = model.apply({"params": params}, video)
  digit_loss = jnp.mean(optax_sigmoid_bce(out["digit_logits"], digits))
  frame_out = model.apply({"params": params}, frames[:, None])  # random frames as 1-frame clips
  frame_loss = jnp.mean(optax_sigmoid_bce(frame_out["frame_digit_logits"][:, 0], frames_digits))
  kind_loss = jnp.mean(optax_softmax_ce(out["kind_logits"], kind))
  w = event_weights[labels]  # events are rare (84% of frames have none): class-balanced so the head detects them
  event_loss = jnp.sum(w * optax_softmax_ce(out["event_logits"], labels)) / jnp.sum(w)
  loss = digit_loss + frame_loss + aux_weight * (kind_loss + event_loss)
  pred = out["digit_logits"] > 0
  set_acc = jnp.mean(jnp.all(pred == (digits > 0.5), axis=-1))
  frame_acc = jnp.mean((frame_out["frame_digit_logits"][:, 0] > 0) == (frames_digits > 0.5))
  return loss, {"loss": loss, "digit_loss": digit_loss, "frame_loss": frame_loss, "kind_loss": kind_loss,
                "event_loss": event_loss, "set_acc": set_acc, "frame_digit_acc": frame_acc}


def optax_sigmoid_bce(logits, targets):
  import optax
  return optax.sigmoid_binary_cross_entropy(logits, targets)


def optax_softmax_ce(logits, labels):
  import optax
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def init_params(cfg: EvaluatorConfig, seed: int = 0):
  """Unboxed float32 parameters of a fresh evaluator."""
  model = DigitsEvaluator(cfg)
  dummy = jnp.zeros((1, max(cfg.frames, 2), cfg.size, cfg.size, 1), jnp.float32)
  return nn.unbox(model.init(jax.random.PRNGKey(seed), dummy)["params"])


def _fmt_time(s: float) -> str:
  s = max(0, int(s))
  return f"{s // 60}m{s % 60:02d}s"


def train_evaluator(out_dir: str | None, steps: int = 1200, batch: int = 16, seed: int = 0, size: int = 32,
                    frames: int = 16, *, frame_batch: int = 256, num_train: int = 6000, num_test: int = 1000,
                    lr: float = 3e-3, aux_weight: float = 0.3, augment: bool = True, workers: int | None = None,
                    log_every: int = 50,
                    log: Callable[[str], None] | None = None, cfg: EvaluatorConfig | None = None) -> dict:
  """Trains the evaluator on real training-split clips and (if `out_dir`) saves it; returns a summary dict.

  Clips come from `digits.make_clip` (train split, `seed`): a pool of `num_train` clips is generated once and
  sampled with replacement (`batch` clips and `frame_batch` random, augmented frames a step), so steps*batch may
  exceed the pool. Held-out accuracy is measured on `num_test` test-split clips (disjoint source images).
  Progress lines: step, loss, set accuracy, it/s, ETA.
  """
  import optax

  from dsa_jax.checkpoint.params_io import save_params

  log = log or (lambda s: print(s, flush=True))
  if steps < 1 or batch < 1:
    raise EvaluatorError(f"steps and batch must be positive, got steps={steps}, batch={batch}")
  cfg = cfg or EvaluatorConfig(size=size, frames=frames)
  if (cfg.size, cfg.frames) != (size, frames):
    cfg = dataclasses.replace(cfg, size=size, frames=frames)
  t0 = time.time()
  train = make_clip_arrays(num_train, split="train", seed=seed, frames=frames, size=size, workers=workers)
  test = make_clip_arrays(num_test, split="test", seed=seed + 1, frames=frames, size=size, workers=workers)
  log(f"evaluator data: {num_train} train + {num_test} test clips ({frames}x{size}x{size}) in "
      f"{time.time() - t0:.1f}s")

  model = DigitsEvaluator(cfg)
  params = init_params(cfg, seed)
  freq = np.bincount(train["labels"].ravel(), minlength=cfg.num_events) / train["labels"].size
  event_weights = 1.0 / np.sqrt(np.maximum(freq, 1e-3))
  event_weights = jnp.asarray(event_weights / np.sum(event_weights * freq), jnp.float32)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, max(1, steps // 10)), steps, lr * 0.02)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, key, video, digits, labels, kind, frames, frames_digits):
    frames = augment_frames(key, to_float(frames)) if augment else to_float(frames)
    (_, m), g = jax.value_and_grad(_loss_fn, has_aux=True)(params, model, to_float(video), digits, labels, kind,
                                                           frames, frames_digits, aux_weight, event_weights)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, m

  rng = np.random.default_rng(seed)
  aug_key = jax.random.PRNGKey(seed + 1)
  t_start = time.time()
  hist = []
  n_frames = frame_batch
  for step in range(1, steps + 1):
    idx = rng.integers(0, num_train, size=batch)
    fi, ft = rng.integers(0, num_train, size=n_frames), rng.integers(0, frames, size=n_frames)
    params, opt_state, m = step_fn(params, opt_state, jax.random.fold_in(aug_key, step), train["video"][idx],
                                   train["digits"][idx],
                                   train["labels"][idx], train["kind"][idx], train["video"][fi, ft],
                                   train["frame_digits"][fi, ft])
    hist.append(m)
    if step % log_every == 0 or step == steps:
      m = jax.device_get(hist)
      hist = []
      losses = [x["loss"] for x in m]
      check_training_losses(losses, step, steps, lr)
      loss = float(np.mean(losses))
      acc = float(np.mean([x["set_acc"] for x in m]))
      facc = float(np.mean([x["frame_digit_acc"] for x in m]))
      its = step / (time.time() - t_start)
      log(f"evaluator step {step}/{steps}  loss {loss:.4f}  acc {acc:.3f} (frame digits {facc:.3f})  "
          f"{its:.2f} it/s  ETA {_fmt_time((steps - step) / max(its, 1e-9))}")
  train_time = time.time() - t_start
  ev = Evaluator(params, cfg)
  metrics = ev.accuracy(test["video"], test["digits"], test["labels"], test["kind"], test["frame_digits"])
  log("evaluator held-out test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  summary = {"steps": steps, "batch": batch, "seed": seed, "num_train": num_train, "num_test": num_test,
             "lr": lr, "aux_weight": aux_weight, "augment": augment, "frame_batch": frame_batch,
             "event_weights": [round(float(x), 4) for x in np.asarray(event_weights)],
             "train_seconds": round(train_time, 1),
             "test": {k: round(float(v), 5) for k, v in metrics.items()},
             "data": {"dataset": "moving_digits", "train_split_seed": seed, "test_split_seed": seed + 1,
                      "frames": frames, "size": size}}
  if out_dir:
    from dsa_jax.checkpoint.params_io import nonfinite_leaves
    bad_leaves = nonfinite_leaves(params)
    if bad_leaves:
      raise EvaluatorError(f"evaluator training: the parameters hold NaN/inf ({', '.join(bad_leaves[:3])}); "
                           f"{out_dir} was not written")
    save_params(out_dir, {NETWORK: params}, {"arch": {NETWORK: cfg.to_dict()}, "evaluator": summary})
    summary["path"] = os.path.abspath(out_dir)
    summary["bytes"] = dir_size(out_dir)
    log(f"evaluator saved to {out_dir} ({summary['bytes'] / 1e6:.2f} MB)")
  summary["params"] = params
  return summary


def check_training_losses(losses, last_step: int, steps: int, lr: float):
  """Stops evaluator training at the first non-finite loss of a logging window ending at `last_step`: a diverged
  evaluator would otherwise be saved and only refused when loaded."""
  bad = [last_step - len(losses) + 1 + i for i, x in enumerate(losses) if not np.isfinite(float(x))]
  if bad:
    raise EvaluatorError(f"evaluator training: the loss became non-finite at step {bad[0]} of {steps} (lr={lr}); "
                         "nothing was saved. Try a lower learning rate or another seed")


def to_float(video):
  """Inside jit: uint8 -> [-1, 1] float32; float passes."""
  if video.dtype == jnp.uint8:
    return video.astype(jnp.float32) / 127.5 - 1.0
  return video.astype(jnp.float32)


def dir_size(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


# ----------------------------------------------------------------------------------------------------------------------
# Inference


class Evaluator:
  """A loaded evaluator: batched, jitted `outputs`, `features`, `predict_digits`, `accuracy`."""

  def __init__(self, params, cfg: EvaluatorConfig, meta: dict | None = None, path: str | None = None):
    self.params, self.cfg, self.meta, self.path = params, cfg, meta or {}, path
    model = DigitsEvaluator(cfg)
    self._apply = jax.jit(lambda p, v: model.apply({"params": p}, to_float(v)))

  def check_input(self, video) -> None:
    shape = tuple(np.shape(video))
    if len(shape) != 5 or shape[-1] != 1:
      raise EvaluatorError(f"evaluator input: expected clips (N, F, H, W, 1), got shape {shape}")
    if shape[2:4] != (self.cfg.size, self.cfg.size):
      raise EvaluatorError(f"evaluator input: clips are {shape[2]}x{shape[3]} but the evaluator"
                           f"{' at ' + repr(self.path) if self.path else ''} was trained on "
                           f"{self.cfg.size}x{self.cfg.size} canvases")

  def outputs(self, video, batch: int = 64) -> dict[str, np.ndarray]:
    """All heads for (N, F, H, W, 1) clips (uint8, or float in [-1, 1]), in batches."""
    self.check_input(video)
    video = np.asarray(video)
    outs = []
    n = video.shape[0]
    for s in range(0, n, batch):
      part = video[s:s + batch]
      pad = batch - part.shape[0] if n > batch else 0  # one compiled shape for the full batches and the tail
      if pad:
        part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
      o = jax.device_get(self._apply(self.params, part))
      outs.append({k: v[:v.shape[0] - pad] for k, v in o.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def features(self, video, batch: int = 64) -> np.ndarray:
    return self.outputs(video, batch)["features"].astype(np.float64)

  def predict_digits(self, video, batch: int = 64) -> np.ndarray:
    """(N, 10) bool: which digits the evaluator sees in each clip."""
    return self.outputs(video, batch)["digit_logits"] > 0

  def accuracy(self, video, digits, labels=None, kind=None, frame_digits=None, batch: int = 64) -> dict[str, float]:
    """Held-out metrics: set accuracy (predicted digit set exact), per-digit accuracy and F1, aux accuracies."""
    from dsa_jax.eval.metrics import digit_f1
    o = self.outputs(video, batch)
    pred = o["digit_logits"] > 0
    true = np.asarray(digits) > 0.5
    out = {"set_acc": float(np.mean(np.all(pred == true, -1))),
           "digit_acc": float(np.mean(pred == true)),
           "digit_f1": float(np.mean(digit_f1(pred, true)))}
    if kind is not None:
      out["kind_acc"] = float(np.mean(np.argmax(o["kind_logits"], -1) == np.asarray(kind)))
    if labels is not None:
      pred_ev, labels = np.argmax(o["event_logits"], -1), np.asarray(labels)
      out["event_acc"] = float(np.mean(pred_ev == labels))
      recalls = [np.mean(pred_ev[labels == e] == e) for e in range(self.cfg.num_events) if np.any(labels == e)]
      out["event_balanced_acc"] = float(np.mean(recalls))
    if frame_digits is not None:
      out["frame_digit_acc"] = float(np.mean((o["frame_digit_logits"] > 0) == (np.asarray(frame_digits) > 0.5)))
    return out


def load_evaluator(path: str | None = None) -> Evaluator:
  """Loads an evaluator checkpoint (default: the one shipped in dsa_jax/assets/evaluator)."""
  from dsa_jax.checkpoint.loading import load_described
  from dsa_jax.checkpoint.params_io import CheckpointError, check_tree_shapes
  path = path or DEFAULT_DIR
  if not os.path.isdir(path):
    raise FileNotFoundError(f"evaluator checkpoint {path!r} does not exist (train one with "
                            "`dsa-jax eval train-evaluator --out DIR`)")
  try:
    params, arch, meta = load_described(path, NETWORK, "--evaluator")
  except CheckpointError as e:
    raise EvaluatorError(f"evaluator checkpoint {path!r}: {e}") from e
  if arch is None:
    raise EvaluatorError(f"evaluator checkpoint {path!r}: meta has no arch for network {NETWORK!r}")
  cfg = EvaluatorConfig.from_dict(arch)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  abstract = jax.eval_shape(lambda: init_params(cfg))
  check_tree_shapes(params, abstract, NETWORK, path)
  return Evaluator(params, cfg, meta, path)


if __name__ == "__main__":  # pragma: no cover - the data-generation worker of `make_clip_arrays`
  if len(sys.argv) < 2 or sys.argv[1] != "--_gen":
    sys.exit("train the evaluator with `dsa-jax eval train-evaluator`")
  sys.exit(_gen_main(sys.argv[2:]))
