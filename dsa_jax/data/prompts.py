"""Prompt sources for data-free (Self Forcing / DMD) training, as grain random-access data sources.

Training needs only text prompts, so every source here is a `grain.sources.RandomAccessDataSource` of `str`:
`len(src)` prompts, `src[i]` the i-th. `dsa_jax.data.pipeline.make_loader` shuffles, shards and batches them.
Bad files fail at construction (not mid-training) with the file name and line number in the message.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence, SupportsIndex

import grain

DEFAULT_MAX_CHARS = 4096  # a prompt longer than this is almost surely a broken file (e.g. a missing newline)


class PromptFileError(ValueError):
  """A prompt file is missing, empty or malformed; the message names the file (and line) and what was expected."""


class PromptFileNotFoundError(PromptFileError, FileNotFoundError):
  """The prompt file does not exist."""


def _check_file(path: str, what: str) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise PromptFileNotFoundError(f"{what} {path!r} does not exist")
  if os.path.isdir(path):
    raise PromptFileError(f"{what} {path!r} is a directory, expected a file")
  return path


def _index(i: SupportsIndex, n: int, owner: str) -> int:
  i = i.__index__()
  if i < 0:
    i += n
  if not 0 <= i < n:
    raise IndexError(f"{owner}: index {i} out of range for {n} prompts")
  return i


class _ListSource(grain.sources.RandomAccessDataSource):
  """A random-access source over an in-memory list of prompts (shared by the file-based sources)."""

  _prompts: list[str]

  def __len__(self) -> int:
    return len(self._prompts)

  def __getitem__(self, record_key: SupportsIndex) -> str:
    return self._prompts[_index(record_key, len(self._prompts), repr(self))]

  def __getitems__(self, record_keys: Sequence[SupportsIndex]) -> list[str]:
    return [self[k] for k in record_keys]

  @property
  def prompts(self) -> list[str]:
    return list(self._prompts)


class ListPromptSource(_ListSource):
  """Prompts given directly (tests, a handful of evaluation prompts)."""

  def __init__(self, prompts: Sequence[str], *, name: str = "<list>"):
    prompts = list(prompts)
    if not prompts:
      raise PromptFileError(f"prompt list {name} is empty")
    for i, p in enumerate(prompts):
      if not isinstance(p, str) or not p.strip():
        raise PromptFileError(f"prompt list {name}: item {i} is {p!r}, expected a non-empty string")
    self._prompts = prompts
    self._name = name

  @property
  def name(self) -> str:
    return self._name

  def __repr__(self) -> str:
    return f"ListPromptSource({self._name}, n={len(self)})"


class TextPromptSource(_ListSource):
  """One prompt per line of a UTF-8 text file; blank lines and lines starting with '#' are skipped."""

  def __init__(self, path: str | os.PathLike, *, max_chars: int = DEFAULT_MAX_CHARS):
    self.path = _check_file(path, "prompt file")
    ext = os.path.splitext(self.path)[1].lower()
    if ext in (".json", ".csv", ".tsv", ".jsonl"):  # read line by line they would give a prompt per raw line
      raise PromptFileError(f"prompt file {self.path!r}: a {ext} file, expected plain text with one prompt per line "
                            "(a CSV column: data.prompts.kind='csv' with data.prompts.column; a JSON prompt schedule: "
                            "--prompt-schedule)")
    with open(self.path, "rb") as f:
      raw = f.read()
    prompts = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
      if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        line = line[3:]
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError as e:
        raise PromptFileError(
            f"prompt file {self.path!r}, line {lineno}: not valid UTF-8 (byte {line[e.start:e.start + 1]!r} at "
            f"column {e.start + 1}); save the file as UTF-8") from None
      text = text.strip()
      if not text or text.startswith("#"):
        continue
      if len(text) > max_chars:
        raise PromptFileError(
            f"prompt file {self.path!r}, line {lineno}: prompt of {len(text)} characters exceeds max_chars="
            f"{max_chars} (one prompt per line expected; is a newline missing?)")
      if "\x00" in text:
        raise PromptFileError(f"prompt file {self.path!r}, line {lineno}: contains a NUL byte (binary file?)")
      prompts.append(text)
    if not prompts:
      raise PromptFileError(
          f"prompt file {self.path!r} holds no prompts (it is empty or has only blank and '#' comment lines)")
    self._prompts = prompts

  def __repr__(self) -> str:
    return f"TextPromptSource({self.path!r}, n={len(self)})"


class CsvPromptSource(_ListSource):
  """The prompts of one named column of a CSV file with a header row (e.g. VidProM's `prompt` column)."""

  def __init__(self, path: str | os.PathLike, column: str, *, max_chars: int = DEFAULT_MAX_CHARS,
               delimiter: str = ","):
    self.path = _check_file(path, "CSV prompt file")
    self.column = column
    with open(self.path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      lineno = raw.count(b"\n", 0, e.start) + 1
      raise PromptFileError(f"CSV prompt file {self.path!r}, line {lineno}: not valid UTF-8; save the file as UTF-8"
                            ) from None
    if not text.strip():
      raise PromptFileError(f"CSV prompt file {self.path!r} is empty (expected a header row naming the columns)")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
      header = next(reader)
    except csv.Error as e:
      raise PromptFileError(f"CSV prompt file {self.path!r}, line 1: {e}") from None
    header = [h.strip() for h in header]
    if column not in header:
      raise PromptFileError(f"CSV prompt file {self.path!r} has no column {column!r}; its columns are {header}")
    col = header.index(column)
    prompts = []
    try:
      for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row):
          continue
        if col >= len(row):
          raise PromptFileError(f"CSV prompt file {self.path!r}, line {lineno}: row has {len(row)} fields, column "
                                f"{column!r} is field {col + 1}")
        value = row[col].strip()
        if not value:
          raise PromptFileError(f"CSV prompt file {self.path!r}, line {lineno}: column {column!r} is empty")
        if len(value) > max_chars:
          raise PromptFileError(f"CSV prompt file {self.path!r}, line {lineno}: prompt of {len(value)} characters "
                                f"exceeds max_chars={max_chars}")
        prompts.append(value)
    except csv.Error as e:
      raise PromptFileError(f"CSV prompt file {self.path!r}, line {reader.line_num}: {e}") from None
    if not prompts:
      raise PromptFileError(f"CSV prompt file {self.path!r} has a header but no rows")
    self._prompts = prompts

  def __repr__(self) -> str:
    return f"CsvPromptSource({self.path!r}, column={self.column!r}, n={len(self)})"


class TfdsPromptSource(grain.sources.RandomAccessDataSource):
  """Prompts from one text feature of a prepared TFDS dataset, read through `tfds.data_source` (ArrayRecord).

  tensorflow_datasets is imported only here, so the rest of the package works without it. No download by default
  (the dataset must already be prepared under `data_dir`).
  """

  def __init__(self, name: str, *, split: str = "train", feature: str = "text", data_dir: str | None = None,
               download: bool = False):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("the 'tfds' prompt source needs tensorflow-datasets (pip install tensorflow-datasets)") from e
    self.name, self.split, self.feature = name, split, feature
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...)
      raise PromptFileError(f"TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}) could not be opened as a "
                            f"data source: {type(e).__name__}: {e}") from e
    if len(self._source) == 0:
      raise PromptFileError(f"TFDS dataset {name!r} split {split!r} is empty")
    first = self._source[0]
    if not isinstance(first, dict) or feature not in first:
      keys = sorted(first) if isinstance(first, dict) else type(first).__name__
      raise PromptFileError(f"TFDS dataset {name!r} has no feature {feature!r}; its features are {keys}")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, record_key: SupportsIndex) -> str:
    i = _index(record_key, len(self), repr(self))
    value = self._source[i][self.feature]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
      value = value.item()
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    if not isinstance(value, str):
      raise PromptFileError(f"TFDS dataset {self.name!r} feature {self.feature!r} at index {i} is "
                            f"{type(value).__name__}, expected text")
    return value

  def __getitems__(self, record_keys: Sequence[SupportsIndex]) -> list[str]:
    return [self[k] for k in record_keys]

  def __repr__(self) -> str:
    return f"TfdsPromptSource({self.name!r}, split={self.split!r}, feature={self.feature!r})"


PROMPT_KINDS = ("text", "csv", "tfds", "embeddings", "digits")


def _get(cfg: Any, key: str, default=None):
  try:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  except (AttributeError, KeyError):
    value = default
  return default if value is None else value


def prompt_source_from_config(cfg) -> grain.sources.RandomAccessDataSource:
  """Builds a prompt source from a config section (an ml_collections.ConfigDict or a dict).

  Fields: `kind` ('text' | 'csv' | 'tfds' | 'embeddings'), `path` (text, csv, embeddings), `column` (csv),
  `name`, `split`, `feature`, `data_dir` (tfds), optional `max_chars`, and for 'embeddings' optional
  `text_len`, `dtype` (passed to `dsa_jax.data.text_embeddings.TextEmbeddingSource`). Text sources yield `str`;
  the embeddings source yields dicts (prompt, context, length).
  """
  kind = _get(cfg, "kind")
  if kind not in PROMPT_KINDS:
    raise PromptFileError(f"config.data.prompts.kind: expected one of {PROMPT_KINDS}, got {kind!r}")
  max_chars = int(_get(cfg, "max_chars", DEFAULT_MAX_CHARS))

  def need(field):
    value = _get(cfg, field)
    if value in (None, ""):
      raise PromptFileError(f"config.data.prompts.{field}: required for kind={kind!r}")
    return value

  if kind == "text":
    return TextPromptSource(need("path"), max_chars=max_chars)
  if kind == "csv":
    return CsvPromptSource(need("path"), need("column"), max_chars=max_chars)
  if kind == "tfds":
    return TfdsPromptSource(need("name"), split=_get(cfg, "split", "train"), feature=_get(cfg, "feature", "text"),
                            data_dir=_get(cfg, "data_dir"), download=bool(_get(cfg, "download", False)))
  if kind == "digits":
    from dsa_jax.data.digits import DigitsPromptSource  # pylint: disable=g-import-not-at-top
    return DigitsPromptSource(int(_get(cfg, "num", 100_000)), split=_get(cfg, "split", "train"),
                              seed=int(_get(cfg, "seed", 0)), frames=int(_get(cfg, "frames", 16)),
                              size=int(_get(cfg, "size", 32)))
  # kind == "embeddings": precomputed text embeddings (ArrayRecord), owned by dsa_jax.data.text_embeddings.
  from dsa_jax.data.text_embeddings import TextEmbeddingSource  # pylint: disable=g-import-not-at-top
  return TextEmbeddingSource(need("path"), text_len=_get(cfg, "text_len"), dtype=_get(cfg, "dtype"))
