"""Reference samplers with Python control flow: the checks that the cached, compiled `Sampler` is right.

`sample_reference` recomputes the full block-causal forward over the sequence prefix at every step (no KV cache);
`sample_fixed` is Self Forcing's fixed-step sampler. Both draw the sampler's noise (same keys and slots), so they
reproduce its videos exactly. Slow: tests and parity checks only.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.diffusion import flow
from dsa_jax.diffusion.guidance import guided_velocity
from dsa_jax.sampling import stop_rules
from dsa_jax.sampling.sampler import Sampler, SampleOutput, SamplingControls, chunk_keys, sample_keys, slot_noise

_JITTED = weakref.WeakKeyDictionary()  # sampler -> {key: jitted function}; kept out of the (immutable) Sampler


def _memo(sampler, key, make):
  fns = _JITTED.setdefault(sampler, {})
  if key not in fns:
    fns[key] = make()
  return fns[key]


def _reference_forward(sampler: Sampler):
  """Jitted full-sequence block-causal forward (no cache) with optional CFG."""
  c = sampler.chunk_frames

  def fwd(gen, x, t, context, uncond_context, guidance, use_cfg):
    b = x.shape[0]
    if use_cfg:
      out = sampler.dit.apply(gen, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                              jnp.concatenate([context, uncond_context]), chunk_frames=c)
      return guided_velocity(out["velocity"][:b], out["velocity"][b:], guidance), out["features"][:b]
    out = sampler.dit.apply(gen, x, t, context, chunk_frames=c)
    return out["velocity"], out["features"]

  return _memo(sampler, "reference", lambda: jax.jit(fwd, static_argnames=("use_cfg",)))


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
  full_forward = _reference_forward(sampler)
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
          if stop_rules.frame_done(True, steps[bi, fi], mn[bi, fi], mx[bi, fi],
                                   stop_rules.READY["confidence"](conf_new[bi, fi], tau, steps[bi, fi])):
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
  def forward(gen, x, t, ctx, uctx, guidance, cache, i):  # the sampler's cache placement (ring slots with a window)
    return sampler.forward(gen, x, t, ctx, uctx, guidance, cache, None, use_cfg, sampler.placement(i))

  fwd = _memo(sampler, ("fixed", use_cfg), lambda: jax.jit(forward))
  cache = sampler.new_cache(b, use_cfg)
  out = []
  for i in range(sampler.num_chunks):
    ckeys = chunk_keys(keys, i)
    x = slot_noise(ckeys, 0, sampler.chunk_shape)
    x0 = None
    for k in range(num_steps):
      sigma = float(sampler.sigmas[k])
      v, _, cache = fwd(params["generator"], x, jnp.full((b, c), tn * sigma, jnp.float32), context, uncond_context,
                        controls.guidance, cache, i)
      x0 = x - sigma * v
      if k + 1 < num_steps:
        x = flow.renoise(x0, slot_noise(ckeys, k + 1, sampler.chunk_shape), float(sampler.sigmas[k + 1]))
    _, _, cache = fwd(params["generator"], sampler.context_input(x0, ckeys),
                      jnp.full((b, c), sampler.context_noise, jnp.float32), context, uncond_context,
                      controls.guidance, cache, i)
    out.append(np.asarray(x0))
  return np.concatenate(out, axis=1)


def sample_window_reference(sampler: Sampler, params, context, num_steps: int, seed=0, rng=None):
  """The windowed (sinks + rolling window) fixed-step sampler with a plain, linear KV cache rebuilt for every chunk.

  Keeps each finished chunk's keys/values and, per chunk, lays out the ones it may see (the sink chunks, then the
  last window chunks in time order) at the start of a fresh cache: the check that the sampler's ring buffer (slots
  modulo the window, eviction, filled length) is right. Returns latents (B, F, H, W, C) as numpy.
  """
  params, context, _ = sampler._check_inputs(params, context, sampler.make_controls(context.shape[0]), None)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  b, c, tn = context.shape[0], sampler.chunk_frames, sampler.num_train_timesteps
  s, cap, tok = sampler.sink_frames, sampler.cache_frames, sampler.tokens_per_frame
  keys = sample_keys(rng, sampler.make_controls(b, seed=seed).seed)
  fwd = _memo(sampler, "window", lambda: jax.jit(lambda gen, x, t, ctx, cache, place: sampler.dit.apply(
      gen, x, t, ctx, cache=cache, sink_frames=s, **place)))
  kv = {}  # chunk -> its (k, v) as written by its cache-fill forward
  out = []
  for i in range(sampler.num_chunks):
    sinks = [j for j in range(min(s // c, i))]
    window = [j for j in range(max(s // c, i - (cap - s) // c + 1), i)]
    seen = sinks + window
    cache = sampler.new_cache(b)
    for n, j in enumerate(seen):
      cache = {a: cache[a].at[:, :, n * c * tok:(n + 1) * c * tok].set(kv[j][a]) for a in ("k", "v")}
    slot = len(seen) * c
    shift = max(0, window[0] * c - s) if window else 0  # sinks sit right before the window
    place = {"frame_offset": i * c, "cache_slot": slot, "sink_shift": shift}
    ckeys = chunk_keys(keys, i)
    x, x0 = slot_noise(ckeys, 0, sampler.chunk_shape), None
    for k in range(num_steps):
      sigma = float(sampler.sigmas[k])
      o = fwd(params["generator"], x, jnp.full((b, c), tn * sigma, jnp.float32), context, cache, place)
      x0 = x - sigma * o["velocity"]
      if k + 1 < num_steps:
        x = flow.renoise(x0, slot_noise(ckeys, k + 1, sampler.chunk_shape), float(sampler.sigmas[k + 1]))
    o = fwd(params["generator"], sampler.context_input(x0, ckeys), jnp.full((b, c), sampler.context_noise, jnp.float32),
            context, cache, place)
    kv[i] = {a: o["cache"][a][:, :, slot * tok:(slot + c) * tok] for a in ("k", "v")}
    out.append(np.asarray(x0))
  return np.concatenate(out, axis=1)
