"""Checks on what the sampler produced and on the numbers that steer it, so that bad input fails with a message
instead of writing a grey NaN video.
"""

from __future__ import annotations

import math

import numpy as np

SEED_LIMIT = 2**32  # seeds are uint32 PRNG keys


class NonFiniteSampleError(ValueError):
  """The sampler returned NaN/inf latents or confidences."""


def check_sample(latents, confidences, *, guidance=None, source: str = "", dtype: str = ""):
  """Raises NonFiniteSampleError naming the likely cause when any latent or confidence is NaN/inf."""
  lat = np.asarray(latents, np.float32)
  conf = np.asarray(confidences, np.float32)
  bad_lat, bad_conf = ~np.isfinite(lat), ~np.isfinite(conf)
  if not bad_lat.any() and not bad_conf.any():
    return
  what = []
  if bad_lat.any():
    frames = sorted({int(f) for f in np.argwhere(bad_lat)[:, 1]}) if lat.ndim >= 2 else []
    what.append(f"latents (frames {frames[:8]}{' ...' if len(frames) > 8 else ''})")
  if bad_conf.any():
    what.append("confidences")
  causes = []
  if guidance is not None and not math.isfinite(float(guidance)):
    causes.append(f"the guidance scale is {guidance}")
  if source:
    causes.append(f"the weights {source!r} are corrupt or come from a diverged run")
  if dtype == "float16":
    causes.append("float16 overflow (try --config.compute.dtype=bfloat16)")
  if not causes:
    causes.append("corrupt or diverged weights")
  raise NonFiniteSampleError(f"the sampler produced non-finite {' and '.join(what)}; no video written. Likely cause: "
                             + "; or ".join(causes))


def check_finite_number(value, name: str, *, allow_inf: bool = False) -> float:
  """`value` as a float; NaN (and inf unless allowed) is a ValueError naming `name`."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: expected a number, got {value!r}") from None
  if math.isnan(v) or (not allow_inf and math.isinf(v)):
    raise ValueError(f"{name}: expected a finite number{' (inf allowed)' if allow_inf else ''}, got {value!r}")
  return v


def check_seeds(first: int, count: int = 1, name: str = "seed"):
  """Seeds first .. first+count-1 must be uint32 values: -1 would silently become 4294967295."""
  if isinstance(first, bool) or not isinstance(first, (int, np.integer)):
    raise ValueError(f"{name}: expected an integer in [0, 2**32), got {first!r}")
  if not 0 <= first or first + count - 1 >= SEED_LIMIT:
    span = f"{first}" if count == 1 else f"{first}..{first + count - 1} (one per prompt)"
    raise ValueError(f"{name}: seeds must lie in [0, 2**32 - 1 = {SEED_LIMIT - 1}], got {span}")
