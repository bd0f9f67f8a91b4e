"""umT5 encoder: parity with transformers' UMT5EncoderModel, checkpoint conversion, tokenizer, embedding files."""

import json
import os
import pickle
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dsa_jax.convert.common import KeyMismatchError
from dsa_jax.convert.umt5 import load_transformers_umt5, umt5_params_from_transformers
from dsa_jax.data.text_embeddings import (
    TextEmbeddingFileError,
    TextEmbeddingSource,
    encode_prompts_to_arrayrecord,
    read_text_embeddings,
    write_text_embeddings,
)
from dsa_jax.models.umt5 import (
    TokenizerNotFoundError,
    UMT5Config,
    UMT5Tokenizer,
    encode,
    init_params,
    pad_to,
    param_logical_axes,
    relative_position_buckets,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Two tiny configs: gated GELU(tanh) with umT5's bucket settings; plain ReLU FFN with a short max_distance so that
# sequences go past it (clamped buckets).
HF_CONFIGS = {
    "gated_gelu": dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", seq_len=24),
    "relu_short_dist": dict(vocab_size=128, d_model=48, d_kv=12, d_ff=96, num_layers=3, num_heads=4,
                            relative_attention_num_buckets=16, relative_attention_max_distance=20,
                            feed_forward_proj="relu", seq_len=40),
}

SENTENCES = [
    "A cat sits on the mat.",
    "The quick brown fox jumps over the lazy dog.",
    "A video of waves crashing on a rocky beach at sunset.",
    "Ein Hund läuft im Park.",
    "Astronaut riding a horse on the moon, cinematic lighting.",
]


def _hf_model(cfg: dict, seed: int = 0):
  kw = {k: v for k, v in cfg.items() if k != "seq_len"}
  hf_cfg = transformers.UMT5Config(dropout_rate=0.0, is_encoder_decoder=False, **kw)
  torch.manual_seed(seed)
  model = transformers.UMT5EncoderModel(hf_cfg).eval()
  # Random norm scales and O(1) position biases, so that a wrong mapping of either shows up in the output.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  return model


def _batch(cfg: dict, seed: int = 0):
  rng = np.random.default_rng(seed)
  length = cfg["seq_len"]
  lengths = [length, length - 7, 5]
  ids = np.zeros((3, length), np.int64)
  mask = np.zeros((3, length), np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(2, cfg["vocab_size"], n)
    ids[i, n - 1] = 1
    mask[i, :n] = 1
  return ids, mask


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _rel_err(ours, ref, mask):
  m = mask.astype(bool)
  return float(np.max(np.abs(ours[m] - ref[m])) / np.max(np.abs(ref[m])))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parity_with_transformers(name):
  cfg = HF_CONFIGS[name]
  model = _hf_model(cfg)
  ids, mask = _batch(cfg)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  config = UMT5Config.from_hf_config(model.config.to_dict())
  assert config.is_gated == (cfg["feed_forward_proj"] == "gated-gelu")
  params = umt5_params_from_transformers(_state_dict(model), config)
  ours = np.asarray(jax.jit(lambda p, i, m: encode(p, i, m, config))(params, ids, mask))
  assert ours.shape == ref.shape
  err = _rel_err(ours, ref, mask)
  print(f"\n[umt5 parity {name}] max abs err / output scale = {err:.3e}")
  assert err <= 1e-4
  assert np.all(ours[mask == 0] == 0.0)
  # Converted parameters have exactly the tree and shapes of freshly initialised ones (so sharding specs apply).
  fresh = init_params(config, jax.random.key(0))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
  assert jax.tree_util.tree_map(np.shape, fresh) == jax.tree_util.tree_map(np.shape, params)
  # bfloat16 compute (the accelerator setting) stays close; norms, softmax and residuals are float32.
  config_bf16 = UMT5Config.from_hf_config(model.config.to_dict(), dtype=jnp.bfloat16)
  err_bf16 = _rel_err(np.asarray(encode(params, ids, mask, config_bf16)), ref, mask)
  print(f"[umt5 parity {name}] bfloat16 compute: max abs err / output scale = {err_bf16:.3e}")
  assert err_bf16 <= 5e-2
  # Position bias matters in every layer (not only layer 0, as in T5): zeroing layer 1's table changes the output.
  p2 = jax.tree_util.tree_map(lambda x: x, params)
  p2["block_1"]["attn"]["relative_attention_bias"] = np.zeros_like(p2["block_1"]["attn"]["relative_attention_bias"])
  assert _rel_err(np.asarray(encode(p2, ids, mask, config)), ref, mask) > 1e-3


def test_relative_position_buckets_match_transformers():
  from transformers.models.umt5.modeling_umt5 import UMT5Attention
  for buckets, max_dist in [(32, 128), (16, 20), (8, 7)]:
    hf_cfg = transformers.UMT5Config(relative_attention_num_buckets=buckets,
                                     relative_attention_max_distance=max_dist, is_decoder=False)
    attn = UMT5Attention(hf_cfg, has_relative_attention_bias=True)
    q, k = 600, 600
    rel = torch.arange(k)[None, :] - torch.arange(q)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    ours = relative_position_buckets(q, k, buckets, max_dist)
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() >= 0 and ours.max() < buckets


def test_padding_invariance_and_pad_to():
  config = UMT5Config.from_hf_config(HF_CONFIGS["gated_gelu"])
  params = init_params(config, jax.random.key(1))
  ids, mask = _batch(HF_CONFIGS["gated_gelu"], seed=3)
  f = jax.jit(lambda p, i, m: encode(p, i, m, config))
  short = np.asarray(f(params, ids, mask))
  long_ids = np.pad(ids, ((0, 0), (0, 40)))
  long_mask = np.pad(mask, ((0, 0), (0, 40)))
  long = np.asarray(f(params, long_ids, long_mask))
  np.testing.assert_allclose(long[:, : ids.shape[1]], short, atol=1e-5, rtol=0)
  assert np.all(long[:, ids.shape[1]:] == 0)
  padded = np.asarray(pad_to(jnp.asarray(long), jnp.asarray(long_mask), 512))
  assert padded.shape == (3, 512, config.d_model)
  lengths = mask.sum(-1)
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(padded[b, :n], long[b, :n])
    assert np.all(padded[b, n:] == 0)
  cut = np.asarray(pad_to(jnp.asarray(short), jnp.asarray(mask), 10))
  np.testing.assert_array_equal(cut[2, 5:], 0)
  np.testing.assert_array_equal(cut[0], short[0, :10])
  # Logical axis names are on every parameter.
  axes = param_logical_axes(config)
  assert tuple(axes["token_embedding"]) == ("vocab", "embed")
  assert tuple(axes["block_0"]["attn"]["q"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(axes["block_0"]["ffn"]["wi_0"]["kernel"]) == ("embed", "mlp")
  assert tuple(axes["block_0"]["ffn"]["wo"]["kernel"]) == ("mlp", "embed")


def test_load_folder_sharded_and_wan_pth(tmp_path):
  cfg = HF_CONFIGS["gated_gelu"]
  model = _hf_model(cfg, seed=5)
  ids, mask = _batch(cfg, seed=5)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  # Sharded safetensors folder with config.json.
  model.save_pretrained(tmp_path / "hf", max_shard_size="30KB", safe_serialization=True)
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
  params, config = load_transformers_umt5(str(tmp_path / "hf"))
  assert config.d_model == 32 and config.num_layers == 2
  assert _rel_err(np.asarray(encode(params, ids, mask, config)), ref, mask) <= 1e-4
  # bfloat16 safetensors file, read without torch.
  (tmp_path / "bf16").mkdir()
  import safetensors.torch
  sd_bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
  safetensors.torch.save_file(sd_bf16, str(tmp_path / "bf16" / "model.safetensors"))
  params_bf16, config_bf16 = load_transformers_umt5(str(tmp_path / "bf16" / "model.safetensors"))
  assert params_bf16["token_embedding"].dtype == jnp.bfloat16
  assert config_bf16.vocab_size == 128 and config_bf16.relative_attention_num_buckets == 32
  np.testing.assert_array_equal(params_bf16["token_embedding"].astype(np.float32),
                                sd_bf16["shared.weight"].float().numpy())
  # Wan2.1's own layout (.pth), config inferred from shapes.
  wan = {"token_embedding.weight": model.state_dict()["shared.weight"],
         "norm.weight": model.state_dict()["encoder.final_layer_norm.weight"]}
  for i in range(cfg["num_layers"]):
    p = f"encoder.block.{i}.layer."
    sd = model.state_dict()
    for n in "qkvo":
      wan[f"blocks.{i}.attn.{n}.weight"] = sd[f"{p}0.SelfAttention.{n}.weight"]
    wan[f"blocks.{i}.pos_embedding.embedding.weight"] = sd[f"{p}0.SelfAttention.relative_attention_bias.weight"]
    wan[f"blocks.{i}.norm1.weight"] = sd[f"{p}0.layer_norm.weight"]
    wan[f"blocks.{i}.norm2.weight"] = sd[f"{p}1.layer_norm.weight"]
    wan[f"blocks.{i}.ffn.gate.0.weight"] = sd[f"{p}1.DenseReluDense.wi_0.weight"]
    wan[f"blocks.{i}.ffn.fc1.weight"] = sd[f"{p}1.DenseReluDense.wi_1.weight"]
    wan[f"blocks.{i}.ffn.fc2.weight"] = sd[f"{p}1.DenseReluDense.wo.weight"]
  torch.save(wan, tmp_path / "wan_t5.pth")
  params_w, config_w = load_transformers_umt5(str(tmp_path / "wan_t5.pth"))
  assert config_w.feed_forward_proj == "gated-gelu" and config_w.d_kv == 8
  assert _rel_err(np.asarray(encode(params_w, ids, mask, config_w)), ref, mask) <= 1e-4
  with pytest.raises(FileNotFoundError, match="nope"):
    load_transformers_umt5(str(tmp_path / "nope"))


def test_config_json_of_another_model(tmp_path):
  """Wan's originals keep the DiT's config.json beside the umT5 .pth: a lone weights file ignores a neighbouring
  config of another kind (the shapes give the config); a folder's own config of another kind is an error naming it."""
  from dsa_jax.convert.common import ConversionError
  cfg = HF_CONFIGS["gated_gelu"]
  model = _hf_model(cfg, seed=3)
  wan = tmp_path / "Wan2.1-T2V-tiny"
  wan.mkdir()
  dit_config = {"_class_name": "WanModel", "model_type": "t2v", "dim": 24, "num_heads": 2, "num_layers": 2,
                "ffn_dim": 32}
  (wan / "config.json").write_text(json.dumps(dit_config))
  torch.save(model.state_dict(), wan / "umt5.pth")
  notes = []
  params, config = load_transformers_umt5(str(wan / "umt5.pth"), log=notes.append)
  assert (config.d_model, config.num_layers, config.num_heads) == (32, 2, 4)
  assert any("ignoring" in n and str(wan / "config.json") in n for n in notes), notes
  ids, mask = _batch(cfg, seed=3)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  assert _rel_err(np.asarray(encode(params, ids, mask, config)), ref, mask) <= 1e-4
  # a folder: its config.json is its own, so one of another model is an error that names the file
  (wan / "umt5.pth").unlink()
  (wan / "diffusion_pytorch_model.safetensors").write_bytes(b"")
  with pytest.raises(ConversionError, match=re.escape(f"{wan / 'config.json'}: not a umT5 text encoder config")):
    load_transformers_umt5(str(wan))
  # and a umT5 config that does not parse names it too
  (wan / "config.json").write_text(json.dumps({"model_type": "umt5", "d_model": 32}))
  lacks = re.escape(f"{wan / 'config.json'}: umT5 config dict lacks required keys")
  with pytest.raises(ConversionError, match=lacks):
    load_transformers_umt5(str(wan))


def test_key_mismatch_error_lists_all():
  cfg = HF_CONFIGS["relu_short_dist"]
  config = UMT5Config.from_hf_config(cfg)
  sd = _state_dict(_hf_model(cfg))
  sd.pop("encoder.block.1.layer.0.SelfAttention.k.weight")
  sd["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2,), np.float32)
  sd["encoder.block.2.layer.1.DenseReluDense.wo.weight"] = np.zeros((48, 95), np.float32)
  # Decoder / LM-head keys of a full seq2seq checkpoint are skipped, not reported.
  sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((48, 48), np.float32)
  with pytest.raises(KeyMismatchError) as e:
    umt5_params_from_transformers(sd, config)
  msg = str(e.value)
  assert "(1 missing, 1 unexpected, 1 misshaped keys)" in msg
  assert "missing:\n    encoder.block.1.layer.0.SelfAttention.k.weight\n" in msg
  assert "unexpected:\n    encoder.block.0.layer.0.SelfAttention.extra.weight\n" in msg
  assert "encoder.block.2.layer.1.DenseReluDense.wo.weight: (48, 95), expected (48, 96)" in msg
  assert "decoder." not in msg
  with pytest.raises(ValueError, match="feed_forward_proj"):
    UMT5Config.from_hf_config({**cfg, "feed_forward_proj": "gated-foo"})
  with pytest.raises(ValueError, match="model_type"):
    UMT5Config.from_hf_config({**cfg, "model_type": "t5"})
  # Dtypes: jnp dtypes in the config, names in its JSON form (checkpoint metadata), both accepted.
  assert UMT5Config(**config.to_dict()) == config and config.to_dict()["param_dtype"] == "float32"
  assert UMT5Config.from_hf_config(cfg, dtype="bfloat16").dtype is jnp.bfloat16
  with pytest.raises(ValueError, match="UMT5Config.dtype"):
    UMT5Config.from_hf_config(cfg, dtype="float64")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  spm = pytest.importorskip("sentencepiece")
  folder = tmp_path_factory.mktemp("spm")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES * 20), model_prefix=str(folder / "spiece"), vocab_size=48,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0,
      minloglevel=2, hard_vocab_limit=False)
  return folder / "spiece.model"


def test_tokenizer(spm_model, tmp_path):
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(spm_model))
  tok = UMT5Tokenizer(str(spm_model), max_length=16)
  ids, mask = tok(SENTENCES[:3] + ["  a   cat &amp; dog  "])
  assert ids.shape == (4, 16) and mask.shape == (4, 16) and ids.dtype == np.int32
  for b, text in enumerate(SENTENCES[:3]):
    want = sp.encode(text)[:15] + [1]
    n = len(want)
    assert mask[b].sum() == n
    np.testing.assert_array_equal(ids[b, :n], want)
    assert np.all(ids[b, n:] == 0) and np.all(mask[b, n:] == 0)
  # Truncation keeps EOS last; whitespace cleaning collapses runs and unescapes HTML.
  long_row = tok.encode(" ".join(SENTENCES))
  assert len(long_row) == 16 and long_row[-1] == 1 and 1 not in long_row[:-1]
  assert tok.encode("  a   cat &amp; dog  ") == sp.encode("a cat & dog") + [1]
  # A folder holding spiece.model, and a transformers tokenizer.json, give the same ids.
  assert UMT5Tokenizer(str(spm_model.parent), max_length=16)(SENTENCES)[0].tolist() == tok(SENTENCES)[0].tolist()
  hf = transformers.T5Tokenizer.from_pretrained(str(spm_model.parent), extra_ids=0)
  hf.save_pretrained(str(tmp_path / "hf_tok"))
  assert os.path.exists(tmp_path / "hf_tok" / "tokenizer.json")
  tj = UMT5Tokenizer(str(tmp_path / "hf_tok"), max_length=16)
  assert tj.file.endswith("tokenizer.json")
  np.testing.assert_array_equal(tj(SENTENCES)[0], tok(SENTENCES)[0])
  assert hf(SENTENCES[1]).input_ids == tok.encode(SENTENCES[1], max_length=512)
  with pytest.raises(TokenizerNotFoundError, match="missing.model"):
    UMT5Tokenizer(str(tmp_path / "missing.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    UMT5Tokenizer(str(bad))


def test_text_embeddings_roundtrip(tmp_path):
  grain = pytest.importorskip("grain")
  rng = np.random.default_rng(0)
  prompts = ["a cat", "a dog on a skateboard", "ünïcödé prompt"]
  lengths = [3, 7, 1]
  emb = np.zeros((3, 8, 6), np.float32)
  for i, n in enumerate(lengths):
    emb[i, :n] = rng.normal(size=(n, 6))
  path = str(tmp_path / "ctx.arrayrecord")
  write_text_embeddings(path, prompts, emb, lengths)
  assert sorted(os.listdir(tmp_path)) == ["ctx.arrayrecord"]  # no temporary file left behind
  src = TextEmbeddingSource(path)
  assert len(src) == 3
  for i in range(3):
    item = src[i]
    assert item["prompt"] == prompts[i] and item["length"] == lengths[i]
    np.testing.assert_array_equal(item["context"], emb[i])
  assert src[-1]["prompt"] == prompts[-1]
  with pytest.raises(IndexError):
    src[3]
  # Unpadded / longer padding / dtype cast; pickling (grain workers); grain's MapDataset.
  assert TextEmbeddingSource(path, text_len=0)[1]["context"].shape == (7, 6)
  assert TextEmbeddingSource(path, text_len=12, dtype=jnp.bfloat16)[1]["context"].shape == (12, 6)
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[1]["context"], emb[1])
  ds = grain.MapDataset.source(src).map(lambda r: r["length"])
  assert [ds[i] for i in range(3)] == lengths
  assert [r["prompt"] for r in read_text_embeddings(path)] == prompts
  # Missing, corrupt and foreign files name the file.
  with pytest.raises(FileNotFoundError, match="absent.arrayrecord"):
    TextEmbeddingSource(str(tmp_path / "absent.arrayrecord"))
  bad = tmp_path / "bad.arrayrecord"
  bad.write_bytes(b"garbage" * 100)
  with pytest.raises(TextEmbeddingFileError, match="bad.arrayrecord"):
    TextEmbeddingSource(str(bad))
  trunc = tmp_path / "trunc.arrayrecord"
  trunc.write_bytes(open(path, "rb").read()[:-40])
  with pytest.raises(TextEmbeddingFileError, match="trunc.arrayrecord"):
    TextEmbeddingSource(str(trunc))
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / "foreign.arrayrecord"), "group_size:1")
  w.write(b"\x93\x01\x02\x03")
  w.close()
  with pytest.raises(TextEmbeddingFileError, match="foreign.arrayrecord: record 0"):
    TextEmbeddingSource(str(tmp_path / "foreign.arrayrecord"))[0]
  with pytest.raises(ValueError, match="2 lengths"):
    write_text_embeddings(str(tmp_path / "x.arrayrecord"), prompts, emb, lengths[:2])
  assert not os.path.exists(tmp_path / "x.arrayrecord")


def test_encode_prompts_to_arrayrecord(spm_model, tmp_path):
  config = UMT5Config.from_hf_config(HF_CONFIGS["gated_gelu"], text_len=32)
  params = init_params(config, jax.random.key(2))
  tok = UMT5Tokenizer(str(spm_model), max_length=24)
  out = str(tmp_path / "prompts.arrayrecord")
  n = encode_prompts_to_arrayrecord(tok, params, config, SENTENCES, out, batch_size=2, length_multiple=8)
  assert n == len(SENTENCES)
  src = TextEmbeddingSource(out)
  assert len(src) == len(SENTENCES)
  for i, text in enumerate(SENTENCES):
    ids, mask = tok([text])
    want = np.asarray(pad_to(encode(params, ids, mask, config), jnp.asarray(mask), 32))[0]
    item = src[i]
    assert item["prompt"] == text and item["length"] == int(mask.sum())
    assert item["context"].shape == (32, config.d_model)
    np.testing.assert_allclose(item["context"], want, atol=1e-5, rtol=0)
