"""Latents -> pixels for sampling, streaming, evaluation and benchmarks.

`PixelDecoder` turns latents into pixels by `config.vae.kind`:
  'none'     no VAE: a visualisation of the first 3 latent channels, upsampled by the VAE's spatial stride;
  'identity' the latents are pixels in [-1, 1] (pixel-space recipes; 1 or 3 channels);
  'wan'      the Wan2.1 VAE (`dsa_jax.models.vae`), params from `config.vae.path` (params_io network 'vae'),
             decoded chunk by chunk with its causal cache (the first chunk gives 1 + 4(c-1) frames, later ones 4c).

Whole videos are decoded chunk by chunk too (`decode_video`): each chunk's pixels are copied to the host while the
next chunk decodes, so the device never holds a whole video of pixels (81 frames of 832x480 are ~0.4 GB in fp32)
next to the sampler. The causal cache is donated from chunk to chunk (updated in place, not copied).

Latents from a sampler on a mesh: split over the batch (data parallel), each device decodes its own videos (the VAE's
weights replicated on the mesh, the latents' other splits dropped; its convolutions are per video, so nothing is
exchanged); not split over the batch (tensor parallel), they are gathered onto one device (a few MB) and decoded by
the single-device program, or, with `config.vae.split_height`, decoded with each video's rows split over every device
of the mesh (the convolutions exchange their edge rows; the mid-block attention gathers its keys). On a mesh of
several processes every process gathers the whole batch and decodes it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsa_jax.config_lib import latent_hw
from dsa_jax.sampling.outputs import quantize_frames

VAE_KINDS = ("none", "identity", "wan")
PREVIEW_SCALE = 3.0  # 'none' streaming preview: latents / 3 clipped to [-1, 1] (latents are ~unit variance)


def random_wan_vae_config(config):
  """A Wan VAE config for random-weight benchmarks: Wan2.1's own at 16 latent channels, a small one otherwise."""
  from dsa_jax.models import vae as vae_lib
  z = config.video.latent_channels
  if z == 16:
    return vae_lib.WanVAEConfig()
  return vae_lib.WanVAEConfig(base_dim=8, num_res_blocks=1, z_dim=z, latents_mean=(0.0,) * z,
                              latents_std=(1.0,) * z)


def random_vae_params(vae_config, seed: int = 0):
  """Random VAE params built on the host from the init's shapes (no compilation: the VAE's jitted init takes
  minutes to compile on a CPU). Kernels ~ N(0, 1/fan_in), biases 0, norm scales 1: finite, O(1) activations, which
  is all a speed benchmark needs."""
  from dsa_jax.models import vae as vae_lib
  shapes = jax.eval_shape(lambda k: vae_lib.init_params(vae_config, k), jax.random.PRNGKey(0))
  rs = np.random.RandomState(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.ones(s.shape, s.dtype)
    if name.endswith("['bias']") or len(s.shape) < 2:
      return jnp.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return jnp.asarray(rs.standard_normal(s.shape).astype(np.float32) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def pixels_to_uint8(pixels):
  """On the device: (..., H, W, 1 or 3) floats in [-1, 1] -> (..., H, W, 3) uint8, the same conversion as
  `outputs.to_uint8` on the host."""
  return quantize_frames(jnp.asarray(pixels, jnp.float32), jnp)


class PixelDecoder:
  """Latents (B, F, h, w, C) -> pixels (B, T, H, W, 3) float32 in [-1, 1], whole videos or chunk by chunk."""

  def __init__(self, config, *, kind: Optional[str] = None, vae_config=None, vae_params=None, dtype=None):
    self.config = config
    self.kind = kind or config.vae.kind
    if self.kind not in VAE_KINDS:
      raise ValueError(f"config.vae.kind: expected one of {VAE_KINDS}, got {self.kind!r}")
    self.chunk_frames = config.video.chunk_frames
    self.latent_hw = tuple(int(x) for x in latent_hw(config))
    self.latent_channels = int(config.video.latent_channels)
    self.spatial = int(config.video.vae_stride[1])
    self.temporal = int(config.video.vae_stride[0])
    c = config.video.latent_channels
    if self.kind == "identity" and c not in (1, 3):
      raise ValueError(f"config.vae.kind='identity' needs video.latent_channels 1 or 3 (pixels), got {c}")
    self.vae = None
    self.vae_params = None
    self._mesh_params = {}
    self.split_height = config.vae.get("split_height", False)
    if not isinstance(self.split_height, bool):
      raise ValueError(f"config.vae.split_height: expected True or False, got {self.split_height!r}")
    if self.kind == "wan":
      from dsa_jax.models import vae as vae_lib
      from dsa_jax.models.dit import _DTYPES
      if vae_config is None:
        from dsa_jax.checkpoint.loading import load_vae
        vae_config, vae_params = load_vae(config.vae.path)
      if vae_config.z_dim != c:
        raise ValueError(f"config.vae.path: the VAE has z_dim {vae_config.z_dim}, video.latent_channels is {c}")
      if vae_config.spatial_factor != self.spatial or vae_config.temporal_factor != self.temporal:
        raise ValueError(f"config.video.vae_stride {tuple(config.video.vae_stride)} does not match the VAE "
                         f"(temporal {vae_config.temporal_factor}, spatial {vae_config.spatial_factor})")
      dtype = dtype or _DTYPES[config.compute.dtype]
      conv3d = config.vae.get("conv3d", "native")
      if conv3d not in vae_lib.CONV3D_IMPLS:
        raise ValueError(f"config.vae.conv3d: expected one of {vae_lib.CONV3D_IMPLS}, got {conv3d!r}")
      self.vae = vae_lib.WanVAE(vae_config, dtype=dtype, conv3d=conv3d)
      self.vae_params = vae_params if vae_params is not None else self.vae.init_params(jax.random.PRNGKey(0))
      # The cache (argument 2) is donated: a chunk's new cache reuses the old one's buffers.
      self._decode_chunk = jax.jit(self.vae.decode_chunk, static_argnames=("first",), donate_argnums=(2,))

      def decode_chunk_uint8(params, z, cache, first):
        pixels, cache = self.vae.decode_chunk(params, z, cache, first=first)
        return pixels_to_uint8(pixels), cache
      self._decode_chunk_uint8 = jax.jit(decode_chunk_uint8, static_argnames=("first",), donate_argnums=(2,))
      self.chunked = bool(config.vae.get("chunked", True))
      self._decode_video = jax.jit(self.vae.decode)

  @classmethod
  def random(cls, config, dtype=None, seed: int = 0):
    """A Wan VAE with random weights (benchmarks); see `random_vae_params`."""
    vcfg = random_wan_vae_config(config)
    return cls(config, kind="wan", vae_config=vcfg, vae_params=random_vae_params(vcfg, seed), dtype=dtype)

  def num_pixel_frames(self, num_latent_frames: int) -> int:
    if self.kind == "wan":
      return 1 + (num_latent_frames - 1) * self.temporal
    return num_latent_frames

  def _preview(self, latents, scale):
    x = latents[..., :3]
    if x.shape[-1] < 3:
      x = jnp.concatenate([x] + [x[..., -1:]] * (3 - x.shape[-1]), axis=-1)
    x = jnp.clip(x / scale, -1.0, 1.0)
    return jnp.repeat(jnp.repeat(x, self.spatial, axis=-3), self.spatial, axis=-2)

  def _identity(self, latents):
    x = jnp.clip(latents.astype(jnp.float32), -1.0, 1.0)
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x

  def decode_video(self, latents, *, uint8: bool = False):
    """Whole video -> pixels: a host numpy array for 'wan' (chunk by chunk, see the module docstring; with
    config.vae.chunked = False one pass on the device), a device array otherwise. 'none': per-video, per-channel
    normalisation of the preview. `uint8=True`: (B, T, H, W, 3) uint8 frames, converted on the device (a quarter
    of the bytes to copy back), equal to `outputs.to_uint8` of the float pixels."""
    if self.kind == "wan":
      if not self.chunked:
        px = self._decode_video(*self._placed(latents))
        return pixels_to_uint8(px) if uint8 else px
      return np.concatenate(list(self.decode_chunks_to_host(latents, uint8=uint8)), axis=1)
    latents = jnp.asarray(latents, jnp.float32)
    if self.kind == "identity":
      px = self._identity(latents)
    else:
      x = latents[..., :3]
      mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
      std = jnp.std(x, axis=(1, 2, 3), keepdims=True) + 1e-6
      px = self._preview((x - mean) / std, 2.5)
    return pixels_to_uint8(px) if uint8 else px

  def init_state(self, batch: int):
    return None

  def chunk_bounds(self, num_frames: int) -> list[tuple[int, int]]:
    """Latent frame ranges [a, b) of the decode chunks of a video (the last one may be shorter)."""
    c = self.chunk_frames
    return [(a, min(a + c, num_frames)) for a in range(0, num_frames, c)]

  def _placed(self, latents):
    """(VAE params, float32 latents) placed for decoding (see the module docstring)."""
    if isinstance(latents, jax.Array) and not latents.is_fully_addressable:
      from jax.experimental import multihost_utils
      latents = multihost_utils.process_allgather(latents, tiled=True)
    sharding = getattr(latents, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
      mesh = sharding.mesh
      if sharding.spec and sharding.spec[0] is not None:
        split = P(sharding.spec[0])  # each device its own videos
      elif self.split_height and np.shape(latents)[2] % mesh.size == 0:
        split = P(None, None, tuple(mesh.axis_names))  # each device a band of rows of every video
      else:
        split = None
      if split is not None:
        if mesh not in self._mesh_params:  # the weights replicated on the mesh, once per mesh
          self._mesh_params[mesh] = jax.device_put(self.vae_params, jax.sharding.NamedSharding(mesh, P()))
        placed = jax.device_put(latents.astype(jnp.float32), jax.sharding.NamedSharding(mesh, split))
        return self._mesh_params[mesh], placed
    return self.vae_params, jax.device_put(jnp.asarray(latents, jnp.float32), jax.local_devices()[0])

  def decode_chunks_to_host(self, latents, *, uint8: bool = False):
    """Yields each chunk's pixels as a host numpy array, decoding chunk i + 1 while chunk i is copied back, so at
    most two chunks of pixels are on the device at a time (`uint8`: see `decode_video`)."""
    latents = self._placed(latents)[1] if self.kind == "wan" else jnp.asarray(latents, jnp.float32)
    state, pending = self.init_state(latents.shape[0]), None
    for i, (a, b) in enumerate(self.chunk_bounds(latents.shape[1])):
      pixels, state = self.decode_chunk(latents[:, a:b], state, first=(i == 0), uint8=uint8)
      if hasattr(pixels, "copy_to_host_async"):
        pixels.copy_to_host_async()
      if pending is not None:
        yield np.asarray(pending)
      pending = pixels
    if pending is not None:
      yield np.asarray(pending)

  def decode_flops(self, batch: int, num_frames: int) -> Optional[float]:
    """FLOPs of the convolutions and matmuls of decoding a whole video of `num_frames` latent frames chunk by chunk
    (`eval.profiling.matmul_flops` of each chunk's decode: traced, not compiled); None without a Wan VAE."""
    if self.kind != "wan":
      return None
    from dsa_jax.eval.profiling import matmul_flops
    total, cache, seen = 0.0, None, {}
    for i, (a, b) in enumerate(self.chunk_bounds(num_frames)):
      z = jax.ShapeDtypeStruct((batch, b - a) + self.latent_hw + (self.latent_channels,), jnp.float32)
      decode = lambda zz, cc, first=(i == 0): self.vae.decode_chunk(self.vae_params, zz, cc, first=first)
      if (i == 0, b - a) not in seen:
        seen[(i == 0, b - a)] = matmul_flops(decode, z, cache)
      total += seen[(i == 0, b - a)]
      cache = jax.eval_shape(decode, z, cache)[1]
    return total

  def decode_chunk(self, latents_chunk, state, first: bool, *, uint8: bool = False):
    """One chunk -> (pixels, state). 'none' uses a fixed scale so chunks of a stream look alike."""
    if self.kind == "wan":
      fn = self._decode_chunk_uint8 if uint8 else self._decode_chunk
      params, latents_chunk = self._placed(latents_chunk)
      return fn(params, latents_chunk, None if first else state, first=first)
    if self.kind == "identity":
      px = self._identity(latents_chunk)
    else:
      px = self._preview(jnp.asarray(latents_chunk, jnp.float32), PREVIEW_SCALE)
    return (pixels_to_uint8(px) if uint8 else px), state
