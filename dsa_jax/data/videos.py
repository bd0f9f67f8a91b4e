"""Video (or latent) clips for teacher training, stored as ArrayRecord files of self-describing records.

A record is one clip: `video` (F, H, W, C) uint8 / float16 / float32 (frames or VAE latents, channels-last like
the models), its `prompt`, optional per-frame `labels` (F,) int, and optional extra numpy arrays (e.g. the digits
dataset's per-frame digit classes). Encoding: 4-byte little-endian header length, a JSON header (prompt, and for
each array its dtype, shape and byte range), then the raw array bytes. No pickle, so files are safe to read and
independent of the Python/numpy version.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Iterable, Mapping, Sequence, SupportsIndex

import grain
import numpy as np

from dsa_jax import atomic

RECORD_VERSION = 1
VIDEO_DTYPES = ("uint8", "float16", "float32")
_ARRAY_DTYPES = {"uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "float16", "float32", "float64",
                 "bool"}
_RESERVED = ("video", "prompt", "labels")


class VideoRecordError(ValueError):
  """A clip or a record file is malformed; the message names the file/field and what was expected."""


def encode_clip(video: np.ndarray, prompt: str, labels: np.ndarray | None = None,
                extras: Mapping[str, np.ndarray] | None = None) -> bytes:
  """Serialises one clip (validating shapes and dtypes) into record bytes."""
  video = np.asarray(video)
  if video.ndim != 4:
    raise VideoRecordError(f"video: expected a (frames, height, width, channels) array, got shape {video.shape}")
  if video.dtype.name not in VIDEO_DTYPES:
    raise VideoRecordError(f"video: dtype {video.dtype} not supported, expected one of {VIDEO_DTYPES}")
  if not isinstance(prompt, str):
    raise VideoRecordError(f"prompt: expected a str, got {type(prompt).__name__}")
  arrays = {"video": video}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (video.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
      raise VideoRecordError(f"labels: expected an integer array of shape ({video.shape[0]},) (one per frame), got "
                             f"{labels.dtype} {labels.shape}")
    arrays["labels"] = labels.astype(np.int32)
  for key, value in (extras or {}).items():
    if key in _RESERVED:
      raise VideoRecordError(f"extras: key {key!r} is reserved")
    value = np.asarray(value)
    if value.dtype.name not in _ARRAY_DTYPES:
      raise VideoRecordError(f"extras[{key!r}]: dtype {value.dtype} not supported, expected one of "
                             f"{sorted(_ARRAY_DTYPES)}")
    arrays[key] = value
  header = {"version": RECORD_VERSION, "prompt": prompt, "arrays": {}}
  blobs, offset = [], 0
  for key, value in arrays.items():
    blob = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    header["arrays"][key] = {"dtype": value.dtype.name, "shape": list(value.shape), "offset": offset,
                             "nbytes": len(blob)}
    blobs.append(blob)
    offset += len(blob)
  head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  return struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_clip(record: bytes, *, where: str = "record") -> dict[str, Any]:
  """Inverse of `encode_clip`: a dict with `video`, `prompt` and (if stored) `labels` and the extras."""
  try:
    (n,) = struct.unpack_from("<I", record, 0)
    header = json.loads(bytes(record[4:4 + n]).decode("utf-8"))
    if header.get("version") != RECORD_VERSION:
      raise VideoRecordError(f"{where}: record version {header.get('version')!r}, expected {RECORD_VERSION}")
    body = memoryview(record)[4 + n:]
    out: dict[str, Any] = {"prompt": header["prompt"]}
    for key, spec in header["arrays"].items():
      dtype = np.dtype(spec["dtype"]).newbyteorder("<")
      start, size = spec["offset"], spec["nbytes"]
      if start + size > len(body):
        raise VideoRecordError(f"{where}: array {key!r} runs past the end of the record (truncated file?)")
      arr = np.frombuffer(body[start:start + size], dtype=dtype).reshape(spec["shape"])
      out[key] = arr.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order
    return out
  except VideoRecordError:
    raise
  except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise VideoRecordError(f"{where}: not a dsa_jax clip record ({type(e).__name__}: {e})") from None


class VideoRecordWriter:
  """Writes clips to one ArrayRecord file atomically: records go to a temporary file beside it, renamed to
  `path` on close.

  Use as a context manager; an exception inside the block removes the partial file and leaves `path` untouched.
  """

  def __init__(self, path: str | os.PathLike):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    self.path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(parent, exist_ok=True)
    self._atomic = atomic.atomic_path(self.path)
    self._tmp = self._atomic.__enter__()
    self._writer = ArrayRecordWriter(self._tmp, "group_size:1")  # group size 1: fast random access for grain
    self.count = 0

  def write(self, video: np.ndarray, prompt: str, labels: np.ndarray | None = None,
            extras: Mapping[str, np.ndarray] | None = None) -> None:
    self.write_bytes(encode_clip(video, prompt, labels, extras))

  def write_bytes(self, record: bytes) -> None:
    if self._writer is None:
      raise VideoRecordError(f"{self.path}: writer already closed")
    self._writer.write(record)
    self.count += 1

  def close(self) -> None:
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    self._atomic.__exit__(None, None, None)

  def abort(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      err = RuntimeError("write aborted")
      self._atomic.__exit__(RuntimeError, err, None)  # removes the temporary file

  def __enter__(self) -> "VideoRecordWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_clips(path: str | os.PathLike, clips: Iterable[Mapping[str, Any]]) -> int:
  """Writes dicts with `video`, `prompt`, optional `labels` and other arrays (extras); returns the count."""
  with VideoRecordWriter(path) as w:
    for clip in clips:
      extras = {k: v for k, v in clip.items() if k not in _RESERVED}
      w.write(clip["video"], clip["prompt"], clip.get("labels"), extras)
  return w.count


def _expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in paths:
    p = os.fspath(p)
    if os.path.isdir(p):
      found = sorted(glob.glob(os.path.join(p, "*.array_record")))
      if not found:
        raise FileNotFoundError(f"video source: directory {p!r} holds no *.array_record files")
      out.extend(found)
    elif any(ch in p for ch in "*?["):
      found = sorted(glob.glob(p))
      if not found:
        raise FileNotFoundError(f"video source: pattern {p!r} matches no files")
      out.extend(found)
    elif not os.path.isfile(p):
      raise FileNotFoundError(f"video source: file {p!r} does not exist")
    else:
      out.append(p)
  if not out:
    raise FileNotFoundError("video source: no paths given")
  return out


class VideoClipSource(grain.sources.RandomAccessDataSource):
  """Random-access source of decoded clips from ArrayRecord files (a file, a directory, a glob, or a list).

  `src[i]` is a dict: `video` (F, H, W, C) as stored, `prompt` (str), and `labels` / extras if stored.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
    self.paths = _expand_paths(paths)
    for p in self.paths:
      if os.path.getsize(p) == 0:
        raise VideoRecordError(f"video source: file {p!r} is empty")
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError on foreign files
      raise VideoRecordError(f"video source: could not open {self.paths} as ArrayRecord files: {e}") from e
    if len(self._source) == 0:
      raise VideoRecordError(f"video source: {self.paths} hold no records")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, record_key: SupportsIndex) -> dict[str, Any]:
    i = record_key.__index__()
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"video source: index {i} out of range for {len(self)} clips")
    return decode_clip(self._source[i], where=f"{self.paths} record {i}")

  def __getitems__(self, record_keys: Sequence[SupportsIndex]) -> list[dict[str, Any]]:
    return [self[k] for k in record_keys]

  def __repr__(self) -> str:
    return f"VideoClipSource({self.paths}, n={len(self)})"
