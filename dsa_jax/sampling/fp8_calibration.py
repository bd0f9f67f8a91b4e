"""fp8 activation calibrations stored in a model folder, so that sampling with calibrated fp8 layers
(`compute.matmul='fp8'`, `compute.fp8_activations='calibrated'`) does not calibrate again in every process (for the
1.3B model that is 33-45 s on an H200, mostly compiling the calibration forward).

  dsa-jax calibrate --config configs/wan_1_3b.py --ckpt MODEL --fp8 [--prompts prompts.txt] [--num 8 --batch 1]

`calibrate` runs the sampler's calibration pass (`Sampler.fp8_calibration`) over the prompts in batches, keeps the
largest activation magnitude per fp8 layer, and writes it into the model's metadata with what it was made for: the
generator network (EMA or not), the compute dtype, the video size and the ladder. `load_sampler_params` attaches a
stored calibration to the generator when all of these match the sampling config; otherwise the sampler calibrates at
its first call as before, and says why the stored one was not used.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import numpy as np

META_KEY = "fp8_activation_amax"


def conditions(config, generator: str) -> dict:
  """What a calibration holds for: the generator network, compute dtype, video size and ladder."""
  v = config.video
  return {"generator": generator, "dtype": str(config.compute.dtype),
          "video": [int(v.num_frames), int(v.height), int(v.width), int(v.chunk_frames)],
          "ladder": [float(t) for t in config.sampling.ladder]}


def wants_calibration(config) -> bool:
  c = config.compute
  return c.get("matmul", "default") == "fp8" and c.get("fp8_activations", "dynamic") == "calibrated"


def stored(meta: dict, config, generator: str) -> tuple[Optional[dict], str]:
  """(the amax tree as float32 arrays, '') from a model's metadata when its calibration holds for this config and
  generator, else (None, why not)."""
  entry = meta.get(META_KEY)
  if not entry:
    return None, "the model stores none (dsa-jax calibrate --fp8 makes one)"
  want = conditions(config, generator)
  differ = [k for k in want if entry.get(k) != want[k]]
  if differ:
    return None, "it was made for another " + ", ".join(f"{k} ({entry.get(k)!r}, here {want[k]!r})" for k in differ)
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), entry["amax"],
                                is_leaf=lambda x: isinstance(x, list)), ""


def calibrate(config, ckpt: str, *, num: int = 8, batch: int = 1, seed: int = 0, write: bool = True,
              prompt_file: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
  """Calibrates the fp8 activation scales of the model at `ckpt` on `num` prompts (the config's training prompts or
  `prompt_file`), `batch` videos per calibration pass, and with `write` stores the result in the model's metadata.
  Returns the metadata entry."""
  import time

  from dsa_jax.checkpoint import loading, params_io
  from dsa_jax.sampling.budget import (BudgetError, calibration_inputs, calibration_prompts_note,
                                       check_model_folder)
  from dsa_jax.sampling.sampler import make_sampler

  check_model_folder(ckpt, "the fp8 calibration")
  if int(num) < 1 or int(batch) < 1:
    raise BudgetError(f"--num / --batch: expected at least 1 prompt, got {num} / {batch}")
  config = config.copy_and_resolve_references()
  config.compute.update(matmul="fp8", fp8_activations="calibrated")
  params, source = loading.load_sampler_params(config, ckpt, warn=log, cast=True, fp8_calibration=False)
  sampler = make_sampler(config)
  prompts, contexts, uncond = calibration_inputs(config, num, prompt_file)
  amax, t0 = None, time.perf_counter()
  for start in range(0, len(prompts), batch):
    amax = sampler.fp8_calibration(params["generator"], contexts[start:start + batch], uncond,
                                   jax.random.PRNGKey(seed + start), amax=amax)
    log(f"  fp8 calibration: {min(start + batch, len(prompts))}/{len(prompts)} prompts "
        f"({time.perf_counter() - t0:.1f} s)")
  entry = {**conditions(config, source.get("generator", "generator")),
           "amax": jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32).tolist(), amax),
           "prompts": calibration_prompts_note(config, len(prompts), prompt_file)}
  if write:
    params_io.update_meta(ckpt, **{META_KEY: entry})
    log(f"wrote the fp8 activation calibration into {os.path.join(ckpt, params_io.META_FILE)}")
  return entry
