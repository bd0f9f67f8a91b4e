"""Model checkpoints by path: a folder holding an orbax PyTree of parameters and `dsa_meta.json`.

`dsa-jax convert` writes them, training exports them, `sample`/`eval`/`bench` read them. The metadata records each
network's architecture, so loading into a different architecture fails with a message naming the mismatch instead of
a shape error deep inside jit. Writes are atomic: orbax writes into a temporary folder and renames it when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from dsa_jax.atomic import atomic_dir

META_FILE = "dsa_meta.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the expected architecture."""


def save_params(path: str, params: dict, meta: dict, files: dict | None = None) -> str:
  """Saves `params` (dict of name -> pytree of arrays) and `meta` (JSON-able; `meta['arch']` per network), and copies
  `files` ({name in the folder: source path}, e.g. a tokenizer the metadata names) into the same folder.

  The folder appears only once complete, the copied files included: written under a sibling temporary name, then
  renamed over `path`, which may be absent, empty or an earlier model checkpoint (anything else is refused).
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  if os.path.lexists(path) and not (os.path.isdir(path) and (os.path.isfile(os.path.join(path, META_FILE))
                                                              or not os.listdir(path))):
    # the folder is replaced whole: only ever replace a model checkpoint (or nothing), never a workdir or other files
    raise CheckpointError(f"{path!r} exists and is not a dsa_jax model checkpoint (no {META_FILE}): not replaced; "
                          "write the model to a new folder, or remove this one first")
  with atomic_dir(path) as tmp:
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, PARAMS_DIR), host)
    full_meta = dict(meta)
    full_meta["format_version"] = FORMAT_VERSION
    full_meta["networks"] = sorted(params)
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(full_meta, f, indent=2, sort_keys=True)
    for name, src in (files or {}).items():
      shutil.copyfile(src, os.path.join(tmp, name))
  return path


def update_meta(path: str, **fields) -> dict:
  """Adds or replaces top-level fields of a model checkpoint's metadata (atomically; the parameters are untouched),
  e.g. the step-budget calibration table written by `dsa-jax calibrate`."""
  from dsa_jax.atomic import write_text
  meta = read_meta(path)
  meta.update(fields)
  write_text(os.path.join(path, META_FILE), json.dumps(meta, indent=2, sort_keys=True))
  return meta


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint {path!r} does not exist (expected a folder written by dsa-jax)")
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"checkpoint {path!r} has no {META_FILE}: not a dsa_jax model checkpoint "
                          "(a training workdir? pass it to --ckpt of sample/eval, which finds its latest step)")
  try:
    with open(meta_path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"checkpoint metadata {meta_path!r} is corrupt: {e}") from e


def check_arch(meta: dict, network: str, expected: dict, path: str = "checkpoint"):
  """Compares the stored architecture of `network` with `expected` (a DiTConfig.to_dict() or similar)."""
  stored = meta.get("arch", {}).get(network)
  if stored is None:
    raise CheckpointError(f"{path}: holds no architecture for network {network!r}; it has "
                          f"{sorted(meta.get('arch', {}))}")
  keys = [k for k in expected if k not in ("dtype", "param_dtype", "attention", "scan_layers", "remat")]
  diff = {k: (stored.get(k), expected[k]) for k in keys if k in stored and _norm(stored[k]) != _norm(expected[k])}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
    raise CheckpointError(f"{path}: network {network!r} was saved with another architecture ({lines})")


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


def load_params(path: str, networks=None) -> tuple[dict, dict]:
  """Returns (params, meta); `networks` restricts which top-level entries are returned (all by default)."""
  import orbax.checkpoint as ocp

  meta = read_meta(path)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"checkpoint {path!r} is incomplete: {PARAMS_DIR}/ is missing")
  try:
    restored = ocp.PyTreeCheckpointer().restore(params_dir)
  except Exception as e:  # orbax raises many types for truncated or corrupt files
    detail = str(e).split(" [tensorstore_spec")[0][:300]  # not the multi-kilobyte TensorStore spec
    raise CheckpointError(f"checkpoint {path!r} could not be read (corrupt or truncated?): {detail}") from e
  if networks is not None:
    missing = [n for n in networks if n not in restored]
    if missing:
      raise CheckpointError(f"checkpoint {path!r} lacks {missing}; it holds {sorted(restored)}")
    restored = {n: restored[n] for n in networks}
  check_finite(restored, path)
  return restored, meta


def nonfinite_leaves(tree) -> list[str]:
  """Key paths of the floating-point leaves holding NaN or inf (host arrays; device arrays are fetched)."""
  bad = []
  for k, v in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(v)
    if a.dtype.kind in "fc" or a.dtype.name == "bfloat16":
      if not np.isfinite(a.astype(np.float32) if a.dtype.name == "bfloat16" else a).all():
        bad.append(jax.tree_util.keystr(k))
  return bad


def check_finite(tree, path: str = "checkpoint"):
  """Every array finite: a flipped bit in a data file otherwise loads silently and samples a grey NaN video."""
  bad = nonfinite_leaves(tree)
  if bad:
    raise CheckpointError(f"checkpoint {path!r} holds non-finite values (NaN/inf) in {len(bad)} array(s), e.g. "
                          f"{', '.join(bad[:3])}: it is corrupt (or was saved from a diverged run)")


def check_tree_shapes(params, abstract, name: str, path: str = "checkpoint"):
  """Every leaf present with the expected shape; lists missing / unexpected / misshaped keys in one error."""
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  bad = sorted(k for k in set(want) & set(got) if tuple(want[k]) != tuple(got[k]))
  if missing or extra or bad:
    parts = []
    if missing:
      parts.append(f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
      parts.append(f"unexpected {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    if bad:
      parts.append("misshaped " + ", ".join(f"{k}: {tuple(got[k])} vs expected {tuple(want[k])}" for k in bad[:10]))
    raise CheckpointError(f"{path}: {name} parameters do not match the config: " + "; ".join(parts))
