"""Wan2.1 video VAE (``AutoencoderKLWan``) in pure-functional Flax linen.

Layout is channels-last throughout: video ``(B, T, H, W, 3)`` in [-1, 1], latents ``(B, F, h, w, z)`` with
``F = 1 + (T - 1) // 4`` and ``h, w = H / 8, W / 8``. Only the Wan2.1 variant (``is_residual=False``,
no patchify) is implemented.

Causality. Every 3x3x3 convolution is causal in time: its input stream is padded on the left with
``kT - 1 = 2`` zero frames. Running a stream chunk by chunk therefore only needs the last 2 input frames of
every such convolution (the "feature cache" of the reference code); a zero cache is the same as the zero
padding. Two layers treat the very first frame of a stream specially (this is what makes 1 pixel frame <->
1 latent frame at t=0):

* decoder ``upsample3d``: frame 0 is *not* temporally doubled; every later frame is doubled by a causal
  ``time_conv`` whose stream excludes frame 0 (its cache starts at zero after frame 0).
* encoder ``downsample3d``: frame 0 passes through; later frames are reduced by a stride-2 temporal conv
  whose window includes the previous chunk's last frame (a 1-frame cache).

Both are selected by a *static* Python flag ``first`` (the first chunk of a stream has a different output
length, so it is a separate compilation anyway: 1 + 4(K-1) pixel frames for K latent frames instead of 4K).
The caches are plain dict pytrees of fixed-shape arrays, so ``decode_chunk(first=False)`` is jit- and
``lax.scan``-friendly; ``decode`` with ``chunk_size`` uses exactly that.

The caches hold activations in the compute dtype; params stay in ``param_dtype`` (fp32 by default) and are
cast at use. RMS norms and the attention softmax run in fp32.

Speed. Convolutions run in the compute dtype (bf16 for the Wan recipes) on channels-last arrays, so XLA needs no
layout transposes around them. Each RMS norm and the SiLU after it are one fp32 elementwise expression cast once to
the compute dtype (one fusion, one write). A causal conv without a cache (the first chunk of a stream) pads time
inside the convolution instead of concatenating zero frames, and the nearest 2x upsampling followed by its 3x3 conv is
computed as four 2x2 convs of the low-resolution input (no upsampled copy, 0.44x the FLOPs). How
the 3x3x3 convs are lowered is a choice (``conv3d``: one 3D conv, time taps folded into channels of one 2D conv, or
per-tap 2D outputs summed); the decoder's functions take it, the result is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsa_jax.models.layers import RMSNorm

Array = jax.Array
Dtype = Any

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

_CONV_AXES_3D = (None, None, None, "conv_in", "conv_out")
_CONV_AXES_2D = (None, None, "conv_in", "conv_out")


class VAEConfigError(ValueError):
  """A VAE config field has an unsupported or inconsistent value."""


class VAEInputError(ValueError):
  """An input array to the VAE has the wrong shape."""


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """Hyper-parameters of the Wan2.1 VAE (names follow the diffusers config, typos included)."""

  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  in_channels: int = 3
  out_channels: int = 3

  def __post_init__(self):
    # Normalise list-typed fields to tuples so the config is hashable (static jit argument).
    for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "temperal_downsample", tuple(bool(b) for b in self.temperal_downsample))
    object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
    object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
    if self.base_dim <= 0 or self.z_dim <= 0 or self.num_res_blocks <= 0:
      raise VAEConfigError(
          f"WanVAEConfig: base_dim, z_dim and num_res_blocks must be positive, got "
          f"{self.base_dim}, {self.z_dim}, {self.num_res_blocks}")
    if len(self.dim_mult) < 1:
      raise VAEConfigError("WanVAEConfig.dim_mult must be non-empty")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise VAEConfigError(
          f"WanVAEConfig.temperal_downsample must have len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
          f"entries, got {len(self.temperal_downsample)}")
    if self.attn_scales:
      raise VAEConfigError(
          "WanVAEConfig.attn_scales must be empty (Wan2.1 has no encoder attention; the reference "
          f"code cannot run with it either), got {self.attn_scales}")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise VAEConfigError(
          f"WanVAEConfig.latents_mean/latents_std must have z_dim = {self.z_dim} entries, got "
          f"{len(self.latents_mean)} and {len(self.latents_std)}")
    if any(s <= 0 for s in self.latents_std):
      raise VAEConfigError("WanVAEConfig.latents_std must be positive")
    if self.dropout != 0.0:
      warnings.warn("WanVAEConfig.dropout is ignored: this VAE is inference-only (deterministic).")

  # Derived sizes.
  @property
  def dec_base_dim(self) -> int:
    return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(self.temperal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  def num_latent_frames(self, num_frames: int) -> int:
    return 1 + (num_frames - 1) // self.temporal_factor

  def num_pixel_frames(self, num_latent_frames: int) -> int:
    return 1 + (num_latent_frames - 1) * self.temporal_factor

  # Serialisation.
  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

  @classmethod
  def from_dict(cls, d: dict) -> "WanVAEConfig":
    """Strict inverse of ``to_dict``: unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise VAEConfigError(f"WanVAEConfig.from_dict: unknown keys {unknown}; expected a subset of "
                           f"{sorted(names)}")
    return cls(**d)

  @classmethod
  def from_diffusers_config(cls, d: dict) -> "WanVAEConfig":
    """Build from a diffusers ``AutoencoderKLWan`` config.json dict (Wan2.1 only)."""
    d = dict(d)
    cls_name = d.get("_class_name")
    if cls_name is not None and cls_name != "AutoencoderKLWan":
      raise VAEConfigError(f"diffusers VAE config: _class_name is {cls_name!r}, expected 'AutoencoderKLWan'")
    if d.get("is_residual", False):
      raise VAEConfigError("diffusers VAE config: is_residual=True (Wan2.2 VAE) is not supported")
    if d.get("patch_size") not in (None, 1):
      raise VAEConfigError(f"diffusers VAE config: patch_size={d.get('patch_size')} is not supported "
                           "(Wan2.1 uses None)")
    names = {f.name for f in dataclasses.fields(cls)}
    known_ignored = {"is_residual", "patch_size", "scale_factor_temporal", "scale_factor_spatial"}
    unknown = sorted(k for k in d if k not in names and k not in known_ignored and not k.startswith("_"))
    if unknown:
      warnings.warn(f"diffusers VAE config: ignoring unknown keys {unknown}")
    cfg = cls(**{k: v for k, v in d.items() if k in names})
    # diffusers keeps these informational fields at their defaults even for other architectures.
    for key, have in (("scale_factor_temporal", cfg.temporal_factor), ("scale_factor_spatial", cfg.spatial_factor)):
      if d.get(key) is not None and int(d[key]) != have:
        warnings.warn(f"diffusers VAE config: {key}={d[key]} but the architecture gives {have}; "
                      "using the architecture's value")
    return cfg


# ----------------------------------------------------------------------------------------------- layers


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def _conv(x, w, strides, padding, dtype, precision):
  nd = x.ndim - 2
  dn = ("NTHWC", "THWIO", "NTHWC") if nd == 3 else ("NHWC", "HWIO", "NHWC")
  return jax.lax.conv_general_dilated(
      x.astype(dtype), w.astype(dtype), window_strides=strides, padding=padding,
      dimension_numbers=dn, precision=precision)


CONV3D_IMPLS = ("native", "fold", "taps")


def _time_window(segments, start: int, length: int):
  """Frames [start, start + length) of the time-concatenation of `segments` ((B, n, H, W, C) arrays, or ints for n
  zero frames), built from slices of the pieces: the concatenated sequence itself is never materialised."""
  parts, pos = [], 0
  ref = next(s for s in segments if not isinstance(s, int))
  for seg in segments:
    n = seg if isinstance(seg, int) else seg.shape[1]
    a, b = max(start, pos), min(start + length, pos + n)
    if a < b:
      if isinstance(seg, int):
        parts.append(jnp.zeros((ref.shape[0], b - a) + ref.shape[2:], ref.dtype))
      else:
        parts.append(seg[:, a - pos:b - pos])
    pos += n
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _conv3d_same_time(x, w, time_pad, impl, dtype, precision, history=None):
  """Stride-1 3D conv, 'same' in space, in time over [history or time_pad[0] zero frames, x, time_pad[1] zero
  frames] (valid), by `impl`:
  'native' one 3D convolution; 'fold' the kT time taps folded into channels (one 2D conv over kT*C input channels
  on a kT-times copy of the input, gathered straight from the history and x in one pass); 'taps' one 2D conv with
  kT*C_out outputs on every frame, whose kT output groups are shifted in time and summed (no input copy, kT-times
  the output). Same result; which is fastest depends on the backend's convolution kernels."""
  kt, kh, kw = w.shape[:3]
  pad_hw = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
  if impl not in CONV3D_IMPLS:
    raise VAEConfigError(f"conv3d: expected one of {CONV3D_IMPLS}, got {impl!r}")
  if history is not None and (impl != "fold" or kt == 1):
    x = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    history = None
  if impl == "native" or kt == 1:
    return _conv(x, w, (1, 1, 1), [time_pad] + pad_hw, dtype, precision)
  c, cout = w.shape[3], w.shape[4]
  if impl == "fold":
    x = x.astype(dtype)
    front = history.astype(dtype) if history is not None else time_pad[0]
    segments = [front, x, time_pad[1]]
    n = sum(s if isinstance(s, int) else s.shape[1] for s in segments)
    b, t = x.shape[0], n - kt + 1
    xs = jnp.concatenate([_time_window(segments, k, t) for k in range(kt)], axis=-1)
    xs = xs.reshape((b * t,) + x.shape[2:4] + (kt * c,))
    y = _conv(xs, jnp.transpose(w, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, cout), (1, 1), pad_hw, dtype, precision)
    return y.reshape((b, t) + y.shape[1:])
  b, t_in = x.shape[:2]
  z = _conv(x.reshape((b * t_in,) + x.shape[2:]), jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(kh, kw, c, kt * cout),
            (1, 1), pad_hw, dtype, precision)
  z = jnp.pad(z.reshape((b, t_in) + z.shape[1:3] + (kt, cout)), ((0, 0), time_pad) + ((0, 0),) * 4)
  t = z.shape[1] - kt + 1
  return sum(z[:, k:k + t, :, :, k].astype(jnp.float32) for k in range(kt)).astype(dtype)


def _zeros_cache(x: Array, n: int, dtype) -> Array:
  return jnp.zeros((x.shape[0], n) + x.shape[2:], dtype)


def _upsample_nearest2x(x: Array) -> Array:
  """(B, T, H, W, C) -> (B, T, 2H, 2W, C), nearest: one broadcast + reshape (a single fusion), exact."""
  b, t, h, w, c = x.shape
  y = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, 2, w, 2, c))
  return y.reshape(b, t, 2 * h, 2 * w, c)


def _subpixel_taps(w: Array, axis: int) -> list[tuple[Array, tuple[int, int]]]:
  """The two output phases of a 3-tap kernel (along `axis`) applied after a nearest 2x repeat, as 2-tap kernels on
  the low-resolution input with their 'same' padding: phase 0 sees rows (i-1, i, i) -> taps (w0, w1 + w2) over
  (i-1, i); phase 1 sees (i, i, i+1) -> taps (w0 + w1, w2) over (i, i+1)."""
  w0, w1, w2 = (jax.lax.index_in_dim(w, k, axis, keepdims=False) for k in range(3))
  return [(jnp.stack([w0, w1 + w2], axis), (1, 0)), (jnp.stack([w0 + w1, w2], axis), (0, 1))]


def upsample2x_conv3x3(x: Array, w: Array, dtype, precision) -> Array:
  """conv3x3_same(nearest_upsample_2x(x), w) without the upsampled input: each of the four output phases
  (row parity, column parity) is a 2x2 conv of the low-resolution input with summed taps, and the phases are
  interleaved once. 16 low-res taps instead of 9 taps at 4x the pixels (0.44x the FLOPs) and no 4x copy of the
  input; the same function (the taps are summed in the kernel's precision before the cast).

  x (N, H, W, C), w (3, 3, C, C_out) -> (N, 2H, 2W, C_out)."""
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  phases = []
  for wr, pad_r in _subpixel_taps(w, 0):
    phases.append([_conv(x, wc, (1, 1), [pad_r, pad_c], dtype, precision) for wc, pad_c in _subpixel_taps(wr, 1)])
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # (N, H, 2, W, 2, C_out)
  n, h, _, wd, _, co = y.shape
  return y.reshape(n, 2 * h, 2 * wd, co)


class CausalConv3d(nn.Module):
  """3D conv, causal in time (left zero padding of kT - 1 frames, or the cache), 'same' in space.

  Returns ``(y, new_cache)``; ``new_cache`` is the last kT - 1 frames of [cache, x] (None for kT == 1).
  With ``causal=False`` no time padding/cache is applied (caller handles it). ``conv3d`` picks how a stride-1
  conv is computed (`CONV3D_IMPLS`, see `_conv3d_same_time`).
  """

  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  strides: tuple[int, int, int] = (1, 1, 1)
  causal: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  @nn.compact
  def __call__(self, x: Array, cache: Array | None = None):
    kt, kh, kw = self.kernel_size
    kernel = self.param("kernel", _part(nn.initializers.lecun_normal(), _CONV_AXES_3D),
                        (kt, kh, kw, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", _part(nn.initializers.zeros, ("conv_out",)), (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    new_cache, history = None, None
    time_pad = (0, 0)
    if self.causal and kt > 1:
      old = _zeros_cache(x, kt - 1, self.dtype) if cache is None else cache.astype(self.dtype)
      new_cache = x[:, x.shape[1] - (kt - 1):] if x.shape[1] >= kt - 1 else \
          jnp.concatenate([old[:, x.shape[1]:], x], axis=1)
      if cache is None:  # zero history: the convolution pads time itself (no concatenated copy of the input)
        time_pad = (kt - 1, 0)
      else:
        history = old
    if tuple(self.strides) == (1, 1, 1):
      y = _conv3d_same_time(x, kernel, time_pad, self.conv3d, self.dtype, self.precision, history=history)
    else:
      if history is not None:
        x = jnp.concatenate([history, x], axis=1)
      y = _conv(x, kernel, self.strides, [time_pad, (kh // 2, kh // 2), (kw // 2, kw // 2)], self.dtype,
                self.precision)
    return y + bias.astype(self.dtype), new_cache


def _plain(kw: dict) -> dict:
  """Module kwargs without the causal-conv choice (for modules that have no causal conv)."""
  return {k: v for k, v in kw.items() if k != "conv3d"}


class Conv2dFrames(nn.Module):
  """Per-frame 2D conv on (B, T, H, W, C) with explicit padding (used by the resamplers). ``upsample=True``: the
  conv (3x3, stride 1, padding 1) of the nearest 2x upsampled input, computed on the input itself
  (`upsample2x_conv3x3`)."""

  features: int
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  upsample: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    kernel = self.param("kernel", _part(nn.initializers.lecun_normal(), _CONV_AXES_2D),
                        (3, 3, c, self.features), self.param_dtype)
    bias = self.param("bias", _part(nn.initializers.zeros, ("conv_out",)), (self.features,), self.param_dtype)
    if self.upsample:
      if tuple(self.strides) != (1, 1) or tuple(map(tuple, self.padding)) != ((1, 1), (1, 1)):
        raise VAEConfigError("Conv2dFrames(upsample=True) is the 3x3 'same' conv: strides (1, 1), padding 1")
      y = upsample2x_conv3x3(x.reshape(b * t, h, w, c), kernel, self.dtype, self.precision)
    else:
      y = _conv(x.reshape(b * t, h, w, c), kernel, self.strides, list(self.padding), self.dtype, self.precision)
    y = y + bias.astype(self.dtype)
    return y.reshape((b, t) + y.shape[1:])


def _rms_norm(name: str, dtype, param_dtype) -> RMSNorm:
  """Wan's RMS_norm: F.normalize over channels * sqrt(C) * gamma, i.e. an RMSNorm (its 1e-12 norm floor -> eps)."""
  return RMSNorm(1e-12, axes=("conv_out",), dtype=dtype, param_dtype=param_dtype, name=name)


class RMSNormSiLU(nn.Module):
  """SiLU(RMS norm over channels), one fp32 expression cast once to `dtype` (same params as `_rms_norm`): no
  intermediate is rounded to bf16.

  The per-pixel statistic passes an optimization barrier: without it XLA's GPU compiler turns the whole
  reduce-then-scale expression into one normalisation kernel whose output, the normalised activations, is a
  buffer of its own that the convolution's time-window gather ('fold') then reads. Behind the barrier only the
  statistic (one value per pixel) is its own pass and the scale and SiLU fuse into their consumers: the same
  values and speed, about 1 GiB less scratch per decode chunk for the 1.3B model's VAE at 832x480."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", _part(nn.initializers.ones, ("conv_out",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.optimization_barrier(
        jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps))
    y = x32 * inv_rms * scale.astype(jnp.float32)
    return nn.silu(y).astype(self.dtype)


class ResidualBlock(nn.Module):
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  @nn.compact
  def __call__(self, x: Array, cache: dict | None = None, first: bool = False):
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ckw = dict(kw, precision=self.precision, conv3d=self.conv3d)
    x = x.astype(self.dtype)
    if x.shape[-1] != self.out_dim:
      h, _ = CausalConv3d(self.out_dim, (1, 1, 1), name="conv_shortcut", **ckw)(x)
    else:
      h = x
    y = RMSNormSiLU(name="norm1", **kw)(x)
    y, c1 = CausalConv3d(self.out_dim, name="conv1", **ckw)(y, cache.get("conv1"))
    y = RMSNormSiLU(name="norm2", **kw)(y)
    y, c2 = CausalConv3d(self.out_dim, name="conv2", **ckw)(y, cache.get("conv2"))
    return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
  """Single-head spatial self-attention within each frame (no temporal mixing), residual."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, c = x.shape
    x = x.astype(self.dtype)
    y = _rms_norm("norm", self.dtype, self.param_dtype)(x)
    qkv = _Dense(3 * c, name="to_qkv", dtype=self.dtype, param_dtype=self.param_dtype,
                 precision=self.precision)(y)
    qkv = qkv.reshape(b * t, h * w, 3 * c)
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision,
                        preferred_element_type=jnp.float32) * (1.0 / math.sqrt(c))
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    o = jnp.einsum("bqk,bkc->bqc", probs, v, precision=self.precision).astype(self.dtype)
    o = _Dense(c, name="proj", dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)(
        o.reshape(b, t, h, w, c))
    return o + x


class _Dense(nn.Module):
  """1x1 conv as a channels-last matmul (kernel (C_in, C_out))."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _part(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", _part(nn.initializers.zeros, ("conv_out",)), (self.features,), self.param_dtype)
    y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
    return y + bias.astype(self.dtype)


class MidBlock(nn.Module):
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  @nn.compact
  def __call__(self, x: Array, cache: dict | None = None, first: bool = False):
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv3d=self.conv3d)
    dim = x.shape[-1]
    x, c0 = ResidualBlock(dim, name="resnets_0", **kw)(x, cache.get("resnets_0"), first)
    x = AttentionBlock(name="attentions_0", dtype=self.dtype, param_dtype=self.param_dtype,
                       precision=self.precision)(x)
    x, c1 = ResidualBlock(dim, name="resnets_1", **kw)(x, cache.get("resnets_1"), first)
    return x, {"resnets_0": c0, "resnets_1": c1}


class Resample(nn.Module):
  """Spatial 2x up/down-sampling, optionally with the causal temporal 2x of Wan (see module doc)."""

  mode: str  # 'upsample2d' | 'upsample3d' | 'downsample2d' | 'downsample3d'
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  @nn.compact
  def __call__(self, x: Array, cache: dict | None = None, first: bool = False):
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv3d=self.conv3d)
    dim = x.shape[-1]
    new_cache = {}
    x = x.astype(self.dtype)
    if self.mode == "upsample3d":
      tconv = CausalConv3d(2 * dim, (3, 1, 1), name="time_conv", **kw)
      stream = x[:, 1:] if first else x
      old = cache.get("time_conv")  # None at the start of a stream: the conv pads time itself
      if stream.shape[1] > 0:
        y, new_tc = tconv(stream, old)
        b, t, h, w, _ = y.shape
        # channel halves (2, C) become two consecutive output frames
        y = y.reshape(b, t, h, w, 2, dim).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, dim)
        x = jnp.concatenate([x[:, :1], y], axis=1) if first else y
      else:  # only frame 0: not doubled, time_conv stream still empty
        old = _zeros_cache(x, 2, self.dtype) if old is None else old
        if self.is_initializing():
          tconv(_zeros_cache(x, 1, self.dtype), old)
        new_tc = old
      new_cache["time_conv"] = new_tc
    if self.mode.startswith("upsample"):
      x = Conv2dFrames(self.out_dim, name="resample", upsample=True, **_plain(kw))(x)
    elif self.mode.startswith("downsample"):
      x = Conv2dFrames(dim, strides=(2, 2), padding=((0, 1), (0, 1)), name="resample", **_plain(kw))(x)
    else:
      raise VAEConfigError(f"Resample.mode: unknown {self.mode!r}")
    if self.mode == "downsample3d":
      tconv = CausalConv3d(dim, (3, 1, 1), strides=(2, 1, 1), causal=False, name="time_conv", **kw)
      if first:
        if x.shape[1] % 2 != 1:
          raise VAEInputError(f"downsample3d: first chunk needs an odd frame count, got {x.shape[1]}")
        if x.shape[1] >= 3:
          y, _ = tconv(x)
          out = jnp.concatenate([x[:, :1], y], axis=1)
        else:
          if self.is_initializing():
            tconv(jnp.concatenate([x, x, x], axis=1))
          out = x
      else:
        if x.shape[1] % 2 != 0:
          raise VAEInputError(f"downsample3d: later chunks need an even frame count, got {x.shape[1]}")
        old = cache.get("time_conv")
        if old is None:
          raise VAEInputError("downsample3d: first=False needs the cache of the previous chunk")
        y, _ = tconv(jnp.concatenate([old.astype(self.dtype), x], axis=1))
        out = y
      new_cache["time_conv"] = x[:, -1:]
      x = out
    return x, new_cache


class Encoder3d(nn.Module):
  config: WanVAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  @nn.compact
  def __call__(self, x: Array, cache: dict | None = None, first: bool = True):
    cfg = self.config
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv3d=self.conv3d)
    new = {}
    dims = [cfg.base_dim * u for u in (1,) + cfg.dim_mult]
    x, new["conv_in"] = CausalConv3d(dims[0], name="conv_in", **kw)(x, cache.get("conv_in"))
    idx = 0
    for i, out_dim in enumerate(dims[1:]):
      for _ in range(cfg.num_res_blocks):
        name = f"down_blocks_{idx}"
        x, new[name] = ResidualBlock(out_dim, name=name, **kw)(x, cache.get(name), first)
        idx += 1
      if i != len(cfg.dim_mult) - 1:
        name = f"down_blocks_{idx}"
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        x, new[name] = Resample(mode, out_dim, name=name, **kw)(x, cache.get(name), first)
        idx += 1
    x, new["mid_block"] = MidBlock(name="mid_block", **kw)(x, cache.get("mid_block"), first)
    x = RMSNormSiLU(self.dtype, self.param_dtype, name="norm_out")(x)
    x, new["conv_out"] = CausalConv3d(2 * cfg.z_dim, name="conv_out", **kw)(x, cache.get("conv_out"))
    return x, new


class UpBlock(nn.Module):
  """Decoder up block: (num_res_blocks + 1) residual blocks, then an optional resampler."""

  out_dim: int
  num_res: int
  mode: str | None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  @nn.compact
  def __call__(self, x: Array, cache: dict | None = None, first: bool = False):
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv3d=self.conv3d)
    new = {}
    for j in range(self.num_res):
      rn = f"resnets_{j}"
      x, new[rn] = ResidualBlock(self.out_dim, name=rn, **kw)(x, cache.get(rn), first)
    if self.mode is not None:
      # Wan2.1: the resampler halves the channels (the next block's in_dim = dims[i+1] // 2).
      x, new["upsamplers_0"] = Resample(self.mode, self.out_dim // 2, name="upsamplers_0", **kw)(
          x, cache.get("upsamplers_0"), first)
    return x, new


class Decoder3d(nn.Module):
  config: WanVAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  @nn.compact
  def __call__(self, x: Array, cache: dict | None = None, first: bool = True):
    cfg = self.config
    cache = cache or {}
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv3d=self.conv3d)
    new = {}
    x, new["conv_in"] = CausalConv3d(cfg.dec_base_dim * cfg.dim_mult[-1], name="conv_in", **kw)(
        x, cache.get("conv_in"))
    x, new["mid_block"] = MidBlock(name="mid_block", **kw)(x, cache.get("mid_block"), first)
    for i, (out_dim, mode) in enumerate(decoder_up_blocks(cfg)):
      name = f"up_blocks_{i}"
      x, new[name] = UpBlock(out_dim, cfg.num_res_blocks + 1, mode, name=name, **kw)(
          x, cache.get(name), first)
    x = RMSNormSiLU(self.dtype, self.param_dtype, name="norm_out")(x)
    x, new["conv_out"] = CausalConv3d(cfg.out_channels, name="conv_out", **dict(kw, conv3d=conv_out_lowering(
        self.conv3d)))(x, cache.get("conv_out"))
    return x, new


def decoder_up_blocks(cfg: WanVAEConfig) -> list[tuple[int, str | None]]:
  """(output channels, resampling mode: 'upsample3d', 'upsample2d' or None for the last) of each decoder up block,
  lowest resolution first."""
  mult = tuple(cfg.dim_mult)
  dims = [cfg.dec_base_dim * u for u in mult[::-1]]
  temporal = tuple(cfg.temperal_downsample[::-1])
  return [(d, None if i == len(mult) - 1 else ("upsample3d" if temporal[i] else "upsample2d"))
          for i, d in enumerate(dims)]


def conv_out_lowering(conv3d: str) -> str:
  """The decoder's last conv (to the 3 image channels) under `conv3d`: 'fold' runs it as 'taps'. Folding copies its
  wide full-resolution input kT times for a 3-channel output, 'taps' only makes kT 3-channel outputs (one H200, a
  later 832x480 chunk: 4.8 ms folded, 3.0 ms as taps, `dsa-jax bench vae-convs`)."""
  return "taps" if conv3d == "fold" else conv3d


class AutoencoderKLWan(nn.Module):
  """Encoder + quant convs + decoder. Methods work on *raw* (un-normalised) latents; the functional API
  below adds the latent mean/std normalisation."""

  config: WanVAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, conv3d=self.conv3d)
    z = self.config.z_dim
    self.encoder = Encoder3d(self.config, **kw)
    self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), **kw)
    self.post_quant_conv = CausalConv3d(z, (1, 1, 1), **kw)
    self.decoder = Decoder3d(self.config, **kw)

  def encode_moments(self, video: Array, cache: dict | None = None, first: bool = True):
    """video (B, T, H, W, C) -> (mean, logvar, cache) of the posterior, raw latent space, fp32."""
    h, cache = self.encoder(video, cache, first)
    h, _ = self.quant_conv(h)
    h = h.astype(jnp.float32)
    z = self.config.z_dim
    return h[..., :z], jnp.clip(h[..., z:], -30.0, 20.0), cache

  def decode_raw(self, z: Array, cache: dict | None = None, first: bool = True):
    """raw latents (B, F, h, w, z) -> (pixels clamped to [-1, 1], cache)."""
    x, _ = self.post_quant_conv(z)
    y, cache = self.decoder(x, cache, first)
    return jnp.clip(y, -1.0, 1.0), cache

  def __call__(self, video: Array):
    mu, _, _ = self.encode_moments(video)
    y, _ = self.decode_raw(mu)
    return y


# ----------------------------------------------------------------------------------------------- functional API
# The public functions are jitted (config / dtype / flags static); calling them inside another jit is fine.


def _variables(params: dict) -> dict:
  if isinstance(params, dict) and set(params.keys()) == {"params"}:
    return params
  return {"params": params}


def _model(config: WanVAEConfig, dtype, precision, param_dtype=jnp.float32, conv3d: str = "native"
           ) -> AutoencoderKLWan:
  if not isinstance(config, WanVAEConfig):
    raise VAEConfigError(f"config must be a WanVAEConfig, got {type(config).__name__}")
  if conv3d not in CONV3D_IMPLS:
    raise VAEConfigError(f"conv3d: expected one of {CONV3D_IMPLS}, got {conv3d!r}")
  return AutoencoderKLWan(config, dtype=dtype, param_dtype=param_dtype, precision=precision, conv3d=conv3d)


def normalize_latents(mu: Array, config: WanVAEConfig) -> Array:
  """Raw posterior mean -> the diffusion model's latent space: (mu - mean) / std."""
  mean = jnp.asarray(config.latents_mean, jnp.float32)
  std = jnp.asarray(config.latents_std, jnp.float32)
  return (mu.astype(jnp.float32) - mean) / std


def denormalize_latents(z: Array, config: WanVAEConfig) -> Array:
  mean = jnp.asarray(config.latents_mean, jnp.float32)
  std = jnp.asarray(config.latents_std, jnp.float32)
  return z.astype(jnp.float32) * std + mean


def _check_video(video, config: WanVAEConfig):
  if video.ndim != 5 or video.shape[-1] != config.in_channels:
    raise VAEInputError(f"video must be (B, T, H, W, {config.in_channels}) channels-last, got {video.shape}")
  _, t, h, w, _ = video.shape
  tf, s = config.temporal_factor, config.spatial_factor
  if (t - 1) % tf != 0:
    raise VAEInputError(f"video: T = {t} frames, expected 1 + {tf}k (e.g. {1 + tf * ((t - 1) // tf)})")
  if h % s or w % s:
    raise VAEInputError(f"video: H, W = {h}, {w} must be multiples of {s}")


def _check_latents(z, config: WanVAEConfig):
  if z.ndim != 5 or z.shape[-1] != config.z_dim:
    raise VAEInputError(f"latents must be (B, F, h, w, {config.z_dim}) channels-last, got {z.shape}")


def init_params(config: WanVAEConfig, rng: Array, *, param_dtype=jnp.float32) -> dict:
  """Random params (plain arrays; see ``param_logical_axes`` for their logical sharding names)."""
  s = config.spatial_factor
  video = jnp.zeros((1, 1 + config.temporal_factor, s, s, config.in_channels), jnp.float32)
  variables = jax.jit(_model(config, jnp.float32, None, param_dtype).init)(rng, video)
  return nn.meta.unbox(variables["params"])


def param_logical_axes(config: WanVAEConfig) -> dict:
  """PartitionSpec tree (logical axis names) matching ``init_params``' structure."""
  s = config.spatial_factor
  video = jax.ShapeDtypeStruct((1, 1 + config.temporal_factor, s, s, config.in_channels), jnp.float32)
  boxed = jax.eval_shape(lambda v: _model(config, jnp.float32, None).init(jax.random.PRNGKey(0), v), video)
  return nn.get_partition_spec(boxed)["params"]


@functools.partial(jax.jit, static_argnames=("config", "dtype", "precision", "chunked"))
def encode_moments(params, video, config: WanVAEConfig, *, dtype=jnp.float32, precision=None,
                   chunked: bool = False):
  """Raw posterior (mean, logvar), fp32. ``chunked``: first frame, then lax.scan over groups of
  ``temporal_factor`` frames with the causal cache (bounded memory, same result)."""
  _check_video(video, config)
  model = _model(config, dtype, precision)
  var = _variables(params)
  f = functools.partial(model.apply, var, method=AutoencoderKLWan.encode_moments)
  if not chunked or video.shape[1] == 1:
    mu, logvar, _ = f(video, None, True)
    return mu, logvar
  tf = config.temporal_factor
  mu0, lv0, cache = f(video[:, :1], None, True)
  b, t, h, w, c = video.shape
  rest = video[:, 1:].reshape(b, (t - 1) // tf, tf, h, w, c).swapaxes(0, 1)

  def body(cache, x):
    mu, lv, cache = f(x, cache, False)
    return cache, (mu, lv)

  _, (mus, lvs) = jax.lax.scan(body, cache, rest)
  join = lambda a0, a: jnp.concatenate([a0, a.swapaxes(0, 1).reshape((b, -1) + a.shape[3:])], axis=1)
  return join(mu0, mus), join(lv0, lvs)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "precision", "chunked"))
def encode(params, video, config: WanVAEConfig, *, dtype=jnp.float32, precision=None, chunked: bool = False):
  """video (B, T, H, W, 3) in [-1, 1] -> normalised latents (posterior mean), (B, 1+(T-1)//4, H/8, W/8, z), fp32."""
  mu, _ = encode_moments(params, video, config, dtype=dtype, precision=precision, chunked=chunked)
  return normalize_latents(mu, config)


def init_decode_cache(config: WanVAEConfig, batch: int, latent_height: int, latent_width: int, *,
                      dtype=jnp.float32) -> dict:
  """Zero causal-conv cache for a fresh decode stream (fixed-shape dict pytree, compute dtype)."""
  model = _model(config, dtype, None)
  z = jax.ShapeDtypeStruct((batch, 1, latent_height, latent_width, config.z_dim), dtype)

  def f(z):
    var = model.init(jax.random.PRNGKey(0), z, None, False, method=AutoencoderKLWan.decode_raw)
    return model.apply(var, z, None, False, method=AutoencoderKLWan.decode_raw)[1]

  shapes = jax.eval_shape(f, z)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("config", "first", "dtype", "precision", "conv3d"))
def decode_chunk(params, latents_chunk, cache, config: WanVAEConfig, *, first: bool = False,
                 dtype=jnp.float32, precision=None, conv3d: str = "native"):
  """Decode K normalised latent frames, carrying the causal cache.

  ``first`` (static Python bool) marks the first chunk of a stream: it yields 1 + 4(K-1) pixel frames and
  needs a fresh cache (``init_decode_cache`` or None). Later chunks (``first=False``) yield 4K frames and
  need the cache returned by the previous call. Returns ``(pixels fp32 in [-1, 1], new_cache)``. ``conv3d``: how
  the causal 3D convs are computed (`CONV3D_IMPLS`; same result).
  """
  _check_latents(latents_chunk, config)
  if cache is None and not first:
    raise VAEInputError("decode_chunk: first=False needs the cache returned by the previous chunk")
  model = _model(config, dtype, precision, conv3d=conv3d)
  z = denormalize_latents(latents_chunk, config).astype(dtype)
  y, cache = model.apply(_variables(params), z, cache, first, method=AutoencoderKLWan.decode_raw)
  return y.astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("config", "dtype", "precision", "chunk_size", "conv3d"))
def decode(params, latents, config: WanVAEConfig, *, dtype=jnp.float32, precision=None,
           chunk_size: int | None = None, conv3d: str = "native"):
  """Normalised latents (B, F, h, w, z) -> video (B, 1 + 4(F-1), 8h, 8w, 3) in [-1, 1], fp32.

  ``chunk_size=None`` decodes all frames in one pass; an int decodes ``chunk_size`` latent frames at a time
  (lax.scan over equal chunks), bounding activation memory. Both give the same result.
  """
  _check_latents(latents, config)
  if chunk_size is None or chunk_size >= latents.shape[1]:
    return decode_chunk(params, latents, None, config, first=True, dtype=dtype, precision=precision,
                        conv3d=conv3d)[0]
  if chunk_size < 1:
    raise VAEInputError(f"decode: chunk_size must be >= 1, got {chunk_size}")
  kw = dict(dtype=dtype, precision=precision, conv3d=conv3d)
  c = chunk_size
  out0, cache = decode_chunk(params, latents[:, :c], None, config, first=True, **kw)
  outs = [out0]
  rest = latents[:, c:]
  n, r = divmod(rest.shape[1], c)
  if n:
    b = rest.shape[0]
    xs = rest[:, :n * c].reshape((b, n, c) + rest.shape[2:]).swapaxes(0, 1)

    def body(cache, z):
      y, cache = decode_chunk(params, z, cache, config, first=False, **kw)
      return cache, y

    cache, ys = jax.lax.scan(body, cache, xs)
    outs.append(ys.swapaxes(0, 1).reshape((b, -1) + ys.shape[3:]))
  if r:
    outs.append(decode_chunk(params, rest[:, n * c:], cache, config, first=False, **kw)[0])
  return jnp.concatenate(outs, axis=1)


@dataclasses.dataclass(frozen=True)
class WanVAE:
  """Config + compute dtype bound together: ``vae.encode(params, video)``, ``vae.decode(params, z)``,
  ``vae.decode_chunk(params, z_chunk, cache, first=...)``. Hashable, so methods can be jitted
  (``jax.jit(vae.decode_chunk, static_argnames='first')``)."""

  config: WanVAEConfig = WanVAEConfig()
  dtype: Any = jnp.float32
  precision: Any = None
  conv3d: str = "native"

  def init_params(self, rng, *, param_dtype=jnp.float32):
    return init_params(self.config, rng, param_dtype=param_dtype)

  def encode(self, params, video, *, chunked: bool = False):
    return encode(params, video, self.config, dtype=self.dtype, precision=self.precision, chunked=chunked)

  def decode(self, params, latents, *, chunk_size: int | None = None):
    return decode(params, latents, self.config, dtype=self.dtype, precision=self.precision,
                  chunk_size=chunk_size, conv3d=self.conv3d)

  def init_decode_cache(self, batch: int, latent_height: int, latent_width: int):
    return init_decode_cache(self.config, batch, latent_height, latent_width, dtype=self.dtype)

  def decode_chunk(self, params, latents_chunk, cache, first: bool = False):
    return decode_chunk(params, latents_chunk, cache, self.config, first=first, dtype=self.dtype,
                        precision=self.precision, conv3d=self.conv3d)
