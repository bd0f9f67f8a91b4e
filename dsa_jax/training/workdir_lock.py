"""One trainer per workdir: a lock file WORKDIR/train.lock holding the owner's host and pid.

Two trainers on one workdir would interleave their checkpoints and TensorBoard files. The lock is an OS file lock
(`flock`) on that file, so it disappears with its process however that process dies; the host/pid written into the
file name the owner in the refusal. A lock file left by a dead process (no OS lock held, same host) is taken over
with a message. A lock from another host cannot be probed from here: it is refused, naming the file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import time

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process trains in this workdir."""


class WorkdirLock:
  """`with WorkdirLock(workdir, log):` holds the workdir for this process; `log` receives the takeover message."""

  def __init__(self, workdir: str, log=print):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.log = log
    self._fd = None

  def acquire(self):
    import fcntl
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      owner = self._describe(self._read(fd))
      os.close(fd)
      raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)!r} is in use by another trainer ({owner}); "
                               "wait for it or use another --workdir") from None
    old = self._read(fd)
    host = socket.gethostname()
    if old:
      if old.get("host") != host:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)!r} is locked by {self._describe(old)}, which "
                                 f"cannot be checked from {host}; if that run is dead, delete {self.path}")
      self.log(f"taking over the stale lock of a dead trainer ({self._describe(old)}) in {self.path}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": host, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
                             ).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  @staticmethod
  def _read(fd) -> dict:
    try:
      raw = os.pread(fd, 4096, 0)
      return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
      return {"host": "?", "pid": "?"}

  @staticmethod
  def _describe(info: dict) -> str:
    return f"host {info.get('host', '?')} pid {info.get('pid', '?')}" + (
        f" since {info['since']}" if info.get("since") else "")

  def release(self):
    if self._fd is None:
      return
    import fcntl
    try:
      os.ftruncate(self._fd, 0)  # an empty lock file is not stale
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
