"""Self Forcing rollout with a sampled exit step: the generator's own few-step video, as the sampler makes it.

The generator produces the whole video chunk by chunk exactly as the sampler does (fresh-noise re-noising between
ladder steps, a cache-fill forward on the finished chunk at t = context_noise), but every chunk stops at one exit
index k* (shared by all chunks and the batch, Self Forcing's `same_step_across_blocks`). Only the exit step's
forward carries gradients.

Two phases keep memory flat in the number of chunks:
  1. `rollout_no_grad`: the complete rollout under stop_gradient (a `lax.scan` over chunks, an inner `lax.scan`
     over a static number of ladder steps whose forwards are skipped by `lax.cond` once past k*). It returns each
     chunk's exit-step input x_{k*}, the exit x0, optionally x0 continued to the last step (consistency target),
     and the final KV cache.
  2. `exit_forward`: the exit-step forward of every chunk again, with gradients, against the *final* cache. That is
     exact: a chunk's queries see only keys < its own end (kv_lengths masking), the slots of earlier chunks hold
     by its forward. The cache is a constant of the scan, so backward keeps one copy instead of one per chunk.
     Activations: the DiT's blocks are `jax.checkpoint`ed (compute.remat), or, if they are not and a chunk's
     activations would be large, each chunk's forward is (train.rollout_remat, see `resolve_remat`).
Phase 2 repeats one forward per chunk that phase 1 already ran without gradient; in exchange backward never holds
per-chunk caches (6 GB each for Wan-1.3B at 832x480).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.config_lib import latent_hw, rollout_exit_steps, tokens_per_frame
from dsa_jax.diffusion import flow
from dsa_jax.models.dit import WanDiT, cache_logical_axes, init_cache
from dsa_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """Static description of a rollout (hashable; changing it recompiles)."""
  num_frames: int
  chunk_frames: int
  height: int
  width: int
  channels: int
  tokens_per_frame: int
  sigmas: tuple  # warped ladder sigmas
  num_steps: int  # exit indices are drawn from [first_exit, num_steps)
  context_sigma: float
  num_train_timesteps: int = 1000
  remat: str = "auto"  # 'auto' | 'chunk' | 'none': jax.checkpoint around each chunk's exit forward
  first_exit: int = 0  # train.min_exit_steps - 1

  @property
  def num_chunks(self) -> int:
    return self.num_frames // self.chunk_frames

  @classmethod
  def from_config(cls, config) -> "RolloutSpec":
    lh, lw = latent_hw(config)
    ladder = training_ladder(config)
    sig = flow.warp_ladder(ladder, config.diffusion.shift, config.diffusion.num_train_timesteps)
    steps = rollout_exit_steps(config)
    first = min(max(int(config.train.get("min_exit_steps", 1)), 1), steps) - 1
    return cls(num_frames=config.video.num_frames, chunk_frames=config.video.chunk_frames, height=lh, width=lw,
               channels=config.model.in_channels, tokens_per_frame=tokens_per_frame(config),
               sigmas=tuple(float(s) for s in sig), num_steps=steps,
               context_sigma=float(config.sampling.context_noise) / config.diffusion.num_train_timesteps,
               num_train_timesteps=config.diffusion.num_train_timesteps,
               remat=str(config.train.rollout_remat), first_exit=first)


def training_ladder(config) -> tuple:
  """The timesteps of training rollouts: config.train.ladder, or the sampling ladder when that is empty."""
  return tuple(config.train.get("ladder") or ()) or tuple(config.sampling.ladder)


def sample_exit_index(key, spec: RolloutSpec):
  """k* ~ U{first_exit, ..., num_steps - 1}, one per rollout."""
  return jax.random.randint(key, (), spec.first_exit, spec.num_steps, dtype=jnp.int32)


def _chunk_keys(key, i):
  """Independent keys for chunk i: initial noise, re-noising (one per step), cache-fill noise."""
  k = jax.random.fold_in(key, i)
  return jax.random.split(k, 3)


def _chunk_shape(spec: RolloutSpec, batch: int):
  return (batch, spec.chunk_frames, spec.height, spec.width, spec.channels)


def _frames_from_chunks(x):
  """(N, B, c, ...) -> (B, N*c, ...)."""
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])


def _chunks_from_frames(x, chunk_frames):
  """(B, F, ...) -> (N, B, c, ...)."""
  b, f = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, f // chunk_frames, chunk_frames) + x.shape[2:]), 1, 0)


def rollout_no_grad(dcfg, params, context, key, exit_index, spec: RolloutSpec, *, continue_to_last: bool = False,
                    mesh=None, rules=()):
  """Phase 1: the full rollout without gradient. context (B, L, D); exit_index traced int32 scalar.

  Returns dict: x_in (B,F,H,W,C) the exit step's noisy input per chunk, x0 (B,F,...) the exit x0 (what the rollout
  outputs and caches), x0_last (continued to step num_steps-1) and x0_next (one step after the exit; the exit's own
  x0 when the exit is the last step), both only if `continue_to_last`, cache (final KV cache).
  """
  params = jax.lax.stop_gradient(params)
  context = jax.lax.stop_gradient(context)
  # Nothing here is differentiated, so the blocks need no remat; without it they also update the KV cache in place
  # (the whole cache in the layer loop's carry) instead of copying each layer's slice in and out.
  model = WanDiT(dataclasses.replace(dcfg, remat="none"))
  b = context.shape[0]
  shape = _chunk_shape(spec, b)
  sig = jnp.asarray(spec.sigmas + (0.0,), jnp.float32)  # sig[num_steps] unused but keeps indexing in range
  cache = init_cache(dcfg, b, spec.num_frames, spec.tokens_per_frame)
  cache_names = cache_logical_axes()
  cache = {k: mesh_lib.constrain(v, cache_names[k], mesh, rules) for k, v in cache.items()}
  last = spec.num_steps - 1 if continue_to_last else exit_index
  tfull = lambda s: jnp.full((b, spec.chunk_frames), s * spec.num_train_timesteps, jnp.float32)

  def chunk(cache, i):
    k_init, k_steps, k_ctx = _chunk_keys(key, i)
    offset = i * spec.chunk_frames
    x = jax.random.normal(k_init, shape, jnp.float32)

    def step(carry, k):
      x, x_in, x0_exit, x0_next, x0_cur = carry

      def run(x):
        out = model.apply(params, x, tfull(sig[k]), context, cache=cache, frame_offset=offset)
        return flow.x0_from_velocity(x, out["velocity"], sig[k])

      x0 = jax.lax.cond(k <= last, run, lambda x: x0_cur, x)
      is_exit = k == exit_index
      x_in = jnp.where(is_exit, x, x_in)
      x0_exit = jnp.where(is_exit, x0, x0_exit)
      # the step after the exit, or the exit itself when it is the last step (one more step is worth nothing)
      is_next = (k == exit_index + 1) | (is_exit & (exit_index == spec.num_steps - 1))
      x0_next = jnp.where(is_next, x0, x0_next)
      eps = jax.random.normal(jax.random.fold_in(k_steps, k), shape, jnp.float32)
      x_next = flow.renoise(x0, eps, sig[k + 1])
      return (x_next, x_in, x0_exit, x0_next, x0), None

    zeros = jnp.zeros(shape, jnp.float32)
    (_, x_in, x0_exit, x0_next, x0_last), _ = jax.lax.scan(step, (x, zeros, zeros, zeros, zeros),
                                                           jnp.arange(spec.num_steps, dtype=jnp.int32))
    # Commit the finished chunk: one forward at t = context_noise writes its keys/values (Self Forcing).
    x_ctx = x0_exit
    if spec.context_sigma > 0:
      x_ctx = flow.add_noise(x0_exit, jax.random.normal(k_ctx, shape, jnp.float32), spec.context_sigma)
    out = model.apply(params, x_ctx, tfull(spec.context_sigma), context, cache=cache, frame_offset=offset)
    new_cache = {k: mesh_lib.constrain(v, cache_names[k], mesh, rules) for k, v in out["cache"].items()}
    return new_cache, (x_in, x0_exit, x0_next, x0_last)

  cache, (x_in, x0, x0_next, x0_last) = jax.lax.scan(chunk, cache, jnp.arange(spec.num_chunks, dtype=jnp.int32))
  result = {"x_in": _frames_from_chunks(x_in), "x0": _frames_from_chunks(x0), "cache": cache}
  if continue_to_last:
    result["x0_last"] = _frames_from_chunks(x0_last)
    result["x0_next"] = _frames_from_chunks(x0_next)
  return jax.tree_util.tree_map(jax.lax.stop_gradient, result)


def exit_forward(dcfg, params, context, x_in, exit_index, cache, spec: RolloutSpec, *, mesh=None, rules=()):
  """Phase 2: each chunk's exit-step forward with gradients against the final (constant) cache.

  Returns dict: x0 (B,F,H,W,C) float32 with gradient to `params`, features (B,F,1,D) (per-frame mean of the final
  hidden states; the confidence head pools over axis 2), t (B,F) the exit timesteps.
  """
  model = WanDiT(dcfg)
  b = x_in.shape[0]
  sig = jnp.asarray(spec.sigmas, jnp.float32)[exit_index]
  t = jnp.full((b, spec.chunk_frames), sig * spec.num_train_timesteps, jnp.float32)
  cache = jax.tree_util.tree_map(jax.lax.stop_gradient, cache)
  x_chunks = _chunks_from_frames(jax.lax.stop_gradient(x_in), spec.chunk_frames)

  def forward(params, x, i):
    out = model.apply(params, x, t, context, cache=cache, frame_offset=i * spec.chunk_frames)
    x0 = flow.x0_from_velocity(x, out["velocity"], sig)
    feats = jnp.mean(out["features"].astype(jnp.float32), axis=2, keepdims=True)
    return x0, feats

  if resolve_remat(spec, dcfg) == "chunk":
    forward = jax.checkpoint(forward, prevent_cse=False)

  def body(carry, inp):
    i, x = inp
    return carry, forward(params, x, i)

  _, (x0, feats) = jax.lax.scan(body, None, (jnp.arange(spec.num_chunks, dtype=jnp.int32), x_chunks))
  return {"x0": _frames_from_chunks(x0), "features": _frames_from_chunks(feats),
          "t": jnp.full((b, spec.num_frames), sig * spec.num_train_timesteps, jnp.float32)}


def resolve_remat(spec: RolloutSpec, dcfg) -> str:
  """'auto': checkpoint each chunk's exit forward only when the DiT's blocks are not rematerialised themselves and a
  chunk's saved activations would be large (> ~1 GiB: roughly 24 values per token, layer and model dim, bf16)."""
  if spec.remat != "auto":
    if spec.remat not in ("chunk", "none"):
      raise ValueError(f"config.train.rollout_remat: expected 'auto', 'chunk' or 'none', got {spec.remat!r}")
    return spec.remat
  if dcfg.remat != "none":
    return "none"  # each block is already a jax.checkpoint
  tokens = spec.chunk_frames * spec.tokens_per_frame
  return "chunk" if tokens * dcfg.dim * dcfg.num_layers * 24 * 2 > (1 << 30) else "none"


def self_forcing_rollout(dcfg, params, context, key, spec: RolloutSpec, *, exit_index=None, with_grad: bool = True,
                         continue_to_last: bool = False, mesh=None, rules=()):
  """Both phases. Returns dict: x0 (with gradient if `with_grad`), x0_nograd, features (with_grad only), t, exit
  (int32 scalar k*), x_in, and x0_last and x0_next when `continue_to_last`."""
  k_exit, k_roll = jax.random.split(key)
  if exit_index is None:
    exit_index = sample_exit_index(k_exit, spec)
  exit_index = jnp.asarray(exit_index, jnp.int32)
  roll = rollout_no_grad(dcfg, params, context, k_roll, exit_index, spec, continue_to_last=continue_to_last,
                         mesh=mesh, rules=rules)
  out = {"x0_nograd": roll["x0"], "x_in": roll["x_in"], "exit": exit_index}
  if continue_to_last:
    out["x0_last"], out["x0_next"] = roll["x0_last"], roll["x0_next"]
  if with_grad:
    ex = exit_forward(dcfg, params, context, roll["x_in"], exit_index, roll["cache"], spec, mesh=mesh, rules=rules)
    out.update(x0=ex["x0"], features=ex["features"], t=ex["t"])
  else:
    b = context.shape[0]
    sig = jnp.asarray(spec.sigmas, jnp.float32)[exit_index]
    out.update(x0=roll["x0"], t=jnp.full((b, spec.num_frames), sig * spec.num_train_timesteps, jnp.float32))
  return out
