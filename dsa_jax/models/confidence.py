"""The DSA confidence head (our reading of the method).

Per frame it reads the generator's final hidden states (mean-pooled over the frame's tokens), the step index k and
the step's timestep t_k, and predicts one logit: the confidence that the current x0 prediction is already reliable.
LayerNorm -> MLP -> 1 logit; well under 1% of the generator's parameters.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsa_jax.models.dit import sinusoidal_embedding


@dataclasses.dataclass(frozen=True)
class ConfidenceConfig:
  hidden: int = 256
  embed_dim: int = 64
  max_steps: int = 8
  detach_trunk: bool = True

  @classmethod
  def from_config(cls, config) -> "ConfidenceConfig":
    return cls(hidden=config.conf.hidden, embed_dim=config.conf.embed_dim,
               max_steps=max(8, len(config.sampling.ladder)), detach_trunk=config.conf.detach_trunk)


class ConfidenceHead(nn.Module):
  cfg: ConfidenceConfig

  @nn.compact
  def __call__(self, features, step, t):
    """features (B, F, T, D); step (B, F) int (0-based step index); t (B, F) timestep -> logits (B, F) float32."""
    c = self.cfg
    pooled = jnp.mean(features.astype(jnp.float32), axis=2)
    if c.detach_trunk:
      pooled = jax.lax.stop_gradient(pooled)
    d = pooled.shape[-1]
    mean = jnp.mean(pooled, -1, keepdims=True)
    var = jnp.var(pooled, -1, keepdims=True)
    h = (pooled - mean) * jax.lax.rsqrt(var + 1e-6)
    h = h * self.param("ln_scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,))
    h = h + self.param("ln_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,))
    step_table = self.param("step_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                           ("conf_steps", None)),
                            (c.max_steps, c.embed_dim))
    s = step_table[jnp.clip(step, 0, c.max_steps - 1)]
    te = sinusoidal_embedding(t, c.embed_dim)
    z = jnp.concatenate([h, s, te], axis=-1)
    dense = lambda n, names, name: nn.Dense(
        n, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]), name=name)
    z = nn.silu(dense(c.hidden, (None, "conf_hidden"), "mlp_in")(z))
    z = nn.silu(dense(c.hidden, ("conf_hidden", "conf_hidden"), "mlp_mid")(z))
    return dense(1, ("conf_hidden", None), "mlp_out")(z)[..., 0]
