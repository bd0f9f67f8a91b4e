"""Streaming: yield each chunk (latents, pixels, steps, confidences) as soon as it is done.

`stream(...)` drives the sampler's jitted per-chunk function (`Sampler.chunk_step`, chunk index traced, KV cache
donated and carried between calls) from Python, so the first chunk reaches the caller after one chunk's work
instead of the whole video's. It computes exactly what `Sampler.sample` computes (same noise, same stopping).
Pixels come from a `decode.PixelDecoder` (chunk by chunk, with its causal state).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.sampling.decode import PixelDecoder


# ----------------------------------------------------------------------------------------------------------------------
# Streaming


@dataclasses.dataclass
class StreamChunk:
  """One finished chunk. Arrays are numpy on the host; pixels None without a decoder."""
  index: int
  latents: np.ndarray      # (B, c, h, w, C)
  steps: np.ndarray        # (B, c)
  confidences: np.ndarray  # (B, c)
  conf_trace: np.ndarray   # (B, c, L)
  iters: int               # denoising forwards this chunk took
  pixels: Optional[np.ndarray]  # (B, T_i, H, W, 3) in [-1, 1]
  seconds: float           # wall time of this chunk (sampling + decoding + transfer)
  elapsed: float           # wall time since the stream started
  threshold: Optional[float] = None  # the tau an fps controller set for this chunk (None: the controls' own)


def stream(sampler, params, context, controls, rng=None, uncond_context=None, decoder: Optional[PixelDecoder] = None,
           *, init_latents=None, prompt_index=None, fps_controller=None, uint8: bool = False) -> Iterator[StreamChunk]:
  """Yields a StreamChunk per chunk as soon as it is done (same result as `sampler.sample`, init frames and prompt
  schedule included; given frames come back as they went in).

  Compiles the per-chunk function on first use (once per batch size and CFG use; never for new controls, new
  schedules or a new number of given frames).
  fps_controller (`budget.FpsController`): sets every chunk's threshold from the measured times of the chunks before
  it (the first chunk, which may include compilation, is not measured), so that the stream holds its target frame
  rate (the threshold is traced: nothing recompiles). `uint8`: pixels come as uint8 frames converted on the device
  (see `PixelDecoder.decode_video`).
  """
  args, use_cfg = sampler.prepare(params, context, controls, rng, uncond_context, init_latents, prompt_index)
  params, context, uncond_context, controls, rng, cache, cond = args
  b = context.shape[0]
  dec_state = decoder.init_state(b) if decoder is not None else None
  start = time.perf_counter()
  for i in range(sampler.num_chunks):
    t0 = time.perf_counter()
    tau = None
    if fps_controller is not None:
      tau = float(fps_controller.threshold)
      controls = controls.replace(threshold=jnp.full_like(controls.threshold, tau))
    # The chunk's cache fill is dispatched after its decoding: the chunk is handed out as soon as it is decoded,
    # the fill runs while the caller looks at it, and the last chunk has none.
    out, cache = sampler.chunk_step(params, context, uncond_context, controls, rng, cache, np.int32(i), cond,
                                    use_cfg=use_cfg, fill=False)
    pixels = None
    if decoder is not None:
      pixels, dec_state = decoder.decode_chunk(out.latents, dec_state, first=(i == 0), uint8=uint8)
    if i + 1 < sampler.num_chunks:
      cache = sampler.fill_step(params, context, uncond_context, controls, rng, cache, np.int32(i), out.latents, cond,
                                use_cfg=use_cfg)
    o, px = jax.device_get((out, pixels))
    now = time.perf_counter()
    if fps_controller is not None and i > 0:  # the first chunk's time may include compilation: not a measurement
      fps_controller.update(int(px.shape[1]) if px is not None else sampler.chunk_frames, now - t0)
    yield StreamChunk(index=i, latents=o.latents, steps=o.steps, confidences=o.confidences,
                      conf_trace=o.conf_trace, iters=int(o.iters), pixels=px, seconds=now - t0,
                      elapsed=now - start, threshold=tau)


def collect(chunks) -> dict:
  """Concatenates StreamChunks along frames: dict(latents, steps, confidences, conf_trace, pixels, chunk_iters,
  chunk_thresholds (the taus an fps controller set, or None))."""
  chunks = list(chunks)
  cat = lambda name: np.concatenate([getattr(c, name) for c in chunks], axis=1)
  out = {n: cat(n) for n in ("latents", "steps", "confidences", "conf_trace")}
  out["pixels"] = cat("pixels") if chunks and chunks[0].pixels is not None else None
  out["chunk_iters"] = np.asarray([c.iters for c in chunks], np.int32)
  taus = [c.threshold for c in chunks]
  out["chunk_thresholds"] = None if all(t is None for t in taus) else taus
  return out
