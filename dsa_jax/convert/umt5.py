"""Converts umT5 encoder checkpoints (transformers or Wan2.1 layout) into `dsa_jax.models.umt5` parameters.

Two layouts are read:
- transformers (`UMT5EncoderModel`, or a full `UMT5Model`/`UMT5ForConditionalGeneration`, whose decoder and LM
  head are skipped): `shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`, ...
- Wan2.1 (`models_t5_umt5-xxl-enc-bf16.pth`): `token_embedding.weight`, `blocks.{i}.attn.{q,k,v,o}.weight`,
  `blocks.{i}.ffn.{gate.0,fc1,fc2}.weight`, `blocks.{i}.pos_embedding.embedding.weight`, `norm.weight`.

Files are found and read by `dsa_jax.convert.common` (safetensors without torch, bfloat16 kept; `.pth`/`.bin` need
torch). Tensors keep their dtype unless `dtype` is given.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from dsa_jax.convert import common
from dsa_jax.models.umt5 import UMT5Config

__all__ = ["umt5_params_from_transformers", "umt5_params_from_wan", "wan_to_transformers_keys", "infer_config",
           "is_umt5_config", "load_transformers_umt5"]

# Keys of a full seq2seq checkpoint that the encoder does not use.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")


def _expected_hf_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  shapes = {"shared.weight": (config.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
  for i in range(config.num_layers):
    p = f"encoder.block.{i}.layer."
    for n in "qkv":
      shapes[f"{p}0.SelfAttention.{n}.weight"] = (inner, d)
    shapes[f"{p}0.SelfAttention.o.weight"] = (d, inner)
    shapes[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (
        config.relative_attention_num_buckets, config.num_heads)
    shapes[f"{p}0.layer_norm.weight"] = (d,)
    shapes[f"{p}1.layer_norm.weight"] = (d,)
    if config.is_gated:
      shapes[f"{p}1.DenseReluDense.wi_0.weight"] = (ff, d)
      shapes[f"{p}1.DenseReluDense.wi_1.weight"] = (ff, d)
    else:
      shapes[f"{p}1.DenseReluDense.wi.weight"] = (ff, d)
    shapes[f"{p}1.DenseReluDense.wo.weight"] = (d, ff)
  return shapes


def umt5_params_from_transformers(state_dict: Mapping[str, Any], config: UMT5Config, dtype: Any = None,
                                  source: str = "state dict"):
  """transformers `UMT5EncoderModel` state dict -> params for `dsa_jax.models.umt5.UMT5Encoder`.

  Decoder/LM-head keys of a full seq2seq checkpoint are skipped. Any other missing, unexpected or misshaped
  key raises one `KeyMismatchError` that lists them all.
  """
  sd = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
  # The embedding is stored as `shared.weight`, as the tied `encoder.embed_tokens.weight`, or both.
  if "encoder.embed_tokens.weight" in sd:
    emb = sd.pop("encoder.embed_tokens.weight")
    sd.setdefault("shared.weight", emb)
  common.check_keys(sd, _expected_hf_shapes(config), source, what="umT5 config")

  def get(k):
    return common.cast(common.to_numpy(sd[k]), dtype)

  h, dk, d = config.num_heads, config.d_kv, config.d_model
  params: dict[str, Any] = {"token_embedding": get("shared.weight"),
                            "final_norm": {"scale": get("encoder.final_layer_norm.weight")}}
  for i in range(config.num_layers):
    p = f"encoder.block.{i}.layer."
    attn = {n: {"kernel": get(f"{p}0.SelfAttention.{n}.weight").T.reshape(d, h, dk)} for n in "qkv"}
    attn["o"] = {"kernel": get(f"{p}0.SelfAttention.o.weight").T.reshape(h, dk, d)}
    attn["relative_attention_bias"] = get(f"{p}0.SelfAttention.relative_attention_bias.weight")
    names = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    ffn = {n: {"kernel": get(f"{p}1.DenseReluDense.{n}.weight").T} for n in names}
    params[f"block_{i}"] = {
        "attn_norm": {"scale": get(f"{p}0.layer_norm.weight")},
        "attn": attn,
        "ffn_norm": {"scale": get(f"{p}1.layer_norm.weight")},
        "ffn": ffn,
    }
  # Transposes are views; make every leaf contiguous so device_put does not keep the source alive.
  return _map_leaves(np.ascontiguousarray, params)


def _map_leaves(fn, tree):
  if isinstance(tree, dict):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)


_WAN_RULES = [
    (re.compile(r"^token_embedding\.weight$"), "shared.weight"),
    (re.compile(r"^norm\.weight$"), "encoder.final_layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.weight$"), r"encoder.block.\1.layer.0.layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.weight$"), r"encoder.block.\1.layer.1.layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$"), r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (re.compile(r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$"),
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    # Wan's FFN: fc2(fc1(x) * gelu(gate(x))): gate <-> wi_0 (activated), fc1 <-> wi_1, fc2 <-> wo.
    (re.compile(r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc1\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc2\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
]


def _is_wan_layout(sd: Mapping[str, Any]) -> bool:
  return "token_embedding.weight" in sd or any(k.startswith("blocks.") for k in sd)


def wan_to_transformers_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames a Wan2.1 `T5Encoder` state dict to transformers names; unknown keys pass through unchanged
  (and are then reported as unexpected)."""
  out = {}
  for k, v in state_dict.items():
    for pat, repl in _WAN_RULES:
      if pat.match(k):
        k = pat.sub(repl, k)
        break
    out[k] = v
  return out


def umt5_params_from_wan(state_dict: Mapping[str, Any], config: UMT5Config, dtype: Any = None,
                         source: str = "state dict"):
  """Wan2.1 `models_t5_umt5-xxl-enc-*.pth` state dict -> params (same checks as the transformers path)."""
  return umt5_params_from_transformers(wan_to_transformers_keys(state_dict), config, dtype, source)


def infer_config(state_dict: Mapping[str, Any], **overrides) -> UMT5Config:
  """Config from tensor shapes, for checkpoints without config.json (Wan's .pth). Needs a gated FFN or a plain
  one by key name; the max distance (128), epsilon (1e-6) and activation (gated-gelu) are umT5's defaults."""
  sd = wan_to_transformers_keys(state_dict) if _is_wan_layout(state_dict) else state_dict
  emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
  if emb is None:
    raise common.ConversionError("cannot infer umT5 config: no token embedding (shared.weight / "
                                  "encoder.embed_tokens.weight / token_embedding.weight) in the checkpoint")
  layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.block\.(\d+)\.", k))}
  if not layer_ids:
    raise common.ConversionError("cannot infer umT5 config: no encoder blocks in the checkpoint")
  p = "encoder.block.0.layer."
  try:
    bias = sd[f"{p}0.SelfAttention.relative_attention_bias.weight"]
    q = sd[f"{p}0.SelfAttention.q.weight"]
    gated = f"{p}1.DenseReluDense.wi_0.weight" in sd
    wi = sd[f"{p}1.DenseReluDense.wi_0.weight" if gated else f"{p}1.DenseReluDense.wi.weight"]
  except KeyError as e:
    raise common.ConversionError(f"cannot infer umT5 config: block 0 lacks {e.args[0]}") from None
  buckets, heads = (int(s) for s in bias.shape)
  kwargs = dict(vocab_size=int(emb.shape[0]), d_model=int(emb.shape[1]), d_kv=int(q.shape[0]) // heads,
                d_ff=int(wi.shape[0]), num_layers=max(layer_ids) + 1, num_heads=heads,
                relative_attention_num_buckets=buckets,
                feed_forward_proj="gated-gelu" if gated else "relu")
  kwargs.update(overrides)
  return UMT5Config(**kwargs)


def is_umt5_config(d: Mapping[str, Any]) -> bool:
  """A transformers umT5 config.json (model_type 'umt5', or none with umT5's d_model)."""
  return d.get("model_type") == "umt5" or ("model_type" not in d and "d_model" in d)


def load_transformers_umt5(path: str, config: UMT5Config | None = None, dtype: Any = None, log=None,
                           **config_overrides) -> tuple[dict, UMT5Config]:
  """Loads a umT5 encoder from a transformers folder (config.json + safetensors, sharded or not) or from a single
  .safetensors/.pth file (transformers or Wan layout). Without `config`, uses the folder's config.json, or the one
  beside a single file when it is a umT5 config (Wan keeps its DiT's config.json there), else infers the config from
  the shapes. Returns (params, config)."""
  path = os.fspath(path)
  log = log or (lambda m: None)
  files, hf_config = common.find_weight_files(path, accepts=is_umt5_config, what="umT5 text encoder", log=log)
  cfg_file = common.config_path(path)
  if config is None and hf_config is not None:
    if not is_umt5_config(hf_config):
      kind = hf_config.get("_class_name") or hf_config.get("model_type") or "another model"
      raise common.ConversionError(
          f"{cfg_file}: not a umT5 text encoder config (it describes {kind!r}; expected model_type 'umt5'); --src "
          "should be the text encoder's folder (text_encoder/ of a Wan pipeline) or its weights file")
    try:
      config = UMT5Config.from_hf_config(hf_config, **config_overrides)
    except (ValueError, TypeError) as e:
      raise common.ConversionError(f"{cfg_file}: {e}") from e
  state_dicts = common.read_weight_files(files)
  if len(state_dicts) != 1:
    raise common.ConversionError(f"{path}: holds several state dicts {sorted(state_dicts)}; expected one umT5")
  (sd,) = state_dicts.values()
  if config is None:
    config = infer_config(sd, **config_overrides)
    log(f"umT5 config inferred from the weights' shapes: d_model {config.d_model}, {config.num_layers} layers, "
        f"{config.num_heads} heads")
  if _is_wan_layout(sd):
    params = umt5_params_from_wan(sd, config, dtype, source=path)
  else:
    params = umt5_params_from_transformers(sd, config, dtype, source=path)
  return params, config
