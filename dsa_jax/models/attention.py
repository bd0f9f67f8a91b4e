"""One attention function, three backends: `xla` (reference, CPU), `cudnn` (GPU), `splash` (TPU Pallas kernel).

Inputs are (B, L, H, D). Masking comes in two forms the backends can exploit: `kv_lengths` (B,) — keys at or past the
length are ignored, which is how the static-shape KV cache hides slots not yet written (cuDNN skips them) — and
`mask`, a boolean (Lq, Lk) or (B, 1, Lq, Lk) array for the block-causal training forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("xla", "cudnn", "splash")


def resolve_backend(name: str) -> str:
  """'auto' picks by platform: cudnn on GPU, splash on TPU, xla elsewhere."""
  if name != "auto":
    if name not in BACKENDS:
      raise ValueError(f"compute.attention: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name
  platform = jax.devices()[0].platform
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


def block_causal_mask(num_frames: int, tokens_per_frame: int, chunk_frames: int | None) -> np.ndarray:
  """(L, L) boolean: query token of chunk i sees key tokens of chunks <= i; None -> full attention (teacher)."""
  length = num_frames * tokens_per_frame
  if chunk_frames is None:
    return np.ones((length, length), bool)
  chunk = np.arange(length) // (tokens_per_frame * chunk_frames)
  return chunk[None, :] <= chunk[:, None]


def _combined_mask(mask, kv_lengths, batch, lq, lk):
  """Boolean (B, 1, Lq, Lk) from the two mask forms, or None."""
  out = None
  if mask is not None:
    out = jnp.asarray(mask, bool)
    if out.ndim == 2:
      out = out[None, None]
  if kv_lengths is not None:
    valid = jnp.arange(lk)[None, :] < jnp.asarray(kv_lengths)[:, None]  # (B, Lk)
    valid = valid[:, None, None, :]
    out = valid if out is None else jnp.logical_and(out, valid)
  if out is not None:
    out = jnp.broadcast_to(out, (batch if out.shape[0] != 1 else 1, 1, lq, lk))
  return out


def _xla_attention(q, k, v, mask, kv_lengths):
  """Reference: softmax in float32, explicit einsums (runs anywhere)."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(d).astype(np.float32)
  m = _combined_mask(mask, kv_lengths, b, lq, lk)
  if m is not None:
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


def _cudnn_attention(q, k, v, mask, kv_lengths):
  b, lq, _, _ = q.shape
  lk = k.shape[1]
  kw = {}
  if kv_lengths is not None:
    kw["key_value_seq_lengths"] = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (b,))
  m = None if mask is None else _combined_mask(mask, None, b, lq, lk)
  return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn", **kw)


@functools.lru_cache(maxsize=16)
def _splash_kernel(lq: int, lk: int, heads: int, mask_bytes: bytes | None, mask_shape):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  if mask_bytes is None:
    base = sm.FullMask((lq, lk))
  else:
    base = sm.NumpyMask(np.frombuffer(mask_bytes, bool).reshape(mask_shape))
  multi = sm.MultiHeadMask([base] * heads)
  return sk.make_splash_mha(multi, head_shards=1, q_seq_shards=1)


def _splash_attention(q, k, v, mask, kv_lengths):
  if jax.devices()[0].platform != "tpu":
    raise RuntimeError("compute.attention='splash' is TPU only; use 'auto', 'xla' or 'cudnn' on this platform")
  if kv_lengths is not None:
    # The KV-cache path needs a traced length; splash masks are static, so fold it in through segment ids.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    lk = k.shape[1]
    kv_seg = (jnp.arange(lk)[None, :] >= jnp.asarray(kv_lengths)[:, None]).astype(jnp.int32)
    q_seg = jnp.zeros(q.shape[:2], jnp.int32)
    seg = [sk.SegmentIds(q=qs, kv=ks) for qs, ks in zip(q_seg, kv_seg)]
  else:
    seg = [None] * q.shape[0]
  m = None if mask is None else np.asarray(mask, bool)
  kernel = _splash_kernel(q.shape[1], k.shape[1], q.shape[2], None if m is None else m.tobytes(),
                          None if m is None else m.shape)
  scale = 1.0 / np.sqrt(q.shape[-1])
  outs = []
  for i in range(q.shape[0]):  # splash kernels take (H, L, D) per example
    qi = jnp.swapaxes(q[i], 0, 1) * scale
    ki, vi = jnp.swapaxes(k[i], 0, 1), jnp.swapaxes(v[i], 0, 1)
    oi = kernel(qi, ki, vi, segment_ids=seg[i]) if seg[i] is not None else kernel(qi, ki, vi)
    outs.append(jnp.swapaxes(oi, 0, 1))
  return jnp.stack(outs).astype(q.dtype)


def dot_product_attention(q, k, v, *, mask=None, kv_lengths=None, backend: str = "xla"):
  """softmax(q k^T / sqrt(D)) v over (B, L, H, D) inputs with the given backend."""
  if backend == "xla":
    return _xla_attention(q, k, v, mask, kv_lengths)
  if backend == "cudnn":
    return _cudnn_attention(q, k, v, mask, kv_lengths)
  if backend == "splash":
    return _splash_attention(q, k, v, mask, kv_lengths)
  raise ValueError(f"compute.attention: unknown backend {backend!r}; expected one of {BACKENDS}")
