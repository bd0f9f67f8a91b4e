"""A fixed (untrained) bag-of-words text encoder for small recipes such as the moving-digits benchmark.

Small recipes cannot afford umT5-XXL, and with a closed prompt grammar a learned text encoder buys little: the
DiT's cross-attention learns what the words mean. Each word gets a fixed pseudo-random vector plus a sinusoidal
position code, and the output is zero-padded to `text_len` like Wan's context, so the same cross-attention code
serves both. Word vectors are derived from a hash of (seed, word), not from a numpy RNG stream, so they are the
same on every platform and numpy version, and adding a word to the vocabulary does not move the others.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Sequence

import numpy as np

PAD, UNK = 0, 1
UNK_TOKEN = "<unk>"
_WORD_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
  """Lower-cased words made of letters and digits; punctuation separates words and is dropped."""
  return _WORD_RE.findall(text.lower())


def build_vocab(texts: Iterable[str]) -> list[str]:
  """The sorted set of words of a corpus (e.g. a prompts.txt)."""
  return sorted({w for t in texts for w in tokenize(t)})


def _hash_normal(seed: int, word: str, dim: int) -> np.ndarray:
  """`dim` standard-normal floats determined by (seed, word) alone (Box-Muller on BLAKE2b output)."""
  n_u32 = 2 * ((dim + 1) // 2)
  chunks, counter = [], 0
  while sum(len(c) for c in chunks) < 4 * n_u32:
    chunks.append(hashlib.blake2b(f"{seed}\x00{word}\x00{counter}".encode("utf-8"), digest_size=64).digest())
    counter += 1
  u = np.frombuffer(b"".join(chunks)[:4 * n_u32], dtype="<u4").astype(np.float64)
  u = (u + 0.5) / 2.0**32  # in (0, 1)
  u1, u2 = u[0::2], u[1::2]
  r = np.sqrt(-2.0 * np.log(u1))
  z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
  return z[:dim]


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """(length, dim) sin/cos position code (Transformer style), amplitude 1."""
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / max(half, 1))
  angles = np.arange(length)[:, None] * freqs[None, :]
  code = np.zeros((length, dim), np.float64)
  code[:, 0:2 * half:2] = np.sin(angles)
  code[:, 1:2 * half:2] = np.cos(angles)
  return code


class BagOfWordsEncoder:
  """Word-level tokenizer + fixed random word vectors + sinusoidal positions -> (B, text_len, text_dim) float32.

  Token ids: 0 = padding, 1 = unknown word, 2.. = the vocabulary in the given order. Positions past the prompt's
  words are exactly zero (like Wan's zero-padded umT5 context); prompts longer than `text_len` words are cut.
  """

  def __init__(self, vocab: Sequence[str], text_len: int, text_dim: int, seed: int = 0,
               position_scale: float = 0.5):
    if isinstance(vocab, str):
      raise ValueError("vocab: expected a sequence of words, got a single string")
    words = []
    for w in vocab:
      toks = tokenize(w)
      if len(toks) != 1 or toks[0] != w.lower():
        raise ValueError(f"vocab: {w!r} is not a single lower-case word of letters/digits (as tokenize() yields)")
      if toks[0] not in words:
        words.append(toks[0])
    if not words:
      raise ValueError("vocab: empty")
    if not (isinstance(text_len, int) and text_len > 0):
      raise ValueError(f"text_len: expected a positive int, got {text_len!r}")
    if not (isinstance(text_dim, int) and text_dim > 0):
      raise ValueError(f"text_dim: expected a positive int, got {text_dim!r}")
    self.vocab = words
    self.text_len, self.text_dim, self.seed = text_len, text_dim, int(seed)
    self.position_scale = float(position_scale)
    self._ids = {w: i + 2 for i, w in enumerate(words)}
    table = np.zeros((len(words) + 2, text_dim), np.float64)
    table[UNK] = _hash_normal(self.seed, UNK_TOKEN, text_dim)
    for w, i in self._ids.items():
      table[i] = _hash_normal(self.seed, w, text_dim)
    self.table = table.astype(np.float32)  # (vocab_size, text_dim); row 0 (padding) is zero
    self.positions = (self.position_scale * sinusoidal_positions(text_len, text_dim)).astype(np.float32)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab) + 2

  def token_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(B, text_len) int32 ids (0-padded) and (B,) int32 lengths (after cutting to text_len)."""
    texts = _as_list(texts)
    ids = np.zeros((len(texts), self.text_len), np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for b, t in enumerate(texts):
      toks = [self._ids.get(w, UNK) for w in tokenize(t)][:self.text_len]
      ids[b, :len(toks)] = toks
      lengths[b] = len(toks)
    return ids, lengths

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """(B, text_len, text_dim) float32 context; padded positions are zero."""
    ids, _ = self.token_ids(texts)
    out = self.table[ids] + self.positions[None]
    out[ids == PAD] = 0.0
    return out

  def encode_one(self, text: str) -> np.ndarray:
    """(text_len, text_dim) for one prompt (for per-example grain map transforms)."""
    return self.encode([text])[0]

  def encode_example(self, example: str | dict[str, Any]) -> dict[str, Any]:
    """A per-example grain map transform: a prompt (or a dict with `prompt`, e.g. a video clip) -> the dict plus
    `context` (text_len, text_dim) float32 and `length` int32, the element format of the precomputed
    text-embedding source, so trainers handle both alike."""
    out = {"prompt": example} if isinstance(example, str) else dict(example)
    if "prompt" not in out:
      raise ValueError(f"encode_example: expected a prompt string or a dict with 'prompt', got keys {sorted(out)}")
    ids, lengths = self.token_ids([out["prompt"]])
    out["context"] = self.encode([out["prompt"]])[0]
    out["length"] = lengths[0]
    return out

  def unknown_words(self, texts: Iterable[str]) -> list[str]:
    """Words of `texts` that map to UNK (to check a prompt file against the vocabulary)."""
    return sorted({w for t in texts for w in tokenize(t) if w not in self._ids})

  def to_dict(self) -> dict[str, Any]:
    """JSON-able description; `from_dict` rebuilds the identical encoder (the vectors are a function of it)."""
    return {"kind": "bag_of_words", "version": 1, "vocab": list(self.vocab), "text_len": self.text_len,
            "text_dim": self.text_dim, "seed": self.seed, "position_scale": self.position_scale}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BagOfWordsEncoder":
    if d.get("kind") != "bag_of_words":
      raise ValueError(f"BagOfWordsEncoder.from_dict: kind {d.get('kind')!r}, expected 'bag_of_words'")
    missing = [k for k in ("vocab", "text_len", "text_dim", "seed") if k not in d]
    if missing:
      raise ValueError(f"BagOfWordsEncoder.from_dict: missing fields {missing}")
    return cls(d["vocab"], int(d["text_len"]), int(d["text_dim"]), int(d["seed"]),
               float(d.get("position_scale", 0.5)))

  def __repr__(self) -> str:
    return (f"BagOfWordsEncoder(vocab={len(self.vocab)} words, text_len={self.text_len}, text_dim={self.text_dim}, "
            f"seed={self.seed})")


def _as_list(texts) -> list[str]:
  if isinstance(texts, str):
    raise ValueError("texts: expected a list of prompts, got a single string (wrap it in a list)")
  out = []
  for t in texts:
    if isinstance(t, bytes):
      t = t.decode("utf-8")
    out.append(str(t))
  return out
