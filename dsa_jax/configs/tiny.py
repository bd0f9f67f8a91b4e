"""A few-million-parameter model that runs on a CPU in seconds: tests, smoke runs, CI.

  dsa-jax info --config configs/tiny.py
  dsa-jax sample --config configs/tiny.py --out out/tiny --prompt "a red ball"
  dsa-jax train --config configs/tiny.py --workdir /tmp/tiny --config.train.steps=10
"""

from dsa_jax.config_defaults import base_config, wan_model


def get_config(arg=None):
  del arg
  config = base_config()
  config.name = "tiny"
  config.model = wan_model(192, 512, 2, 4, text_dim=32, text_len=8, channels=4, freq_dim=32)
  config.teacher = wan_model(192, 512, 2, 4, text_dim=32, text_len=8, channels=4, freq_dim=32)
  config.critic = wan_model(192, 512, 2, 4, text_dim=32, text_len=8, channels=4, freq_dim=32)
  # 6 latent frames of 8x12 latents (64x96 pixels through an 8x VAE) -> 24 tokens per frame, chunks of 2 frames.
  config.video.update(height=64, width=96, num_frames=6, chunk_frames=2, latent_channels=4)
  config.conf.update(hidden=32, embed_dim=16)
  config.compute.update(dtype="float32", remat="none")
  config.sampling.update(threshold=0.5)
  config.train.update(steps=20, batch_size=2, lr=1e-4, critic_lr=1e-4, conf_lr=1e-3, ema_start=0, log_every=1,
                      ckpt_every=10, ode_steps=8, async_ckpt=False)
  config.dmd.update(critic_ratio=2)
  return config
