"""Samples videos with the DSA sampler and writes, per prompt, DIR/<name>.mp4 (+ .gif), DIR/<name>.steps.json
(steps and confidences per latent frame, timings, a config summary) and DIR/<name>.steps.png (their plot).

  dsa-jax sample --config digits --out out/digits --prompt "digit 3 moves slowly"
  dsa-jax sample --config wan_1_3b --ckpt ckpts/dsa --out out --prompts prompts.txt --threshold 0.7
  dsa-jax sample --config wan_1_3b --ckpt ckpts/dsa --out out --prompt "..." --threshold inf \\
      --max-steps 4        # fixed 4 steps: the Self Forcing sampler
  dsa-jax sample --config digits --out out/rem --prompt "digit 3 moves slowly" \\
      --head dsa_jax/assets/digits_heads/remaining --mean-steps 2.5   # another confidence head, same generator

Long videos and continuation (see the README):

  dsa-jax sample --config digits --out out/long --prompt "digit 3 moves slowly" --num-frames 160 \\
      --config.sampling.window_frames=8 --config.sampling.sink_frames=2
  dsa-jax sample --config digits --out out/cont --prompt "digit 3 moves slowly" --init-video clip.gif
  dsa-jax sample --config digits --out out/sched --num-frames 32 \\
      --prompt-schedule "0:digit 3 moves fast; 16:digit 8 moves slowly"

--threshold inf always takes --max-steps steps per frame, --threshold -inf always --min-steps. Names come from the
prompt (a slug, plus a short hash of the prompt when the slug is empty, cut or shared; with several prompts prefixed
by their index) or from --name. --stream shows per-chunk progress (the streaming API); otherwise the whole video is
one compiled program and progress is per batch. The output folder, the numbers and the prompts are checked before
anything is compiled; a sample with NaN/inf latents or confidences is an error, not a video. Compiled programs are
cached on disk (--compile-cache), so later calls with the same shapes start faster.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from dsa_jax.sampling.sampler import parse_threshold

HELP = "sample videos (mp4/gif) with per-frame steps and confidences (json + plot)"


def add_arguments(p):
  p.add_argument("--config", required=True, help="config: a shipped one by name (digits, tiny, wan_1_3b) or a "
                 "file, with an optional :arg (digits:teacher, path.py:arg)")
  p.add_argument("--ckpt", default=None, help="model checkpoint folder or training workdir "
                 "(default: config.sampling.checkpoint; empty: random weights)")
  p.add_argument("--head", default=None, help="confidence head folder (dsa-jax convert export-head) to use instead of "
                 "the checkpoint's head; its calibration table serves --mean-steps; it must have been trained for "
                 "the --ckpt generator (default config.sampling.head; empty: the checkpoint's head)")
  p.add_argument("--out", required=True, help="output folder")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several videos)")
  g.add_argument("--prompts", default=None, help="text file, one prompt per line ('#' comments)")
  g.add_argument("--prompt-schedule", default=None, help="one video whose prompt changes at chunk boundaries: "
                 "'0:PROMPT; 8:PROMPT; ...' (latent frame indices, multiples of video.chunk_frames, from 0) or a "
                 ".json file ({\"0\": PROMPT, ...} or [{\"frame\": 0, \"prompt\": PROMPT}, ...])")
  p.add_argument("--num-frames", type=_int_arg("--num-frames"), default=None, help="latent frames to sample, any "
                 "multiple of video.chunk_frames (default video.num_frames); for long videos also set "
                 "--config.sampling.window_frames (and sink_frames) so that memory and time per chunk stay flat")
  init = p.add_mutually_exclusive_group()
  init.add_argument("--init-video", default=None, help="continue this video (mp4/gif): its frames, fitted to the "
                    "config's size and encoded, are the start of every sample")
  init.add_argument("--init-image", default=None, help="image-to-video (png/jpg/gif: the first frame): the image "
                    "is the first frame of every sample")
  p.add_argument("--threshold", default=None, help="confidence threshold tau (a number, inf or -inf; default "
                 "config.sampling.threshold)")
  p.add_argument("--mean-steps", type=float, default=None, help="average denoising steps per frame (a step budget): "
                 "picks tau from the model's calibration table (dsa-jax calibrate), or the --head folder's; default "
                 "config.sampling.mean_steps "
                 "(0 = use the threshold)")
  p.add_argument("--target-fps", type=float, default=None, help="with --stream: adjust tau chunk by chunk from "
                 "measured chunk times to hold this many frames per second (needs the calibration table)")
  p.add_argument("--min-steps", type=int, default=None, help="default config.sampling.min_steps")
  p.add_argument("--max-steps", type=int, default=None, help="default config.sampling.max_steps")
  p.add_argument("--seed", type=_int_arg("--seed"), default=None, help="noise seed of the first prompt (prompt i "
                 "gets seed+i), in [0, 2**32); default config.seed")
  p.add_argument("--guidance", type=_float_arg("--guidance"), default=None, help="classifier-free guidance g: "
                 "cond + g (cond - uncond), 0 = off (default config.sampling.guidance); the unconditional branch uses config.text.negative_prompt")
  p.add_argument("--name", default=None, help="output name (with several prompts: NAME_000, NAME_001, ...)")
  p.add_argument("--batch-size", type=int, default=None, help="prompts per compiled batch (default "
                 "config.sampling.batch_size)")
  p.add_argument("--stream", action="store_true", help="sample chunk by chunk with per-chunk progress")
  p.add_argument("--formats", default="mp4,gif", help="video files to write: mp4, gif or both (default mp4,gif)")
  p.add_argument("--no-ema", action="store_true", help="use 'generator' even where 'generator_ema' exists")
  p.add_argument("--strict-prompts", action="store_true", help="words the text encoder does not know are an error "
                 "(default: a warning listing them)")
  p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
  p.add_argument("--compile-cache", default=None, help="compilation cache folder (default $DSA_JAX_CACHE or "
                 "~/.cache/dsa_jax/xla): a later call with the same shapes skips most of the compile")


def _int_arg(name):
  def parse(text):
    try:
      return int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  return parse


def _float_arg(name):
  def parse(text):
    from dsa_jax.sampling.guards import check_finite_number
    try:
      return check_finite_number(text, name)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
  return parse


def check_out_dir(out: str):
  """--out must be a folder we can write (created if missing): checked before anything is compiled."""
  import os
  import tempfile
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out: {out!r} is a file, expected a folder")
  try:
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
      pass
  except OSError as e:
    raise ValueError(f"--out: cannot write into {out!r} ({e.strerror or e})") from None


def default_cache_dir() -> str:
  import os
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.environ.get("DSA_JAX_CACHE") or os.path.join(base, "dsa_jax", "xla")


def enable_compile_cache(path=None) -> str | None:
  """Turns on jax's persistent compilation cache in `path` (default: default_cache_dir()) unless a cache folder is
  configured already (JAX_COMPILATION_CACHE_DIR); an unusable folder only costs the speed-up, with a note."""
  import os

  import jax
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = os.path.expanduser(path or default_cache_dir())
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f"note: no compilation cache ({path!r}: {e.strerror or e})", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


def read_prompts(args) -> list[str]:
  if args.prompts is not None:
    from dsa_jax.data.prompts import TextPromptSource
    src = TextPromptSource(args.prompts)
    return [src[i] for i in range(len(src))]
  if getattr(args, "prompt_schedule", None) is not None:
    from dsa_jax.sampling.inputs import parse_schedule
    return [p for _, p in parse_schedule(args.prompt_schedule)]
  if args.prompt is not None:
    if not all(p.strip() for p in args.prompt):
      raise ValueError("--prompt: a prompt is empty")
    return [p.strip() for p in args.prompt]
  raise ValueError("no prompt: give --prompt \"...\", --prompts FILE or --prompt-schedule \"0:...; 8:...\"")


def output_names(prompts, name=None) -> list[str]:
  """One file name per prompt: its slug, plus a short hash of the prompt when the slug is empty (a non-ASCII
  prompt) or shared by several prompts, so that no two prompts overwrite each other's files."""
  import collections
  import hashlib
  from dsa_jax.sampling.outputs import slugify
  if name is not None:
    base = slugify(name, max_len=80)
    return [base] if len(prompts) == 1 else [f"{base}_{i:03d}" for i in range(len(prompts))]
  slugs = [slugify(p) for p in prompts]
  counts = collections.Counter(slugs)
  raw = [slugify(p, max_len=10**6) for p in prompts]
  for i, p in enumerate(prompts):
    if counts[slugs[i]] > 1 or not any(c.isalnum() for c in p.lower() if c.isascii()) or raw[i] != slugs[i]:
      slugs[i] = f"{slugs[i]}_{hashlib.sha1(p.encode('utf-8')).hexdigest()[:6]}"
  if len(prompts) == 1:
    return slugs
  return [f"{i:03d}_{s}" for i, s in enumerate(slugs)]


def resolve_steps(config, min_steps, max_steps):
  """Checks --min-steps / --max-steps against the ladder; a lone --min-steps above the default max raises max."""
  n = len(config.sampling.ladder)
  mn = config.sampling.min_steps if min_steps is None else min_steps
  mx = config.sampling.max_steps if max_steps is None else max_steps
  if max_steps is None and mn > mx:
    mx = mn
  if min_steps is not None and not 1 <= mn <= n:
    raise ValueError(f"--min-steps: must lie in [1, {n}] (sampling.ladder has {n} steps), got {mn}")
  if max_steps is not None and not 1 <= mx <= n:
    raise ValueError(f"--max-steps: must lie in [1, {n}] (sampling.ladder has {n} steps), got {mx}")
  if mn > mx:
    raise ValueError(f"--min-steps {mn} exceeds --max-steps {mx}")
  return mn, mx


def config_summary(config, sampler) -> dict:
  return {
      "name": config.name,
      "model": {k: config.model[k] for k in ("dim", "ffn_dim", "num_layers", "num_heads", "text_len", "text_dim")},
      "video": {"height": config.video.height, "width": config.video.width, "latent_frames": config.video.num_frames,
                "chunk_frames": config.video.chunk_frames, "fps": config.video.fps},
      "ladder": list(config.sampling.ladder), "sigmas": [float(s) for s in sampler.sigmas],
      "shift": config.diffusion.shift, "context_noise": config.sampling.context_noise,
      "frozen_frames": sampler.frozen_mode, "window_frames": sampler.window_frames,
      "sink_frames": sampler.sink_frames, "vae": config.vae.kind, "text": config.text.kind,
      "dtype": config.compute.dtype, "attention": sampler.dcfg.attention,
  }


def _budget_mean_steps(config, args) -> float:
  """The requested average steps per frame (--mean-steps, else config.sampling.mean_steps; 0 = none)."""
  return args.mean_steps if args.mean_steps is not None else float(config.sampling.mean_steps or 0.0)


def budget_table(config, args, source: dict, steps: tuple[int, int]) -> dict | None:
  """The calibration table a step budget uses: the one of the range fixed by --min-steps / --max-steps, else the
  config's range where its table covers the budget, else one that covers it (`budget.pick_table`)."""
  from dsa_jax.sampling import budget
  explicit = args.min_steps is not None or args.max_steps is not None
  m = _budget_mean_steps(config, args) or None
  return budget.pick_table(source, m, step_range=steps if explicit else None, prefer=steps,
                           **budget.sampler_settings(config))


def budget_step_range(config, args, source: dict, steps: tuple[int, int], warn) -> tuple[int, int]:
  """The steps per frame under a step budget: the calibration table's own range (a tau gives its average only under
  the floor and ceiling it was calibrated with) unless --min-steps / --max-steps are given, which must then agree
  with the table (checked by `resolve_budget`)."""
  from dsa_jax.sampling import budget
  table = budget_table(config, args, source, steps)
  uses_budget = args.threshold is None and bool(args.mean_steps or config.sampling.mean_steps or args.target_fps)
  if not uses_budget or not table or args.min_steps is not None or args.max_steps is not None:
    return steps
  if budget.sampling_mismatch(table, **budget.sampler_settings(config)):
    return steps  # a table of another ladder or first-chunk floor: `resolve_budget` refuses it, with what to do
  rng = budget.table_step_range(table)
  if rng != tuple(steps):
    warn(f"note: the step budget uses the calibration table's {rng[0]}-{rng[1]} steps per frame "
         f"(config.sampling: {steps[0]}-{steps[1]})")
  return rng


def resolve_budget(config, args, threshold: float, source: dict, ckpt: str, warn,
                   step_range: tuple[int, int] | None = None) -> tuple[float, str]:
  """tau from a step budget (--mean-steps, else config.sampling.mean_steps) and the model's calibration table (of
  the step range `step_range`, which `budget_step_range` chose).

  An explicit --mean-steps without a table (or with one made on another ladder or first-chunk floor) is an error that
  says how to make one; a budget that comes from the config falls back to config.sampling.threshold with a warning
  (models without a table still sample, and so does a model on a ladder its table was not made on)."""
  from dsa_jax.sampling import budget
  if args.threshold is not None:
    return threshold, ""
  m = _budget_mean_steps(config, args)
  if not m:
    return threshold, ""
  table = budget.pick_table(source, m, step_range=step_range, **budget.sampler_settings(config))
  from dsa_jax.checkpoint.loading import calibration_owner
  owner = calibration_owner(source, repr(ckpt or "the model"))
  if table is None and args.mean_steps is None:
    warn(f"warning: config.sampling.mean_steps={m:g} but {owner} has no calibration table "
         f"(dsa-jax calibrate); using config.sampling.threshold={threshold:g}")
    return threshold, ""
  why = budget.sampling_mismatch(table, **budget.sampler_settings(config), source=owner) if table is not None else None
  if why and args.mean_steps is None:
    warn(f"warning: config.sampling.mean_steps={m:g} cannot be used: {why}; using config.sampling.threshold="
         f"{threshold:g}")
    return threshold, ""
  tau = budget.threshold_for(table, m, source=owner, step_range=step_range, **budget.sampler_settings(config))
  return tau, f" (from --mean-steps {m:g})" if args.mean_steps is not None else f" (from mean_steps {m:g})"


def encode_batches(encode, prompts, batch: int, *, schedule=None, negative_prompt=None, dtype="float32"):
  """([context of each batch of `batch` prompts, the last padded with its last prompt (one compiled shape)], the
  negative prompt's context or None); under a prompt `schedule` one (1, K, L, D) context of its K prompts. Kept on
  the host in the compute dtype: what the DiT casts the context to first, so nothing changes, at half the bytes in
  bf16."""
  import jax.numpy as jnp
  keep = lambda a: np.asarray(a).astype(np.dtype(jnp.dtype(dtype)))
  if schedule:
    contexts = [keep(encode([p for _, p in schedule])[None])]
  else:
    contexts = []
    for start in range(0, len(prompts), batch):
      group = prompts[start:start + batch]
      contexts.append(keep(encode(group + [group[-1]] * (batch - len(group)))))
  uncond = None if negative_prompt is None else keep(encode([negative_prompt]))
  return contexts, uncond


def batch_over_devices(batch: int, requested: bool, split: int, num_prompts: int, scheduled: bool):
  """(prompts per compiled batch, a warning or None) on a mesh whose data x fsdp axes hold `split` devices. Unless a
  batch size was asked for (`requested`: --batch-size or a config value other than 1), the batch fills those devices
  (one video each, as far as there are prompts). A batch that does not divide over them is replicated: every device
  then computes every video, which gains nothing, so the warning says what would."""
  if split > 1 and not requested and not scheduled:
    batch = min(split, num_prompts)
  if split <= 1 or batch % split == 0:
    return batch, None
  fix = ("split the video's work instead: " if scheduled else
         f"with {split} or more prompts give --batch-size {split}; for one video, split its work instead: ")
  return batch, (f"warning: a batch of {batch} video(s) does not split over the mesh's data x fsdp = {split} devices, "
                 f"so each device computes every video (no speed-up); {fix}--config.mesh.shape.data=1 "
                 f"--config.mesh.shape.tensor={split} (the model's heads must divide by it)")


def _say(msg):
  print(msg, flush=True)


def _head_note(source) -> str:
  from dsa_jax.checkpoint.loading import head_folder
  head = head_folder(source)
  if not head:
    return ""
  kind = (source.get("conf_target") or {}).get("kind")
  return f", head: {head}" + (f" ({kind} target)" if kind else "")


def _window_note(sampler) -> str:
  if not sampler.window_frames:
    return ""
  sinks = f"{sampler.sink_frames} sink + " if sampler.sink_frames else ""
  return f"; attention over {sinks}the last {sampler.window_frames} frames"


def _long_video_inputs(args, config, sampler, decoder, schedule, warn):
  """(init latents or None, per-chunk prompt index or None) from --init-video/--init-image and --prompt-schedule,
  checked against the sampler before anything is compiled."""
  from dsa_jax.sampling import inputs
  if sampler.num_frames > config.video.num_frames and not sampler.window_frames:
    warn(f"note: no window: the KV cache holds all {sampler.num_frames} frames, so memory and time per chunk grow "
         f"with the length (set --config.sampling.window_frames)")
  init = None
  flag, path = ("--init-video", args.init_video) if args.init_video is not None else ("--init-image", args.init_image)
  if path is not None:
    vae = (decoder.vae, decoder.vae_params) if decoder.vae is not None else None
    init = inputs.load_init(config, path, flag, vae=vae, say=_say)
    try:
      sampler.conditioning(1, init_latents=init)
    except ValueError as e:
      raise ValueError(f"{flag}: {path}: {str(e).split(': ', 1)[1]}") from None
  index = None
  if schedule:
    index = inputs.schedule_index(schedule, sampler.num_frames, sampler.chunk_frames)
  return init, index


def main(args):
  from dsa_jax.config_lib import get_config

  config = get_config(args.config, args.overrides)
  threshold = config.sampling.threshold if args.threshold is None else parse_threshold(args.threshold)
  if args.mean_steps is not None and args.threshold is not None:
    raise ValueError("--mean-steps and --threshold: give one of them (a step budget or a raw threshold)")
  if args.target_fps is not None and not args.stream:
    raise ValueError("--target-fps: only with --stream (the rate is held chunk by chunk)")
  if args.target_fps is not None and args.threshold is not None:
    raise ValueError("--target-fps and --threshold: give one of them (the frame rate sets tau chunk by chunk)")
  min_steps, max_steps = resolve_steps(config, args.min_steps, args.max_steps)
  formats = [f.strip() for f in args.formats.split(",") if f.strip()]
  from dsa_jax.sampling.outputs import VIDEO_FORMATS
  if not formats or any(f not in VIDEO_FORMATS for f in formats):
    raise ValueError(f"--formats: expected a comma-separated subset of {','.join(VIDEO_FORMATS)}, got {args.formats!r}")
  if "mp4" in formats:  # found out now, not after the sampling
    try:
      import imageio_ffmpeg  # noqa: F401
    except ImportError:
      raise ValueError("--formats mp4: writing mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg); "
                       "or write gifs only with --formats gif") from None
  prompts = read_prompts(args)
  schedule = None
  if args.prompt_schedule is not None:  # one video; its prompts become the schedule's contexts
    from dsa_jax.sampling.inputs import parse_schedule
    schedule = parse_schedule(args.prompt_schedule)
  names = output_names(prompts[:1] if schedule else prompts, args.name)
  ckpt = config.sampling.checkpoint if args.ckpt is None else args.ckpt
  from dsa_jax.sampling import guards
  guidance = guards.check_finite_number(config.sampling.guidance if args.guidance is None else args.guidance,
                                        "--guidance" if args.guidance is not None else "config.sampling.guidance")
  seed = config.seed if args.seed is None else args.seed
  guards.check_seeds(seed, len(prompts), "--seed" if args.seed is not None else "config.seed")
  batch = config.sampling.batch_size if args.batch_size is None else args.batch_size
  if batch < 1:
    raise ValueError(f"--batch-size: must be >= 1, got {batch}")
  batch_requested = args.batch_size is not None or batch != 1
  batch = 1 if schedule else min(batch, len(prompts))
  check_out_dir(args.out)
  if not args.no_compile_cache:
    enable_compile_cache(args.compile_cache)

  import jax

  from dsa_jax.checkpoint.loading import load_sampler_params
  from dsa_jax.data.text_context import make_text_encoder
  from dsa_jax.diffusion.guidance import is_on
  from dsa_jax.parallel.mesh import describe as mesh_describe
  from dsa_jax.sampling import outputs
  from dsa_jax.sampling import sampler as sampler_lib
  from dsa_jax.sampling import stream as stream_lib
  from dsa_jax.sampling.decode import PixelDecoder

  warn = lambda m: print(m, file=sys.stderr, flush=True)
  params, source = load_sampler_params(config, ckpt, use_ema=not args.no_ema, warn=warn, cast=True, head=args.head)
  min_steps, max_steps = budget_step_range(config, args, source, (min_steps, max_steps), warn)
  threshold, budget_note = resolve_budget(config, args, threshold, source, ckpt, warn,
                                          step_range=(min_steps, max_steps))
  fps_controller = None
  if args.target_fps is not None:
    from dsa_jax.sampling.budget import FpsController, check_table_fits, pick_table, sampler_settings
    table = pick_table(source, None, step_range=(min_steps, max_steps))  # the table of the range chosen above
    if table:
      check_table_fits(table, step_range=(min_steps, max_steps), **sampler_settings(config),
                       source=repr(ckpt or "the model"))
    fps_controller = FpsController(table, args.target_fps,
                                   initial_steps=args.mean_steps or config.sampling.mean_steps or None)
  sampler = sampler_lib.make_sampler(config, num_frames=args.num_frames)
  if sampler.mesh is not None:
    from dsa_jax.parallel.mesh import mesh_sizes
    sizes = mesh_sizes(sampler.mesh)
    batch, note = batch_over_devices(batch, batch_requested, sizes["data"] * sizes["fsdp"], len(prompts),
                                     bool(schedule))
    if note:
      warn(note)
  decoder = PixelDecoder(config)
  use_cfg = is_on(guidance)
  # Every prompt is encoded up front (unknown words and truncation are reported, or refused, before anything is
  # compiled), then the text encoder is let go: umT5-XXL holds 10.6 GiB that sampling does not need.
  encode = make_text_encoder(config, strict=args.strict_prompts, warn=warn)
  contexts, uncond = encode_batches(encode, prompts, batch, schedule=schedule,
                                    negative_prompt=config.text.negative_prompt if use_cfg else None,
                                    dtype=config.compute.dtype)
  del encode
  init_latents, prompt_index = _long_video_inputs(args, config, sampler, decoder, schedule, warn)
  if schedule:
    prompts = [args.prompt_schedule]
  _say(f"sampling {len(prompts)} video(s) of {sampler.num_frames} latent frames ({sampler.num_chunks} chunks "
       f"of {sampler.chunk_frames}{_window_note(sampler)}) on {jax.devices()[0].device_kind}"
       f"{'' if sampler.mesh is None else ' (' + mesh_describe(sampler.mesh) + ')'}: tau={threshold:g}{budget_note} "
       f"steps in [{min_steps}, {max_steps}] of a {sampler.num_steps}-step ladder, guidance {guidance:g}, "
       f"weights: {source.get('path', 'random')}{_head_note(source)}")
  summary = config_summary(config, sampler)
  compile_s = None
  written = []
  for start in range(0, len(prompts), batch):
    group = prompts[start:start + batch]
    n_real = len(group)
    context = np.asarray(contexts[start // batch], np.float32)
    seeds = np.arange(seed + start, seed + start + n_real)
    seeds = np.concatenate([seeds, np.repeat(seeds[-1:], batch - n_real)])  # padding stays within uint32
    controls = sampler.make_controls(batch, threshold=threshold, min_steps=min_steps, max_steps=max_steps,
                                     guidance=guidance, seed=seeds)
    uc = None if uncond is None else np.broadcast_to(np.asarray(uncond, np.float32), (batch,) + uncond.shape[1:])
    extra = {"init_latents": init_latents, "prompt_index": prompt_index}
    t0 = time.perf_counter()
    pixels, chunk_taus = None, None
    if args.stream:
      chunks = []
      for ch in stream_lib.stream(sampler, params, context, controls, uncond_context=uc, decoder=decoder,
                                  fps_controller=fps_controller, uint8=True, **extra):
        chunks.append(ch)
        note = " (includes compilation)" if ch.index == 0 and compile_s is None else ""
        _say(f"  [{start + 1}-{start + n_real}/{len(prompts)}] chunk {ch.index + 1}/{sampler.num_chunks}: "
             f"{ch.iters} steps, {ch.seconds:.2f} s{note}; steps/frame {ch.steps[:n_real].tolist()}")
      col = stream_lib.collect(chunks)
      lat, steps, conf, trace, iters = (col["latents"], col["steps"], col["confidences"], col["conf_trace"],
                                        col["chunk_iters"])
      chunk_taus = col["chunk_thresholds"]
      pixels = col["pixels"]
      if compile_s is None:
        compile_s = float("nan")  # folded into the first chunk's time when streaming
      sample_s = time.perf_counter() - t0
      decode_s = 0.0
    else:
      if compile_s is None:
        _say("compiling the sampler ...")
        compile_s = sampler.compile(params, context, controls, uncond_context=uc, **extra)
        if sampler.fp8_calibration_s is not None:
          _say(f"calibrated the fp8 activation scales on this batch's prompts in {sampler.fp8_calibration_s:.1f} s")
        _say(f"compiled in {compile_s:.1f} s")
        t0 = time.perf_counter()
      out = jax.device_get(sampler.sample(params, context, controls, uncond_context=uc, **extra))
      sample_s = time.perf_counter() - t0
      lat, steps, conf, trace, iters = out.latents, out.steps, out.confidences, out.conf_trace, out.chunk_iters
    guards.check_sample(lat[:n_real], conf[:n_real], guidance=guidance, source=source.get("path", ""),
                        dtype=config.compute.dtype)
    if not args.stream:
      t1 = time.perf_counter()
      pixels = np.asarray(decoder.decode_video(lat[:n_real], uint8=True))  # frames leave the device as uint8
      decode_s = time.perf_counter() - t1
    _say(f"  [{start + 1}-{start + n_real}/{len(prompts)}] sampled in {sample_s:.2f} s (+ {decode_s:.2f} s decode), "
         f"mean {steps[:n_real].mean():.2f} steps/frame, denoising forwards per chunk {np.asarray(iters).tolist()}")
    for j in range(n_real):
      i = start + j
      record = {
          "name": names[i], "prompt": prompts[i], "index": i, "seed": int(seeds[j]),
          "prompt_schedule": [{"frame": f, "prompt": p} for f, p in schedule] if schedule else None,
          "init": args.init_video or args.init_image, "given_frames": 0 if init_latents is None else len(init_latents),
          "threshold": threshold, "stop_rule": sampler.stop_rule, "min_steps": min_steps, "max_steps": max_steps,
          "guidance": guidance, "steps": steps[j], "confidences": conf[j], "conf_trace": trace[j],
          "mean_steps": float(np.mean(steps[j])), "chunk_iters_batch": iters,
          # --target-fps: tau was set per chunk (threshold above is the first chunk's starting point)
          **({"target_fps": args.target_fps, "chunk_thresholds": chunk_taus} if chunk_taus is not None else {}),
          "latent_frames": int(lat.shape[1]), "pixel_frames": int(pixels.shape[1]), "fps": config.video.fps,
          "timings": {"compile_s": compile_s, "batch_sample_s": sample_s, "batch_decode_s": decode_s,
                      "batch_size": batch, "streamed": bool(args.stream)},
          "checkpoint": source, "config": summary,
      }
      paths = outputs.write_sample(args.out, names[i], pixels[j], record, fps=config.video.fps,
                                   chunk_frames=config.video.chunk_frames, formats=formats)
      written.append(paths)
      _say(f"  wrote {', '.join(paths[k] for k in paths)}")
  return 0
