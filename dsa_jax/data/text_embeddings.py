"""Precomputed umT5 prompt embeddings in an ArrayRecord file, so that training needs no text encoder on device.

Training is data-free (prompts only), and umT5-XXL is 5.7B parameters: encoding every prompt once, offline, and
reading (L, 4096) arrays during training keeps the accelerator for the DiT. Each record is one prompt, a msgpack
map with the prompt, its token count, the padded length it was written for, and the embedding of its valid
tokens only (zeros are not stored; the reader pads back). Records are written with group_size 1 for cheap random
access by grain.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

__all__ = [
    "TextEmbeddingFileError",
    "TextEmbeddingWriter",
    "TextEmbeddingSource",
    "write_text_embeddings",
    "read_text_embeddings",
    "encode_prompts_to_arrayrecord",
]

FORMAT = "dsa_jax.text_embedding/1"


class TextEmbeddingFileError(ValueError):
  """A text-embedding ArrayRecord file is unreadable or holds a record of another format."""


def _dtype_name(dt: np.dtype) -> str:
  return np.dtype(dt).name  # "float32", "bfloat16" (ml_dtypes registers the name), ...


def _dtype_from_name(name: Any) -> np.dtype:
  """np.dtype from a dtype, a type or a name; "bfloat16"/"float8_*" names resolve through ml_dtypes."""
  if not isinstance(name, str):
    return np.dtype(name)
  try:
    return np.dtype(name)
  except TypeError:
    import ml_dtypes  # noqa: PLC0415 - only for bfloat16/float8 payloads
    if not hasattr(ml_dtypes, name):
      raise ValueError(f"unknown dtype name {name!r}") from None
    return np.dtype(getattr(ml_dtypes, name))


def _array_record():
  try:
    from array_record.python import array_record_module  # noqa: PLC0415
  except ImportError as e:
    raise ImportError("text embeddings need the array_record package (pip install array-record)") from e
  return array_record_module


def _encode_record(prompt: str, context: np.ndarray, text_len: int) -> bytes:
  context = np.ascontiguousarray(context)
  return msgpack.packb({
      "format": FORMAT, "prompt": prompt, "length": int(context.shape[0]), "text_len": int(text_len),
      "dtype": _dtype_name(context.dtype), "shape": list(context.shape), "data": context.tobytes(),
  }, use_bin_type=True)


def _decode_record(raw: bytes, path: str, index: int) -> dict[str, Any]:
  try:
    rec = msgpack.unpackb(raw, raw=False)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
      raise ValueError(f"format tag {rec.get('format') if isinstance(rec, dict) else None!r}, expected "
                       f"{FORMAT!r}")
    dt = _dtype_from_name(rec["dtype"])
    ctx = np.frombuffer(rec["data"], dtype=dt).reshape(rec["shape"])
    if ctx.ndim != 2 or ctx.shape[0] != rec["length"]:
      raise ValueError(f"context shape {ctx.shape} does not match length {rec['length']}")
    return {"prompt": rec["prompt"], "context": ctx, "length": int(rec["length"]),
            "text_len": int(rec["text_len"])}
  except Exception as e:  # msgpack/numpy raise many types for corrupt payloads
    raise TextEmbeddingFileError(f"{path}: record {index} is corrupt or not a text embedding ({e})") from e


class TextEmbeddingWriter:
  """Streams records to `path` (atomically: a temporary file in the same folder, renamed on close).

  Use as a context manager; on an exception the temporary file is removed and `path` is left untouched.
  """

  def __init__(self, path: str, text_len: int | None = None):
    self.path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"folder for text embeddings does not exist: {folder}")
    self.text_len = text_len
    fd, self._tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    self._writer = _array_record().ArrayRecordWriter(self._tmp, "group_size:1")
    if not self._writer.ok():
      os.unlink(self._tmp)
      raise OSError(f"cannot open {self._tmp} for writing text embeddings")
    self.count = 0
    self.dim: int | None = None

  def write(self, prompt: str, context: np.ndarray, length: int | None = None, text_len: int | None = None):
    """Adds one prompt. `context` (L, d); only its first `length` rows (default all) are stored."""
    if not isinstance(prompt, str):
      raise ValueError(f"text embedding prompt must be str, got {type(prompt).__name__}")
    context = np.asarray(context)
    if context.ndim != 2:
      raise ValueError(f"text embedding context must be (L, d), got shape {context.shape} for {prompt!r}")
    length = context.shape[0] if length is None else int(length)
    if not 0 <= length <= context.shape[0]:
      raise ValueError(f"text embedding length {length} outside [0, {context.shape[0]}] for {prompt!r}")
    if self.dim is None:
      self.dim = context.shape[1]
    elif context.shape[1] != self.dim:
      raise ValueError(f"text embedding width {context.shape[1]} differs from earlier records ({self.dim})")
    text_len = text_len or self.text_len or context.shape[0]
    if length > text_len:
      raise ValueError(f"text embedding length {length} exceeds text_len {text_len} for {prompt!r}")
    self._writer.write(_encode_record(prompt, context[:length], text_len))
    self.count += 1

  def close(self):
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    os.replace(self._tmp, self.path)

  def abort(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if os.path.exists(self._tmp):
      os.unlink(self._tmp)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()
    return False


def write_text_embeddings(path: str, prompts: Sequence[str], embeddings, lengths: Sequence[int] | None = None,
                          text_len: int | None = None) -> str:
  """Writes prompts with their embeddings.

  embeddings: (N, L, d) array (zero-padded; `lengths` gives each prompt's valid tokens) or a list of (L_i, d)
  arrays. text_len (default: L, or the longest L_i) is the length the reader pads back to.
  """
  n = len(prompts)
  if len(embeddings) != n:
    raise ValueError(f"write_text_embeddings: {n} prompts but {len(embeddings)} embeddings")
  if lengths is not None and len(lengths) != n:
    raise ValueError(f"write_text_embeddings: {n} prompts but {len(lengths)} lengths")
  if text_len is None:
    text_len = max((np.shape(e)[0] for e in embeddings), default=1)
  with TextEmbeddingWriter(path, text_len) as w:
    for i in range(n):
      w.write(prompts[i], np.asarray(embeddings[i]), None if lengths is None else int(lengths[i]))
  return path


class TextEmbeddingSource:
  """Random-access reader of a text-embedding file; satisfies grain's `RandomAccessDataSource` protocol.

  `source[i]` -> dict(prompt=str, context=(text_len, d) array zero beyond `length`, length=int). text_len
  defaults to the one each record was written with; `text_len=0` returns unpadded (length, d) arrays.
  `dtype` casts the context (default: the stored dtype). Pickles without its open file (grain workers).
  """

  def __init__(self, path: str, text_len: int | None = None, dtype: Any = None):
    self.path = os.fspath(path)
    self.text_len = text_len
    self.dtype = None if dtype is None else _dtype_from_name(dtype)
    self._reader = None
    self._open()

  def _open(self):
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"text embedding file not found: {self.path}")
    reader = _array_record().ArrayRecordReader(self.path, "readahead_buffer_size:0,max_parallelism:0")
    if not reader.ok():
      raise TextEmbeddingFileError(f"{self.path}: not a readable ArrayRecord file (corrupt or truncated)")
    self._reader = reader
    self._len = int(reader.num_records())

  def __len__(self) -> int:
    return self._len

  def _records(self, indices: Sequence[int]) -> list[bytes]:
    if self._reader is None:
      self._open()
    try:
      return self._reader.read(list(indices))
    except Exception as e:  # riegeli errors surface as RuntimeError/ValueError
      raise TextEmbeddingFileError(f"{self.path}: cannot read records {list(indices)[:8]} ({e})") from e

  def _finish(self, rec: dict[str, Any]) -> dict[str, Any]:
    ctx = rec["context"]
    target = rec["text_len"] if self.text_len is None else self.text_len
    if target:
      if rec["length"] > target:
        ctx = ctx[:target]
      out = np.zeros((target, ctx.shape[1]), ctx.dtype)
      out[: ctx.shape[0]] = ctx
      ctx = out
    else:
      ctx = np.array(ctx)  # own the memory (frombuffer views are read-only)
    if self.dtype is not None:
      ctx = ctx.astype(self.dtype)
    return {"prompt": rec["prompt"], "context": ctx, "length": min(rec["length"], ctx.shape[0])}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += self._len
    if not 0 <= index < self._len:
      raise IndexError(f"{self.path}: index {index} out of range for {self._len} records")
    (raw,) = self._records([index])
    return self._finish(_decode_record(raw, self.path, index))

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    return [self._finish(_decode_record(r, self.path, i)) for i, r in zip(indices, self._records(indices))]

  def __repr__(self) -> str:
    return f"TextEmbeddingSource({self.path!r}, records={self._len})"

  def close(self):
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)


def read_text_embeddings(path: str, text_len: int | None = None, dtype: Any = None) -> list[dict[str, Any]]:
  """Every record of a file, in order (small files; use TextEmbeddingSource for training)."""
  src = TextEmbeddingSource(path, text_len, dtype)
  try:
    return [src[i] for i in range(len(src))]
  finally:
    src.close()


def encode_prompts_to_arrayrecord(tokenizer, params, config, prompts: Iterable[str], out_path: str,
                                  batch_size: int = 8, text_len: int | None = None, store_dtype: Any = None,
                                  length_multiple: int = 64, progress=None) -> int:
  """Encodes prompts with umT5 and writes them to `out_path`; returns the number of records.

  Each batch is cut to the longest prompt rounded up to `length_multiple` (padding keys are masked, so the
  valid positions do not depend on the padded length) and the last batch is filled with empty prompts, so at
  most max_length/length_multiple programs are compiled. `store_dtype` (e.g. "bfloat16") halves the file.
  """
  import functools  # noqa: PLC0415
  import jax  # noqa: PLC0415
  from dsa_jax.models.umt5 import encode  # noqa: PLC0415

  if batch_size < 1:
    raise ValueError(f"encode_prompts_to_arrayrecord: batch_size must be >= 1, got {batch_size}")
  prompts = list(prompts)
  max_length = tokenizer.max_length
  text_len = config.text_len if text_len is None else int(text_len)
  fn = jax.jit(functools.partial(encode, config=config))
  with TextEmbeddingWriter(out_path, text_len) as w:
    for start in range(0, len(prompts), batch_size):
      batch = prompts[start:start + batch_size]
      ids, mask = tokenizer(batch + [""] * (batch_size - len(batch)), max_length=max_length)
      longest = int(mask.sum(-1).max())
      cut = min(max_length, -(-longest // length_multiple) * length_multiple)
      emb = np.asarray(jax.device_get(fn(params, ids[:, :cut], mask[:, :cut])))
      lengths = mask.sum(-1)
      if store_dtype is not None:
        emb = emb.astype(_dtype_from_name(store_dtype))
      for j, p in enumerate(batch):
        w.write(p, emb[j], min(int(lengths[j]), text_len), text_len)
      if progress is not None:
        progress(start + len(batch), len(prompts))
  return len(prompts)
