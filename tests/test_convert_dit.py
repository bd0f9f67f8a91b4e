"""Wan DiT converters: parity with diffusers' WanTransformer3DModel on tiny random configs, exact round trips,
the original Wan / Self Forcing layout, key checking, and the `dsa-jax convert` command."""

import dataclasses
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsa_jax.convert import common  # noqa: E402
from dsa_jax.convert import dit as cd  # noqa: E402
from dsa_jax.models.dit import DiTConfig, WanDiT  # noqa: E402

# Two tiny configs: (name, diffusers kwargs, batch, frames, latent h, w, text length, scan_layers).
CONFIGS = {
    "small": (dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                   ffn_dim=32, num_layers=2), 2, 3, 4, 4, 8, True),
    # several frames, a non-square latent, 16 channels, 3 heads of 24, per-layer params
    "frames": (dict(num_attention_heads=3, attention_head_dim=24, in_channels=16, out_channels=16, text_dim=16,
                    ffn_dim=64, num_layers=2), 1, 5, 6, 10, 7, False),
    # Wan's real head size 128: RoPE splits it 44/42/42 over (frame, height, width)
    "head128": (dict(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=32,
                     ffn_dim=96, num_layers=1), 1, 3, 4, 6, 5, True),
}
TOL = 1e-4  # max abs error relative to the reference output's RMS


def _random_model(kwargs, seed):
  torch.manual_seed(seed)
  m = diffusers.WanTransformer3DModel(**kwargs).eval()
  with torch.no_grad():  # every tensor random (norm scales and biases included), so no mapping error hides
    for p in m.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return m


@pytest.fixture(scope="module")
def models():
  return {name: _random_model(spec[0], i) for i, (name, spec) in enumerate(CONFIGS.items())}


def _inputs(name, seed=0):
  kwargs, b, f, h, w, text_len, _ = CONFIGS[name]
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(b, kwargs["in_channels"], f, h, w, generator=g)
  t = torch.tensor([500.0, 137.0][:b])
  ctx = torch.randn(b, text_len, kwargs["text_dim"], generator=g)
  return x, t, ctx


def _reference(m, x, t, ctx):
  with torch.no_grad():
    return m(x, t, ctx).sample.numpy()


def _ours(params, cfg, x, t, ctx):
  f = x.shape[2]
  xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1))  # (B, C, F, H, W) -> channels-last
  tj = jnp.broadcast_to(jnp.asarray(t.numpy())[:, None], (x.shape[0], f))  # one t per sample -> per frame
  fn = jax.jit(lambda p, a, b, c: WanDiT(cfg).apply(p, a, b, c)["velocity"])
  return np.asarray(fn(params, xj, tj, jnp.asarray(ctx.numpy()))).transpose(0, 4, 1, 2, 3)


def _rel_err(out, ref):
  return float(np.abs(out - ref).max() / np.sqrt(np.mean(ref ** 2)))


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [jax.tree_util.keystr(k) for k, _ in la] == [jax.tree_util.keystr(k) for k, _ in lb]
  for (k, x), (_, y) in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(k)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))


def _diffusers_load(folder, dtype=torch.float32):
  """diffusers' own reading of an exported folder: config.json -> model, safetensors -> strict load_state_dict.

  (from_pretrained needs `accelerate` for this model class; this path checks the same config and keys.)
  """
  import json

  from safetensors.torch import load_file
  cls = diffusers.WanTransformer3DModel
  model = cls.from_config(cls.load_config(folder))
  index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
  files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else \
      ["diffusion_pytorch_model.safetensors"]
  sd = {}
  for f in files:
    sd.update(load_file(os.path.join(folder, f)))
  assert all(sd[k].dtype == dtype for k in sd)
  model.load_state_dict(sd, strict=True)  # bf16 values upcast exactly into the fp32 model
  return model.eval()


def _save_diffusers(m, folder, shard=None):
  kw = {"safe_serialization": True}
  if shard:
    kw["max_shard_size"] = shard
  m.save_pretrained(folder, **kw)
  return folder


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(models, name, tmp_path):
  kwargs, _, _, _, _, text_len, scan = CONFIGS[name]
  m = models[name]
  # the "frames" model is saved in shards, so the index reading is covered too
  folder = _save_diffusers(m, str(tmp_path / "transformer"), shard="60KB" if name == "frames" else None)
  if name == "frames":
    assert os.path.exists(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
  nets, cfg, _ = cd.load_dit(folder, text_len=text_len, scan_layers=scan)
  assert sorted(nets) == ["generator"]
  assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.in_channels, cfg.text_len, cfg.scan_layers) == (
      kwargs["num_attention_heads"] * kwargs["attention_head_dim"], kwargs["num_attention_heads"],
      kwargs["num_layers"],
      kwargs["ffn_dim"], kwargs["in_channels"], text_len, scan)
  # the converted tree has exactly the shapes WanDiT initialises
  x, t, ctx = _inputs(name)
  abstract = jax.eval_shape(lambda k: WanDiT(cfg).init(k, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)),
                                                       jnp.zeros((x.shape[0], x.shape[2])),
                                                       jnp.asarray(ctx.numpy())), jax.random.PRNGKey(0))
  import flax.linen as nn
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))}
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(nets["generator"])}
  assert got == want
  ref = _reference(m, x, t, ctx)
  out = _ours(nets["generator"], cfg, x, t, ctx)
  err = _rel_err(out, ref)
  print(f"\n[{name}] max abs err {np.abs(out - ref).max():.3e}, ref rms {np.sqrt(np.mean(ref ** 2)):.3f}, "
        f"ref max {np.abs(ref).max():.3f}, relative {err:.2e}")
  assert err <= TOL, err


# ----------------------------------------------------------------------------------------------- round trips


def test_round_trip_flax_diffusers_flax(models, tmp_path):
  m = models["small"]
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  cfg = cd.config_from_diffusers_json(dict(m.config), text_len=8)
  for scan in (True, False):
    c = dataclasses.replace(cfg, scan_layers=scan)
    params = cd.dit_params_from_state_dict(sd, c)
    out = str(tmp_path / f"export_{scan}")
    cd.export_diffusers(params, c, out)
    # diffusers itself loads the export, bit for bit
    back = _diffusers_load(out).state_dict()
    assert sorted(back) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(back[k].numpy(), sd[k], err_msg=k)
    nets, cfg2, _ = cd.load_dit(out, text_len=8, scan_layers=scan)
    assert cfg2.to_dict() == c.to_dict()
    _leaves_equal(nets["generator"], params)
  stacked = cd.dit_params_from_state_dict(sd, dataclasses.replace(cfg, scan_layers=True))
  per_layer = cd.dit_params_from_state_dict(sd, dataclasses.replace(cfg, scan_layers=False))
  _leaves_equal(cd.stack_layers(per_layer), stacked)
  _leaves_equal(cd.unstack_layers(stacked), per_layer)


def test_export_shards_and_bfloat16(models, tmp_path):
  m = models["frames"]
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  cfg = cd.config_from_diffusers_json(dict(m.config), text_len=7)
  params = cd.dit_params_from_state_dict(sd, cfg, dtype="bfloat16")
  assert str(jax.tree_util.tree_leaves(params)[0].dtype) == "bfloat16"
  files = cd.export_diffusers(params, cfg, str(tmp_path / "bf16"), max_shard_bytes=40_000)
  assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
  back = _diffusers_load(str(tmp_path / "bf16"), torch.bfloat16)
  for k, v in back.state_dict().items():
    np.testing.assert_array_equal(v.float().numpy(), sd[k].astype(common.np_dtype("bfloat16")).astype(np.float32))
  nets, _, _ = cd.load_dit(str(tmp_path / "bf16"), text_len=7, dtype="bfloat16")
  _leaves_equal(nets["generator"], params)


# ----------------------------------------------------------------------------------------------- Wan layout

# The original Wan names (wan/modules/model.py), written out independently of the converter; the test checks them
# against diffusers' own single-file conversion script below.
_WAN_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
}
_WAN_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "scale_shift_table": "modulation",
}


def _to_wan_key(k):
  if k == "scale_shift_table":
    return "head.modulation"
  if k.startswith("blocks."):
    _, i, rest = k.split(".", 2)
    for a, b in _WAN_BLOCK.items():
      if rest == a or rest.startswith(a + "."):
        return f"blocks.{i}.{b}{rest[len(a):]}"
    raise AssertionError(k)
  for a, b in _WAN_TOP.items():
    if k.startswith(a + "."):
      return b + k[len(a):]
  return k


def test_wan_names_agree_with_diffusers_script(models):
  from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
  sd = models["frames"].state_dict()
  wan = {_to_wan_key(k): v for k, v in sd.items()}
  assert len(wan) == len(sd)
  back = convert_wan_transformer_to_diffusers(dict(wan))
  assert sorted(back) == sorted(sd)
  assert all(back[k] is sd[k] or torch.equal(back[k], sd[k]) for k in sd)
  # and our table names the same keys in both layouts
  cfg = cd.config_from_diffusers_json(dict(models["frames"].config), text_len=7)
  assert set(cd.expected_shapes(cfg, "wan")) == set(wan)
  assert set(cd.expected_shapes(cfg, "diffusers")) == set(sd)


def test_self_forcing_checkpoint_loads(models, tmp_path):
  m = models["frames"]
  ema = _random_model(CONFIGS["frames"][0], 7)
  wrap = lambda model, dt: {"model." + _to_wan_key(k): v.to(dt) for k, v in model.state_dict().items()}
  path = str(tmp_path / "self_forcing_dmd.pt")
  # generator in fp32, generator_ema in bf16 (how checkpoints are often stored), plus a non-state-dict entry
  torch.save({"generator": wrap(m, torch.float32), "generator_ema": wrap(ema, torch.bfloat16), "step": 600}, path)
  nets, cfg, info = cd.load_dit(path, num_heads=3, text_len=7, scan_layers=False)
  assert sorted(nets) == ["generator", "generator_ema"]
  assert info["entries"]["generator"]["prefix"] == "model." and info["entries"]["generator"]["layout"] == "wan"
  ref_cfg = dataclasses.replace(cd.config_from_diffusers_json(dict(m.config), text_len=7), scan_layers=False)
  assert cfg.to_dict() == ref_cfg.to_dict()
  direct = cd.dit_params_from_state_dict({k: v.numpy() for k, v in m.state_dict().items()}, ref_cfg)
  _leaves_equal(nets["generator"], direct)
  # the bf16 EMA weights, upcast, drive our model to the diffusers output of the same (bf16-rounded) weights
  with torch.no_grad():
    for p in ema.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  x, t, ctx = _inputs("frames", seed=1)
  err = _rel_err(_ours(nets["generator_ema"], cfg, x, t, ctx), _reference(ema, x, t, ctx))
  print(f"\n[self forcing bf16 ema] relative {err:.2e}")
  assert err <= TOL, err
  # --key picks one entry, stored as the generator; without --num-heads the head count follows head_dim 128
  only, _, _ = cd.load_dit(path, key="generator_ema", num_heads=3, text_len=7, scan_layers=False)
  assert sorted(only) == ["generator"]
  _leaves_equal(only["generator"], nets["generator_ema"])
  with pytest.raises(common.ConversionError, match="num-heads"):
    cd.load_dit(path, text_len=7)  # dim 72 is no multiple of 128: the head count must be given
  with pytest.raises(common.ConversionError, match="no entry 'critic'"):
    cd.load_dit(path, key="critic", num_heads=3)


def test_wan_safetensors_with_original_config(models, tmp_path):
  m = models["small"]
  folder = tmp_path / "Wan2.1-T2V-tiny"
  folder.mkdir()
  common.write_safetensors(str(folder / "diffusion_pytorch_model.safetensors"),
                           {_to_wan_key(k): v.numpy() for k, v in m.state_dict().items()})
  common.write_json_atomic(str(folder / "config.json"), {
      "_class_name": "WanModel", "model_type": "t2v", "dim": 24, "ffn_dim": 32, "freq_dim": 256, "in_dim": 4,
      "out_dim": 4, "num_heads": 2,
      "num_layers": 2, "text_len": 8, "text_dim": 16, "eps": 1e-6, "patch_size": [1, 2, 2], "cross_attn_norm": True})
  nets, cfg, _ = cd.load_dit(str(folder))
  assert (cfg.num_heads, cfg.text_len) == (2, 8)
  x, t, ctx = _inputs("small")
  assert _rel_err(_ours(nets["generator"], cfg, x, t, ctx), _reference(m, x, t, ctx)) <= TOL
  # a lone weights file shares its folder: a config.json of another model there is ignored, not obeyed
  os.rename(folder / "diffusion_pytorch_model.safetensors", folder / "dit.safetensors")
  common.write_json_atomic(str(folder / "config.json"), {"_class_name": "AutoencoderKLWan", "z_dim": 16})
  notes = []
  lone, cfg2, _ = cd.load_dit(str(folder / "dit.safetensors"), num_heads=2, text_len=8, log=notes.append)
  assert cfg2.to_dict() == cfg.to_dict() and any("ignoring" in n and "config.json" in n for n in notes)
  _leaves_equal(lone["generator"], nets["generator"])


# ----------------------------------------------------------------------------------------------- errors


def test_key_errors_list_every_offender(models):
  m = models["small"]
  cfg = cd.config_from_diffusers_json(dict(m.config), text_len=8)
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  del sd["blocks.1.attn2.to_k.bias"]
  for i in range(2):
    del sd[f"blocks.{i}.ffn.net.2.weight"]
  sd["blocks.0.attn1.extra.weight"] = np.zeros(3, np.float32)
  sd["proj_out.weight"] = np.zeros((15, 24), np.float32)
  with pytest.raises(common.KeyMismatchError) as e:
    cd.dit_params_from_state_dict(sd, cfg)
  msg = str(e.value)
  for s in ("3 missing", "1 unexpected", "1 misshaped", "blocks.1.attn2.to_k.bias", "blocks.{0-1}.ffn.net.2.weight",
            "blocks.0.attn1.extra.weight", "proj_out.weight: (15, 24), expected (16, 24)"):
    assert s in msg, (s, msg)
  # an image-to-video checkpoint says so
  sd2 = {k: v.numpy() for k, v in m.state_dict().items()}
  sd2["blocks.0.attn2.add_k_proj.weight"] = np.zeros((24, 24), np.float32)
  with pytest.raises(common.KeyMismatchError, match="image-to-video"):
    cd.dit_params_from_state_dict(sd2, cfg)
  # a VAE is recognised as one
  with pytest.raises(common.ConversionError, match="convert vae"):
    cd.detect_layout({"encoder.conv_in.weight": np.zeros(1), "decoder.conv_in.weight": np.zeros(1)})
  # our params with a wrong shape refuse to export
  params = cd.dit_params_from_state_dict({k: v.numpy() for k, v in m.state_dict().items()}, cfg)
  params["params"]["head"]["bias"] = np.zeros(5, np.float32)
  with pytest.raises(common.KeyMismatchError, match="head/bias"):
    cd.dit_state_dict(params, cfg)


def test_config_mismatch_is_reported(models, tmp_path):
  m = models["small"]
  folder = _save_diffusers(m, str(tmp_path / "t"))
  user = DiTConfig(dim=24, ffn_dim=64, num_layers=3, num_heads=2, text_dim=16, text_len=8, in_channels=4,
                   out_channels=4)
  with pytest.raises(common.ConversionError) as e:
    cd.load_dit(folder, config=user)
  assert "ffn_dim: weights 32 vs config 64" in str(e.value) and "num_layers: weights 2 vs config 3" in str(e.value)
  ok = dataclasses.replace(user, ffn_dim=32, num_layers=2, scan_layers=False)
  nets, cfg, _ = cd.load_dit(folder, config=ok)
  assert cfg.scan_layers is False and "blocks_1" in nets["generator"]["params"]


# ----------------------------------------------------------------------------------------------- CLI + checkpoints


def test_cli_convert_export_and_check_arch(models, tmp_path, capsys, repo_root):
  from dsa_jax import cli
  from dsa_jax.checkpoint.params_io import CheckpointError, check_arch, load_params
  from dsa_jax.config_lib import get_config
  m = models["small"]
  folder = _save_diffusers(m, str(tmp_path / "pipe" / "transformer"))
  (tmp_path / "pipe" / "model_index.json").write_text("{}")  # a diffusers pipeline folder: transformer/ is found
  out = str(tmp_path / "ckpt")
  tiny = os.path.join(repo_root, "configs", "tiny.py")
  # the tiny config is another architecture: refused, with the fields named, exit code 2
  assert cli.main(["convert", "dit", "--src", str(tmp_path / "pipe"), "--out", out, "--config", tiny]) == 2
  err = capsys.readouterr().err
  assert "dim: weights 24 vs config 192" in err and not os.path.exists(out)
  over = ["--config.model.dim=24", "--config.model.num_heads=2", "--config.model.ffn_dim=32",
          "--config.model.freq_dim=256"] + [f"--config.{r}.{k}" for r in ("model", "teacher", "critic")
                                            for k in ("text_dim=16", "text_len=8")]
  assert cli.main(["convert", "dit", "--src", str(tmp_path / "pipe"), "--out", out, "--config", tiny] + over) == 0
  log = capsys.readouterr().out
  assert "converted layer 2/2" in log and "generator:" in log
  params, meta = load_params(out)
  assert sorted(params) == ["generator"]
  cfg = DiTConfig.from_config(get_config(tiny, over).model)
  check_arch(meta, "generator", cfg.to_dict(), out)  # matches the config it was converted for
  direct = cd.dit_params_from_state_dict({k: v.numpy() for k, v in m.state_dict().items()}, cfg)
  _leaves_equal(params["generator"], direct)
  # a checkpoint of another architecture fails check_arch clearly
  with pytest.raises(CheckpointError, match="dim: checkpoint 24 vs config 192"):
    check_arch(meta, "generator", DiTConfig.from_config(get_config(tiny).model).to_dict(), out)
  # and back to diffusers
  exp = str(tmp_path / "exported")
  assert cli.main(["convert", "export-diffusers", "--src", out, "--network", "generator", "--out", exp]) == 0
  back = _diffusers_load(exp).state_dict()
  for k, v in m.state_dict().items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  assert cli.main(["convert", "export-diffusers", "--src", out, "--network", "generator_ema", "--out", exp]) == 2
  assert "generator_ema" in capsys.readouterr().err
  # --out: an earlier export is replaced whole; the source checkpoint, a file or a folder of other files never
  (tmp_path / "exported" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"stale shard")
  assert cli.main(["convert", "export-diffusers", "--src", out, "--out", exp]) == 0
  assert sorted(os.listdir(exp)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  before = sorted(os.listdir(out))
  for bad, why in ((out, "is --src itself"), (str(tmp_path / "a_file"), "is a file"),
                   (str(tmp_path / "other"), "not an earlier diffusers export")):
    assert cli.main(["convert", "export-diffusers", "--src", out, "--out", bad]) == 2
    err = capsys.readouterr().err
    assert f"--out {bad!r}" in err and why in err, err
  assert sorted(os.listdir(out)) == before and os.listdir(tmp_path / "other") == ["notes.txt"]
  # a missing source is one clear line
  assert cli.main(["convert", "dit", "--src", str(tmp_path / "nope"), "--out", out]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_cli_convert_vae_and_umt5_from_pipeline_folder(tmp_path, capsys):
  """The vae / umt5 subcommands find their subfolders in a diffusers pipeline folder and write loadable checkpoints."""
  transformers = pytest.importorskip("transformers")
  spm = pytest.importorskip("sentencepiece")
  from dsa_jax import cli
  from dsa_jax.checkpoint.params_io import load_params
  from dsa_jax.models.umt5 import UMT5Config
  from dsa_jax.models.vae import WanVAEConfig
  pipe = tmp_path / "Wan2.1-T2V-tiny-Diffusers"
  pipe.mkdir()
  (pipe / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
  torch.manual_seed(0)
  diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                             latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(
                                 str(pipe / "vae"), safe_serialization=True)
  hf = transformers.UMT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                               dropout_rate=0.0, is_encoder_decoder=False, feed_forward_proj="gated-gelu")
  transformers.UMT5EncoderModel(hf).save_pretrained(str(pipe / "text_encoder"))
  (pipe / "tokenizer").mkdir()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red ball rolls", "two digits move"] * 30),
                                 model_prefix=str(pipe / "tokenizer" / "spiece"), vocab_size=20, pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  assert cli.main(["convert", "vae", "--src", str(pipe), "--out", str(tmp_path / "vae_ckpt")]) == 0
  params, meta = load_params(str(tmp_path / "vae_ckpt"))
  assert sorted(params) == ["vae"] and WanVAEConfig.from_dict(meta["arch"]["vae"]).z_dim == 4
  assert cli.main(["convert", "umt5", "--src", str(pipe), "--out", str(tmp_path / "t5")]) == 0
  params, meta = load_params(str(tmp_path / "t5"))
  assert sorted(params) == ["text_encoder"] and UMT5Config(**meta["arch"]["text_encoder"]).d_model == 16
  assert os.path.isfile(tmp_path / "t5" / "spiece.model") and meta["tokenizer"] == "spiece.model"
  assert "spiece.model" in capsys.readouterr().out
  # --tokenizer must be a SentencePiece model, checked before converting: a tokenizer.json is refused, nothing written
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Unigram"}}')
  t5b = str(tmp_path / "t5b")
  assert cli.main(["convert", "umt5", "--src", str(pipe), "--out", t5b, "--tokenizer",
                   str(tmp_path / "tokenizer.json")]) == 2
  err = capsys.readouterr().err
  assert "--tokenizer" in err and "is not a SentencePiece model" in err and not os.path.exists(t5b)
  # the tokenizer is written within the checkpoint's own atomic write: a failed copy leaves no checkpoint
  import shutil

  def fail(*a, **k):
    raise OSError("disk full")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(shutil, "copyfile", fail)
    with pytest.raises(OSError, match="disk full"):
      cli.main(["convert", "umt5", "--src", str(pipe), "--out", t5b])
  assert not os.path.exists(t5b)
