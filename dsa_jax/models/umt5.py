"""umT5 text encoder (the encoder half of umT5, as Wan2.1 uses it to embed prompts).

umT5 differs from T5 in one structural point: every layer owns its relative-position bias table (T5 computes
the bias once, in layer 0, and shares it). The rest is T5 v1.1: RMSNorm without mean subtraction or bias,
attention logits without the 1/sqrt(d_head) scale, a gated GELU(tanh) FFN and a final RMSNorm. The output at
padding positions is zeroed, because the Wan DiT cross-attends to the full zero-padded 512-token context.

Parameters carry logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp') so that the 5.7B-parameter
umT5-XXL can be sharded like the DiT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dsa_jax.models.layers import RMSNorm, dtype_name, to_dtype

__all__ = [
    "UMT5Config",
    "UMT5Encoder",
    "relative_position_buckets",
    "encode",
    "init_params",
    "param_logical_axes",
    "pad_to",
    "UMT5Tokenizer",
    "TokenizerNotFoundError",
]

# Activations by the names transformers' configs use. "gated-gelu" means GELU with the tanh approximation
# (transformers maps it to "gelu_new"), while a plain "gelu" is the exact (erf) GELU.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Shape and numerics of a umT5 encoder. Defaults are umT5-XXL as used by Wan2.1.

  `dtype` / `param_dtype` follow the model-config convention of `dsa_jax.models.layers` (jnp dtypes; names such as
  'bfloat16' are accepted and converted).
  """

  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  # Compute dtype of matmuls; norms, softmax and the residual stream stay float32.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Length Wan zero-pads the context to.
  text_len: int = 512

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "text_len"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"UMT5Config.{name} must be a positive integer, got {v!r}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("UMT5Config.relative_attention_num_buckets must be >= 4 (bidirectional buckets), "
                       f"got {self.relative_attention_num_buckets}")
    if not self.layer_norm_epsilon > 0:
      raise ValueError(f"UMT5Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
    self.activation  # validates feed_forward_proj
    for name in ("dtype", "param_dtype"):
      object.__setattr__(self, name, to_dtype(getattr(self, name), f"UMT5Config.{name}"))

  def to_dict(self) -> dict:
    """JSON-ready fields (dtype names), the inverse of `UMT5Config(**d)`."""
    d = dataclasses.asdict(self)
    d["dtype"], d["param_dtype"] = dtype_name(self.dtype), dtype_name(self.param_dtype)
    return d

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.split("-")[0] == "gated"

  @property
  def activation(self) -> str:
    """Activation name after transformers' rule ("gated-gelu" -> tanh GELU)."""
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"UMT5Config.feed_forward_proj must be 'ACT' or 'gated-ACT', got "
                       f"{self.feed_forward_proj!r}")
    act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
    if act not in _ACTIVATIONS:
      raise ValueError(f"UMT5Config.feed_forward_proj={self.feed_forward_proj!r}: activation {act!r} not "
                       f"supported (known: {sorted(_ACTIVATIONS)})")
    return act

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def umt5_xxl(cls, **overrides) -> "UMT5Config":
    """umT5-XXL encoder of Wan2.1 (vocab 256384, d 4096, FFN 10240, 64 heads, 24 layers)."""
    return cls(**overrides)

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any] | Any, **overrides) -> "UMT5Config":
    """Builds a config from a transformers `config.json` dict (or a `PretrainedConfig`)."""
    if not isinstance(cfg, Mapping):
      if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
      else:
        raise ValueError(f"from_hf_config expects a dict or a transformers config, got {type(cfg).__name__}")
    model_type = cfg.get("model_type", "umt5")
    if model_type not in ("umt5",):
      raise ValueError(f"config model_type is {model_type!r}; only 'umt5' is supported (T5/mT5 share one "
                       "position bias across layers, umT5 has one per layer)")
    missing = [k for k in ("d_model", "num_heads", "num_layers") if k not in cfg]
    if missing:
      raise ValueError(f"umT5 config dict lacks required keys {missing}")
    kwargs = dict(
        vocab_size=int(cfg.get("vocab_size", 250112)),
        d_model=int(cfg["d_model"]),
        d_kv=int(cfg.get("d_kv", 64)),
        d_ff=int(cfg.get("d_ff", 1024)),
        num_layers=int(cfg["num_layers"]),
        num_heads=int(cfg["num_heads"]),
        relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=str(cfg.get("feed_forward_proj", "gated-gelu")),
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket index of (key − query) for every (query, key) pair, shape (q_len, k_len), int32.

  Half of the buckets are for keys after the query. Inside each half, distances below num_buckets/4 get their
  own bucket and longer ones share log-spaced buckets up to max_distance. The log is taken in float32 as the
  PyTorch reference does, so that bucket edges (where the ratio is an exact integer) round the same way.
  Computed with numpy at trace time: the result is a constant of the compiled program.
  """
  rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    ratio = np.log(dist.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = ratio * np.float32(half - max_exact)
  # Truncation toward zero, as the reference's .long(); -inf only occurs where dist == 0 (the small branch).
  large = max_exact + np.trunc(np.where(np.isfinite(large), large, 0.0)).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets = buckets + np.where(dist < max_exact, dist, large)
  return buckets.astype(np.int32)


def _dense_init(std: float):
  return nn.initializers.normal(stddev=std)


class SelfAttention(nn.Module):
  """Bidirectional self-attention with this layer's own relative position bias and no logit scaling."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x, key_mask):
    cfg = self.config
    dtype, pdtype = cfg.dtype, cfg.param_dtype
    b, length, d = x.shape
    h, dk = cfg.num_heads, cfg.d_kv

    def proj(name, std):
      return nn.DenseGeneral(features=(h, dk), axis=-1, use_bias=False, dtype=dtype, param_dtype=pdtype,
                             kernel_init=nn.with_logical_partitioning(_dense_init(std), ("embed", "heads", "kv")),
                             name=name)

    xc = x.astype(dtype)
    q = proj("q", (d * dk) ** -0.5)(xc)  # (B, L, H, Dk)
    k = proj("k", d ** -0.5)(xc)
    v = proj("v", d ** -0.5)(xc)

    table = self.param("relative_attention_bias",
                       nn.with_logical_partitioning(_dense_init(d ** -0.5), (None, "heads")),
                       (cfg.relative_attention_num_buckets, h), pdtype)
    buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    bias = jnp.transpose(jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0), (2, 0, 1))

    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias[None]
    # Masked keys get a large finite negative logit (not -inf) so a fully masked row stays finite.
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(features=d, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype,
                           kernel_init=nn.with_logical_partitioning(_dense_init((h * dk) ** -0.5),
                                                                    ("heads", "kv", "embed")),
                           name="o")(out)


class FeedForward(nn.Module):
  """T5 FFN: act(x·wi_0) * (x·wi_1) → wo when gated, act(x·wi) → wo otherwise."""

  config: UMT5Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype, pdtype = cfg.dtype, cfg.param_dtype
    act = _ACTIVATIONS[cfg.activation]

    def dense(name, features, std, axes):
      return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=pdtype,
                      kernel_init=nn.with_logical_partitioning(_dense_init(std), axes), name=name)

    xc = x.astype(dtype)
    std_in = cfg.d_model ** -0.5
    if cfg.is_gated:
      hidden = act(dense("wi_0", cfg.d_ff, std_in, ("embed", "mlp"))(xc)) * \
          dense("wi_1", cfg.d_ff, std_in, ("embed", "mlp"))(xc)
    else:
      hidden = act(dense("wi", cfg.d_ff, std_in, ("embed", "mlp"))(xc))
    return dense("wo", cfg.d_model, cfg.d_ff ** -0.5, ("mlp", "embed"))(hidden.astype(dtype))


class EncoderBlock(nn.Module):
  config: UMT5Config

  @nn.compact
  def __call__(self, x, key_mask):
    cfg = self.config
    pdtype = cfg.param_dtype
    h = RMSNorm(cfg.layer_norm_epsilon, param_dtype=pdtype, name="attn_norm")(x)
    x = x + SelfAttention(cfg, name="attn")(h, key_mask).astype(jnp.float32)
    h = RMSNorm(cfg.layer_norm_epsilon, param_dtype=pdtype, name="ffn_norm")(x)
    return x + FeedForward(cfg, name="ffn")(h).astype(jnp.float32)


class UMT5Encoder(nn.Module):
  """umT5 encoder: (input_ids (B, L) int, attention_mask (B, L)) -> (B, L, d_model) float32, zero at padding."""

  config: UMT5Config

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    cfg = self.config
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(f"umT5 expects input_ids (B, L) and attention_mask of the same shape, got "
                       f"{input_ids.shape} and {attention_mask.shape}")
    pdtype = cfg.param_dtype
    table = self.param("token_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (cfg.vocab_size, cfg.d_model), pdtype)
    x = jnp.take(table, input_ids.astype(jnp.int32), axis=0).astype(jnp.float32)
    key_mask = attention_mask.astype(bool)
    for i in range(cfg.num_layers):
      x = EncoderBlock(cfg, name=f"block_{i}")(x, key_mask)
    x = RMSNorm(cfg.layer_norm_epsilon, param_dtype=pdtype, name="final_norm")(x)
    return x * key_mask[..., None].astype(x.dtype)


def init_params(config: UMT5Config, rng: jax.Array, seq_len: int = 8):
  """Random parameters (plain arrays, logical-axis boxes removed)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  variables = UMT5Encoder(config).init(rng, ids, jnp.ones_like(ids))
  return nn.unbox(variables["params"])


def param_logical_axes(config: UMT5Config):
  """Pytree of logical axis names (PartitionSpec of names) matching `init_params`' tree, for sharding rules."""
  ids = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda: UMT5Encoder(config).init(jax.random.key(0), ids, jnp.ones_like(ids)))
  return nn.get_partition_spec(abstract["params"])


def encode(params, input_ids, attention_mask, config: UMT5Config) -> jax.Array:
  """Runs the encoder: (B, L, d_model) float32 with zeros at positions where attention_mask is 0.

  Jit-compatible; wrap with `jax.jit(functools.partial(encode, config=config))` for repeated use.
  """
  params = params["params"] if isinstance(params, Mapping) and set(params) == {"params"} else params
  return UMT5Encoder(config).apply({"params": params}, jnp.asarray(input_ids), jnp.asarray(attention_mask))


def pad_to(emb: jax.Array, mask: jax.Array, text_len: int) -> jax.Array:
  """Wan's context layout: each prompt's first `length = mask.sum()` embeddings, then zeros, to `text_len`.

  emb (B, L, d), mask (B, L) (right-padded). Longer inputs are truncated to text_len.
  """
  if emb.ndim != 3 or mask.shape != emb.shape[:2]:
    raise ValueError(f"pad_to expects emb (B, L, d) and mask (B, L), got {emb.shape} and {mask.shape}")
  if text_len <= 0:
    raise ValueError(f"pad_to: text_len must be positive, got {text_len}")
  b, length, d = emb.shape
  if length >= text_len:
    emb = emb[:, :text_len]
  else:
    emb = jnp.concatenate([emb, jnp.zeros((b, text_len - length, d), emb.dtype)], axis=1)
  lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
  keep = jnp.arange(text_len)[None, :] < lengths[:, None]
  return jnp.where(keep[..., None], emb, jnp.zeros((), emb.dtype))


# --- tokenizer ------------------------------------------------------------------------------------------------

class TokenizerNotFoundError(FileNotFoundError):
  """No SentencePiece model / tokenizer.json at the given path."""


def _clean_whitespace(text: str) -> str:
  """Wan's prompt cleaning minus ftfy: HTML entities unescaped (twice), whitespace runs collapsed, stripped."""
  import html  # noqa: PLC0415
  import re  # noqa: PLC0415
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
  """umT5 tokenizer: SentencePiece pieces, then EOS (id 1), right-padded with id 0 to `max_length`.

  `path` is a SentencePiece model file (`spiece.model`), a folder holding one, or a transformers tokenizer
  folder with `tokenizer.json` (read with the `tokenizers` package). Sequences longer than max_length − 1
  pieces are truncated and still end with EOS, as transformers' tokenizer does with truncation=True.
  `clean="whitespace"` applies Wan's whitespace cleaning (without ftfy); `None` passes text through.
  """

  def __init__(self, path: str, max_length: int = 512, eos_id: int = 1, pad_id: int = 0,
               clean: str | None = "whitespace"):
    import os  # noqa: PLC0415
    path = os.fspath(path)
    if max_length < 1:
      raise ValueError(f"UMT5Tokenizer: max_length must be >= 1, got {max_length}")
    if clean not in (None, "whitespace"):
      raise ValueError(f"UMT5Tokenizer: clean must be None or 'whitespace', got {clean!r}")
    self.max_length, self.eos_id, self.pad_id, self.clean = int(max_length), int(eos_id), int(pad_id), clean
    self.path = path
    spm_file = None
    json_file = None
    if os.path.isfile(path):
      if path.endswith(".json"):
        json_file = path
      else:
        spm_file = path
    elif os.path.isdir(path):
      for name in ("spiece.model", "tokenizer.model", "sentencepiece.model"):
        if os.path.isfile(os.path.join(path, name)):
          spm_file = os.path.join(path, name)
          break
      if spm_file is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
        json_file = os.path.join(path, "tokenizer.json")
      if spm_file is None and json_file is None:
        raise TokenizerNotFoundError(f"no spiece.model or tokenizer.json in tokenizer folder {path}")
    else:
      raise TokenizerNotFoundError(f"umT5 tokenizer not found: {path} (expected a SentencePiece .model "
                                   "file or a folder with spiece.model / tokenizer.json)")
    if spm_file is not None:
      try:
        import sentencepiece as spm  # noqa: PLC0415
      except ImportError as e:
        raise ImportError("UMT5Tokenizer needs the sentencepiece package (pip install sentencepiece)") from e
      try:
        self._sp = spm.SentencePieceProcessor(model_file=spm_file)
      except (RuntimeError, OSError) as e:
        raise ValueError(f"{spm_file}: not a valid SentencePiece model ({e})") from e
      self._encode = lambda text: self._sp.encode(text)
      self.vocab_size = int(self._sp.get_piece_size())
      self.file = spm_file
    else:
      try:
        import tokenizers  # noqa: PLC0415
      except ImportError as e:
        raise ImportError(f"{json_file}: reading tokenizer.json needs the tokenizers package") from e
      try:
        self._tk = tokenizers.Tokenizer.from_file(json_file)
      except Exception as e:  # tokenizers raises its own Exception type
        raise ValueError(f"{json_file}: not a valid tokenizers JSON file ({e})") from e
      self._encode = lambda text: self._tk.encode(text, add_special_tokens=False).ids
      self.vocab_size = int(self._tk.get_vocab_size())
      self.file = json_file

  def encode(self, text: str, max_length: int | None = None) -> list[int]:
    """Ids of one prompt, truncated to `max_length` − 1 pieces, EOS appended (no padding)."""
    if not isinstance(text, str):
      raise ValueError(f"UMT5Tokenizer expects str prompts, got {type(text).__name__}")
    max_length = self.max_length if max_length is None else int(max_length)
    if self.clean == "whitespace":
      text = _clean_whitespace(text)
    return list(self._encode(text))[: max_length - 1] + [self.eos_id]

  def __call__(self, prompts, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """prompts: str or list of str -> (ids (B, max_length) int32, mask (B, max_length) int32)."""
    if isinstance(prompts, str):
      prompts = [prompts]
    max_length = self.max_length if max_length is None else int(max_length)
    ids = np.full((len(prompts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    for i, p in enumerate(prompts):
      row = self.encode(p, max_length)
      ids[i, : len(row)] = row
      mask[i, : len(row)] = 1
    return ids, mask
