"""Training checkpoints with orbax, and model export (DESIGN 1.4, issue 5 item 4).

A training workdir holds `checkpoints/<step>/` written by an orbax `CheckpointManager` (async saves, keep-N). Each
step folder has one item per network ('generator', 'generator_ema', 'head', 'critic', or 'teacher' in the teacher
stage) so that a sampler reads only what it needs, plus 'train' (optimiser states, step, rng, d_bar), 'data' (the
grain iterator state, JSON), 'config' (the run's config, JSON) and 'meta' (stage, step, architectures).

Saving is atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a run killed
mid-save leaves a temporary folder that `latest_step` ignores (and the next manager removes): the run resumes from
the last complete checkpoint. A complete but damaged checkpoint raises `TrainCheckpointError` naming the step
folder. Restoring takes the target shardings from the *current* mesh, so a run saved on 8 devices resumes on 4.

`load_model_from_workdir` gives the sampler the generator / EMA / head of a workdir (latest checkpoint, or an
exported model folder); `export_model` writes a `params_io` model checkpoint (WORKDIR/model at the end of training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import jax
import numpy as np

from dsa_jax.checkpoint import params_io
from dsa_jax.checkpoint.params_io import CheckpointError
from dsa_jax.training import state as state_lib

CKPT_DIR = "checkpoints"
MODEL_DIR = "model"
TRAIN_FIELDS = ("step", "rng", "dbar", "gen_opt", "head_opt", "critic_opt", "teacher_opt")
SAMPLER_NETWORKS = ("generator", "generator_ema", "head")


class TrainCheckpointError(CheckpointError):
  """A training checkpoint is corrupt, incomplete or does not match the config."""


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


def arch_meta(config, networks) -> dict:
  from dsa_jax.models import factory
  from dsa_jax.models.confidence import ConfidenceConfig
  import dataclasses
  arch = {}
  for n in networks:
    if n == "head":
      arch[n] = dataclasses.asdict(ConfidenceConfig.from_config(config))
    else:
      role = {"generator": "model", "generator_ema": "model", "critic": "critic", "teacher": "teacher"}[n]
      arch[n] = factory.dit_config(config, role).to_dict()
  return arch


def _split_state(state: state_lib.TrainState) -> dict:
  items = {n: v for n, v in state.networks().items()}
  items["train"] = {k: getattr(state, k) for k in TRAIN_FIELDS if getattr(state, k) is not None}
  return items


def _join_state(items: dict) -> state_lib.TrainState:
  kw = dict(items["train"])
  kw.update({n: items[n] for n in state_lib.NETWORK_FIELDS if n in items})
  return state_lib.TrainState(**kw)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for TrainStates (all processes call every method)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    ocp = _ocp()
    remote = "://" in str(workdir)
    self.workdir = str(workdir).rstrip("/") if remote else os.path.abspath(workdir)
    self.directory = f"{self.workdir}/{CKPT_DIR}" if remote else os.path.join(self.workdir, CKPT_DIR)
    if not remote:
      if not read_only:
        os.makedirs(self.directory, exist_ok=True)
      elif not os.path.isdir(self.directory):
        raise TrainCheckpointError(f"{self.workdir!r} holds no {CKPT_DIR}/ folder (not a training workdir)")
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                           save_interval_steps=0 if read_only else 1,
                                           enable_async_checkpointing=async_save, create=not read_only,
                                           cleanup_tmp_directories=not read_only, read_only=read_only)
    with _quiet_read_only_notice():
      self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: state_lib.TrainState, *, config, data_state: dict | None = None,
           extra_meta: dict | None = None) -> bool:
    ocp = _ocp()
    items = _split_state(state)
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    meta = {"stage": config.train.stage, "step": int(step), "networks": sorted(state.networks()),
            "arch": arch_meta(config, state.networks()), "format": "dsa_jax.train/1"}
    meta.update(extra_meta or {})
    args["meta"] = ocp.args.JsonSave(meta)
    args["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    args["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
    return self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)

  def _step_dir(self, step: int) -> str:
    return f"{self.directory}/{step}"

  def read_json(self, step: int, name: str) -> Any:
    ocp = _ocp()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise TrainCheckpointError(f"checkpoint {self._step_dir(step)!r}: item {name!r} could not be read "
                                 f"(corrupt or truncated?): {type(e).__name__}: {e}") from e
    return out[name]

  def restore(self, step: int, target: state_lib.TrainState, *, config=None) -> tuple[state_lib.TrainState, dict]:
    """Restores the state into `target` (ShapeDtypeStructs with the new shardings); returns (state, data_state)."""
    ocp = _ocp()
    meta = self.read_json(step, "meta")
    if config is not None:
      _check_meta(meta, config, self._step_dir(step))
    items = _split_state(target)
    args = {k: ocp.args.StandardRestore(v) for k, v in items.items()}
    args["data"] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      raise TrainCheckpointError(
          f"checkpoint {self._step_dir(step)!r} could not be restored ({type(e).__name__}: {str(e)[:400]}). It is "
          "corrupt or does not match the config; delete that folder to resume from the previous checkpoint") from e
    state = _join_state({k: out[k] for k in items})
    return state, (out["data"] or None)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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


def _check_meta(meta: dict, config, where: str):
  stage = config.train.stage
  if meta.get("stage") != stage:
    raise TrainCheckpointError(f"{where}: saved by stage {meta.get('stage')!r}, this run is stage {stage!r} "
                               "(use a new workdir per stage; --config.train.init_from=OLD_WORKDIR starts from it)")
  expected = arch_meta(config, meta.get("networks", []))
  for n, arch in expected.items():
    params_io.check_arch(meta, n, arch, where)


# ----------------------------------------------------------------------------------------------------------------------
# Models for sampling / next stages


def _abstract_networks(config, networks, sharding=None) -> dict:
  """ShapeDtypeStructs of `networks` under `config`'s architecture, on one local device by default (orbax needs a
  target sharding when the checkpoint was written by another topology, e.g. a multi-host run)."""
  from dsa_jax.parallel.mesh import unbox
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  out = {}
  for n in networks:
    name = "generator" if n == "generator_ema" else n
    boxed = jax.eval_shape(lambda k, name=name: state_lib._init_network(config, name, k), jax.random.PRNGKey(0))
    out[n] = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), unbox(boxed))
  return out


def _is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, params_io.META_FILE))


def load_model_from_workdir(path: str, config, networks=SAMPLER_NETWORKS, step: int | None = None
                            ) -> tuple[dict, dict]:
  """Params {'generator', 'generator_ema', 'head'} (numpy) and meta from a workdir or an exported model folder.

  A workdir with checkpoints gives its latest (or `step`) checkpoint; without checkpoints, its exported
  `model/` folder; a folder with `dsa_meta.json` is read with `params_io`. Architectures are checked against
  `config` first, so a mismatch names the field instead of failing inside orbax.
  """
  path = os.fspath(path)
  networks = tuple(networks)
  if "://" in path:
    return _load_from_checkpoints(path, config, networks, step)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
  if _is_model_dir(path):
    params, meta = params_io.load_params(path, networks)
    _check_loaded(params, meta, config, networks, path)
    return params, meta
  ck_dir = os.path.join(path, CKPT_DIR)
  if not os.path.isdir(ck_dir) or not _complete_steps(ck_dir):
    if _is_model_dir(os.path.join(path, MODEL_DIR)):
      return load_model_from_workdir(os.path.join(path, MODEL_DIR), config, networks)
    raise TrainCheckpointError(f"{path!r} is neither a model checkpoint (no {params_io.META_FILE}) nor a training "
                               f"workdir with complete checkpoints under {CKPT_DIR}/ or an exported {MODEL_DIR}/")
  return _load_from_checkpoints(path, config, networks, step)


def _load_from_checkpoints(path, config, networks, step):
  ck = Checkpointer(path, read_only=True)
  step = ck.latest_step() if step is None else step
  if step is None:
    raise TrainCheckpointError(f"{path!r}: no complete checkpoint under {CKPT_DIR}/")
  meta = ck.read_json(step, "meta")
  missing = [n for n in networks if n not in meta.get("networks", [])]
  if missing:
    raise TrainCheckpointError(f"{ck._step_dir(step)!r} (stage {meta.get('stage')!r}) holds no {missing}; it has "
                               f"{meta.get('networks')}")
  arch = arch_meta(config, networks)
  for n in networks:
    params_io.check_arch(meta, n, arch[n], ck._step_dir(step))
  ocp = _ocp()
  target = _abstract_networks(config, networks)
  try:
    out = ck.manager.restore(step, args=ocp.args.Composite(**{n: ocp.args.StandardRestore(target[n])
                                                             for n in networks}))
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


def _complete_steps(ck_dir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(ck_dir) if d.isdigit() and os.path.isdir(os.path.join(ck_dir, d)))


def _check_loaded(params, meta, config, networks, path):
  arch = arch_meta(config, networks)
  for n in networks:
    if n in meta.get("arch", {}):
      params_io.check_arch(meta, n, arch[n], path)
  target = _abstract_networks(config, networks)
  for n in networks:
    params_io.check_tree_shapes(params[n], target[n], n, path)


def export_networks(state_or_params, config, out_dir: str, *, step: int | None = None, source: str = "") -> str:
  """Writes a params_io model checkpoint from a TrainState (or {name: params}) of this process (single host)."""
  if isinstance(state_or_params, state_lib.TrainState):
    nets = state_or_params.networks()
    step = int(jax.device_get(state_or_params.step)) if step is None else step
  else:
    nets = dict(state_or_params)
  stage = config.train.stage
  names = ("teacher",) if stage == "teacher" else tuple(n for n in SAMPLER_NETWORKS if n in nets)
  host = {n: jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), nets[n]) for n in names}
  meta = {"arch": arch_meta(config, names), "config": config.to_json_best_effort(), "stage": stage,
          "step": step, "source": source}
  return params_io.save_params(out_dir, host, meta)


def export_model(workdir_or_state, out_dir: str, config=None, step: int | None = None) -> str:
  """Exports the model of a training workdir (latest checkpoint) or of an in-memory TrainState to `out_dir`.

  From a workdir the config is read from the checkpoint unless given. Multi-host runs call `export_in_subprocess`
  (one process restores from the workdir on CPU and writes).
  """
  if isinstance(workdir_or_state, state_lib.TrainState):
    if config is None:
      raise ValueError("export_model: pass the config along with a TrainState")
    return export_networks(workdir_or_state, config, out_dir, step=step)
  workdir = os.fspath(workdir_or_state)
  ck = Checkpointer(workdir, read_only=True)
  step = ck.latest_step() if step is None else step
  if step is None:
    raise TrainCheckpointError(f"{workdir!r}: no complete checkpoint under {CKPT_DIR}/ to export")
  if config is None:
    import ml_collections
    config = ml_collections.ConfigDict(ck.read_json(step, "config"))
    _fix_tuples(config)
  meta = ck.read_json(step, "meta")
  names = ("teacher",) if meta["stage"] == "teacher" else tuple(n for n in SAMPLER_NETWORKS if n in meta["networks"])
  params, _ = load_model_from_workdir(workdir, config, names, step=step)
  return export_networks(params, config, out_dir, step=step, source=ck._step_dir(step))


def _fix_tuples(config):
  """JSON turns tuples into lists; the few fields that the model code hashes need tuples back."""
  for sec in ("model", "teacher", "critic"):
    if sec in config and "patch_size" in config[sec]:
      config[sec].patch_size = tuple(config[sec].patch_size)
  config.video.vae_stride = tuple(config.video.vae_stride)
  config.sampling.ladder = tuple(config.sampling.ladder)


def export_in_subprocess(workdir: str, out_dir: str, timeout: float | None = None) -> str:
  """Export from a fresh single CPU process (multi-host runs: orbax's writer would otherwise wait for all hosts)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for k in ("DSA_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "XLA_FLAGS"):
    env.pop(k, None)
  code = ("import sys; from dsa_jax.training.checkpointing import export_model; "
          "print(export_model(sys.argv[1], sys.argv[2]))")
  res = subprocess.run([sys.executable, "-c", code, workdir, out_dir], env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
  if res.returncode != 0:
    raise TrainCheckpointError(f"export of {workdir!r} to {out_dir!r} failed:\n{res.stderr[-2000:]}")
  return out_dir


def main(argv=None):
  """python -m dsa_jax.training.checkpointing export WORKDIR OUT_DIR [--step N]: latest checkpoint -> model folder."""
  import argparse
  p = argparse.ArgumentParser(prog="python -m dsa_jax.training.checkpointing")
  sub = p.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("export", help="write a params_io model folder from a training workdir's checkpoint")
  e.add_argument("workdir")
  e.add_argument("out_dir")
  e.add_argument("--step", type=int, default=None)
  args = p.parse_args(argv)
  print(export_model(args.workdir, args.out_dir, step=args.step))


if __name__ == "__main__":
  main()
