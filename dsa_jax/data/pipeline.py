"""Grain input pipeline: deterministic shuffling, per-host sharding, batching, resumable iterator state.

The global example stream is `source` shuffled by `seed` (reshuffled each epoch) and repeated; it does not depend
on the number of hosts. Host h of c takes the stream's elements h, h + c, h + 2c, ... starting at the position
where the run (or the restored checkpoint) stands, so the c per-host batches of step j together are exactly the
global elements [j·B·c, (j+1)·B·c). Consequently the iterator state is one number, the global position, valid
on any host: a resumed run sees exactly the batches it would have seen, even with a different number of hosts
(if the global batch size is unchanged). With filtering transforms the per-host positions can drift apart; then
the state is per host and must be restored with the same host layout.

Every host yields the same number of batches (the stream is cut to a multiple of the host count), so a finite
run cannot deadlock in a collective because one host ran out of data first.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Sequence

import grain
import jax
import numpy as np

STATE_VERSION = 1
Transform = Callable[[Any], Any] | grain.transforms.Map | grain.transforms.RandomMap | grain.transforms.Filter


class DataStateError(ValueError):
  """A saved iterator state does not fit this loader (different data, seed or host layout)."""


def _is_filter(t) -> bool:
  return isinstance(t, grain.transforms.Filter)


def _apply_transform(ds: grain.MapDataset, t) -> grain.MapDataset:
  if isinstance(t, (grain.transforms.Map, grain.transforms.RandomMap, grain.transforms.Filter,
                    grain.transforms.MapWithIndex)):
    return ds.apply(t)
  if callable(t):
    return ds.map(t)
  raise TypeError(f"transforms: {t!r} is neither a callable nor a grain transform")


class Loader(grain.DatasetIterator):
  """Iterator of per-host batches with a JSON-able, resumable state (also usable with grain's orbax handler).

  Build with `make_loader`. `next(loader)` returns a batch (a pytree of numpy arrays with a leading batch axis of
  `batch_size`; strings become numpy string arrays). `get_state()` / `set_state()` save and restore the position.
  """

  def __init__(self, source, *, batch_size: int, seed: int, shuffle: bool, num_epochs: int | None,
               shard_index: int, shard_count: int, transforms: Sequence[Transform], drop_remainder: bool,
               num_threads: int, prefetch_buffer_size: int, batch_fn: Callable | None):
    super().__init__()
    self._source = source
    self._len = len(source)
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.num_epochs, self.shard_index, self.shard_count = num_epochs, shard_index, shard_count
    self._transforms = tuple(transforms)
    self._has_filter = any(_is_filter(t) for t in self._transforms)
    self._drop_remainder = drop_remainder
    self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    self._batch_fn = batch_fn
    self._global = self._global_stream()
    self._build(start=0)

  # The global stream: shuffled per epoch, repeated, transformed; identical on every host. Transforms act on the
  # global stream (lazily, only on the elements a host reads) so that a RandomMap's per-element randomness depends
  # on the element's global position, not on the host layout or the point where a run was resumed.
  def _global_stream(self) -> grain.MapDataset:
    ds = grain.MapDataset.source(self._source).seed(self.seed)
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed)
    ds = ds.repeat(self.num_epochs)
    for t in self._transforms:
      ds = _apply_transform(ds, t)
    return ds

  def _build(self, start: int, inner_state: dict[str, Any] | None = None) -> None:
    if getattr(self, "_it", None) is not None:
      self._it.close()
    total = len(self._global)  # sys.maxsize when repeating forever
    per_host = max(total - start, 0) // self.shard_count
    ds = self._global[start + self.shard_index::self.shard_count][:per_host]
    it_ds = ds.to_iter_dataset(self._read_options).batch(self.batch_size, drop_remainder=self._drop_remainder,
                                                         batch_fn=self._batch_fn)
    self._start = start
    self._it = iter(it_ds)
    if inner_state is not None:
      self._it.set_state(inner_state)

  def __next__(self):
    self._assert_not_closed()
    return next(self._it)

  def _next_index(self) -> int:
    state = self._it.get_state()
    if "next_index" not in state:
      raise DataStateError(f"unexpected grain iterator state {state}")
    return int(state["next_index"])

  def get_state(self) -> dict[str, Any]:
    """JSON-able state; `position` is the global stream position (valid on any host when there are no filters)."""
    n = self._next_index()
    return {
        "version": STATE_VERSION,
        "position": self._start + n * self.shard_count,
        "start": self._start,
        "host_next_index": n,
        "shard_index": self.shard_index,
        "shard_count": self.shard_count,
        "seed": self.seed,
        "shuffle": self.shuffle,
        "num_epochs": self.num_epochs,
        "source_len": self._len,
        "batch_size": self.batch_size,
        "has_filter": self._has_filter,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a `get_state()` result; checks that it belongs to the same data, seed and shuffling."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise DataStateError(f"data iterator state: expected a dict with version {STATE_VERSION}, got {state!r:.200}")
    for key, mine in (("source_len", self._len), ("seed", self.seed), ("shuffle", self.shuffle),
                      ("num_epochs", self.num_epochs)):
      if state.get(key) != mine:
        raise DataStateError(f"data iterator state: saved with {key}={state.get(key)!r} but this loader has "
                             f"{key}={mine!r}; the resumed run would not see the same batches")
    if self._has_filter or state.get("has_filter"):
      if (state["shard_index"], state["shard_count"]) != (self.shard_index, self.shard_count):
        raise DataStateError(
            "data iterator state: saved by host {}/{} with filtering transforms, cannot be restored on host {}/{} "
            "(with filters each host's position is its own)".format(state["shard_index"], state["shard_count"],
                                                                      self.shard_index, self.shard_count))
      self._build(int(state["start"]), {"next_index": int(state["host_next_index"])})
    else:
      self._build(int(state["position"]))

  def start_prefetch(self) -> None:
    """Starts reading ahead now (e.g. before restoring the model, to hide the first batch's latency)."""
    self._it.start_prefetch()

  def close(self) -> None:
    if not self._closed and getattr(self, "_it", None) is not None:
      self._it.close()
    super().close()

  def __repr__(self) -> str:
    return (f"Loader(n={self._len}, batch_size={self.batch_size}, seed={self.seed}, shuffle={self.shuffle}, "
            f"num_epochs={self.num_epochs}, shard={self.shard_index}/{self.shard_count})")


def make_loader(source, *, batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int | None = None, shard_count: int | None = None,
                transforms: Iterable[Transform] = (), drop_remainder: bool = True, num_threads: int = 4,
                prefetch_buffer_size: int | None = None, batch_fn: Callable | None = None) -> Loader:
  """A resumable iterator of per-host batches over a random-access `source` (a grain source or a sequence).

  Args:
    source: anything with `__len__` and `__getitem__` (prompt sources, `VideoClipSource`, a list).
    batch_size: examples per batch on THIS host (the global batch is batch_size * shard_count).
    seed: shuffling seed (and the default seed of `grain.transforms.RandomMap` transforms).
    shuffle: shuffle globally, differently in every epoch.
    num_epochs: None repeats forever.
    shard_index, shard_count: this host's slot; default `jax.process_index()` / `jax.process_count()`.
    transforms: per-example callables or grain `Map` / `RandomMap` / `Filter` / `MapWithIndex` transforms,
      applied in order to the global stream (a RandomMap's randomness follows the element's global position;
      `MapWithIndex` sees the global stream index).
    drop_remainder: drop a last partial batch (keeps shapes static for jit).
    num_threads, prefetch_buffer_size: grain read threads and element prefetch buffer (default 2 batches).
    batch_fn: how to combine examples (default: stack the leaves of the pytree).
  """
  if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
    raise TypeError(f"make_loader: source must support len() and indexing, got {type(source).__name__}")
  n = len(source)
  if n == 0:
    raise ValueError(f"make_loader: source {source!r:.200} is empty")
  if not (isinstance(batch_size, int) and batch_size > 0):
    raise ValueError(f"make_loader: batch_size must be a positive int, got {batch_size!r}")
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
    raise ValueError(f"make_loader: seed must be an int in [0, 2**32), got {seed!r}")
  if num_epochs is not None and not (isinstance(num_epochs, int) and num_epochs > 0):
    raise ValueError(f"make_loader: num_epochs must be None or a positive int, got {num_epochs!r}")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not (isinstance(shard_count, int) and shard_count > 0 and isinstance(shard_index, int)
          and 0 <= shard_index < shard_count):
    raise ValueError(f"make_loader: need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}")
  if num_epochs is not None and drop_remainder and (n * num_epochs) // shard_count < batch_size:
    raise ValueError(f"make_loader: {n} examples x {num_epochs} epochs over {shard_count} hosts give fewer than "
                     f"batch_size={batch_size} examples per host; no batch would be produced")
  if prefetch_buffer_size is None:
    prefetch_buffer_size = max(2 * batch_size, 8)
  return Loader(source, batch_size=batch_size, seed=int(seed), shuffle=shuffle, num_epochs=num_epochs,
                shard_index=shard_index, shard_count=shard_count, transforms=list(transforms),
                drop_remainder=drop_remainder, num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size,
                batch_fn=batch_fn)


def state_to_bytes(state: dict[str, Any]) -> bytes:
  """Iterator state -> bytes (UTF-8 JSON), for checkpoint formats that want bytes."""
  return json.dumps(state, sort_keys=True).encode("utf-8")


def state_from_bytes(data: bytes) -> dict[str, Any]:
  try:
    return json.loads(bytes(data).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataStateError(f"data iterator state: not valid JSON bytes ({e})") from None


def _is_numeric(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic, jax.Array)) and (
      np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_))


def make_global_batch(batch, sharding: jax.sharding.Sharding, *, global_batch_size: int | None = None):
  """Turns a host's batch (pytree of numpy arrays) into global `jax.Array`s laid out by `sharding`.

  Each host passes its own rows; with a `NamedSharding` whose spec splits axis 0 over the data axes, the global
  batch is the concatenation of all hosts' batches (`jax.make_array_from_process_local_data`). Non-numeric leaves
  (e.g. prompt strings) are returned unchanged (host-local). `global_batch_size` defaults to
  local rows x `jax.process_count()`.
  """
  def to_global(x):
    if not _is_numeric(x):
      return x
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("make_global_batch: scalar leaves cannot be sharded over the batch axis")
    rows = global_batch_size if global_batch_size is not None else x.shape[0] * jax.process_count()
    global_shape = (rows,) + x.shape[1:]
    try:
      return jax.make_array_from_process_local_data(sharding, x, global_shape)
    except ValueError as e:
      raise ValueError(f"make_global_batch: local batch of shape {x.shape} does not fit global shape {global_shape} "
                       f"under {sharding}: {e}") from e

  return jax.tree_util.tree_map(to_global, batch)
