"""What the DiT, the umT5 encoder and the VAE share: the compute-dtype names and one RMSNorm.

Dtype convention (all model configs): `dtype` / `param_dtype` fields hold jnp dtypes (`jnp.float32`,
`jnp.bfloat16`, `jnp.float16`); config files and checkpoint metadata hold their names ('float32', ...). `DTYPES`
maps names to dtypes, `to_dtype` accepts either and `dtype_name` goes back.
"""

from __future__ import annotations

import math
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
FP8_ROW_MULTIPLE = 16  # cuBLASLt's fp8 GEMMs take row counts that are multiples of 16


def fp8_scale(amax):
  """The per-tensor scale of values whose largest magnitude is `amax`: the smallest power of two s with amax / s <=
  FP8_MAX. A power of two is exact in every float type, so x / s and q * s round nothing beyond the float8 cast."""
  amax = jnp.maximum(jnp.asarray(amax, jnp.float32), jnp.finfo(jnp.float32).tiny)
  return jnp.exp2(jnp.ceil(jnp.log2(amax / FP8_MAX)))


def quantize_fp8(x, axis=None):
  """x -> (float8_e4m3fn values, float32 scale) with x ~ values * scale; `axis`: keep that axis (one scale per
  index along it, e.g. per layer of stacked weights), else one scale for the tensor."""
  reduce = None if axis is None else tuple(d for d in range(x.ndim) if d != axis % x.ndim)
  scale = fp8_scale(jnp.max(jnp.abs(x), axis=reduce, keepdims=axis is not None))
  q = jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
  return q, (scale if axis is None else scale.reshape(-1))


FP8_ACTIVATIONS = ("dynamic", "calibrated")
FP8_CALIBRATION_HEADROOM = 2.0  # calibrated activation scales leave one power of two above the calibration amax


def quantize_fp8_static(x, scale):
  """x -> float8_e4m3fn values with a given power-of-two `scale` (x ~ values * scale), saturating at +-FP8_MAX: a
  pure elementwise map, which XLA fuses into the producer of x (no pass over x to find its amax)."""
  inv = (1.0 / jnp.asarray(scale, jnp.float32)).astype(jnp.float32)  # exact: the scale is a power of two
  return jnp.clip(x.astype(jnp.float32) * inv, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _fp8_product(x, qw, sw, dtype, sx=None):
  """(rows, K) activations x float8 (K, N) weights with scale `sw` -> (rows, N) in `dtype`; `sx`: the activation's
  scale (calibrated), else from its amax at this call."""
  rows = x.shape[0]
  x = jnp.pad(x, ((0, -rows % FP8_ROW_MULTIPLE), (0, 0)))
  if sx is None:
    qx, sx = quantize_fp8(x)
  else:
    qx = quantize_fp8_static(x, sx)
  return (jax.lax.dot(qx, qw, preferred_element_type=dtype) * (sx * sw).astype(dtype))[:rows]


@jax.custom_vjp
def _fp8_matmul(x, w):
  return _fp8_product(x, *quantize_fp8(w), x.dtype)


def _fp8_matmul_fwd(x, w):
  return _fp8_matmul(x, w), (x, w)


def _fp8_matmul_bwd(res, g):
  # Straight through the quantization: the gradients of x @ w in the input dtype (float32 accumulation). Through
  # the float8 product itself they would come back as float8 cotangents without a scale, i.e. mostly zero.
  x, w = res
  g = g.astype(x.dtype)
  return (jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype),
          jnp.dot(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype))


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, quantized_rhs=None,
                    x_scale=None):
  """`lax.dot_general` of a Dense layer in float8_e4m3fn with per-tensor power-of-two scales: the activation's from
  its amax at this call (dynamic scaling, no calibration state), the weight's from its amax, or `quantized_rhs` =
  (float8 kernel, scale) quantized once beforehand (`DiT fp8_weights`: a sampler does it once per program, not at
  every forward; `rhs` is then unused, and nothing is differentiated). The float8 operands go to the dot as they
  are (XLA on Hopper runs it as a cuBLASLt fp8 GEMM; dequantized operands would let it hoist the weights'
  dequantization out of the sampler's loops and run a bf16 GEMM), its output in the input dtype, and the product of
  the two power-of-two scales applied after (exact, fused into the consumer). The activation's rows are padded to a
  multiple of 16 in the quantizing pass (cuBLASLt's fp8 row alignment), not copied again by XLA. Gradients pass
  straight through the quantization (those of the same product in the input dtype). `x_scale`: the activation's
  power-of-two scale fixed beforehand (calibrated; with `quantized_rhs` only), so quantizing it is elementwise."""
  del precision, preferred_element_type
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(d % lhs.ndim for d in lc), tuple(d % rhs.ndim for d in rc)
  if lb or rb or lc != tuple(range(lhs.ndim - len(lc), lhs.ndim)) or rc != tuple(range(len(rc))):
    raise ValueError(f"fp8_dot_general: expects a Dense layer's contraction (trailing lhs dims with leading rhs "
                     f"dims, no batch dims), got {dimension_numbers}")
  k = math.prod(lhs.shape[lhs.ndim - len(lc):])
  x = lhs.reshape(-1, k)
  if quantized_rhs is None:
    if x_scale is not None:
      raise ValueError("fp8_dot_general: x_scale (a calibrated activation scale) needs quantized_rhs")
    y = _fp8_matmul(x, rhs.astype(lhs.dtype).reshape(k, -1))
  else:
    qw, sw = quantized_rhs
    y = _fp8_product(x, qw.reshape(k, -1), sw, lhs.dtype, x_scale)
  return y.reshape(lhs.shape[:lhs.ndim - len(lc)] + rhs.shape[len(rc):])


def matmul_fn(name: str, field: str = "compute.matmul"):
  """The `dot_general` of a `compute.matmul` name for flax's Dense layers (None: lax.dot_general)."""
  if name not in MATMULS:
    raise ValueError(f"{field}: expected one of {', '.join(MATMULS)}, got {name!r}")
  return fp8_dot_general if name == "fp8" else None
