"""Prints a JSON summary of a config: parameter counts, tokens, FLOPs per chunk forward; with --mesh or
--device-memory also the per-device memory of sampling and of one training step, and whether they fit.

  dsa-jax info --config configs/wan_1_3b.py
  dsa-jax info --config configs/wan_1_3b.py --mesh data=1,tensor=8 --device-memory 16GB

The memory estimate compiles both programs for the mesh on abstract inputs (nothing is allocated). Where this
machine has fewer accelerators than the mesh, it compiles for that many simulated CPU devices, with the attention
backend the CPU runs (xla, which stores the attention logits: an upper bound for cuDNN/splash).
"""

from __future__ import annotations

import json
import math
import os

HELP = "parameter counts, tokens and FLOPs of a config (JSON)"


def add_arguments(p):
  p.add_argument("--config", required=True, help="config file (path[:arg])")
  p.add_argument("--mesh", default=None, help="mesh for the memory estimate, e.g. data=1,tensor=8 (axes not named "
                 "are 1; default with --device-memory: config.mesh over this machine's devices)")
  p.add_argument("--device-memory", default=None, help="memory of one device, e.g. 16GB or 16GiB: says whether "
                 "sampling and a training step fit")
  p.add_argument("--programs", default=PROGRAMS_DEFAULT, help="which programs the memory estimate compiles: "
                 "sampling, training or both (default); needs --mesh or --device-memory")
  p.add_argument("--batch-size", type=int, default=None, help="videos per sampling call for the memory estimate "
                 "(default: config.sampling.batch_size); needs --mesh or --device-memory")


def summarize(config) -> dict:
  from dsa_jax.config_lib import latent_hw, pixel_frames, tokens_per_frame
  from dsa_jax.models import factory
  from dsa_jax.sampling.stop_rules import config_first_chunk_floor

  gen = factory.dit_config(config, "model")
  out = {"name": config.name}
  counts = {"generator": factory.param_count(factory.abstract_dit_params(gen, config)),
            "confidence_head": factory.param_count(factory.abstract_head_params(config))}
  for role in ("teacher", "critic"):
    counts[role] = factory.param_count(factory.abstract_dit_params(factory.dit_config(config, role), config))
  counts["head_share_of_generator"] = counts["confidence_head"] / counts["generator"]
  out["params"] = counts
  tpf = tokens_per_frame(config)
  lh, lw = latent_hw(config)
  out["video"] = {"pixels": [config.video.height, config.video.width], "latent": [lh, lw],
                  "latent_frames": config.video.num_frames, "pixel_frames": pixel_frames(config),
                  "chunk_frames": config.video.chunk_frames,
                  "chunks": config.video.num_frames // config.video.chunk_frames}
  out["tokens"] = {"per_frame": tpf, "per_chunk": tpf * config.video.chunk_frames,
                   "per_video": tpf * config.video.num_frames}
  flops = {"generator": factory.chunk_flops(config, gen)}
  teacher = factory.dit_config(config, "teacher")
  full = tpf * config.video.num_frames
  flops["teacher_full_video"] = factory.dit_forward_flops(teacher, full, full, config.video.num_frames)
  out["flops_per_forward"] = flops
  out["sampling"] = {"ladder": list(config.sampling.ladder), "min_steps": config.sampling.min_steps,
                     "max_steps": config.sampling.max_steps, "threshold": config.sampling.threshold,
                     "first_chunk_min_steps": config_first_chunk_floor(config)}
  return out


def _estimate_mesh(config, text):
  """The mesh of the estimate: on this machine's devices, or on as many simulated CPU devices."""
  from dsa_jax.parallel import memory
  from dsa_jax.parallel import mesh as mesh_lib
  if text is None:
    return mesh_lib.make_mesh(config), config
  shape = memory.parse_mesh(text)
  n = math.prod(shape.values())
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:  # read when jax first starts its CPU backend
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  import jax
  devices = jax.devices()
  if len(devices) < n:
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"--mesh {text}: needs {n} devices; this process has {len(devices)} CPU devices (run the "
                       "command in a fresh process)")
    if jax.devices()[0].platform != "cpu":
      config = config.copy_and_resolve_references()
      config.compute.attention = "xla"
  return mesh_lib.make_mesh(config, devices=devices[:n], shape=shape), config


PROGRAMS_DEFAULT = "sampling,training"


def parse_programs(text) -> tuple[str, ...]:
  """--programs 'sampling,training' -> ('sampling', 'training'); anything else is an error naming the option."""
  programs = tuple(x.strip() for x in str(text).split(",") if x.strip())
  if not programs or set(programs) - {"sampling", "training"}:
    raise ValueError(f"--programs: expected sampling, training or sampling,training, got {text!r}")
  return programs


def check_estimate_options(args) -> bool:
  """Whether the memory estimate runs (--mesh or --device-memory); its own options are checked either way, and
  given without it they are an error rather than dropped."""
  estimate = args.mesh is not None or args.device_memory is not None
  parse_programs(args.programs)
  if args.batch_size is not None and args.batch_size < 1:
    raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
  if not estimate:
    given = [flag for flag, on in (("--programs", args.programs != PROGRAMS_DEFAULT),
                                   ("--batch-size", args.batch_size is not None)) if on]
    if given:
      raise ValueError(f"{' and '.join(given)}: only for the memory estimate, which needs --mesh or --device-memory")
  return estimate


def main(args):
  from dsa_jax.config_lib import get_config
  estimate = check_estimate_options(args)
  config = get_config(args.config, args.overrides)
  if estimate:  # before anything starts jax: the mesh may need simulated devices
    from dsa_jax.parallel import memory
    device_memory = None if args.device_memory is None else memory.parse_bytes(args.device_memory)
    batch = config.sampling.batch_size if args.batch_size is None else args.batch_size
    if batch < 1:
      raise ValueError(f"config.sampling.batch_size: must be >= 1 for the memory estimate, got {batch}")
    programs = parse_programs(args.programs)
    mesh, est_config = _estimate_mesh(config, args.mesh)
  out = summarize(config)
  if estimate:
    out["memory_per_device"] = memory.fit_report(est_config, mesh, device_memory, batch, programs)
  print(json.dumps(out, indent=2))
