"""3D rotary position embedding of Wan2.1: head dim split t/h/w (44/42/42 at 128), interleaved pairs, theta 1e4.

Tables are built in float64 with numpy (as the reference does) and only gathered on device, so a traced frame offset
(the KV-cache path) costs a dynamic slice, not a recomputation in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """(t, h, w) shares of the head dim: h = w = 2 * (d // 6), t gets the rest."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def _angles(dim: int, positions: int, theta: float) -> np.ndarray:
  inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  return np.outer(np.arange(positions, dtype=np.float64), inv)  # (positions, dim / 2)


def rope_tables(head_dim: int, max_frames: int, height: int, width: int, theta: float):
  """cos/sin tables per axis: ((Tf, dt/2), (h, dh/2), (w, dw/2)) each as (cos, sin) float32 numpy arrays."""
  dt, dh, dw = rope_split(head_dim)
  out = []
  for dim, n in ((dt, max_frames), (dh, height), (dw, width)):
    a = _angles(dim, n, theta)
    out.append((np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)))
  return tuple(out)


def rope_for_grid(tables, frame_offset, num_frames: int, height: int, width: int):
  """(cos, sin) of shape (F*h*w, D/2) for frames [offset, offset + F) of an h x w token grid."""
  (tc, ts), (hc, hs), (wc, ws) = tables
  offset = jnp.asarray(frame_offset, jnp.int32)
  tc = jax.lax.dynamic_slice_in_dim(jnp.asarray(tc), offset, num_frames, 0)
  ts = jax.lax.dynamic_slice_in_dim(jnp.asarray(ts), offset, num_frames, 0)

  def grid(t, h, w):
    t = jnp.broadcast_to(t[:, None, None, :], (num_frames, height, width, t.shape[-1]))
    h = jnp.broadcast_to(jnp.asarray(h[:height])[None, :, None, :], (num_frames, height, width, h.shape[-1]))
    w = jnp.broadcast_to(jnp.asarray(w[:width])[None, None, :, :], (num_frames, height, width, w.shape[-1]))
    return jnp.concatenate([t, h, w], axis=-1).reshape(num_frames * height * width, -1)

  return grid(tc, hc, wc), grid(ts, hs, ws)


def temporal_shift(tables, shift, num_tokens: int):
  """(cos, sin) of shape (num_tokens, D/2) that move already-rotated tokens `shift` frames later in time (height and
  width untouched): RoPE rotations compose, R(p + s) = R(s) R(p)."""
  (tc, ts), (hc, _), (wc, _) = tables
  shift = jnp.asarray(shift, jnp.int32)
  rest = hc.shape[-1] + wc.shape[-1]
  cos = jnp.concatenate([jnp.asarray(tc)[shift], jnp.ones((rest,), jnp.float32)])
  sin = jnp.concatenate([jnp.asarray(ts)[shift], jnp.zeros((rest,), jnp.float32)])
  return jnp.broadcast_to(cos, (num_tokens, cos.shape[0])), jnp.broadcast_to(sin, (num_tokens, sin.shape[0]))


def apply_rope(x, cos, sin):
  """Rotates interleaved pairs (x[2i], x[2i+1]) of x (B, L, H, D) by the angles of cos/sin (L, D/2)."""
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = x[..., 0], x[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
  return out.reshape(*out.shape[:-2], -1).astype(dtype)
