"""The training loop of every stage: data, state (fresh or resumed), jitted sharded steps, logging, checkpoints.

  dsa-jax train --config configs/tiny.py --workdir /tmp/x

A run resumes from the workdir's latest complete checkpoint automatically (parameters, optimiser states, rng and
the data iterator position), so a preempted job is restarted with the same command. At the end it exports a
`params_io` model checkpoint into WORKDIR/model.

Terminal: one progress line per `train.log_every` steps (step, losses, it/s, on accelerators the fullest local
device's memory peak, ETA). TensorBoard: event files in WORKDIR/tb (losses, confidence calibration, mean exit step,
gradient norms, throughput, that memory peak). Only process 0 logs.
"""

from __future__ import annotations

import contextlib
import math
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.checkpoint import loading
from dsa_jax.checkpoint.workdir import stored_networks
from dsa_jax.eval.profiling import device_memory, device_peak
from dsa_jax.models import factory
from dsa_jax.parallel import mesh as mesh_lib
from dsa_jax.training import checkpointing, steps as steps_lib
from dsa_jax.training import state as state_lib

SUBJECTS = ("a red ball", "a small robot", "a golden retriever", "a paper boat", "a hot-air balloon", "a cyclist",
            "a blue whale", "a steam train")
ACTIONS = ("moving slowly from left to right", "spinning in place", "bouncing up and down", "drifting towards the camera")
PLACES = ("on a sunny beach", "in a snowy forest", "over a city at night", "in a quiet studio with soft light")


def builtin_prompts() -> list[str]:
  """128 synthetic prompts: training on tiny works out of the box without a prompt file."""
  return [f"{s} {a} {p}" for s in SUBJECTS for a in ACTIONS for p in PLACES]


class TrainingError(ValueError):
  """A training setup problem (missing data for the stage, shapes that do not match the config)."""


class NonFiniteError(TrainingError):
  """A loss, gradient norm or parameter became NaN/inf; the run stops before saving it."""


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Data


def make_video_source(config):
  """Clips for teacher training from `config.data.videos`: 'digits[:split]' (moving digits generated on the fly at
  the config's frame count and size), a written digits dataset folder, or ArrayRecord clip files (file/folder/glob)."""
  spec = str(config.data.videos)
  if not spec:
    raise TrainingError("config.data.videos: stage 'teacher' trains on videos; give an ArrayRecord file/folder/glob "
                        "of latent clips (see `dsa-jax data`), or 'digits:train'")
  if spec == "digits" or spec.startswith("digits:"):
    from dsa_jax.data.digits import MovingDigitsSource
    split = spec.partition(":")[2] or "train"
    if config.video.height != config.video.width:
      raise TrainingError(f"config.data.videos={spec!r}: moving digits are square, video is "
                          f"{config.video.height}x{config.video.width}")
    return MovingDigitsSource(int(config.data.num_videos), split=split, seed=0,
                              frames=int(config.video.num_frames), size=int(config.video.height))
  from dsa_jax.data import digits as digits_lib
  if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, digits_lib.META_FILE)):
    return digits_lib.digits_source(spec)
  from dsa_jax.data.videos import VideoClipSource
  return VideoClipSource(spec)


def make_source(config):
  """The stage's random-access source: prompts (dsa, ode on the fly), ODE pairs (ode stored) or video clips."""
  stage = config.train.stage
  if stage == "teacher":
    return make_video_source(config)
  if stage == "ode" and config.train.ode_pairs:
    from dsa_jax.training.ode_pairs import OdePairSource
    return OdePairSource(config.train.ode_pairs, config)
  from dsa_jax.data import prompts as prompts_lib
  p = config.data.prompts
  if p.kind == "text" and not p.get("path"):  # the default: smoke tests run without a prompt file (said in the log)
    return prompts_lib.ListPromptSource(builtin_prompts(), name=BUILTIN_PROMPTS)
  return prompts_lib.prompt_source_from_config(p)  # other kinds name their missing field


BUILTIN_PROMPTS = "<built-in synthetic prompts>"


def make_text_encoder(config) -> Callable:
  from dsa_jax.data.text_context import make_text_encoder as make
  return make(config)


class BatchPreparer:
  """Host batch (prompts / dicts from the loader) -> global jax arrays sharded over data x fsdp."""

  def __init__(self, config, sharding, text_encoder, global_batch: int):
    self.config = config
    self.sharding = sharding
    self.encode = text_encoder
    self.global_batch = global_batch
    self.text_shape = (config.model.text_len, config.model.text_dim)
    from dsa_jax.training.rollout import RolloutSpec
    spec = RolloutSpec.from_config(config)
    self.video_shape = (spec.num_frames, spec.height, spec.width, spec.channels)

  def _context(self, host) -> np.ndarray:
    if isinstance(host, dict) and "context" in host:
      ctx = np.asarray(host["context"], np.float32)
    else:
      prompts = host["prompt"] if isinstance(host, dict) else host
      ctx = np.asarray(self.encode([str(p) for p in np.asarray(prompts).reshape(-1)]), np.float32)
    if ctx.shape[1:] != self.text_shape:
      raise TrainingError(f"text context has shape {ctx.shape[1:]}, the model expects (model.text_len, "
                          f"model.text_dim) = {self.text_shape}")
    return ctx

  def __call__(self, host) -> dict:
    from dsa_jax.data.pipeline import make_global_batch
    out = {"context": self._context(host)}
    if isinstance(host, dict) and "video" in host:
      video = np.asarray(host["video"])
      if video.dtype == np.uint8:
        if self.config.vae.kind != "identity":
          raise TrainingError("config.data.videos holds uint8 frames; with vae.kind="
                              f"{self.config.vae.kind!r} teacher training needs VAE latents (float) of shape "
                              f"(F,H,W,C) = {self.video_shape}; pixel-space training needs vae.kind='identity'")
        video = video.astype(np.float32) / 127.5 - 1.0  # pixel space: frames in [-1, 1] are the latents
      if video.shape[1:] != self.video_shape:
        raise TrainingError(f"clips have shape {video.shape[1:]}, the config expects latents (F,H,W,C) = "
                            f"{self.video_shape} (video.num_frames, latent height/width, latent_channels)")
      out["video"] = video.astype(np.float32)
    if isinstance(host, dict) and "trajectory" in host:
      out["trajectory"] = np.asarray(host["trajectory"], np.float32)
    return make_global_batch(out, self.sharding, global_batch_size=self.global_batch)


# ----------------------------------------------------------------------------------------------------------------------
# Networks from other runs


def place(tree, shardings):
  """Host numpy tree -> global arrays in `shardings` (works on every host of a multi-host run)."""
  def one(x, sh):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
  return jax.tree_util.tree_map(one, tree, shardings)


def _same_arch(config, a: str, b: str) -> bool:
  return factory.dit_config(config, a).to_dict() == factory.dit_config(config, b).to_dict()


def load_teacher(config, mesh, rules, shardings):
  """The frozen teacher (train.teacher_from: a model folder with 'teacher', or a teacher-stage workdir), cast to
  the compute dtype for its matmul weights and sharded. Without teacher_from: random weights (smoke tests only)."""
  path = config.train.teacher_from
  tcfg = factory.dit_config(config, "teacher")
  if not path:
    _log("WARNING: config.train.teacher_from is empty: the teacher has RANDOM weights (fine for smoke tests only)")
    init = lambda k: steps_lib.frozen_cast(mesh_lib.unbox(factory.init_dit(tcfg, config, k)), tcfg.dtype)
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(int(config.seed) + 17))
  params, _ = loading.load_networks(config, path, ("teacher",), fallbacks={}, log=_log)
  return place(steps_lib.frozen_cast(params["teacher"], tcfg.dtype), shardings)


# The head stage reads the generator a sampler would use: the EMA where the model has one.
HEAD_STAGE_FALLBACKS = {"generator": ("generator_ema", "teacher")}


def _continued_head(config, init_from: str, *, unrecorded_ok: bool):
  """init_from's confidence head where this stage continues it (it has one and train.continue_head), else None. Only
  a head trained on this stage's conf.target continues: another target's confidence means something else (a note
  says so); `unrecorded_ok` also takes a head whose model records no target."""
  if not config.train.get("continue_head", True):
    return None
  stored, meta = stored_networks(init_from)
  if "head" not in stored:
    return None
  kind, target = (meta.get("conf_target") or {}).get("kind"), str(config.conf.target)
  if kind != target and not (unrecorded_ok and kind is None):
    if kind is not None:
      _log(f"note: {init_from} has a {kind!r} head and this stage trains conf.target={target!r}: the head starts "
           f"afresh (pass --config.conf.target={kind} to continue it)")
    return None
  return loading.load_networks(config, init_from, ("head",), fallbacks={}, log=_log)[0]["head"]


def initial_networks(config, teacher_host: Callable[[], Any]) -> tuple[dict, dict]:
  """Host params that replace fresh initialisation at step 0 of a stage (the previous stage's model, the teacher as
  the ODE student's and the critic's start), and where each came from."""
  stage = config.train.stage
  nets, sources = {}, {}
  init_from = config.train.init_from
  if stage == "teacher":
    if init_from:
      nets["teacher"] = loading.load_networks(config, init_from, ("teacher",), fallbacks={}, log=_log)[0]["teacher"]
      sources["teacher"] = init_from
    return nets, sources
  if stage == "head":
    if not init_from:
      raise TrainingError("config.train.init_from: stage 'head' trains a confidence head for an existing generator; "
                          "give its model folder or workdir")
    nets["generator"] = loading.load_networks(config, init_from, ("generator",), fallbacks=HEAD_STAGE_FALLBACKS,
                                              log=_log)[0]["generator"]
    sources["generator"] = init_from
    head = _continued_head(config, init_from, unrecorded_ok=False)  # a longer head run in two parts
    if head is not None:
      nets["head"] = head
      sources["head"] = f"{init_from} (its {str(config.conf.target)!r} head continues)"
    return nets, sources
  if init_from:
    # a converted base model stored as 'teacher' with the generator's architecture (e.g. Wan2.1-1.3B) also serves
    nets["generator"] = loading.load_networks(config, init_from, ("generator",),
                                              fallbacks=loading.INIT_FROM_FALLBACKS, log=_log)[0]["generator"]
    sources["generator"] = init_from
    # continuing a DSA model keeps its confidence head (a fresh one would have to relearn it from scratch); DSA
    # exports made before models recorded their target are taken as they are
    head = _continued_head(config, init_from, unrecorded_ok=True) if stage == "dsa" else None
    if head is not None:
      nets["head"] = head
      sources["head"] = init_from
  elif stage == "ode" and config.train.teacher_from and _same_arch(config, "model", "teacher"):
    nets["generator"] = teacher_host()  # CausVid: the causal student starts from the bidirectional teacher
    sources["generator"] = f"the teacher {config.train.teacher_from}"
  if stage == "dsa":
    critic_from = config.train.critic_from
    if critic_from:
      nets["critic"] = loading.load_networks(config, critic_from, ("critic",),
                                             fallbacks=loading.CRITIC_FROM_FALLBACKS, log=_log)[0]["critic"]
      sources["critic"] = critic_from
    elif config.train.teacher_from and _same_arch(config, "critic", "teacher"):
      nets["critic"] = teacher_host()  # the fake score starts as the real score
      sources["critic"] = f"the teacher {config.train.teacher_from}"
    elif "generator" in nets and _same_arch(config, "critic", "model"):
      nets["critic"] = nets["generator"]
      sources["critic"] = f"the generator {sources['generator']}"
  return nets, sources


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def record_eval(workdir: str, step: int, scores: dict):
  """Appends one line {step, scores} to WORKDIR/eval.jsonl (the in-training evaluation curve; local workdirs)."""
  if is_remote(workdir) or jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
    f.write(json.dumps({"step": int(step), **scores}) + "\n")


class MetricLog:
  """Collects per-step device metrics; averages them (per key, over the steps that reported it) at log time."""

  def __init__(self, workdir: str | None, enable_tb: bool = True):
    self.pending: list[dict] = []
    self.writer = None
    if workdir and enable_tb and jax.process_index() == 0:
      try:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(workdir.rstrip("/") + "/tb")
      except ImportError:
        _log("WARNING: tensorboardX is not installed; no TensorBoard event files (pip install tensorboardX)")
      except Exception as e:  # pylint: disable=broad-except  (e.g. a gs:// workdir without GCS support)
        _log(f"WARNING: no TensorBoard event files in {workdir}/tb: {type(e).__name__}: {e}")

  def add(self, metrics):
    self.pending.append(metrics)

  def flush(self) -> dict:
    host = jax.device_get(self.pending)
    self.pending = []
    sums: dict[str, list] = {}
    for m in host:
      for k, v in m.items():
        sums.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in sums.items()}

  def write(self, step: int, scalars: dict):
    if self.writer is None:
      return
    for k, v in scalars.items():
      group = "perf" if k in ("it_per_s", "samples_per_s", "frames_per_s", "step_time_s") else (
          "confidence" if k.startswith("conf_") else "grad" if k.startswith("grad_norm") else
          "eval" if k.startswith("eval_") else "train")
      self.writer.add_scalar(f"{group}/{k}", v, step)
    self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


_SHORT = {"loss_dmd": "dmd", "loss_critic": "critic", "loss_conf": "conf", "loss_ode": "ode", "loss_fm": "fm",
          "exit_step": "exit", "conf_abs_err": "cal_err", "conf_ece": "ece", "grad_norm_gen": "|g_gen|"}


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(stage, step, total, scalars, it_s, eta_s) -> str:
  parts = [f"{_SHORT[k]} {scalars[k]:.4g}" for k in _SHORT if k in scalars]
  rate = f"{it_s:.3g}" if math.isfinite(it_s) else "?"  # unknown until a step after compilation
  mem = ""
  if "device_peak_gb" in scalars:  # the fullest local accelerator so far (none on CPU)
    mem = f" | mem {scalars['device_peak_gb']:.1f} GB ({100 * scalars['device_peak_fraction']:.0f} %)"
  return f"[{stage}] step {step}/{total} | " + " ".join(parts) + f" | {rate} it/s{mem} | ETA {_fmt_time(eta_s)}"


# ----------------------------------------------------------------------------------------------------------------------
# Guards: non-finite values, corrupt checkpoints


def nonfinite_metrics(metrics) -> dict:
  """The losses and gradient norms of a step that are NaN/inf ({} when all are finite); waits for the step."""
  keys = [k for k in metrics if k.startswith(("loss_", "grad_norm"))]
  host = jax.device_get({k: metrics[k] for k in keys})
  return {k: float(v) for k, v in host.items() if not np.isfinite(v)}


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def networks_finite(state) -> bool:
  """Whether every parameter of every network of `state` is finite (one small reduction program)."""
  return bool(jax.device_get(_all_finite(state.networks())))


def nonfinite_skip_budget(config) -> int:
  n = config.train.get("nonfinite_skip", 0)
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise TrainingError(f"config.train.nonfinite_skip: expected an int >= 0 (batches with a non-finite loss or "
                        f"gradient to skip before stopping), got {n!r}")
  return n


def set_aside(ck, step: int, emit) -> str:
  """Moves a bad checkpoint step folder to WORKDIR/corrupt_checkpoints/ (never deleted: it may be inspected)."""
  src = ck._step_dir(step)
  dst_dir = os.path.join(ck.workdir, "corrupt_checkpoints")
  os.makedirs(dst_dir, exist_ok=True)
  dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  os.replace(src, dst)
  ck.manager.reload()
  return dst


def restore_latest_readable(ck, target, config, emit):
  """(state, data_state, step) of the newest checkpoint that reads and holds finite parameters.

  A corrupt or non-finite latest checkpoint is moved aside with a warning naming its step and the previous one is
  tried; the error names every bad step only when none is readable. Returns (None, None, None) without checkpoints.
  """
  stage = config.train.stage
  bad = []
  while True:
    step = ck.latest_step()
    if step is None:
      if bad:
        raise checkpointing.TrainCheckpointError(
            f"no readable checkpoint in {ck.directory}: " + "; ".join(bad) + " (moved to corrupt_checkpoints/)")
      return None, None, None
    try:
      state, data_state = ck.restore(step, target, config=config)
      if not networks_finite(state):
        raise checkpointing.TrainCheckpointError(f"checkpoint {ck._step_dir(step)!r} holds non-finite parameters")
      return state, data_state, step
    except checkpointing.TrainStateMismatchError:
      raise  # a config mismatch, not damage: moving it would not help
    except checkpointing.TrainCheckpointError as e:
      if is_remote(ck.workdir):
        raise  # a remote workdir's checkpoints are not moved
      if jax.process_index() == 0:
        dst = set_aside(ck, step, emit)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"dsa_jax_set_aside_{step}")
        ck.manager.reload()
      msg = str(e).split(". It is corrupt")[0][:300]
      emit(f"[{stage}] WARNING: checkpoint step {step} is unreadable ({msg}); moved it to "
           f"{dst if jax.process_index() == 0 else 'corrupt_checkpoints/'} and falling back to the previous one")
      bad.append(f"step {step}")


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def setup_compilation_cache(config):
  path = config.train.compilation_cache
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def is_remote(path: str) -> bool:
  return "://" in str(path)


class StopFlag:
  """SIGTERM (preemption) or SIGINT (Ctrl-C, `timeout --signal=INT`) asks the loop to stop after the current step,
  save a checkpoint and leave; with several hosts the flag is agreed on by all of them every step."""

  def __init__(self):
    self.raised = False
    self._old = {}

  def __enter__(self):
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.raised and signum == 2:  # a second Ctrl-C interrupts for real
      raise KeyboardInterrupt
    self.raised = True

  def __exit__(self, *exc):
    import signal
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.raised
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([self.raised]))))


def train(config, workdir: str, *, stop_after: int | None = None, mesh=None, log: Callable[[str], None] | None = None
          ) -> dict:
  """Runs (or resumes) the stage of `config` in `workdir`; returns a summary dict.

  Stops early, with a checkpoint at the current step and without exporting, on SIGTERM / SIGINT or after
  `train.max_time_s` seconds (0: no limit); the same command resumes. `stop_after`: leave after this many steps of
  this invocation without saving or exporting (tests use it to simulate a crash; checkpoints exist only where
  `train.ckpt_every` put them). A local workdir is locked (WORKDIR/train.lock) by process 0 for the whole run.
  """
  from dsa_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError
  lock = None
  if not is_remote(workdir) and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    try:
      lock = WorkdirLock(os.path.abspath(workdir), log or _log).acquire()
    except WorkdirLockedError as e:
      raise TrainingError(str(e)) from None
  try:
    return _train_locked(config, workdir, stop_after=stop_after, mesh=mesh, log=log)
  finally:
    if lock is not None:
      lock.release()


def _train_locked(config, workdir: str, *, stop_after=None, mesh=None, log=None) -> dict:
  # The loader, checkpointer and metric log are closed however the run ends, a refused resume or a failed teacher
  # load included: an exception must not leave their threads running in a notebook's process.
  with contextlib.ExitStack() as resources:
    return _train_run(config, workdir, resources, stop_after=stop_after, mesh=mesh, log=log)


def _train_run(config, workdir: str, resources: contextlib.ExitStack, *, stop_after, mesh, log) -> dict:
  emit = log or _log
  config = config.copy_and_resolve_references()
  stage = config.train.stage
  state_lib.check_stage(stage)
  setup_compilation_cache(config)
  remote = is_remote(workdir)
  workdir = str(workdir) if remote else os.path.abspath(workdir)
  if not remote:
    os.makedirs(workdir, exist_ok=True)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config)
  rules = mesh_lib.rules_from_config(config)
  total = int(config.train.steps)
  global_batch = int(config.train.batch_size)
  mesh_lib.check_batch(global_batch, mesh)
  mesh_lib.check_process_batch_layout(mesh)
  steps_lib.check_grad_accum(config, mesh)
  accum = steps_lib.grad_accum(config)
  local_batch = global_batch // jax.process_count()
  max_time = float(config.train.max_time_s)
  micro = f" ({accum} micro-batches of {global_batch // accum} per update)" if accum > 1 else ""
  emit(f"[{stage}] {mesh_lib.describe(mesh)}; global batch {global_batch}{micro}; {total} steps; workdir {workdir}")

  # Data first: a bad prompt or video file fails before anything is compiled.
  from dsa_jax.data.pipeline import make_loader
  source = make_source(config)
  if getattr(source, "name", None) == BUILTIN_PROMPTS:
    emit(f"[{stage}] WARNING: config.data.prompts.path is empty: training on {len(source)} built-in synthetic "
         "prompts (fine for smoke tests only)")
  loader = make_loader(source, batch_size=local_batch, seed=int(config.seed), shuffle=bool(config.data.shuffle),
                       num_threads=max(1, int(config.data.num_workers or 1)))
  resources.callback(loader.close)
  text_encoder = make_text_encoder(config)
  uncond = np.asarray(text_encoder([config.text.negative_prompt]), np.float32)

  ck = checkpointing.Checkpointer(workdir, keep=int(config.train.keep), async_save=bool(config.train.async_ckpt))
  resources.callback(ck.close)
  newest = ck.latest_step()
  if newest is not None:
    try:
      meta = ck.read_json(newest, "meta")
    except Exception:  # pylint: disable=broad-except  (an unreadable checkpoint is handled by the restore below)
      meta = None
    config = checkpointing.resume_compatible(config, meta, emit)
  shardings = state_lib.state_shardings(config, mesh, rules)
  bundle = steps_lib.build_steps(config, mesh, rules, state_shardings=shardings)
  teacher = None
  teacher_cache: dict = {}
  if stage in ("ode", "dsa"):
    teacher = load_teacher(config, mesh, rules, bundle.teacher_shardings)

  def teacher_host():
    if "p" not in teacher_cache:
      teacher_cache["p"] = jax.tree_util.tree_map(
          lambda x: np.asarray(jax.device_get(x)),
          loading.load_networks(config, config.train.teacher_from, ("teacher",), fallbacks={}, log=_log)[0]["teacher"])
    return teacher_cache["p"]

  latest = ck.latest_step()
  if latest is not None:
    target = state_lib.abstract_state(config, shardings)
    state, data_state, latest = restore_latest_readable(ck, target, config, emit)
  if latest is not None:
    if data_state:
      loader.set_state(data_state)
    emit(f"[{stage}] resumed from {ck._step_dir(latest)}")
  else:
    nets, sources = initial_networks(config, teacher_host)
    placed = {n: place(p, getattr(shardings, n)) for n, p in nets.items()}
    state, _ = state_lib.create_sharded_state(config, mesh, rules, jax.random.PRNGKey(int(config.seed)),
                                              networks=placed)
    for n in sorted(sources):
      emit(f"[{stage}] initialised {n} from {sources[n]}")
  uncond_dev = place(uncond, mesh_lib.replicated(mesh))
  prep = BatchPreparer(config, bundle.batch_sharding, text_encoder, global_batch)
  metrics_log = MetricLog(workdir, enable_tb=bool(config.train.tensorboard))
  resources.callback(metrics_log.close)
  eval_every, evaluator = int(config.train.eval_every), None
  if eval_every > 0 and jax.process_count() == 1:
    from dsa_jax.eval.during_training import TrainingEval
    evaluator = TrainingEval(config, log=emit)
  elif eval_every > 0:
    emit(f"[{stage}] WARNING: train.eval_every is for single-process runs; no in-training evaluation here")

  start = int(jax.device_get(state.step))
  log_every, ckpt_every = max(1, int(config.train.log_every)), max(1, int(config.train.ckpt_every))
  frames = int(config.video.num_frames)
  t_start = t_last = time.time()
  step_last, rate = start, float("nan")
  summary: dict[str, Any] = {"start_step": start, "workdir": workdir, "stopped": None}
  done = start
  skip_budget, skipped = nonfinite_skip_budget(config), 0
  # Skipping a batch needs the state from before the step (the step donates its input): a second copy in memory.
  backup = jax.jit(lambda s: jax.tree_util.tree_map(jnp.copy, s), out_shardings=shardings) if skip_budget else None
  compiled_names: set = set()
  with StopFlag() as stop:
    step = start
    while step < total:
      t0 = time.time()
      batch = prep(next(loader))
      name = bundle.step_name(step, config)
      compiling = name not in compiled_names
      if compiling:
        emit(f"[{stage}] compiling the {name} step (takes a while on first use) ...")
      before = backup(state) if backup is not None else None
      state, metrics = bundle(name, state, teacher, batch, uncond_dev)
      compiled_names.add(name)
      bad = nonfinite_metrics(metrics)
      if bad:
        what = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        if skipped < skip_budget:
          skipped += 1
          state = before
          emit(f"[{stage}] WARNING: step {step + 1}: non-finite {what}; skipped this batch ({skipped} of "
               f"train.nonfinite_skip={skip_budget})")
          continue
        raise NonFiniteError(f"step {step + 1}: non-finite {what}; stopped before saving (the last checkpoint "
                             f"is the newest finite one; lower train.lr, check the data, or allow skipping a few "
                             f"batches with --config.train.nonfinite_skip=N)")
      metrics_log.add(metrics)
      step += 1
      done = step
      if "first_step_s" not in summary:
        jax.block_until_ready(metrics)
        summary["first_step_s"] = time.time() - t0
      if compiling:
        jax.block_until_ready(metrics)
        t_last, step_last = time.time(), done  # the rate and ETA count compiled steps only
      if done % log_every == 0 or done == total:
        scalars = metrics_log.flush()
        now = time.time()
        if done > step_last:
          rate = (done - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, done
        if math.isfinite(rate):  # none before a step that did not compile
          scalars.update(it_per_s=rate, samples_per_s=rate * global_batch,
                         frames_per_s=rate * global_batch * frames)
        scalars.update(device_peak(device_memory()))
        emit(progress_line(stage, done, total, scalars, rate, (total - done) / rate if rate > 0 else float("nan")))
        metrics_log.write(done, scalars)
        summary["last_metrics"] = scalars
      if evaluator is not None and (done % eval_every == 0 or done == total):
        scores = evaluator(state)
        emit(f"[{stage}] eval at step {done}: FD {scores['eval_fd']:.2f} (mean {scores['eval_fd_mean']:.1f} + cov "
             f"{scores['eval_fd_cov']:.1f}, spread {scores['eval_fd_spread']:.2f}), prompt agreement "
             f"{scores['eval_agreement']:.3f}, {scores['eval_avg_steps']:.2f} steps/frame")
        metrics_log.write(done, scores)
        record_eval(workdir, done, scores)
        summary["last_eval"] = scores
      if stop_after is not None and done - start >= stop_after:
        summary["stopped"] = "stop_after"
        break
      reason = "signal" if stop.agreed() else (
          "max_time_s" if max_time and time.time() - t_start > max_time else None)
      if done % ckpt_every == 0 or done == total or reason:
        _check_before_save(state, done)
        ck.save(done, state, config=config, data_state=loader.get_state())
      if reason:
        summary["stopped"] = reason
        emit(f"[{stage}] stopped at step {done} ({reason}); checkpoint saved; the same command resumes")
        break
  ck.wait()
  summary["end_step"] = done
  if done >= total and summary["stopped"] is None:
    if ck.latest_step() != done:
      _check_before_save(state, done)
      ck.save(done, state, config=config, data_state=loader.get_state())
      ck.wait()
    summary["model"] = _export(config, state, workdir, done, emit)
  summary["state"] = state
  return summary


def _check_before_save(state, step: int):
  if not networks_finite(state):
    raise NonFiniteError(f"step {step}: the parameters hold NaN/inf although the losses were finite; stopped "
                         "before saving (the last checkpoint is the newest finite one)")


def _export(config, state, workdir: str, step: int, emit) -> str | None:
  stage = config.train.stage
  if is_remote(workdir):
    emit(f"[{stage}] done: {step} steps. The workdir is remote; export a model folder with\n"
         f"  python -m dsa_jax.training.checkpointing export {workdir} LOCAL_DIR")
    return None
  out = os.path.join(workdir, checkpointing.MODEL_DIR)
  if jax.process_count() == 1:
    checkpointing.export_networks(state, config, out, step=step, source=workdir)
  else:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("dsa_jax_export_start")
    error = None
    if jax.process_index() == 0:
      try:
        checkpointing.export_in_subprocess(workdir, out)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    multihost_utils.sync_global_devices("dsa_jax_export_done")  # every host gets here, even after an error
    if error is not None:
      raise error
  emit(f"[{stage}] done: {step} steps; model exported to {out}")
  return out
