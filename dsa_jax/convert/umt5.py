"""Converts umT5 encoder checkpoints (transformers or Wan2.1 layout) into `dsa_jax.models.umt5` parameters.

Two layouts are read:
- transformers (`UMT5EncoderModel`, or a full `UMT5Model`/`UMT5ForConditionalGeneration`, whose decoder and LM
  head are skipped): `shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`, ...
- Wan2.1 (`models_t5_umt5-xxl-enc-bf16.pth`): `token_embedding.weight`, `blocks.{i}.attn.{q,k,v,o}.weight`,
  `blocks.{i}.ffn.{gate.0,fc1,fc2}.weight`, `blocks.{i}.pos_embedding.embedding.weight`, `norm.weight`.

Safetensors files are read with a small header parser (numpy + ml_dtypes) so that bfloat16 weights need no
torch; `.pth`/`.bin` files need torch. Tensors keep their dtype unless `dtype` is given.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Mapping

import numpy as np

from dsa_jax.models.umt5 import UMT5Config

__all__ = [
    "CheckpointMismatchError",
    "umt5_params_from_transformers",
    "umt5_params_from_wan",
    "wan_to_transformers_keys",
    "infer_config",
    "read_state_dict",
    "load_transformers_umt5",
]


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not match the umT5 config."""


# Keys of a full seq2seq checkpoint that the encoder does not use.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")


def _to_numpy(t: Any) -> np.ndarray:
  """torch tensor / jax array / numpy array -> numpy, bfloat16 preserved through ml_dtypes."""
  if isinstance(t, np.ndarray):
    return t
  mod = type(t).__module__
  if mod.startswith("torch"):
    import torch  # noqa: PLC0415 - only for torch inputs
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
      import ml_dtypes  # noqa: PLC0415
      return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(t)


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


def _check_keys(sd: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str):
  missing = sorted(k for k in expected if k not in sd)
  extra = sorted(k for k in sd if k not in expected)
  misshaped = sorted(f"{k}: got {tuple(sd[k].shape)}, expected {expected[k]}" for k in expected
                     if k in sd and tuple(sd[k].shape) != tuple(expected[k]))
  if missing or extra or misshaped:
    lines = [f"umT5 checkpoint {source} does not match the config:"]
    for title, items in (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped)):
      if items:
        shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
        lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    raise CheckpointMismatchError("\n".join(lines))


def umt5_params_from_transformers(state_dict: Mapping[str, Any], config: UMT5Config, dtype: Any = None,
                                  source: str = "state dict"):
  """transformers `UMT5EncoderModel` state dict -> params for `dsa_jax.models.umt5.UMT5Encoder`.

  Decoder/LM-head keys of a full seq2seq checkpoint are skipped. Any other missing, unexpected or misshaped
  key raises one `CheckpointMismatchError` that lists them all.
  """
  sd = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
  # The embedding is stored as `shared.weight`, as the tied `encoder.embed_tokens.weight`, or both.
  if "encoder.embed_tokens.weight" in sd:
    emb = sd.pop("encoder.embed_tokens.weight")
    sd.setdefault("shared.weight", emb)
  _check_keys(sd, _expected_hf_shapes(config), source)

  def get(k):
    a = _to_numpy(sd[k])
    return a.astype(dtype) if dtype is not None else a

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
    raise CheckpointMismatchError("cannot infer umT5 config: no token embedding (shared.weight / "
                                  "encoder.embed_tokens.weight / token_embedding.weight) in the checkpoint")
  layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.block\.(\d+)\.", k))}
  if not layer_ids:
    raise CheckpointMismatchError("cannot infer umT5 config: no encoder blocks in the checkpoint")
  p = "encoder.block.0.layer."
  try:
    bias = sd[f"{p}0.SelfAttention.relative_attention_bias.weight"]
    q = sd[f"{p}0.SelfAttention.q.weight"]
    gated = f"{p}1.DenseReluDense.wi_0.weight" in sd
    wi = sd[f"{p}1.DenseReluDense.wi_0.weight" if gated else f"{p}1.DenseReluDense.wi.weight"]
  except KeyError as e:
    raise CheckpointMismatchError(f"cannot infer umT5 config: block 0 lacks {e.args[0]}") from None
  buckets, heads = (int(s) for s in bias.shape)
  kwargs = dict(vocab_size=int(emb.shape[0]), d_model=int(emb.shape[1]), d_kv=int(q.shape[0]) // heads,
                d_ff=int(wi.shape[0]), num_layers=max(layer_ids) + 1, num_heads=heads,
                relative_attention_num_buckets=buckets,
                feed_forward_proj="gated-gelu" if gated else "relu")
  kwargs.update(overrides)
  return UMT5Config(**kwargs)


# --- file reading --------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _st_dtype(name: str, path: str):
  if name in _ST_DTYPES:
    return np.dtype(_ST_DTYPES[name])
  import ml_dtypes  # noqa: PLC0415
  extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
  if name not in extra:
    raise ValueError(f"{path}: unsupported safetensors dtype {name!r}")
  return np.dtype(extra[name])


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Memory-maps a .safetensors file (8-byte little-endian header size, JSON header, raw little-endian data)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n <= 0 or 8 + n > size:
        raise ValueError("header size out of range")
      header = json.loads(f.read(n))
  except (OSError, ValueError, struct.error) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(size - 8 - n,)) if size > 8 + n else \
      np.zeros((0,), np.uint8)
  out = {}
  for name, info in header.items():
    dt = _st_dtype(info["dtype"], path)
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end > data.shape[0] or end - begin != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets (file truncated?)")
    out[name] = data[begin:end].view(dt).reshape(shape)
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (pip install torch); safetensors files do not") from e
  try:
    try:  # mmap avoids a second copy of a 11 GB checkpoint; legacy (non-zip) files need a plain load
      obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises assorted types for corrupt archives
    raise ValueError(f"{path}: cannot be read by torch.load ({type(e).__name__}: {e})") from e
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return {k: _to_numpy(v) for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads one weights file (.safetensors, .pth/.pt/.bin) or every shard in a folder."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"umT5 checkpoint not found: {path}")
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      files = [os.path.join(path, s) for s in shards]
    else:
      files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith((".bin", ".pth", ".pt")))
    if not files:
      raise FileNotFoundError(f"no .safetensors/.bin/.pth weights in folder {path}")
    sd: dict[str, np.ndarray] = {}
    for f in files:
      if not os.path.exists(f):
        raise FileNotFoundError(f"umT5 shard listed in the index is missing: {f}")
      sd.update(read_state_dict(f))
    return sd
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith((".pth", ".pt", ".bin")):
    return _read_torch(path)
  raise ValueError(f"{path}: unknown weights format (expected .safetensors, .pth, .pt or .bin)")


def load_transformers_umt5(path: str, config: UMT5Config | None = None, dtype: Any = None,
                           **config_overrides) -> tuple[dict, UMT5Config]:
  """Loads a umT5 encoder from a transformers folder (config.json + safetensors, sharded or not) or from a single
  .safetensors/.pth file (transformers or Wan layout). Without `config`, uses config.json next to the weights,
  else infers the config from the shapes. Returns (params, config)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"umT5 checkpoint not found: {path}")
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  sd = read_state_dict(path)
  if config is None:
    cfg_path = os.path.join(folder, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        try:
          cfg_dict = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
      config = UMT5Config.from_hf_config(cfg_dict, **config_overrides)
    else:
      config = infer_config(sd, **config_overrides)
  if _is_wan_layout(sd):
    params = umt5_params_from_wan(sd, config, dtype, source=path)
  else:
    params = umt5_params_from_transformers(sd, config, dtype, source=path)
  return params, config
