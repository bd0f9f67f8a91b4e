"""Atomic writes: a file or folder appears at its path complete or not at all (a killed run leaves no half file).

Everything that writes outputs goes through here: videos, plots, JSON, datasets, previews, model checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary file path beside `path` (same extension, so writers that pick a format by it work) and
  renames it over `path` when the block succeeds; on an exception the temporary file is removed."""
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  base, ext = os.path.splitext(os.path.basename(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=ext, dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> str:
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return os.fspath(path)


@contextlib.contextmanager
def atomic_dir(path):
  """Yields a temporary folder beside `path`; when the block succeeds it replaces `path` (an existing folder is
  moved aside first and deleted after), else it is deleted."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
  try:
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the usual permissions
    yield tmp
    if os.path.exists(path):
      old = tmp + ".old"  # beside the unique temporary name: never an existing folder of the user's
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_figure(fig, path, *, layout: bool = True, **savefig_kwargs) -> str:
  """Writes a matplotlib figure to `path` atomically (PNG unless `savefig_kwargs` say otherwise), after
  `tight_layout` unless `layout` is false; the caller still closes the figure."""
  if layout:
    fig.tight_layout()
  savefig_kwargs.setdefault("format", "png")
  with atomic_path(path) as tmp:
    fig.savefig(tmp, **savefig_kwargs)
  return os.fspath(path)


def nearest_existing(path) -> str:
  """`path` itself if it exists, else its nearest existing parent: where the folders a writer makes would start (a
  file there means they cannot be made)."""
  path = os.path.abspath(os.fspath(path))
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_file_target(path, option: str):
  """Raises, naming `option`, unless `path` can take a file (not a folder; its nearest existing parent a writable
  folder): checked before long work (a benchmark) whose results a bad path would otherwise lose at its end."""
  if path is None:
    return
  if not str(path).strip():
    raise ValueError(f"{option}: expected a file path, got an empty one")
  full = os.path.abspath(os.fspath(path))
  if os.path.isdir(full):
    raise ValueError(f"{option} {path!r}: is a folder; expected the path of the file to write (e.g. "
                     f"{os.path.join(str(path), 'results.json')!r})")
  parent = nearest_existing(os.path.dirname(full))
  if not os.path.isdir(parent):
    raise ValueError(f"{option} {path!r}: {parent!r} is a file, not a folder; expected a path whose folders can be "
                     "created")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{option} {path!r}: the folder {parent!r} is not writable")
