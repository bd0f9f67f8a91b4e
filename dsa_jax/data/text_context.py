"""Prompts -> the DiT's text context (B, text_len, text_dim), by `config.text.kind`.

  'random': a deterministic Gaussian context per prompt (a hash seeds it): benchmarks and smoke tests, no weights.
  'bow':    the fixed bag-of-words encoder saved as JSON at `config.text.path`; path 'digits' builds the one of the
            moving-digits grammar (small recipes need no learned text encoder).
  'umt5':   the umT5 encoder (model checkpoint at `config.text.path`, network 'text_encoder') and its SentencePiece
            tokenizer at `config.text.tokenizer`, zero-padded to text_len as Wan does.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import numpy as np

TextEncoder = Callable[[Sequence[str]], np.ndarray]


def _check_prompts(prompts):
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of strings, not one string")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"prompt {i} is a {type(p).__name__}, expected a string")
  return prompts


def random_context(prompt: str, text_len: int, text_dim: int) -> np.ndarray:
  """N(0, 1) context seeded by the prompt's hash: the same prompt always gives the same context."""
  seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
  return np.random.default_rng(seed).standard_normal((text_len, text_dim)).astype(np.float32)


def _random_encoder(text_len, text_dim) -> TextEncoder:
  def encode(prompts):
    return np.stack([random_context(p, text_len, text_dim) for p in _check_prompts(prompts)])
  return encode


class UnknownWordsError(ValueError):
  """A prompt holds words the bag-of-words encoder does not know (with strict prompts)."""


# Prompts cut to text_len that are named one by one; a training run over generated prompts would otherwise log one
# line per distinct long prompt for its whole length (the digits grammar makes prompts of up to 27 words).
MAX_CUT_PROMPTS_LISTED = 5


def _prompt_checker(enc, strict: bool, warn):
  """Reports once per word: unknown words (a bag-of-words encoder maps them all to one vector, so the video ignores
  them); and prompts cut to text_len words, the first MAX_CUT_PROMPTS_LISTED by name, then once that more are."""
  seen_words, seen_cut = set(), set()

  def check(prompts):
    from dsa_jax.data.bow_text import tokenize
    unknown = [w for w in enc.unknown_words(prompts) if w not in seen_words]
    if unknown:
      msg = (f"prompt words unknown to the text encoder (it knows {len(enc.vocab)} words, e.g. "
             f"{', '.join(enc.vocab[:6])}): {', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}")
      if strict:
        raise UnknownWordsError(msg)
      seen_words.update(unknown)
      warn(f"warning: {msg}; they all map to one unknown-word vector, so the video cannot follow them "
           "(--strict-prompts makes this an error)")
    for p in prompts:
      if len(seen_cut) > MAX_CUT_PROMPTS_LISTED or p in seen_cut:
        continue
      n = len(tokenize(p))
      if n <= enc.text_len:
        continue
      seen_cut.add(p)
      if len(seen_cut) <= MAX_CUT_PROMPTS_LISTED:
        warn(f"warning: a prompt of {n} words is cut to the first {enc.text_len} (model.text_len): {p[:60]!r}...")
      else:
        warn(f"warning: more prompts are longer than model.text_len = {enc.text_len} words and are cut; "
             f"no more of them are listed")
  return check


def _warn_stderr(msg):
  import sys
  print(msg, file=sys.stderr, flush=True)


def _bow_encoder(path, text_len, text_dim, strict=False, warn=_warn_stderr) -> TextEncoder:
  from dsa_jax.data.bow_text import BagOfWordsEncoder
  if path == "digits":  # the moving-digits grammar: a fixed encoder needs no file
    from dsa_jax.data.digits import PROMPT_VOCAB
    return _bow_encode_fn(BagOfWordsEncoder(PROMPT_VOCAB, text_len, text_dim, seed=0), strict, warn)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"config.text.path: bag-of-words encoder file {path!r} does not exist")
  with open(path) as f:
    try:
      enc = BagOfWordsEncoder.from_dict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"config.text.path: {path!r} is not a valid encoder JSON: {e}") from e
  if (enc.text_len, enc.text_dim) != (text_len, text_dim):
    raise ValueError(f"config.text.path: encoder {path!r} makes ({enc.text_len}, {enc.text_dim}) contexts, the "
                     f"model expects (text_len, text_dim) = ({text_len}, {text_dim})")
  return _bow_encode_fn(enc, strict, warn)


def _bow_encode_fn(enc, strict: bool, warn) -> TextEncoder:
  """prompts -> contexts through a bag-of-words encoder, reporting (or, strict, refusing) unknown words first."""
  check = _prompt_checker(enc, strict, warn)

  def encode(prompts):
    prompts = _check_prompts(prompts)
    check(prompts)
    return enc.encode(prompts).astype(np.float32)
  return encode


def _umt5_encoder(path, tokenizer_path, text_len, text_dim, warn=_warn_stderr) -> TextEncoder:
  import jax

  from dsa_jax.checkpoint.loading import load_text_encoder
  from dsa_jax.models import umt5
  ucfg, params = load_text_encoder(path)
  if ucfg.d_model != text_dim:
    raise ValueError(f"config.text.path: umT5 at {path!r} has d_model {ucfg.d_model}, model.text_dim is {text_dim}")
  tok = umt5.UMT5Tokenizer(tokenizer_path, max_length=text_len)
  enc_fn = jax.jit(lambda p, ids, mask: umt5.pad_to(umt5.encode(p, ids, mask, ucfg), mask, text_len))

  cut = set()

  def encode(prompts):
    ids, mask = tok(_check_prompts(prompts))
    for p, m in zip(prompts, np.asarray(mask)):
      if m.all() and p not in cut:  # every position used: the prompt may have been cut (the last is EOS)
        cut.add(p)
        warn(f"warning: a prompt fills all {text_len} text tokens (model.text_len) and may be cut: {p[:60]!r}...")
    return np.asarray(enc_fn(params, ids, mask), np.float32)
  return encode


def make_text_encoder(config, *, strict: bool = False, warn=_warn_stderr) -> TextEncoder:
  """Returns prompts -> np.ndarray (B, model.text_len, model.text_dim) float32.

  Encoders with a vocabulary warn (via `warn`, once per word) about unknown words, an error with `strict`; every
  encoder that cuts long prompts warns when it does.
  """
  kind = config.text.kind
  text_len, text_dim = config.model.text_len, config.model.text_dim
  if kind == "random":
    return _random_encoder(text_len, text_dim)
  if kind == "bow":
    return _bow_encoder(config.text.path, text_len, text_dim, strict=strict, warn=warn)
  if kind == "umt5":
    return _umt5_encoder(config.text.path, config.text.tokenizer, text_len, text_dim, warn=warn)
  raise ValueError(f"config.text.kind: expected 'random', 'bow' or 'umt5', got {kind!r}")
