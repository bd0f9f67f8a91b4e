"""Building the networks of a config: generator, confidence head, teacher, critic; abstract shapes; FLOP counts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsa_jax.config_lib import latent_hw, tokens_per_frame
from dsa_jax.models.confidence import ConfidenceConfig, ConfidenceHead
from dsa_jax.models.dit import DiTConfig, WanDiT


def dit_config(config, role: str = "model") -> DiTConfig:
  """DiTConfig of `config.model` (generator), `config.teacher` or `config.critic`."""
  return DiTConfig.from_config(config[role], config.compute)


def dit_example_inputs(config, dcfg: DiTConfig, batch: int = 1, frames: int | None = None):
  """Shape-only inputs (x, t, context) for init / eval_shape: one chunk by default."""
  frames = frames or config.video.chunk_frames
  lh, lw = latent_hw(config)
  x = jax.ShapeDtypeStruct((batch, frames, lh, lw, dcfg.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch, frames), jnp.float32)
  ctx = jax.ShapeDtypeStruct((batch, dcfg.text_len, dcfg.text_dim), jnp.float32)
  return x, t, ctx


def init_dit(dcfg: DiTConfig, config, key):
  """Boxed (logically partitioned) params of a DiT; init on one chunk so the cost does not grow with the video."""
  x, t, ctx = dit_example_inputs(config, dcfg)
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  return WanDiT(dcfg).init(key, zeros(x), zeros(t), zeros(ctx))


def init_head(config, key):
  hcfg = ConfidenceConfig.from_config(config)
  f = config.video.chunk_frames
  feats = jnp.zeros((1, f, 1, config.model.dim), jnp.float32)
  return ConfidenceHead(hcfg).init(key, feats, jnp.zeros((1, f), jnp.int32), jnp.zeros((1, f), jnp.float32))


def abstract_dit_params(dcfg: DiTConfig, config):
  """Boxed ShapeDtypeStruct tree: parameter counts and shardings without allocating (1.3B / 14B on a laptop)."""
  return jax.eval_shape(lambda k: init_dit(dcfg, config, k), jax.random.PRNGKey(0))


def abstract_head_params(config):
  return jax.eval_shape(lambda k: init_head(config, k), jax.random.PRNGKey(0))


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(tree))))


def dit_forward_flops(dcfg: DiTConfig, query_tokens: int, key_tokens: int, frames: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one forward over `query_tokens` attending to `key_tokens`.

  Counts projections, attention scores and values, cross-attention (text keys/values computed once per forward),
  FFN, patch embedding, time projection and the output head. Elementwise work is excluded (it is not FLOP-bound).
  """
  d, ff, L, tl = dcfg.dim, dcfg.ffn_dim, dcfg.num_layers, dcfg.text_len
  q = query_tokens
  patch = dcfg.patch_size[0] * dcfg.patch_size[1] * dcfg.patch_size[2]
  per_layer = (
      2 * q * d * d * 4            # self-attention q, k, v, o
      + 2 * 2 * q * key_tokens * d  # scores + weighted values
      + 2 * q * d * d * 2          # cross-attention q, o
      + 2 * tl * d * d * 2         # cross-attention k, v over the text
      + 2 * 2 * q * tl * d         # cross-attention scores + values
      + 2 * q * d * ff * 2         # FFN
  )
  other = (2 * q * patch * dcfg.in_channels * d + 2 * q * d * patch * dcfg.out_channels
           + 2 * tl * (dcfg.text_dim * d + d * d) + 2 * frames * (dcfg.freq_dim * d + d * d + d * 6 * d))
  return float(L * per_layer + other)


def chunk_flops(config, dcfg: DiTConfig) -> dict:
  """FLOPs of one chunk forward: first chunk, last chunk (longest context) and the mean over a video's chunks."""
  tpf = tokens_per_frame(config)
  cf, nf = config.video.chunk_frames, config.video.num_frames
  n = nf // cf
  per = [dit_forward_flops(dcfg, cf * tpf, (i + 1) * cf * tpf, cf) for i in range(n)]
  return {"first_chunk": per[0], "last_chunk": per[-1], "mean_chunk": sum(per) / n}
