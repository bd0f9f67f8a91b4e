"""Confidence heads stored apart from their generator: a head folder, and the fingerprint that ties it to one.

A head is trained on one generator's features, so its confidences (and the tau -> mean steps table calibrated with
them) mean nothing on another. A head folder is a params_io model folder holding only the 'head' network; its
metadata keeps what the head needs at sampling time (`arch`, `conf_target`, `calibration`) and the fingerprint of
the generator it was trained with, so that `load_sampler_params(..., head=DIR)` refuses a head for another
generator instead of sampling with meaningless thresholds. Several heads then share one copy of the generator.

The fingerprint is a short hash of a generator's weights: sha256 over its leaves sorted by path (each leaf's path,
shape, and its values as little-endian float32), first 16 hex digits. It depends on the values only: the same
weights stored as float32 or read into another tree layout (with or without the 'params' wrapper, boxed or not)
give the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import jax
import numpy as np

from dsa_jax.checkpoint import params_io
from dsa_jax.checkpoint.params_io import CheckpointError

FINGERPRINT_KEY = "generator_fingerprint"
ALL_FINGERPRINTS_KEY = "generator_fingerprints"  # {network: fingerprint} when a model holds more than one generator
GENERATORS = ("generator_ema", "generator")  # the sampling generator first, as load_sampler_params picks it
HEAD_META_KEYS = ("conf_target", "calibration", "calibration_ranges")
FINGERPRINT_HEX = 16


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def generator_fingerprint(tree) -> str:
  """The fingerprint of a generator's weights (see the module docstring); host or device arrays."""
  from dsa_jax.models import factory
  variables = factory.as_variables(tree)
  leaves = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    leaves.append(("/".join(_key_name(k) for k in path), leaf))
  h = hashlib.sha256()
  for name, leaf in sorted(leaves, key=lambda x: x[0]):
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)).astype("<f4"))
    h.update(f"{name}:{tuple(a.shape)}:float32;".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:FINGERPRINT_HEX]


def sampling_generator(networks) -> Optional[str]:
  """The generator network a sampler reads from a model holding `networks`: 'generator_ema' where present."""
  return next((n for n in GENERATORS if n in networks), None)


def fingerprint_meta(params: dict) -> dict:
  """The metadata fields recording the fingerprints of the generators in `params` ({network: tree}): the sampling
  generator's under `generator_fingerprint`, and all of them by name when there are several."""
  prints = {n: generator_fingerprint(params[n]) for n in GENERATORS if n in params}
  if not prints:
    return {}
  out = {FINGERPRINT_KEY: prints[sampling_generator(prints)]}
  if len(prints) > 1:
    out[ALL_FINGERPRINTS_KEY] = prints
  return out


def recorded_fingerprints(meta: dict) -> list[str]:
  """Every generator fingerprint a model's or head's metadata records (empty: it records none)."""
  prints = [meta[FINGERPRINT_KEY]] if meta.get(FINGERPRINT_KEY) else []
  for fp in (meta.get(ALL_FINGERPRINTS_KEY) or {}).values():
    if fp not in prints:
      prints.append(fp)
  return prints


def is_head_folder(path: str) -> bool:
  """A model folder holding only a confidence head (what `export_head` writes)."""
  if not os.path.isfile(os.path.join(path, params_io.META_FILE)):
    return False
  try:
    meta = params_io.read_meta(path)
  except CheckpointError:
    return False
  return list(meta.get("networks", [])) == ["head"]


def check_head_folder(path: str, flag: str = "--head") -> dict:
  """The metadata of the head folder (or full model folder) at `path`; errors name `flag` and say what was expected."""
  if not path:
    raise FileNotFoundError(f"{flag}: expected a head folder (dsa-jax convert export-head writes one); got ''")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{flag} {path!r} does not exist (expected a head folder written by dsa-jax convert "
                            "export-head)")
  if not os.path.isfile(os.path.join(path, params_io.META_FILE)):
    raise CheckpointError(f"{flag} {path!r} has no {params_io.META_FILE}: expected a head folder written by dsa-jax "
                          "convert export-head (or a model folder holding a 'head')")
  meta = params_io.read_meta(path)
  networks = meta.get("networks") or sorted(meta.get("arch", {}))
  if "head" not in networks:
    raise CheckpointError(f"{flag} {path!r} holds no 'head' network; it has {sorted(networks)}")
  return meta


def check_fingerprint(head_meta: dict, fingerprint: str, head_path: str, flag: str = "--head",
                      warn=None) -> bool:
  """True when the head at `head_path` was trained for the generator whose fingerprint is `fingerprint`; a head that
  records none passes with a warning through `warn`; one trained for another generator is an error."""
  prints = recorded_fingerprints(head_meta)
  if not prints:
    if warn is not None:
      warn(f"warning: {flag} {head_path!r} records no generator fingerprint: cannot check that it was trained for "
           f"this generator (fingerprint {fingerprint}); re-export it with `dsa-jax convert export-head` to record it")
    return False
  if fingerprint not in prints:
    raise CheckpointError(f"{flag} {head_path} was trained for another generator (fingerprint {prints[0]} vs "
                          f"{fingerprint}, the loaded generator's): its confidences and calibration mean nothing "
                          "here; pass the --ckpt of the generator it was trained with")
  return True


def _same_folder(a: str, b: str) -> bool:
  return os.path.realpath(a) == os.path.realpath(b)


def _folder_kind(path: str) -> str:
  """A few words on what the folder at `path` holds, for errors that refuse to replace it."""
  if not os.path.isdir(path):
    return "a file"
  if is_head_folder(path):
    return "a head folder"
  if os.path.isfile(os.path.join(path, params_io.META_FILE)):
    try:
      return f"a model folder with {sorted(params_io.read_meta(path).get('networks', []))}"
    except CheckpointError:
      return f"a folder with an unreadable {params_io.META_FILE}"
  return f"a folder of {len(os.listdir(path))} entries that is not a head folder"


def check_head_out(src: str, out: str, src_flag: str = "--src", flag: str = "--out"):
  """`out` may be written by export_head: absent, an empty folder, or an earlier head folder (it is replaced whole,
  so a model folder, `src` itself above all, would lose its generators)."""
  if _same_folder(src, out):
    raise CheckpointError(f"{flag} {out!r} is {src_flag} itself: writing the head there would replace the model "
                          "with its head alone; pass a new folder")
  if not os.path.lexists(out) or (os.path.isdir(out) and not os.listdir(out)) or is_head_folder(out):
    return
  raise CheckpointError(f"{flag} {out!r} exists and is {_folder_kind(out)}: not replaced (expected a new folder, an "
                        "empty one, or an earlier head folder written by dsa-jax convert export-head)")


def _attached_from(path: str, model: str) -> bool:
  """`path` is a model folder that attach-head wrote from `model` earlier (so writing it again loses nothing)."""
  if not os.path.isfile(os.path.join(path, params_io.META_FILE)):
    return False
  try:
    source = params_io.read_meta(path).get("source") or {}
  except CheckpointError:
    return False
  return (isinstance(source, dict) and source.get("command") == "convert attach-head"
          and isinstance(source.get("model"), str) and _same_folder(source["model"], model))


def export_head(src: str, out: str, log=lambda m: None) -> dict:
  """Writes the head of the model folder `src` into the head folder `out` (atomically) and returns its metadata.

  The generator fingerprint is computed from `src`'s sampling generator (its 'generator_ema' where it has one, else
  'generator'), and of every generator it holds, so a head extracted from a DSA-stage export (both) passes the check
  with or without the EMA. `out` must be new, empty or an earlier head folder (`check_head_out`)."""
  if not os.path.isdir(src) or not os.path.isfile(os.path.join(src, params_io.META_FILE)):
    raise CheckpointError(f"--src {src!r}: expected a model folder with {params_io.META_FILE} (export a training "
                          "workdir first: its model/ folder)")
  check_head_out(src, out)
  meta = params_io.read_meta(src)
  networks = list(meta.get("networks", []))
  if "head" not in networks:
    raise CheckpointError(f"--src {src!r} holds no 'head' network; it has {sorted(networks)}")
  gens = [n for n in GENERATORS if n in networks]
  if not gens:
    raise CheckpointError(f"--src {src!r} holds no generator ('generator_ema' or 'generator'), so the head's "
                          f"generator fingerprint cannot be computed; it has {sorted(networks)}")
  if "head" not in meta.get("arch", {}):
    raise CheckpointError(f"--src {src!r} records no architecture for its 'head' (its {params_io.META_FILE} lacks "
                          "arch.head); a head folder must carry it")
  params, _ = params_io.load_params(src, ["head", *gens])
  prints = fingerprint_meta({n: params[n] for n in gens})
  head_meta = {k: meta[k] for k in HEAD_META_KEYS if k in meta}
  head_meta.update(prints)
  head_meta["arch"] = {"head": meta["arch"]["head"]}
  gen = sampling_generator(gens)
  if gen in meta.get("arch", {}):
    head_meta["generator_arch"] = meta["arch"][gen]
  for k in ("config", "stage", "step"):
    if k in meta:
      head_meta[k] = meta[k]
  head_meta["source"] = {"command": "convert export-head", "model": os.path.abspath(src), "generator": gen,
                         "model_source": meta.get("source")}
  if "calibration" not in head_meta:
    log(f"note: {src!r} has no calibration table: calibrate the head with `dsa-jax calibrate --ckpt {src} "
        f"--head {out}` before using --mean-steps with it")
  params_io.save_params(out, {"head": params["head"]}, head_meta)
  return params_io.read_meta(out)


def attach_head(model: str, head: str, out: str, log=lambda m: None) -> dict:
  """Writes a model folder `out` that is `model` with the head of the head folder `head` as its own (the inverse of
  `export_head`): the head's parameters, architecture, conf_target and calibration table replace the model's, so
  every command that reads the model's head uses it without --head. Everything else of `model` (every network it
  stores, a stop rule's table such as calibration_x0_delta) is kept. Refused when the head was trained for another
  generator. `out` may be `model` itself (the folder is replaced atomically once the new one is complete), or new or
  empty; never another existing folder, whose networks would be lost."""
  if not os.path.isdir(model) or not os.path.isfile(os.path.join(model, params_io.META_FILE)):
    raise CheckpointError(f"--ckpt {model!r}: expected a model folder with {params_io.META_FILE}")
  if not (_same_folder(model, out) or not os.path.lexists(out) or (os.path.isdir(out) and not os.listdir(out))
          or _attached_from(out, model)):
    raise CheckpointError(f"--out {out!r} exists and is {_folder_kind(out)}: not replaced (expected a new folder, an "
                          "empty one, an earlier attach-head output of this --ckpt, or --ckpt itself to attach the "
                          "head in place)")
  head_meta = check_head_folder(head)
  if "head" not in head_meta.get("arch", {}):
    raise CheckpointError(f"--head {head!r} records no architecture for its 'head' (arch.head in "
                          f"{params_io.META_FILE})")
  meta = params_io.read_meta(model)
  networks = list(meta.get("networks", []))
  gen = sampling_generator(networks)
  if gen is None:
    raise CheckpointError(f"--ckpt {model!r} holds no generator ('generator_ema' or 'generator'); it has "
                          f"{sorted(networks)}")
  params, _ = params_io.load_params(model)  # every stored network, whatever the metadata lists
  prints = fingerprint_meta({n: params[n] for n in GENERATORS if n in params})
  if not check_fingerprint(head_meta, prints[FINGERPRINT_KEY], head):
    raise CheckpointError(f"--head {head!r} records no generator fingerprint: it cannot be checked against "
                          f"--ckpt {model!r}; re-export it with `dsa-jax convert export-head`")
  params["head"] = params_io.load_params(head, ["head"])[0]["head"]
  new_meta = {k: v for k, v in meta.items() if k not in ("format_version", "networks", *HEAD_META_KEYS)}
  new_meta.update({k: head_meta[k] for k in HEAD_META_KEYS if k in head_meta})
  new_meta["arch"] = {**meta.get("arch", {}), "head": head_meta["arch"]["head"]}
  new_meta.update(prints)
  new_meta["source"] = {"command": "convert attach-head", "model": os.path.abspath(model),
                        "head": os.path.abspath(head), "model_source": meta.get("source")}
  if "calibration" not in head_meta:
    log(f"note: {head!r} has no calibration table, so {out!r} has none: run `dsa-jax calibrate --ckpt {out}` "
        "before using --mean-steps with it")
  params_io.save_params(out, params, new_meta)
  return params_io.read_meta(out)
