"""What the DiT, the umT5 encoder and the VAE share: the compute-dtype names and one RMSNorm.

Dtype convention (all model configs): `dtype` / `param_dtype` fields hold jnp dtypes (`jnp.float32`,
`jnp.bfloat16`, `jnp.float16`); config files and checkpoint metadata hold their names ('float32', ...). `DTYPES`
maps names to dtypes, `to_dtype` accepts either and `dtype_name` goes back.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(value, field: str = "dtype"):
  """A name from `DTYPES` or one of its dtypes -> the jnp dtype; anything else is an error naming `field`."""
  if isinstance(value, str):
    if value not in DTYPES:
      raise ValueError(f"{field}: unknown dtype {value!r} (expected one of {sorted(DTYPES)})")
    return DTYPES[value]
  for d in DTYPES.values():
    if value is d or jnp.dtype(value) == jnp.dtype(d):
      return d
  raise ValueError(f"{field}: unsupported dtype {value!r} (expected one of {sorted(DTYPES)})")


def dtype_name(value) -> str:
  """jnp dtype (or name) -> its name in `DTYPES`, for JSON."""
  return jnp.dtype(to_dtype(value)).name


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * scale over the trailing dims named by `axes`; statistics in float32.

  The DiT's q/k norm normalises over heads x head_dim (`axes=("heads", "kv")`, a (heads, head_dim) scale), umT5's
  layer norm and the VAE's norm over channels (the VAE's `x / ||x|| * sqrt(C)` is the same quantity). The output is
  in `dtype`, or in the input's dtype when None.
  """
  eps: float = 1e-6
  axes: tuple = ("embed",)
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = len(self.axes)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes), x.shape[-n:],
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=tuple(range(-n, 0)), keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Matmul precision of the DiT's linear layers (`compute.matmul`)

MATMULS = ("default", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_quantize(x):
  """x -> (float8_e4m3fn values, float32 per-tensor scale) with x ~ values * scale (amax mapped to FP8_MAX)."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  scale = jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / FP8_MAX
  q = jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
  return q, scale


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` on float8_e4m3fn operands with per-tensor scales: the weight's from its amax, the
  activation's from its amax at this call (dynamic scaling, no calibration state to carry). The product accumulates in
  float32 and is rescaled into the input dtype, so XLA on Hopper can run it as an fp8 GEMM."""
  del precision, preferred_element_type
  qx, sx = _fp8_quantize(lhs)
  qw, sw = _fp8_quantize(rhs)
  out = jax.lax.dot_general(qx, qw, dimension_numbers, preferred_element_type=jnp.float32)
  return (out * (sx * sw)).astype(lhs.dtype)


def matmul_fn(name: str, field: str = "compute.matmul"):
  """The `dot_general` of a `compute.matmul` name for flax's Dense layers (None: lax.dot_general)."""
  if name not in MATMULS:
    raise ValueError(f"{field}: expected one of {', '.join(MATMULS)}, got {name!r}")
  return fp8_dot_general if name == "fp8" else None
