"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan (tiny random configs, fp32), chunked causal decoding,
checkpoint conversion/loading errors."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dsa_jax.convert.common import KeyMismatchError  # noqa: E402
from dsa_jax.convert.vae import load_diffusers_vae, vae_params_from_diffusers  # noqa: E402
from dsa_jax.models import vae as V  # noqa: E402

# A: Wan2.1 layout (4 levels, temporal (F, T, T)) at base_dim 8, z 4, 1 res block.
CFG_A = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
             latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.0])
# B: other temporal placement (down at full res), 3 levels, 2 res blocks, z 16 with the Wan2.1 mean/std.
CFG_B = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=2, temperal_downsample=[True, True])


def _torch_vae(kw, seed):
  torch.manual_seed(seed)
  m = diffusers.AutoencoderKLWan(**kw).eval()
  with torch.no_grad():  # non-trivial norm gammas and biases, so a wrong mapping shows up
    for n, p in m.named_parameters():
      if n.endswith("gamma"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif n.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
  return m


def _setup(kw, seed):
  m = _torch_vae(kw, seed)
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  with warnings.catch_warnings():  # diffusers keeps scale_factor_spatial=8 for the 3-level config B
    warnings.simplefilter("ignore", UserWarning)
    params = vae_params_from_diffusers(sd, dict(m.config))
    cfg = V.WanVAEConfig.from_diffusers_config(dict(m.config))
  return m, sd, params, cfg


@pytest.fixture(scope="module")
def model_a():
  return _setup(CFG_A, 0)


@pytest.fixture(scope="module")
def model_b():
  return _setup(CFG_B, 1)


def _norm_stats(cfg):
  mean = np.asarray(cfg.latents_mean, np.float32)
  std = np.asarray(cfg.latents_std, np.float32)
  return mean, std


def _check_parity(m, params, cfg, video_shape, latent_shape, seed, results, chunked_encode=True):
  g = torch.Generator().manual_seed(seed)
  x = torch.rand(*video_shape, generator=g) * 2 - 1                 # (B, C, T, H, W)
  z_raw = torch.randn(*latent_shape, generator=g)                   # (B, z, F, h, w)
  with torch.no_grad():
    mu_t = m.encode(x).latent_dist.mean.numpy()
    y_t = m.decode(z_raw).sample.numpy()
  mean, std = _norm_stats(cfg)
  ref_z = (mu_t.transpose(0, 2, 3, 4, 1) - mean) / std
  x_j = jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1))
  z_j = np.asarray(V.encode(params, x_j, cfg))
  assert z_j.shape == ref_z.shape
  enc_err = np.abs(z_j - ref_z).max() / np.abs(ref_z).max()
  enc_chunk_err = 0.0
  if chunked_encode:  # first frame, then lax.scan over 4-frame groups with the causal cache
    enc_chunk_err = np.abs(np.asarray(V.encode(params, x_j, cfg, chunked=True)) - z_j).max()

  z_norm = (z_raw.numpy().transpose(0, 2, 3, 4, 1) - mean) / std
  y_j = np.asarray(V.decode(params, jnp.asarray(z_norm), cfg))
  ref_y = y_t.transpose(0, 2, 3, 4, 1)
  assert y_j.shape == ref_y.shape
  assert 0.05 < ref_y.std() and (np.abs(ref_y) >= 1).mean() < 0.05  # output not saturated by the clamp
  dec_err = np.abs(y_j - ref_y).max() / np.abs(ref_y).max()
  results.update(enc=enc_err, enc_chunked=enc_chunk_err, dec=dec_err)
  print(f"parity {video_shape}: encode rel err {enc_err:.2e} (chunked vs full {enc_chunk_err:.2e}), "
        f"decode rel err {dec_err:.2e}")
  assert enc_err <= 1e-3
  assert enc_chunk_err <= 1e-5
  assert dec_err <= 1e-3
  return z_norm, y_j


def test_parity_config_a_several_frames_non_square(model_a):
  m, _, params, cfg = model_a
  # 9 pixel frames -> 3 latent frames, 16x24 -> 2x3
  _check_parity(m, params, cfg, (2, 3, 9, 16, 24), (2, 4, 3, 2, 3), seed=0, results={})


def test_parity_config_b(model_b):
  m, _, params, cfg = model_b
  assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 4)
  _check_parity(m, params, cfg, (1, 3, 5, 12, 8), (1, 16, 2, 3, 2), seed=1, results={}, chunked_encode=False)


def test_chunked_decode_equals_full(model_a):
  _, _, params, cfg = model_a
  vae = V.WanVAE(cfg)
  z = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 2, 3, cfg.z_dim))
  full = np.asarray(vae.decode(params, z))
  assert full.shape == (1, 17, 16, 24, 3)
  step = jax.jit(vae.decode_chunk, static_argnames="first")

  # One latent frame at a time (first frame -> 1 pixel frame, later -> 4), jitted with a fixed chunk size.
  cache = vae.init_decode_cache(1, 2, 3)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, cache)
  outs = []
  for f in range(z.shape[1]):
    y, cache = step(params, z[:, f:f + 1], cache, first=(f == 0))
    assert y.shape[1] == (1 if f == 0 else 4)
    assert jax.tree_util.tree_map(lambda a: a.shape, cache) == shapes  # static-shape cache
    outs.append(np.asarray(y))
  err1 = np.abs(np.concatenate(outs, 1) - full).max()

  # decode(chunk_size=2): a 2-frame first chunk (1 + 4 pixel frames), one lax.scan step, a 1-frame remainder.
  err2 = np.abs(np.asarray(vae.decode(params, z, chunk_size=2)) - full).max()
  print(f"chunked vs full decode: 1 frame at a time {err1:.2e}, chunk_size=2 (scan) {err2:.2e}")
  assert max(err1, err2) <= 1e-5

  with pytest.raises(V.VAEInputError, match="cache"):
    vae.decode_chunk(params, z[:, :1], None, first=False)


def test_bf16_compute_close_to_fp32(model_b):
  _, _, params, cfg = model_b
  z = jax.random.normal(jax.random.PRNGKey(4), (1, 2, 3, 2, cfg.z_dim))
  y32 = np.asarray(V.decode(params, z, cfg))
  y16 = V.decode(params, z, cfg, dtype=jnp.bfloat16)
  cache = V.init_decode_cache(cfg, 1, 3, 2, dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(cache))
  err = np.abs(np.asarray(y16) - y32).max()
  print(f"bf16 vs fp32 decode max abs err {err:.3e}")
  assert y16.dtype == jnp.float32 and err < 0.1
  assert jax.tree_util.tree_leaves(params)[0].dtype == np.float32


def test_conversion_key_errors(model_a):
  _, sd, _, cfg = model_a
  bad = dict(sd)
  del bad["decoder.conv_in.bias"]
  bad["decoder.extra_layer.weight"] = np.zeros(3, np.float32)
  bad["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3, 2), np.float32)
  with pytest.raises(KeyMismatchError) as ei:
    vae_params_from_diffusers(bad, cfg)
  msg = str(ei.value)
  assert "(1 missing, 1 unexpected, 1 misshaped keys)" in msg
  assert "missing:\n    decoder/conv_in/bias\n" in msg
  assert "unexpected:\n    decoder.extra_layer.weight\n" in msg
  assert "misshaped:\n    encoder/conv_in/kernel: (3, 3, 2, 3, 8), expected (3, 3, 3, 3, 8)" in msg
  # a checkpoint for another config is rejected as a whole, never loaded partially
  with pytest.raises(KeyMismatchError, match="misshaped"):
    vae_params_from_diffusers(sd, V.WanVAEConfig(**{**CFG_A, "base_dim": 16}))
  # converted tree has exactly the model's structure
  ref = jax.eval_shape(lambda: V.init_params(cfg, jax.random.PRNGKey(0)))
  conv = vae_params_from_diffusers(sd, cfg)
  assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(conv)


def test_load_diffusers_folder_sharded_and_single_file(model_a, tmp_path):
  from safetensors.numpy import save_file

  m, sd, params, cfg = model_a
  m.save_pretrained(tmp_path / "vae")
  p1, c1 = load_diffusers_vae(tmp_path / "vae")
  assert c1 == cfg
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)

  # sharded folder with an index json
  shard = tmp_path / "sharded"
  shard.mkdir()
  keys = sorted(sd)
  halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
  for fname, ks in halves.items():
    save_file({k: np.ascontiguousarray(sd[k]) for k in ks}, str(shard / fname))
  (shard / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
  (shard / "config.json").write_text(json.dumps(dict(m.config)))
  p2, _ = load_diffusers_vae(shard)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p2),
                                                    jax.tree_util.tree_leaves(params)))

  # single file (no config.json beside it) + explicit config; a lone shard fails loudly
  single = tmp_path / "single"
  single.mkdir()
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(single / "wan_vae.safetensors"))
  p3, c3 = load_diffusers_vae(single / "wan_vae.safetensors", config=dict(m.config))
  assert c3 == cfg and all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p3),
                                                                  jax.tree_util.tree_leaves(params)))
  with pytest.raises(KeyMismatchError, match="missing"):
    load_diffusers_vae(shard / "a.safetensors", config=cfg)
  with pytest.raises(FileNotFoundError, match="nope"):
    load_diffusers_vae(tmp_path / "nope")

  # config round trip through JSON (checkpoint metadata stores it so)
  assert V.WanVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ValueError, match="unknown keys"):
    V.WanVAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_and_input_validation():
  cfg = V.WanVAEConfig()
  assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.temperal_downsample) == (96, 16, (1, 2, 4, 4),
                                                                                (False, True, True))
  assert cfg.latents_mean[0] == -0.7571 and cfg.latents_std[-1] == 1.9160
  assert (cfg.temporal_factor, cfg.spatial_factor, cfg.num_latent_frames(81)) == (4, 8, 21)
  hub_like = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0", "attn_scales": [],
              "base_dim": 96, "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "latents_mean": list(cfg.latents_mean),
              "latents_std": list(cfg.latents_std), "num_res_blocks": 2,
              "temperal_downsample": [False, True, True], "z_dim": 16}
  assert V.WanVAEConfig.from_diffusers_config(hub_like) == cfg
  with pytest.raises(V.VAEConfigError, match="is_residual"):
    V.WanVAEConfig.from_diffusers_config({"is_residual": True})
  with pytest.raises(V.VAEConfigError, match="latents_mean"):
    V.WanVAEConfig(z_dim=4)
  small = V.WanVAEConfig(**CFG_A)
  with pytest.raises(V.VAEInputError, match="1 \\+ 4k"):
    V.encode({}, jnp.zeros((1, 6, 16, 16, 3)), small)
  with pytest.raises(V.VAEInputError, match="multiples of 8"):
    V.encode({}, jnp.zeros((1, 5, 12, 16, 3)), small)
  with pytest.raises(V.VAEInputError, match="channels-last"):
    V.decode({}, jnp.zeros((1, 2, 2, 2, 3)), small)
