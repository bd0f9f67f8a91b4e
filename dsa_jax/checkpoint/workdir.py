"""Reading training workdirs: the latest orbax checkpoint of a run, or the model folder it exported.

A training workdir holds `checkpoints/<step>/` written by an orbax `CheckpointManager`. Each step folder has one item
per network ('generator', 'generator_ema', 'head', 'critic', or 'teacher' in the teacher stage) so that a reader
restores only what it needs, plus 'train' (optimiser states, step, rng, d_bar), 'data' (the input pipeline's state),
'config' (the run's config) and 'meta' (stage, step, networks, architectures). Orbax writes a step under a temporary
name and renames it when complete, so an interrupted save is never read.

Inference, evaluation and the trainer (teacher, init_from, critic_from) read through here; writing and resuming a
run's whole state is the trainer's (`dsa_jax.training.checkpointing`). Nothing here imports `dsa_jax.training`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from dsa_jax.checkpoint import params_io
from dsa_jax.checkpoint.params_io import CheckpointError

CKPT_DIR = "checkpoints"
MODEL_DIR = "model"
SAMPLER_NETWORKS = ("generator", "generator_ema", "head")


class TrainCheckpointError(CheckpointError):
  """A training checkpoint is corrupt, incomplete or does not match the config."""


def ocp():
  import orbax.checkpoint as ocp_lib
  return ocp_lib


def arch_meta(config, networks) -> dict:
  """The architecture record of each network under `config` (what params_io.check_arch compares)."""
  from dsa_jax.models import factory
  from dsa_jax.models.confidence import ConfidenceConfig
  arch = {}
  for n in networks:
    if n == "head":
      arch[n] = dataclasses.asdict(ConfidenceConfig.from_config(config))
    else:
      arch[n] = factory.dit_config(config, factory.network_role(n)).to_dict()
  return arch


class _DropReadOnlyNotice:
  def filter(self, record):
    return "read only" not in record.getMessage()


def _quiet_read_only_notice():
  """orbax logs 'Given directory is read only' for every reader: noise for `sample --ckpt WORKDIR`."""
  import contextlib
  import logging

  @contextlib.contextmanager
  def quiet():
    f = _DropReadOnlyNotice()
    logger = logging.getLogger("absl")
    logger.addFilter(f)
    try:
      yield
    finally:
      logger.removeFilter(f)
  return quiet()


class Workdir:
  """A run's `checkpoints/` folder through an orbax `CheckpointManager` (read-only unless `read_only=False`)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = True):
    o = ocp()
    remote = "://" in str(workdir)
    self.workdir = str(workdir).rstrip("/") if remote else os.path.abspath(workdir)
    self.directory = f"{self.workdir}/{CKPT_DIR}" if remote else os.path.join(self.workdir, CKPT_DIR)
    if not remote:
      if not read_only:
        os.makedirs(self.directory, exist_ok=True)
      elif not os.path.isdir(self.directory):
        raise TrainCheckpointError(f"{self.workdir!r} holds no {CKPT_DIR}/ folder (not a training workdir)")
    options = o.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                         save_interval_steps=0 if read_only else 1,
                                         enable_async_checkpointing=async_save, create=not read_only,
                                         cleanup_tmp_directories=not read_only, read_only=read_only)
    with _quiet_read_only_notice():
      self.manager = o.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def _step_dir(self, step: int) -> str:
    return f"{self.directory}/{step}"

  def read_json(self, step: int, name: str) -> Any:
    o = ocp()
    try:
      out = self.manager.restore(step, args=o.args.Composite(**{name: o.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise TrainCheckpointError(f"checkpoint {self._step_dir(step)!r}: item {name!r} could not be read "
                                 f"(corrupt or truncated?): {type(e).__name__}: {e}") from e
    return out[name]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_networks(config, networks, sharding=None, roles: dict | None = None) -> dict:
  """ShapeDtypeStructs of `networks` under `config`'s architecture (network `n` shaped like `roles.get(n, n)`), on
  one local device by default (orbax needs a target sharding when another topology wrote the checkpoint)."""
  from dsa_jax.models import factory
  from dsa_jax.parallel.mesh import unbox
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  roles = roles or {}
  out = {}
  for n in networks:
    boxed = factory.abstract_network(config, roles.get(n, n))
    out[n] = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), unbox(boxed))
  return out


def is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, params_io.META_FILE))


def complete_steps(ck_dir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(ck_dir) if d.isdigit() and os.path.isdir(os.path.join(ck_dir, d)))


def resolve(path: str) -> tuple[str, str]:
  """('model', folder) for a params_io model folder (or a workdir holding only an exported `model/`), else
  ('workdir', path) for a workdir with complete checkpoints."""
  path = os.fspath(path)
  if "://" in path:
    return "workdir", path
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
  if is_model_dir(path):
    return "model", path
  ck_dir = os.path.join(path, CKPT_DIR)
  if not os.path.isdir(ck_dir) or not complete_steps(ck_dir):
    if is_model_dir(os.path.join(path, MODEL_DIR)):
      return "model", os.path.join(path, MODEL_DIR)
    raise TrainCheckpointError(f"{path!r} is neither a model checkpoint (no {params_io.META_FILE}) nor a training "
                               f"workdir with complete checkpoints under {CKPT_DIR}/ or an exported {MODEL_DIR}/")
  return "workdir", path


def stored_networks(path: str, step: int | None = None) -> tuple[list[str], dict]:
  """(names of the networks stored at `path`, their meta) without reading any weights."""
  kind, where = resolve(path)
  if kind == "model":
    meta = params_io.read_meta(where)
    return sorted(set(meta.get("networks", [])) or set(meta.get("arch", {}))), meta
  with _open_step(where, step) as (ck, step):
    meta = ck.read_json(step, "meta")
  return list(meta.get("networks", [])), meta


@contextlib.contextmanager
def _open_step(path: str, step: int | None):
  """(the workdir at `path`, `step`: default its latest complete checkpoint), closed on leaving, errors included:
  an orbax manager left open is closed by the garbage collector after its event loop, which then complains."""
  ck = Workdir(path)
  try:
    step = ck.latest_step() if step is None else step
    if step is None:
      raise TrainCheckpointError(f"{path!r}: no complete checkpoint under {CKPT_DIR}/")
    yield ck, step
  finally:
    ck.close()


def load_model_from_workdir(path: str, config, networks=SAMPLER_NETWORKS, step: int | None = None,
                            roles: dict | None = None) -> tuple[dict, dict]:
  """Params {name: tree} (numpy) and meta from a workdir (latest or `step` checkpoint) or a model folder.

  Architectures are checked against `config` first (network `n` against the config's `roles.get(n, n)`, e.g. a
  stored 'teacher' read as the critic), so a mismatch names the field instead of failing inside orbax. No
  fallbacks here: `dsa_jax.checkpoint.loading.load_networks` decides what substitutes for a missing network.
  """
  networks = tuple(networks)
  roles = roles or {}
  kind, where = resolve(path)
  if kind == "model":
    params, meta = params_io.load_params(where, networks)
    arch = arch_meta(config, [roles.get(n, n) for n in networks])
    for n in networks:
      if n in meta.get("arch", {}):
        params_io.check_arch(meta, n, arch[roles.get(n, n)], where)
    target = abstract_networks(config, networks, roles=roles)
    for n in networks:
      params_io.check_tree_shapes(params[n], target[n], n, where)
    return params, meta
  return _load_from_checkpoints(where, config, networks, step, roles)


def _load_from_checkpoints(path, config, networks, step, roles):
  with _open_step(path, step) as (ck, step):
    meta = ck.read_json(step, "meta")
    missing = [n for n in networks if n not in meta.get("networks", [])]
    if missing:
      raise TrainCheckpointError(f"{ck._step_dir(step)!r} (stage {meta.get('stage')!r}) holds no {missing}; it has "
                                 f"{meta.get('networks')}")
    arch = arch_meta(config, [roles.get(n, n) for n in networks])
    for n in networks:
      params_io.check_arch(meta, n, arch[roles.get(n, n)], ck._step_dir(step))
    o = ocp()
    target = abstract_networks(config, networks, roles=roles)
    try:
      restore = o.args.Composite(**{n: o.args.StandardRestore(target[n]) for n in networks})
      out = ck.manager.restore(step, args=restore)
    except Exception as e:  # pylint: disable=broad-except
      raise TrainCheckpointError(f"checkpoint {ck._step_dir(step)!r} could not be read (corrupt or truncated?): "
                                 f"{type(e).__name__}: {str(e)[:400]}") from e
    params = {n: jax.tree_util.tree_map(np.asarray, out[n]) for n in networks}
    params_io.check_finite(params, ck._step_dir(step))
    try:
      meta["config"] = json.dumps(ck.read_json(step, "config"))
    except TrainCheckpointError:
      pass
    meta["source"] = ck._step_dir(step)
  return params, meta
