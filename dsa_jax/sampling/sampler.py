"""The DSA sampler: autoregressive chunks, per-frame dynamic stopping, a KV cache, one compiled program.

Per chunk (DESIGN 1.5), a `lax.while_loop` walks the warped ladder sigma_0 > sigma_1 > ...: the generator predicts
the velocity of the chunk (cache mode, per-frame t = 1000 sigma_k), x0 = x - sigma v, and the confidence head
predicts per frame c_k = sigmoid(logit). A frame is done once (steps >= min_steps and c_k >= tau) or
steps == max_steps; its output is its last x0. Unfinished frames are re-noised to the next sigma with fresh noise
(Self Forcing's consistency step). The loop ends when every frame of the chunk, in every batch sample, is done.
Then one cache-fill forward at t = context_noise on the clean chunk overwrites the chunk's K/V slot. Chunks run in
a `lax.fori_loop`, so a whole video is one jitted program; the KV cache is donated and carried in the loop state.

Thresholds, min/max steps (per frame), guidance and seeds are traced (`SamplingControls`): changing them never
recompiles. Only the use of classifier-free guidance (an extra batch half with its own KV cache) is static.

Frames of a chunk attend to each other, so a finished frame still feeds the forward of its unfinished neighbours.
What it feeds is `sampling.frozen_frames` (our reading): 'clean' (default) feeds its final x0 at t = context_noise,
like a context frame; 'noisy' keeps feeding the input and t of the step at which it stopped.

Noise is drawn per sample from fold_in(fold_in(fold_in(rng, seed_b), chunk), slot) with slot 0 for the chunk's
initial noise, k + 1 for the re-noising after step k and L + 1 for the context noise, so a sample's video depends
only on its own seed (not on its batch neighbours), and the reference samplers below reproduce it exactly.
"""

from __future__ import annotations

import collections
import functools
import os
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.config_lib import latent_hw, tokens_per_frame
from dsa_jax.diffusion import flow
from dsa_jax.models.confidence import ConfidenceConfig, ConfidenceHead
from dsa_jax.models.dit import DiTConfig, WanDiT, init_cache


FROZEN_MODES = ("clean", "noisy")
STOP_RULES = ("confidence", "x0_delta")  # how a frame decides it is done: the head, or the training-free x0 change


# ----------------------------------------------------------------------------------------------------------------------
# State and controls


@flax.struct.dataclass
class SamplingControls:
  """Traced knobs of one sampling call (batch B, F latent frames). Changing values never recompiles.

  threshold (B,) float32: confidence tau per sample (+inf: always max_steps; -inf: always min_steps).
  min_steps, max_steps (B, F) int32: per sample and frame (a fixed per-frame pattern forces a step schedule).
  guidance (B,) float32: CFG scale (used only when the sampler is called with an unconditional context).
  seed (B,) uint32: per-sample noise seed.
  """
  threshold: jax.Array
  min_steps: jax.Array
  max_steps: jax.Array
  guidance: jax.Array
  seed: jax.Array


@flax.struct.dataclass
class SamplerState:
  """Loop state of one chunk's denoising `while_loop`."""
  k: jax.Array          # () int32: the step about to run
  x: jax.Array          # (B, c, H, W, C) float32: current noisy latents of unfinished frames
  x0: jax.Array         # (B, c, H, W, C) float32: last x0 prediction per frame (the output of finished frames)
  steps: jax.Array      # (B, c) int32: steps taken per frame
  done: jax.Array       # (B, c) bool
  conf: jax.Array       # (B, c) float32: confidence at the last step taken
  trace: jax.Array      # (B, c, L) float32: confidence at every step (nan where not taken)
  keys: jax.Array       # (B, 2) uint32: per-sample keys of this chunk
  cache: Any            # {'k', 'v'}: (layers, B', N*T, heads, head_dim), B' = 2B with CFG


@flax.struct.dataclass
class SampleOutput:
  """latents (B, F, H, W, C) float32; steps (B, F) int32; confidences (B, F) at each frame's last step;
  conf_trace (B, F, L) per step (nan where not taken); chunk_iters (num_chunks,) while-loop iterations per chunk
  (= DiT denoising forwards per chunk, the cost driver)."""
  latents: jax.Array
  steps: jax.Array
  confidences: jax.Array
  conf_trace: jax.Array
  chunk_iters: jax.Array


@flax.struct.dataclass
class ChunkOutput:
  latents: jax.Array      # (B, c, H, W, C)
  steps: jax.Array        # (B, c)
  confidences: jax.Array  # (B, c)
  conf_trace: jax.Array   # (B, c, L)
  iters: jax.Array        # () int32


# ----------------------------------------------------------------------------------------------------------------------
# Noise (shared with the reference samplers so they reproduce the same video)


def sample_keys(rng, seeds):
  """(B,) seeds -> (B, 2) per-sample keys."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  return jax.vmap(lambda s: jax.random.fold_in(rng, s))(seeds)


def chunk_keys(keys, chunk_index):
  return jax.vmap(lambda k: jax.random.fold_in(k, chunk_index))(keys)


def slot_noise(ckeys, slot, shape):
  """Per-sample N(0, 1) of `shape` for noise slot `slot` (0 initial, k+1 after step k, L+1 context)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, slot), shape, jnp.float32))(ckeys)


def _per_frame_ints(value, batch: int, frames: int, num_steps: int, name: str) -> np.ndarray:
  """Scalar, (B,) per sample, (1, F) / (B, F) per frame -> (B, F) int32 in [1, num_steps]."""
  a = np.asarray(value)
  if a.dtype.kind not in "iu":
    if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
      raise ValueError(f"sampling {name}: expected integers, got {value!r}")
  a = a.astype(np.int64)
  if a.ndim == 1:
    if a.shape[0] != batch:
      raise ValueError(f"sampling {name}: a 1-d value is per sample and needs {batch} entries, got {a.shape[0]}")
    a = a[:, None]
  elif a.ndim == 2:
    if a.shape[1] != frames or a.shape[0] not in (1, batch):
      raise ValueError(f"sampling {name}: a 2-d value is per frame, shape (1 or {batch}, {frames}); got {a.shape}")
  elif a.ndim != 0:
    raise ValueError(f"sampling {name}: expected a scalar, (B,) or (B, F) value, got shape {a.shape}")
  if np.any(a < 1) or np.any(a > num_steps):
    raise ValueError(f"sampling {name}: must lie in [1, {num_steps}] (the ladder has {num_steps} steps), got "
                     f"{np.unique(a).tolist()}")
  return np.broadcast_to(a, (batch, frames)).astype(np.int32)


def _signature(args, use_cfg):
  """Hashable shapes/dtypes of program arguments: which ahead-of-time executable fits them."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  return (use_cfg, treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves))


def _bcast(mask, x):
  """(B, c) -> broadcastable against (B, c, H, W, C)."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def as_variables(params):
  """Accepts a DiT/head variables dict ({'params': ...}) or the bare params tree."""
  params = nn.unbox(params)
  if isinstance(params, dict) and set(params) == {"params"}:
    return params
  return {"params": params}


def cast_params_for_inference(params, dtype=jnp.bfloat16):
  """Casts the big matmul kernels of a DiT to the compute dtype once (saves memory and a cast per forward).

  Norm scales, biases, modulation tables and the time embedding stay float32 (they are tiny and precision-sensitive).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params

  def cast(path, x):
    names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
    if any(str(n).startswith("time_") for n in names):
      return x
    if names and names[-1] in ("kernel", "patch_embedding") and x.ndim >= 2:
      return x.astype(dtype)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


# ----------------------------------------------------------------------------------------------------------------------
# The sampler


class Sampler:
  """Compiled DSA sampler for one config. Build with `make_sampler(config)`.

  sample(params, context, controls, rng=None, uncond_context=None) -> SampleOutput
    params: {'generator': DiT variables, 'head': head variables}; context (B, text_len, text_dim).
    With `uncond_context` (B or 1, text_len, text_dim) the program uses classifier-free guidance (a separate
    compilation); v = v_uncond + g (v_cond - v_uncond) with g = controls.guidance.
  chunk_step: the jitted per-chunk function (chunk index traced) that `stream.stream` drives.
  trace_counts: how often each program was traced (tests assert that controls do not recompile).
  """

  def __init__(self, config, dit_cfg: Optional[DiTConfig] = None):
    self.config = config
    self.dcfg = dit_cfg or DiTConfig.from_config(config.model, config.compute)
    self.hcfg = ConfidenceConfig.from_config(config)
    self.dit = WanDiT(self.dcfg)
    self.head = ConfidenceHead(self.hcfg)
    v = config.video
    self.num_frames = v.num_frames
    self.chunk_frames = v.chunk_frames
    self.num_chunks = v.num_frames // v.chunk_frames
    self.latent_hw = latent_hw(config)
    self.channels = self.dcfg.in_channels
    self.tokens_per_frame = tokens_per_frame(config)
    self.sigmas = flow.warp_ladder(config.sampling.ladder, config.diffusion.shift,
                                   config.diffusion.num_train_timesteps)
    self.num_steps = len(self.sigmas)
    self.num_train_timesteps = float(config.diffusion.num_train_timesteps)
    self.context_noise = float(config.sampling.context_noise)
    self.stop_rule = config.sampling.get("stop_rule", "confidence")
    if self.stop_rule not in STOP_RULES:
      raise ValueError(f"config.sampling.stop_rule: expected one of {STOP_RULES}, got {self.stop_rule!r}")
    self.frozen_mode = config.sampling.get("frozen_frames", "clean")
    if self.frozen_mode not in FROZEN_MODES:
      raise ValueError(f"config.sampling.frozen_frames: expected one of {FROZEN_MODES}, got {self.frozen_mode!r}")
    if self.num_steps > self.hcfg.max_steps:
      raise ValueError(f"config.sampling.ladder has {self.num_steps} steps; the confidence head embeds at most "
                       f"{self.hcfg.max_steps}")
    self.trace_counts = collections.Counter()
    self._caches = {}
    self._compiled = {}
    self._fixed_forward = {}
    self._ref_forward = None
    self.program = jax.jit(self._program, static_argnames=("use_cfg",), donate_argnums=(5,))
    self.chunk_step = jax.jit(self._chunk_step, static_argnames=("use_cfg",), donate_argnums=(5,))

  # -- shapes and inputs ------------------------------------------------------------------------------------------

  @property
  def chunk_shape(self):
    return (self.chunk_frames,) + tuple(self.latent_hw) + (self.channels,)

  @property
  def latent_shape(self):
    return (self.num_frames,) + tuple(self.latent_hw) + (self.channels,)

  def init_params(self, key=None):
    """Random generator + head variables (unboxed)."""
    key = jax.random.PRNGKey(self.config.seed) if key is None else key
    return random_params(self.config, self.dcfg, key)

  def make_controls(self, batch: int, threshold=None, min_steps=None, max_steps=None, guidance=None, seed=None
                    ) -> SamplingControls:
    """Full-shape controls from scalars, per-sample (B,) or per-frame (B, F) values; defaults from config.sampling.

    seed: a scalar s gives samples s, s+1, ...; a (B,) array is taken as is.
    """
    s = self.config.sampling
    b, f, n = batch, self.num_frames, self.num_steps
    threshold = s.threshold if threshold is None else threshold
    min_steps = s.min_steps if min_steps is None else min_steps
    max_steps = s.max_steps if max_steps is None else max_steps
    guidance = s.guidance if guidance is None else guidance
    seed = self.config.seed if seed is None else seed
    th = np.asarray(threshold, np.float32)
    if np.isnan(th).any():
      raise ValueError("sampling threshold: expected a number (inf allowed), got nan")
    th = np.broadcast_to(th, (b,))
    mn = _per_frame_ints(min_steps, b, f, n, "min_steps")
    mx = _per_frame_ints(max_steps, b, f, n, "max_steps")
    if np.any(mn > mx):
      raise ValueError(f"sampling min_steps must not exceed max_steps (got min {mn.min()}..{mn.max()}, "
                       f"max {mx.min()}..{mx.max()})")
    g = np.broadcast_to(np.asarray(guidance, np.float32), (b,))
    if not np.isfinite(g).all():
      raise ValueError(f"sampling guidance: expected a finite number, got {guidance!r}")
    sd = np.asarray(seed)
    if sd.dtype.kind not in "iu" or sd.min() < 0 or sd.max() + (b - 1 if sd.ndim == 0 else 0) >= 2**32:
      raise ValueError(f"sampling seed: expected integers in [0, 2**32) (one per sample), got {seed!r}")
    sd = (sd + np.arange(b)) if sd.ndim == 0 else np.broadcast_to(sd, (b,))
    return SamplingControls(threshold=jnp.asarray(th, jnp.float32), min_steps=jnp.asarray(mn, jnp.int32),
                            max_steps=jnp.asarray(mx, jnp.int32), guidance=jnp.asarray(g, jnp.float32),
                            seed=jnp.asarray(sd.astype(np.uint32)))

  def new_cache(self, batch: int, use_cfg: bool = False):
    """A zeroed KV cache for the whole video (doubled batch with CFG)."""
    return init_cache(self.dcfg, batch * (2 if use_cfg else 1), self.num_frames, self.tokens_per_frame)

  def _take_cache(self, batch: int, use_cfg: bool):
    """Reuses the donated cache of the last call of the same size (unwritten slots are masked by kv lengths)."""
    cache = self._caches.pop((batch, use_cfg), None)
    return cache if cache is not None else self.new_cache(batch, use_cfg)

  def _check_inputs(self, params, context, controls, uncond_context):
    context = jnp.asarray(context, jnp.float32)
    want = (self.dcfg.text_len, self.dcfg.text_dim)
    if context.ndim != 3 or context.shape[1:] != want:
      raise ValueError(f"context: expected (B, text_len, text_dim) = (B, {want[0]}, {want[1]}), got {context.shape}")
    b = context.shape[0]
    if controls.threshold.shape != (b,) or controls.min_steps.shape != (b, self.num_frames):
      raise ValueError(f"controls are for batch {controls.threshold.shape[0]} x {controls.min_steps.shape[1]} frames; "
                       f"context has batch {b} and the video {self.num_frames} frames (use make_controls)")
    if uncond_context is not None:
      uncond_context = jnp.asarray(uncond_context, jnp.float32)
      if uncond_context.ndim != 3 or uncond_context.shape[1:] != want:
        raise ValueError(f"uncond_context: expected (B or 1, {want[0]}, {want[1]}), got {uncond_context.shape}")
      uncond_context = jnp.broadcast_to(uncond_context, context.shape)
    if not isinstance(params, dict) or "generator" not in params or "head" not in params:
      raise ValueError("params: expected {'generator': ..., 'head': ...}")
    params = {"generator": as_variables(params["generator"]), "head": as_variables(params["head"])}
    return params, context, uncond_context

  # -- the network calls ------------------------------------------------------------------------------------------

  def forward(self, gen_params, x, t, context, uncond_context, guidance, cache, frame_offset, use_cfg: bool):
    """One cache-mode DiT forward on a chunk -> (velocity (B,c,H,W,C) f32, features (B,c,T,D), new cache)."""
    if use_cfg:
      x2 = jnp.concatenate([x, x], 0)
      t2 = jnp.concatenate([t, t], 0)
      ctx2 = jnp.concatenate([context, uncond_context], 0)
      out = self.dit.apply(gen_params, x2, t2, ctx2, cache=cache, frame_offset=frame_offset)
      b = x.shape[0]
      v_c, v_u = out["velocity"][:b], out["velocity"][b:]
      g = _bcast(guidance, v_c)
      return v_u + g * (v_c - v_u), out["features"][:b], out["cache"]
    out = self.dit.apply(gen_params, x, t, context, cache=cache, frame_offset=frame_offset)
    return out["velocity"], out["features"], out["cache"]

  def confidence(self, head_params, features, step, t):
    return jax.nn.sigmoid(self.head.apply(head_params, features, step, t).astype(jnp.float32))

  def context_input(self, x0, ckeys):
    """A finished (clean) chunk as the network sees it as context: noised at context_noise (static: 0 -> x0)."""
    if self.context_noise <= 0.0:
      return x0
    eps = slot_noise(ckeys, self.num_steps + 1, x0.shape[1:])
    return flow.add_noise(x0, eps, self.context_noise / self.num_train_timesteps)

  def _reference_forward(self):
    """Jitted full-sequence block-causal forward (no cache) with optional CFG, for `sample_reference`."""
    if self._ref_forward is None:
      c = self.chunk_frames

      def fwd(gen, x, t, context, uncond_context, guidance, use_cfg):
        b = x.shape[0]
        if use_cfg:
          out = self.dit.apply(gen, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                               jnp.concatenate([context, uncond_context]), chunk_frames=c)
          v_c, v_u = out["velocity"][:b], out["velocity"][b:]
          return v_u + _bcast(guidance, v_c) * (v_c - v_u), out["features"][:b]
        out = self.dit.apply(gen, x, t, context, chunk_frames=c)
        return out["velocity"], out["features"]

      self._ref_forward = jax.jit(fwd, static_argnames=("use_cfg",))
    return self._ref_forward

  # -- one chunk ----------------------------------------------------------------------------------------------------

  def denoise_chunk(self, params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg: bool):
    """The while-loop over denoising steps of chunk `chunk_index` (traced) -> (SamplerState after the loop)."""
    c, L = self.chunk_frames, self.num_steps
    b = context.shape[0]
    offset = jnp.asarray(chunk_index, jnp.int32) * c
    sig = jnp.asarray(np.append(self.sigmas, np.float32(0.0)))  # (L + 1,): the last entry is never used as a target
    max_s = jnp.clip(jax.lax.dynamic_slice_in_dim(controls.max_steps, offset, c, axis=1), 1, L)
    min_s = jnp.clip(jax.lax.dynamic_slice_in_dim(controls.min_steps, offset, c, axis=1), 1, max_s)
    tau = controls.threshold[:, None]
    ckeys = chunk_keys(keys, chunk_index)
    tn = self.num_train_timesteps
    gen, hp = params["generator"], params.get("head")

    def body(s: SamplerState) -> SamplerState:
      active = ~s.done
      a5 = _bcast(active, s.x)
      sigma_k = sig[s.k]
      if self.frozen_mode == "clean":
        frozen_x = self.context_input(s.x0, ckeys)
        frozen_t = jnp.full((b, c), self.context_noise, jnp.float32)
      else:
        frozen_x = s.x
        frozen_t = tn * sig[jnp.maximum(s.steps - 1, 0)]
      x_in = jnp.where(a5, s.x, frozen_x)
      t_in = jnp.where(active, tn * sigma_k, frozen_t)
      v, feats, cache = self.forward(gen, x_in, t_in, context, uncond_context, controls.guidance, s.cache, offset,
                                     use_cfg)
      x0_new = flow.x0_from_velocity(s.x, v, sigma_k)
      steps = jnp.where(active, s.k + 1, s.steps)
      if self.stop_rule == "x0_delta":
        # Training-free baseline: stop once x0 moved less than tau (mean |change|) since the previous step; the
        # change is recorded where the confidence would be.
        conf_new = jnp.where(s.k > 0, jnp.mean(jnp.abs(x0_new - s.x0), axis=(2, 3, 4)), jnp.nan)
        ready = (steps >= 2) & (conf_new < tau)
      else:
        conf_new = self.confidence(hp, feats, jnp.full((b, c), s.k, jnp.int32), t_in)
        ready = conf_new >= tau
      stop = active & (((steps >= min_s) & ready) | (steps >= max_s))
      x0 = jnp.where(a5, x0_new, s.x0)
      conf = jnp.where(active, conf_new, s.conf)
      trace = jax.lax.dynamic_update_slice_in_dim(
          s.trace, jnp.where(active, conf_new, jnp.nan)[:, :, None], s.k, axis=2)
      eps = slot_noise(ckeys, s.k + 1, s.x.shape[1:])
      x_next = flow.renoise(x0_new, eps, sig[s.k + 1])
      x = jnp.where(_bcast(active & ~stop, s.x), x_next, s.x)
      return SamplerState(k=s.k + 1, x=x, x0=x0, steps=steps, done=s.done | stop, conf=conf, trace=trace,
                          keys=s.keys, cache=cache)

    def cond(s: SamplerState):
      return (s.k < L) & ~jnp.all(s.done)

    shape = (b,) + self.chunk_shape
    state = SamplerState(
        k=jnp.zeros((), jnp.int32), x=slot_noise(ckeys, 0, self.chunk_shape), x0=jnp.zeros(shape, jnp.float32),
        steps=jnp.zeros((b, c), jnp.int32), done=jnp.zeros((b, c), bool), conf=jnp.zeros((b, c), jnp.float32),
        trace=jnp.full((b, c, L), jnp.nan, jnp.float32), keys=ckeys, cache=cache)
    return jax.lax.while_loop(cond, body, state)

  def fill_cache(self, params, context, uncond_context, controls, x0, ckeys, cache, chunk_index, use_cfg: bool):
    """The cache-fill forward: the clean chunk at t = context_noise overwrites the chunk's K/V slot."""
    b, c = x0.shape[:2]
    offset = jnp.asarray(chunk_index, jnp.int32) * self.chunk_frames
    t = jnp.full((b, c), self.context_noise, jnp.float32)
    _, _, cache = self.forward(params["generator"], self.context_input(x0, ckeys), t, context, uncond_context,
                               controls.guidance, cache, offset, use_cfg)
    return cache

  def run_chunk(self, params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg: bool):
    s = self.denoise_chunk(params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg)
    cache = self.fill_cache(params, context, uncond_context, controls, s.x0, s.keys, s.cache, chunk_index, use_cfg)
    return ChunkOutput(latents=s.x0, steps=s.steps, confidences=s.conf, conf_trace=s.trace, iters=s.k), cache

  def _chunk_step(self, params, context, uncond_context, controls, rng, cache, chunk_index, use_cfg: bool = False):
    self.trace_counts["chunk_step"] += 1
    keys = sample_keys(rng, controls.seed)
    return self.run_chunk(params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg)

  # -- the whole video ---------------------------------------------------------------------------------------------

  def _program(self, params, context, uncond_context, controls, rng, cache, use_cfg: bool = False):
    self.trace_counts["program"] += 1
    b = context.shape[0]
    c, L = self.chunk_frames, self.num_steps
    keys = sample_keys(rng, controls.seed)

    def body(i, carry):
      cache, lat, steps, conf, trace, iters = carry
      out, cache = self.run_chunk(params, context, uncond_context, controls, keys, cache, i, use_cfg)
      put = lambda a, u: jax.lax.dynamic_update_slice_in_dim(a, u, i * c, axis=1)
      return (cache, put(lat, out.latents), put(steps, out.steps), put(conf, out.confidences),
              put(trace, out.conf_trace), iters.at[i].set(out.iters))

    init = (cache, jnp.zeros((b,) + self.latent_shape, jnp.float32), jnp.zeros((b, self.num_frames), jnp.int32),
            jnp.zeros((b, self.num_frames), jnp.float32), jnp.full((b, self.num_frames, L), jnp.nan, jnp.float32),
            jnp.zeros((self.num_chunks,), jnp.int32))
    cache, lat, steps, conf, trace, iters = jax.lax.fori_loop(0, self.num_chunks, body, init)
    return SampleOutput(latents=lat, steps=steps, confidences=conf, conf_trace=trace, chunk_iters=iters), cache

  def prepare(self, params, context, controls, rng=None, uncond_context=None):
    """Validated program arguments: (args tuple, use_cfg). The cache comes from the pool (donated by the call)."""
    params, context, uncond_context = self._check_inputs(params, context, controls, uncond_context)
    use_cfg = uncond_context is not None
    rng = jax.random.PRNGKey(0) if rng is None else rng
    cache = self._take_cache(context.shape[0], use_cfg)
    return (params, context, uncond_context, controls, rng, cache), use_cfg

  def sample(self, params, context, controls: SamplingControls, rng=None, uncond_context=None) -> SampleOutput:
    """Samples a whole video batch in one compiled program (asynchronous: arrays are ready when read)."""
    args, use_cfg = self.prepare(params, context, controls, rng, uncond_context)
    compiled = self._compiled.get(_signature(args, use_cfg))
    if compiled is not None:
      out, cache = compiled(*args)
    else:
      out, cache = self.program(*args, use_cfg=use_cfg)
    self._caches[(args[1].shape[0], use_cfg)] = cache
    return out

  def compile(self, params, context, controls, rng=None, uncond_context=None) -> float:
    """Compiles the whole-video program ahead of time for this batch size / CFG use (later `sample` calls of that
    shape use it); returns the compile time in seconds (tracing + lowering + XLA compilation)."""
    args, use_cfg = self.prepare(params, context, controls, rng, uncond_context)
    t0 = time.perf_counter()
    compiled = self.program.lower(*args, use_cfg=use_cfg).compile()
    dt = time.perf_counter() - t0
    self._compiled[_signature(args, use_cfg)] = compiled
    self._caches[(args[1].shape[0], use_cfg)] = args[-1]  # lowering does not consume the donated cache
    return dt


def make_sampler(config, dit_cfg: Optional[DiTConfig] = None) -> Sampler:
  """The compiled DSA sampler of `config` (model, video size, ladder, context noise, frozen-frame mode)."""
  return Sampler(config, dit_cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Reference samplers (pure Python control flow; for tests and parity)


def _np_controls(controls):
  return jax.tree_util.tree_map(np.asarray, controls)


def sample_reference(sampler: Sampler, params, context, controls: SamplingControls, rng=None, uncond_context=None):
  """Recomputes the full block-causal forward over the sequence prefix at every step (no KV cache).

  Same stopping rule, noise and frozen-frame semantics as `Sampler.sample`, with Python loops and numpy
  bookkeeping: the check that the cached, compiled sampler is right. Returns a SampleOutput of numpy arrays.
  """
  params, context, uncond_context = sampler._check_inputs(params, context, controls, uncond_context)
  use_cfg = uncond_context is not None
  rng = jax.random.PRNGKey(0) if rng is None else rng
  ctl = _np_controls(controls)
  c, L, f = sampler.chunk_frames, sampler.num_steps, sampler.num_frames
  b = context.shape[0]
  tn = sampler.num_train_timesteps
  sig = np.asarray(sampler.sigmas, np.float32)
  keys = sample_keys(rng, controls.seed)
  full_forward = sampler._reference_forward()
  guidance = jnp.asarray(ctl.guidance)

  lat = np.zeros((b,) + sampler.latent_shape, np.float32)
  ctx_in = np.zeros_like(lat)  # the clean chunks as the network sees them (noised at context_noise)
  steps_all = np.zeros((b, f), np.int32)
  conf_all = np.zeros((b, f), np.float32)
  trace_all = np.full((b, f, L), np.nan, np.float32)
  iters = np.zeros((sampler.num_chunks,), np.int32)
  for i in range(sampler.num_chunks):
    lo, hi = i * c, (i + 1) * c
    ckeys = chunk_keys(keys, i)
    x = np.array(slot_noise(ckeys, 0, sampler.chunk_shape))
    x0 = np.zeros_like(x)
    steps = np.zeros((b, c), np.int32)
    done = np.zeros((b, c), bool)
    conf = np.zeros((b, c), np.float32)
    mn = np.clip(ctl.min_steps[:, lo:hi], 1, np.clip(ctl.max_steps[:, lo:hi], 1, L))
    mx = np.clip(ctl.max_steps[:, lo:hi], 1, L)
    k = 0
    while k < L and not done.all():
      x_in = x.copy()
      t_in = np.full((b, c), tn * sig[k], np.float32)
      clean = np.asarray(sampler.context_input(jnp.asarray(x0), ckeys)) if done.any() else None
      for bi in range(b):
        for fi in range(c):
          if done[bi, fi]:
            if sampler.frozen_mode == "clean":
              x_in[bi, fi] = clean[bi, fi]
              t_in[bi, fi] = sampler.context_noise
            else:
              t_in[bi, fi] = tn * sig[steps[bi, fi] - 1]
      x_full = np.concatenate([ctx_in[:, :lo], x_in], axis=1)
      t_full = np.concatenate([np.full((b, lo), sampler.context_noise, np.float32), t_in], axis=1)
      v, feats = full_forward(params["generator"], jnp.asarray(x_full), jnp.asarray(t_full), context, uncond_context,
                              guidance, use_cfg=use_cfg)
      v = np.asarray(v)[:, lo:hi]
      feats = feats[:, lo:hi]
      x0_new = x - sig[k] * v
      conf_new = np.asarray(sampler.confidence(params["head"], feats, jnp.full((b, c), k, jnp.int32),
                                               jnp.asarray(t_in)))
      eps = np.asarray(slot_noise(ckeys, k + 1, sampler.chunk_shape))
      sig_next = sig[k + 1] if k + 1 < L else 0.0
      for bi in range(b):
        tau = float(ctl.threshold[bi])
        for fi in range(c):
          if done[bi, fi]:
            continue
          steps[bi, fi] = k + 1
          x0[bi, fi] = x0_new[bi, fi]
          conf[bi, fi] = conf_new[bi, fi]
          trace_all[bi, lo + fi, k] = conf_new[bi, fi]
          if (steps[bi, fi] >= mn[bi, fi] and conf_new[bi, fi] >= tau) or steps[bi, fi] >= mx[bi, fi]:
            done[bi, fi] = True
          else:
            x[bi, fi] = (1.0 - sig_next) * x0_new[bi, fi] + sig_next * eps[bi, fi]
      k += 1
    iters[i] = k
    lat[:, lo:hi] = x0
    ctx_in[:, lo:hi] = np.asarray(sampler.context_input(jnp.asarray(x0), ckeys))
    steps_all[:, lo:hi] = steps
    conf_all[:, lo:hi] = conf
  return SampleOutput(latents=lat, steps=steps_all, confidences=conf_all, conf_trace=trace_all, chunk_iters=iters)


def sample_fixed(sampler: Sampler, params, context, num_steps: int, seed=0, rng=None, uncond_context=None,
                 guidance=None):
  """Self Forcing's sampler: every frame takes the first `num_steps` ladder steps; KV cache, Python loops.

  The baseline that the DSA sampler must reproduce at tau = +inf (max_steps = num_steps) and at tau = -inf
  (min_steps = num_steps). Returns latents (B, F, H, W, C) as numpy.
  """
  controls = sampler.make_controls(context.shape[0], threshold=np.inf, min_steps=1, max_steps=num_steps,
                                   guidance=guidance, seed=seed)
  params, context, uncond_context = sampler._check_inputs(params, context, controls, uncond_context)
  use_cfg = uncond_context is not None
  rng = jax.random.PRNGKey(0) if rng is None else rng
  b, c = context.shape[0], sampler.chunk_frames
  tn = sampler.num_train_timesteps
  keys = sample_keys(rng, controls.seed)
  fwd = sampler._fixed_forward.get(use_cfg)
  if fwd is None:
    fwd = sampler._fixed_forward[use_cfg] = jax.jit(functools.partial(sampler.forward, use_cfg=use_cfg))
  cache = sampler.new_cache(b, use_cfg)
  out = []
  for i in range(sampler.num_chunks):
    ckeys = chunk_keys(keys, i)
    x = slot_noise(ckeys, 0, sampler.chunk_shape)
    x0 = None
    for k in range(num_steps):
      sigma = float(sampler.sigmas[k])
      v, _, cache = fwd(params["generator"], x, jnp.full((b, c), tn * sigma, jnp.float32), context, uncond_context,
                        controls.guidance, cache, i * c)
      x0 = x - sigma * v
      if k + 1 < num_steps:
        x = flow.renoise(x0, slot_noise(ckeys, k + 1, sampler.chunk_shape), float(sampler.sigmas[k + 1]))
    _, _, cache = fwd(params["generator"], sampler.context_input(x0, ckeys),
                      jnp.full((b, c), sampler.context_noise, jnp.float32), context, uncond_context,
                      controls.guidance, cache, i * c)
    out.append(np.asarray(x0))
  return np.concatenate(out, axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# Parameters


class RandomWeightsWarning(UserWarning):
  pass


def random_params(config, dcfg: DiTConfig, key, exact: bool = True):
  """Random {'generator', 'head'} variables (unboxed).

  exact=True: the modules' own initialisers, in one jitted init (compiling it traces the whole model: ~5-10 s on a
  CPU). exact=False: the same tree filled by one small jitted program (seconds even at 1.3B): matrices and tables
  ~ N(0, 0.02^2), biases 0, norm scales 1 -- for smoke runs and speed benchmarks, where weights only need to be finite.
  """
  from dsa_jax.models import factory

  def init(key):
    kg, kh = jax.random.split(key)
    return {"generator": nn.unbox(factory.init_dit(dcfg, config, kg)),
            "head": nn.unbox(factory.init_head(config, kh))}

  if exact:
    return jax.jit(init)(key)
  shapes = jax.eval_shape(init, key)
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(shapes))
  treedef = jax.tree_util.tree_structure(shapes)

  kinds = []
  for path, s in zip(paths, leaves):
    name = jax.tree_util.keystr(path)
    kinds.append("one" if name.endswith("scale']") else
                 "zero" if name.endswith("bias']") or len(s.shape) < 2 else "normal")
  total = sum(int(np.prod(s.shape)) for s, k in zip(leaves, kinds) if k == "normal")

  @jax.jit
  def fill(key):
    flat = 0.02 * jax.random.normal(key, (max(total, 1),), jnp.float32)  # one random op: a fast compile
    out, pos = [], 0
    for s, kind in zip(leaves, kinds):
      if kind == "one":
        out.append(jnp.ones(s.shape, s.dtype))
      elif kind == "zero":
        out.append(jnp.zeros(s.shape, s.dtype))
      else:
        n = int(np.prod(s.shape))
        out.append(flat[pos:pos + n].reshape(s.shape).astype(s.dtype))
        pos += n
    return jax.tree_util.tree_unflatten(treedef, out)

  return fill(key)


def _is_training_workdir(path: str) -> bool:
  """Anything but a params_io model folder (dsa_meta.json) goes to the training loader (workdir or exported model/)."""
  return not os.path.isfile(os.path.join(path, "dsa_meta.json"))


def load_sampler_params(config, ckpt: str = "", *, use_ema: Optional[bool] = None, dit_cfg=None, warn=print):
  """{'generator', 'head'} variables for sampling, and a dict describing where they came from.

  ckpt '' -> random init (warned). A model checkpoint folder (params_io) -> networks 'generator_ema' (use_ema, if
  present) or 'generator', and 'head' (random with a warning if absent). A training workdir -> the latest step via
  `dsa_jax.training.checkpointing.load_model_from_workdir`.
  """
  from dsa_jax.checkpoint import params_io
  from dsa_jax.models import factory

  use_ema = config.sampling.use_ema if use_ema is None else use_ema
  dcfg = dit_cfg or DiTConfig.from_config(config.model, config.compute)
  key = jax.random.PRNGKey(config.seed)
  if not ckpt:
    warn("warning: no checkpoint given (config.sampling.checkpoint / --ckpt): the generator and the confidence head "
         "have RANDOM weights; outputs are noise-like and only useful for smoke tests and benchmarks")
    return random_params(config, dcfg, key, exact=False), {"source": "random"}
  if not os.path.exists(ckpt):
    raise FileNotFoundError(f"checkpoint {ckpt!r} does not exist (--ckpt / config.sampling.checkpoint)")
  if not os.path.isdir(ckpt):
    raise FileNotFoundError(f"checkpoint {ckpt!r} is not a folder (expected a dsa_jax model checkpoint or a "
                            "training workdir)")

  if _is_training_workdir(ckpt):
    try:
      from dsa_jax.training.checkpointing import load_model_from_workdir
    except ImportError as e:
      raise params_io.CheckpointError(f"checkpoint {ckpt!r} looks like a training workdir, but loading workdirs "
                                      f"needs dsa_jax.training.checkpointing.load_model_from_workdir ({e})") from e
    # Preferred first; runs without an EMA or a head (e.g. an ODE-stage workdir) fall back (reported below).
    gens = ("generator_ema", "generator") if use_ema else ("generator",)
    attempts = [(g, "head") for g in gens] + [(g,) for g in gens]
    first_error, loaded = None, None
    for networks in attempts:
      try:
        loaded = load_model_from_workdir(ckpt, config, networks=networks)
        break
      except (ValueError, KeyError) as e:  # the loader's errors name the missing networks
        first_error = first_error or e
    if loaded is None:
      raise first_error
    tree, meta = loaded if isinstance(loaded, tuple) else (loaded, {})
    source = {"source": "workdir", "path": ckpt}
  else:
    meta = params_io.read_meta(ckpt)
    available = set(meta.get("networks", [])) or set(meta.get("arch", {}))
    wanted = [n for n in ("generator_ema" if use_ema else None, "generator", "head") if n and n in available]
    if not any(n.startswith("generator") for n in wanted):
      raise params_io.CheckpointError(f"checkpoint {ckpt!r} holds no 'generator' or 'generator_ema' network; it has "
                                      f"{sorted(available)}")
    if "generator_ema" in wanted and "generator" in wanted:
      wanted.remove("generator")
    tree, meta = params_io.load_params(ckpt, wanted)
    source = {"source": "checkpoint", "path": ckpt}

  gen_name = "generator_ema" if use_ema and "generator_ema" in tree else "generator"
  if gen_name not in tree:
    raise params_io.CheckpointError(f"checkpoint {ckpt!r} holds no 'generator' or 'generator_ema' network; it has "
                                    f"{sorted(tree)}")
  if use_ema and gen_name != "generator_ema":
    warn(f"note: checkpoint {ckpt!r} has no 'generator_ema'; using 'generator'")
  if meta.get("arch"):
    if gen_name in meta["arch"]:
      params_io.check_arch(meta, gen_name, dcfg.to_dict(), ckpt)
    elif "generator" in meta["arch"]:
      params_io.check_arch(meta, "generator", dcfg.to_dict(), ckpt)
  gen = as_variables(tree[gen_name])
  abstract = nn.unbox(factory.abstract_dit_params(dcfg, config))
  params_io.check_tree_shapes(gen, abstract, gen_name, ckpt)
  gen = jax.tree_util.tree_map(lambda a, s: jnp.asarray(a, s.dtype), gen, abstract)
  if "head" in tree:
    head = as_variables(tree["head"])
    habs = nn.unbox(factory.abstract_head_params(config))
    params_io.check_tree_shapes(head, habs, "head", ckpt)
    head = jax.tree_util.tree_map(lambda a, s: jnp.asarray(a, s.dtype), head, habs)
  else:
    warn(f"warning: checkpoint {ckpt!r} has no confidence 'head': it gets RANDOM weights, so thresholds are "
         "meaningless (use --threshold inf for the fixed-step sampler)")
    head = nn.unbox(factory.init_head(config, key))
    source["head"] = "random"
  source["generator"] = gen_name
  return {"generator": gen, "head": head}, source
