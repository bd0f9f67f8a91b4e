"""Saving and resuming whole training states with orbax, and model export.

The workdir layout and every read of networks (sampling, evaluation, a next stage) live in
`dsa_jax.checkpoint.workdir`; here the trainer's side: async keep-N saves of the TrainState split into one item per
network plus 'train' (optimiser states, step, rng, d_bar), 'data' (the grain iterator state), 'config' and 'meta'.

Saving is atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a run killed
mid-save leaves a temporary folder that `latest_step` ignores (and the next manager removes): the run resumes from
the last complete checkpoint. A complete but damaged checkpoint raises `TrainCheckpointError` naming the step
folder. Restoring takes the target shardings from the *current* mesh, so a run saved on 8 devices resumes on 4.

`export_model` writes a `params_io` model checkpoint (WORKDIR/model at the end of training).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np

from dsa_jax.checkpoint import heads, params_io
from dsa_jax.config_lib import LOG_SCALE_TARGETS
from dsa_jax.checkpoint.params_io import CheckpointError  # noqa: F401  (callers catch it from here)
from dsa_jax.checkpoint.workdir import (CKPT_DIR, MODEL_DIR, SAMPLER_NETWORKS, TrainCheckpointError, Workdir,  # noqa
                                        arch_meta, load_model_from_workdir, ocp)
from dsa_jax.training import state as state_lib

TRAIN_FIELDS = ("step", "rng", "dbar", "target_range", "gen_opt", "head_opt", "critic_opt", "teacher_opt")


class TrainStateMismatchError(TrainCheckpointError):
  """A readable checkpoint whose training state is not what this run's config builds (saved by another stage, or laid
  out differently because an optimiser option changed: gradient clipping, warmup, beta1, a teacher EMA...): a config
  mismatch, not damage, so a resume stops instead of setting the checkpoint aside."""


# Run-control fields that never change the training state's layout; left out of a mismatch's list of differences.
_RUN_CONTROL = ("train.steps", "train.max_time_s", "train.log_every", "train.ckpt_every", "train.keep",
                "train.eval_every", "train.tensorboard", "train.async_ckpt")


def state_layout(items: dict) -> dict:
  """{item: fingerprint of its leaves' paths and shapes}: what a restore needs to match, dtypes and shardings aside."""
  out = {}
  for name, tree in items.items():
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    text = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(np.shape(leaf))}" for path, leaf in leaves)
    out[name] = hashlib.sha1(text.encode()).hexdigest()[:16]
  return out


def _flat(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _config_differences(saved: dict | None, config) -> str:
  if not saved:
    return ""
  old, new = dict(_flat(saved)), dict(_flat(json.loads(config.to_json_best_effort())))
  diff = [f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})" for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k not in _RUN_CONTROL]
  return ("; the config differs from the checkpoint's in " + ", ".join(diff[:12])
          + (f" and {len(diff) - 12} more" if len(diff) > 12 else "")) if diff else ""


def _split_state(state: state_lib.TrainState) -> dict:
  items = {n: v for n, v in state.networks().items()}
  items["train"] = {k: getattr(state, k) for k in TRAIN_FIELDS if getattr(state, k) is not None}
  return items


def _join_state(items: dict) -> state_lib.TrainState:
  kw = dict(items["train"])
  kw.update({n: items[n] for n in state_lib.NETWORK_FIELDS if n in items})
  return state_lib.TrainState(**kw)


class Checkpointer(Workdir):
  """`Workdir` that also saves and restores whole TrainStates (all processes call every method)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    super().__init__(workdir, keep=keep, async_save=async_save, read_only=read_only)

  def save(self, step: int, state: state_lib.TrainState, *, config, data_state: dict | None = None,
           extra_meta: dict | None = None) -> bool:
    o = ocp()
    items = _split_state(state)
    args = {k: o.args.StandardSave(v) for k, v in items.items()}
    meta = {"stage": config.train.stage, "step": int(step), "networks": sorted(state.networks()),
            "arch": arch_meta(config, state.networks()), "format": "dsa_jax.train/1",
            "optimizer": {"adam_first_moment": "none" if state_lib.drops_first_moment(config) else "kept"},
            "state_layout": state_layout(items)}
    meta.update(extra_meta or {})
    args["meta"] = o.args.JsonSave(meta)
    args["config"] = o.args.JsonSave(json.loads(config.to_json_best_effort()))
    args["data"] = o.args.JsonSave(data_state if data_state is not None else {})
    return self.manager.save(int(step), args=o.args.Composite(**args), force=True)

  def restore(self, step: int, target: state_lib.TrainState, *, config=None) -> tuple[state_lib.TrainState, dict]:
    """Restores the state into `target` (ShapeDtypeStructs with the new shardings); returns (state, data_state)."""
    o = ocp()
    meta = self.read_json(step, "meta")
    if config is not None:
      _check_meta(meta, config, self._step_dir(step))
    items = _split_state(target)
    saved_layout, layout = meta.get("state_layout"), state_layout(items)
    if saved_layout is not None and any(saved_layout.get(k) != v for k, v in layout.items()):
      self._mismatch(step, sorted(k for k in layout if saved_layout.get(k) != layout[k]), config)
    args = {k: o.args.StandardRestore(v) for k, v in items.items()}
    args["data"] = o.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=o.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      if saved_layout is None and "tree structure" in str(e).lower():  # saved before layouts were recorded
        self._mismatch(step, [], config, cause=e)
      raise TrainCheckpointError(
          f"checkpoint {self._step_dir(step)!r} could not be restored ({type(e).__name__}: {str(e)[:400]}). It is "
          "corrupt or does not match the config; delete that folder to resume from the previous checkpoint") from e
    state = _join_state({k: out[k] for k in items})
    return state, (out["data"] or None)

  def _mismatch(self, step: int, items: list, config, cause=None):
    try:
      saved = self.read_json(step, "config")
    except TrainCheckpointError:
      saved = None
    which = f" ({', '.join(items)})" if items else ""
    raise TrainStateMismatchError(
        f"checkpoint {self._step_dir(step)!r} holds a training state laid out differently{which} from what this "
        f"config builds{_config_differences(saved, config) if config is not None else ''}. Resume with the settings "
        "it was saved with, or train in a new workdir (--config.train.init_from=THIS_WORKDIR starts from its "
        "networks)") from cause




def _check_meta(meta: dict, config, where: str):
  stage = config.train.stage
  if meta.get("stage") != stage:
    raise TrainStateMismatchError(f"{where}: saved by stage {meta.get('stage')!r}, this run is stage {stage!r} "
                               "(use a new workdir per stage; --config.train.init_from=OLD_WORKDIR starts from it)")
  expected = arch_meta(config, meta.get("networks", []))
  for n, arch in expected.items():
    params_io.check_arch(meta, n, arch, where)


# ----------------------------------------------------------------------------------------------------------------------
# Model export

def export_networks(state_or_params, config, out_dir: str, *, step: int | None = None, source: str = "") -> str:
  """Writes a params_io model checkpoint from a TrainState (or {name: params}) of this process (single host)."""
  stage = config.train.stage
  conf_target = {"kind": str(config.conf.target)}
  if isinstance(state_or_params, state_lib.TrainState):
    nets = state_or_params.networks()
    step = int(jax.device_get(state_or_params.step)) if step is None else step
    if (stage in ("dsa", "head") and conf_target["kind"] in LOG_SCALE_TARGETS
        and state_or_params.target_range is not None):
      # the normalisation the head was trained with: what its confidence means (evaluation reads it back)
      conf_target["log_range"] = [float(x) for x in np.asarray(jax.device_get(state_or_params.target_range))]
  else:
    nets = dict(state_or_params)
  if stage == "teacher" and "teacher_ema" in nets:
    nets["teacher"] = nets.pop("teacher_ema")  # the EMA is the teacher that later stages use
  names = ("teacher",) if stage == "teacher" else tuple(n for n in SAMPLER_NETWORKS if n in nets)
  host = {n: jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), nets[n]) for n in names}
  meta = {"arch": arch_meta(config, names), "config": config.to_json_best_effort(), "stage": stage,
          "step": step, "source": source}
  if "head" in names:
    meta["conf_target"] = conf_target
    # which generator the head was trained with: a head exported on its own (convert export-head) is checked by it
    meta.update(heads.fingerprint_meta(host))
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
  if meta["stage"] == "teacher":
    names = ("teacher_ema",) if "teacher_ema" in meta["networks"] else ("teacher",)
  else:
    names = tuple(n for n in SAMPLER_NETWORKS if n in meta["networks"])
  params, _ = load_model_from_workdir(workdir, config, names, step=step)
  return export_networks(params, config, out_dir, step=step, source=ck._step_dir(step))


def slim_model(src: str, out_dir: str) -> str:
  """A copy of the model folder `src` for sampling only: the EMA generator (when it has one, instead of the raw
  weights: sampling uses the EMA) and the confidence head; metadata (calibration table included) kept. Halves the
  size of a DSA-stage export, which is what a shipped model needs."""
  meta = params_io.read_meta(src)
  names = [n for n in meta.get("networks", []) if n != "generator" or "generator_ema" not in meta["networks"]]
  params, meta = params_io.load_params(src, names)
  meta = {k: v for k, v in meta.items() if k not in ("networks", "format_version")}
  if "arch" in meta:
    meta["arch"] = {n: a for n, a in meta["arch"].items() if n in names or n == "generator"}
  return params_io.save_params(out_dir, params, meta)


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


def resume_compatible(config, meta: dict | None, emit=print):
  """The config to resume a checkpoint with: at beta1 = 0 its optimiser states decide whether Adam's first moment is
  stored (its meta records it; states saved before that was recorded hold it), so resuming never fails on a
  mismatch that the restore would take for a damaged checkpoint and set aside."""
  if not meta or float(config.train.b1) != 0.0:
    return config
  saved_without = (meta.get("optimizer") or {}).get("adam_first_moment", "kept") == "none"
  if state_lib.drops_first_moment(config) == saved_without:
    return config
  config = config.copy_and_resolve_references()
  config.train.adam_first_moment = "auto" if saved_without else "keep"
  held = "do not hold" if saved_without else "hold"
  emit(f"[{config.train.stage}] the checkpoint's optimiser states {held} Adam's first moment: resuming with "
       f"train.adam_first_moment={config.train.adam_first_moment!r}")
  return config


def main(argv=None):
  """python -m dsa_jax.training.checkpointing export WORKDIR OUT_DIR [--step N]: latest checkpoint -> model folder;
  ... slim SRC OUT_DIR: a sampling-only copy of a model folder."""
  import argparse
  p = argparse.ArgumentParser(prog="python -m dsa_jax.training.checkpointing")
  sub = p.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("export", help="write a params_io model folder from a training workdir's checkpoint")
  e.add_argument("workdir")
  e.add_argument("out_dir")
  e.add_argument("--step", type=int, default=None)
  sl = sub.add_parser("slim", help="copy a model folder keeping what sampling uses (EMA generator, head)")
  sl.add_argument("src")
  sl.add_argument("out_dir")
  args = p.parse_args(argv)
  if args.cmd == "slim":
    print(slim_model(args.src, args.out_dir))
    return
  print(export_model(args.workdir, args.out_dir, step=args.step))


if __name__ == "__main__":
  main()
