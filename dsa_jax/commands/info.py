"""Prints a JSON summary of a config: parameter counts, tokens, FLOPs per chunk forward.

  dsa-jax info --config configs/wan_1_3b.py
"""

from __future__ import annotations

import json

HELP = "parameter counts, tokens and FLOPs of a config (JSON)"


def add_arguments(p):
  p.add_argument("--config", required=True, help="config file (path[:arg])")


def summarize(config) -> dict:
  from dsa_jax.config_lib import latent_hw, pixel_frames, tokens_per_frame
  from dsa_jax.models import factory

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
                     "max_steps": config.sampling.max_steps, "threshold": config.sampling.threshold}
  return out


def main(args):
  from dsa_jax.config_lib import get_config
  config = get_config(args.config, args.overrides)
  print(json.dumps(summarize(config), indent=2))
