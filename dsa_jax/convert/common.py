"""Reading and writing PyTorch-side weight files for the converters, without a silent partial load.

What users hand us: a diffusers folder (`config.json` + one or several `.safetensors` with an `.index.json`), a single
`.safetensors`, or a torch `.pt`/`.pth` whose state dict may sit under `generator` / `generator_ema` / `model` and whose
keys may carry a wrapper prefix (`model.` in Self Forcing, `module.` from DDP, `_orig_mod.` from torch.compile).
Safetensors files are memory-mapped and parsed here (numpy + ml_dtypes), so bfloat16 weights need no torch and a
14B model is never held twice in memory. `check_keys` compares a state dict with the expected key -> shape table and
raises one error that lists every missing, unexpected and misshaped key.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from dsa_jax.atomic import atomic_path, write_text

__all__ = [
    "ConversionError", "KeyMismatchError", "LazyTensor", "read_safetensors", "write_safetensors",
    "save_safetensors_folder",
    "read_torch", "to_numpy", "config_path", "find_weight_files", "read_weight_files", "pick_state_dicts",
    "strip_wrapper_prefix",
    "check_keys", "read_json", "write_json_atomic", "np_dtype", "cast",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# Keys of a training checkpoint that hold a model's state dict, in the order we look for them.
STATE_DICT_KEYS = ("generator", "generator_ema", "model", "state_dict", "module", "ema", "model_ema", "net")
# Wrapper prefixes that training frameworks prepend to every key.
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                    "model.diffusion_model.", "diffusion_model.")


class ConversionError(ValueError):
  """A weights file cannot be converted: wrong format, wrong model, or a config that does not match."""


class KeyMismatchError(ConversionError):
  """A state dict's keys or shapes do not match the architecture (lists every offending key)."""


# ----------------------------------------------------------------------------------------------- dtypes


_ST_TO_NP = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
             "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def np_dtype(name) -> np.dtype:
  """'float32' / 'bfloat16' / numpy / jax dtype -> numpy dtype (bfloat16 through ml_dtypes)."""
  if isinstance(name, str) and name in ("bfloat16", "bf16"):
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  try:
    return np.dtype(name)
  except TypeError as e:
    raise ConversionError(f"unknown dtype {name!r} (expected float32, bfloat16 or float16)") from e


def _st_dtype(code: str, path: str) -> np.dtype:
  if code in _ST_TO_NP:
    return np.dtype(_ST_TO_NP[code])
  import ml_dtypes
  extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
  if code not in extra:
    raise ConversionError(f"{path}: unsupported safetensors dtype {code!r}")
  return np.dtype(extra[code])


def _np_to_st(dtype: np.dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype.name == "bfloat16":
    return "BF16"
  for code, name in _ST_TO_NP.items():
    if dtype == np.dtype(name):
      return code
  raise ConversionError(f"cannot write dtype {dtype} to safetensors")


def cast(a, dtype) -> np.ndarray:
  """A float array in `dtype` (None keeps it); integer arrays are left alone."""
  a = np.asarray(a)
  if dtype is None or not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
    return a
  return a.astype(np_dtype(dtype), copy=False)


# ----------------------------------------------------------------------------------------------- safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Memory-maps a .safetensors file: {name: read-only numpy view}. Nothing is read until a tensor is used."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n <= 0 or 8 + n > size:
        raise ValueError("header size out of range")
      header = json.loads(f.read(n))
  except (ValueError, struct.error, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: not a readable .safetensors file ({e})") from e
  header.pop("__metadata__", None)
  data_len = size - 8 - n
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_len,)) if data_len else \
      np.zeros((0,), np.uint8)
  out = {}
  for name, info in header.items():
    dt = _st_dtype(info["dtype"], path)
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end > data_len or end - begin != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ConversionError(f"{path}: tensor {name!r} has inconsistent offsets (truncated file?)")
    out[name] = data[begin:end].view(dt).reshape(shape)
  return out


class LazyTensor:
  """A tensor computed only when written (`fn()` -> array of `shape`/`dtype`), so exports hold one at a time."""

  def __init__(self, shape, dtype, fn: Callable[[], Any]):
    self.shape, self.dtype, self.fn = tuple(shape), np.dtype(dtype), fn

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  def __array__(self, dtype=None, copy=None):
    a = np.asarray(self.fn())
    return a if dtype is None else a.astype(dtype)


def _materialize(v, name: str, path: str) -> np.ndarray:
  a = np.ascontiguousarray(np.asarray(v))
  if isinstance(v, LazyTensor) and (a.shape != v.shape or a.dtype != v.dtype):
    raise AssertionError(f"{path}: {name} came out {a.shape} {a.dtype}, announced {v.shape} {v.dtype}")
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  return a


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> int:
  """Writes `tensors` (name -> array or LazyTensor) as one .safetensors file, atomically; returns its size."""
  path = os.fspath(path)
  names = sorted(tensors)
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name in names:
    v = tensors[name]
    if not isinstance(v, LazyTensor):
      v = np.asarray(v)
    header[name] = {"dtype": _np_to_st(v.dtype), "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
    offset += v.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in names:
      a = _materialize(tensors[name], name, path)
      if a.nbytes:
        f.write(memoryview(a.reshape(-1).view(np.uint8)))
  return 8 + len(blob) + offset


def save_safetensors_folder(folder: str, tensors: Mapping[str, Any], weights_name: str = WEIGHTS_NAME,
                            max_shard_bytes: int = 10 * 10**9) -> list[str]:
  """Writes one `weights_name` file, or numbered shards plus `<weights_name>.index.json` as diffusers does.

  Files from an earlier export with another shard count are removed, so the folder never mixes two exports.
  """
  os.makedirs(folder, exist_ok=True)
  shards: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    v = tensors[name]
    nbytes = v.nbytes if isinstance(v, LazyTensor) else np.asarray(v).nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  stem, ext = os.path.splitext(weights_name)
  index_path = os.path.join(folder, weights_name + ".index.json")
  old = [f for f in os.listdir(folder) if f == weights_name or f == os.path.basename(index_path) or
         re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(ext), f)]
  written = []
  if len(shards) == 1:
    names = [weights_name]
  else:
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))]
  total = 0
  for fname, keys in zip(names, shards):
    total += write_safetensors(os.path.join(folder, fname), {k: tensors[k] for k in keys})
    written.append(fname)
  if len(shards) > 1:
    weight_map = {k: fname for fname, keys in zip(names, shards) for k in keys}
    write_json_atomic(index_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    written.append(os.path.basename(index_path))
  for f in old:
    if f not in written:
      os.remove(os.path.join(folder, f))
  return written


# ----------------------------------------------------------------------------------------------- torch files


def to_numpy(t) -> np.ndarray:
  """torch tensor / jax array / numpy array -> numpy without a copy where possible (bfloat16 kept via ml_dtypes)."""
  if isinstance(t, np.ndarray):
    return t
  if type(t).__module__.startswith("torch"):
    import torch
    t = t.detach()
    if t.dtype == torch.bfloat16:
      import ml_dtypes
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(t)


def read_torch(path: str, allow_pickle: bool = False):
  """torch.load on the CPU, memory-mapped where the file allows it, with tensors only unless `allow_pickle`."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (pip install 'dsa_jax[convert]'); .safetensors files do not") \
        from e
  try:
    try:
      return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e) and "zip" not in str(e):
        raise
      return torch.load(path, map_location="cpu", weights_only=not allow_pickle)  # legacy (non-zip) format
  except Exception as e:  # torch raises assorted types for corrupt files and refused pickles
    hint = "" if allow_pickle else (" (if the file holds Python objects besides tensors and you trust it, pass "
                                    "--trust-pickle)")
    raise ConversionError(f"{path}: torch.load failed: {type(e).__name__}: {str(e).splitlines()[0]}{hint}") from e


# ----------------------------------------------------------------------------------------------- finding weights


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON ({e})") from e


def write_json_atomic(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")


def config_path(path: str) -> str:
  """The `config.json` that goes with weights at `path`: inside a folder, beside a file."""
  path = os.fspath(path)
  return os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), "config.json")


def find_weight_files(path: str, accepts: Callable[[dict], bool] | None = None, what: str = "model",
                      log: Callable[[str], None] | None = None) -> tuple[list[str], dict | None]:
  """Weight files of a folder or file, and the `config.json` beside them (None if absent).

  A folder: the shards named by `*.safetensors.index.json`, else its one `.safetensors` (diffusers name preferred),
  else its one torch file. Several candidates without an index is an error naming them, never a guess.
  A single file shares its folder with whatever else lies there (Wan's originals keep the DiT's config.json beside
  the text encoder's .pth), so its neighbouring config.json is used only when `accepts` says it describes a `what`;
  otherwise it is ignored (with a note through `log`) and the caller goes on as without one (shapes or defaults).
  """
  path = os.fspath(path)
  log = log or (lambda m: None)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights not found: {path}")
  cfg_file = config_path(path)
  config = read_json(cfg_file) if os.path.isfile(cfg_file) else None
  if not os.path.isdir(path):
    if not path.endswith((".safetensors",) + _TORCH_EXT):
      raise ConversionError(f"{path}: unknown weights format (expected .safetensors, .pt, .pth, .bin or a folder)")
    if config is not None and accepts is not None and not (isinstance(config, dict) and accepts(config)):
      log(f"note: ignoring {cfg_file}: not a {what} config (another model's, sharing the folder)")
      config = None
    elif config is not None:
      log(f"using config {cfg_file}")
    return [path], config
  if config is not None:
    if not isinstance(config, dict):
      raise ConversionError(f"{cfg_file}: expected a JSON object (a model config), got {type(config).__name__}")
    if accepts is None or accepts(config):  # else the caller's error names it
      log(f"using config {cfg_file}")
  entries = sorted(os.listdir(path))
  indexes = [f for f in entries if f.endswith(INDEX_SUFFIX)]
  if WEIGHTS_NAME + ".index.json" in indexes:
    indexes = [WEIGHTS_NAME + ".index.json"]
  if len(indexes) == 1:
    index = read_json(os.path.join(path, indexes[0]))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ConversionError(f"{os.path.join(path, indexes[0])}: no 'weight_map' in the index")
    files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise FileNotFoundError(f"shards listed in {indexes[0]} are missing: {missing}")
    return files, config
  if len(indexes) > 1:
    raise ConversionError(f"{path}: several index files {indexes}; pass the weights file itself")
  st = [f for f in entries if f.endswith(".safetensors")]
  if WEIGHTS_NAME in st:
    st = [WEIGHTS_NAME]
  if len(st) == 1:
    return [os.path.join(path, st[0])], config
  if len(st) > 1:
    raise ConversionError(f"{path}: several .safetensors files {st} and no *.safetensors.index.json; pass one file")
  pt = [f for f in entries if f.endswith(_TORCH_EXT)]
  if len(pt) == 1:
    return [os.path.join(path, pt[0])], config
  if len(pt) > 1:
    raise ConversionError(f"{path}: several torch files {pt}; pass one file")
  raise FileNotFoundError(f"no .safetensors / .pt / .pth weights in folder {path} (found {entries[:10]})")


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and (hasattr(v, "shape") and hasattr(v, "dtype")) for k, v in obj.items())


def pick_state_dicts(obj, key: str | None = None, source: str = "checkpoint") -> dict[str, dict]:
  """The state dicts in a loaded torch object: {'' : sd} for a bare state dict, {name: sd} for a training checkpoint.

  With `key`, exactly that entry (dotted paths like 'model.generator' allowed). Without it, every entry among
  `generator` / `generator_ema` that exists, else the first of `model` / `state_dict` / `module` / ...
  """
  if key:
    cur = obj
    for part in key.split("."):
      if not isinstance(cur, Mapping) or part not in cur:
        have = sorted(k for k in cur if isinstance(k, str))[:20] if isinstance(cur, Mapping) else type(cur).__name__
        raise ConversionError(f"{source}: no entry {key!r} (the checkpoint holds {have})")
      cur = cur[part]
    if not _is_state_dict(cur):
      raise ConversionError(f"{source}: entry {key!r} is not a state dict of tensors")
    return {key: dict(cur)}
  if _is_state_dict(obj):
    return {"": dict(obj)}
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{source}: expected a state dict or a dict of state dicts, got {type(obj).__name__}")
  found = {k: dict(obj[k]) for k in ("generator", "generator_ema") if k in obj and _is_state_dict(obj[k])}
  if found:
    return found
  for k in STATE_DICT_KEYS:
    if k in obj:
      if _is_state_dict(obj[k]):
        return {k: dict(obj[k])}
      if isinstance(obj[k], Mapping):
        inner = pick_state_dicts(obj[k], None, source)
        return {f"{k}.{n}" if n else k: sd for n, sd in inner.items()}
  raise ConversionError(f"{source}: found no state dict; top-level entries are {sorted(map(str, obj))[:20]} "
                        "(pass --key NAME to pick one)")


def strip_wrapper_prefix(sd: Mapping[str, Any], keep: Iterable[str] = ()) -> tuple[dict, str]:
  """Removes a wrapper prefix that every key carries (`model.`, `module.`, ...), repeatedly; returns (sd, prefix).

  `keep` names top-level modules of the model itself, so a model whose own first module is called `model` is not
  stripped by mistake.
  """
  keep = tuple(keep)
  removed = ""
  sd = dict(sd)
  while sd:
    for p in sorted(WRAPPER_PREFIXES, key=len, reverse=True):
      if all(k.startswith(p) for k in sd) and not any(k.startswith(m + ".") or k == m for m in keep for k in sd):
        sd = {k[len(p):]: v for k, v in sd.items()}
        removed += p
        break
    else:
      break
  return sd, removed


def read_weight_files(files: list[str], key: str | None = None, allow_pickle: bool = False) -> dict[str, dict]:
  """Reads the files from `find_weight_files` -> {entry name: state dict of numpy arrays} ('' for a bare one)."""
  if all(f.endswith(".safetensors") for f in files):
    if key:
      raise ConversionError(f"--key {key!r} applies to torch checkpoints; {files[0]} is a .safetensors file")
    sd: dict[str, np.ndarray] = {}
    for f in files:
      part = read_safetensors(f)
      dup = sorted(set(part) & set(sd))
      if dup:
        raise ConversionError(f"{f}: keys already present in another shard: {dup[:10]}")
      sd.update(part)
    return {"": sd}
  if len(files) != 1:
    raise ConversionError(f"expected one torch checkpoint, got {files}")
  obj = read_torch(files[0], allow_pickle)
  picked = pick_state_dicts(obj, key, files[0])
  return {name: {k: to_numpy(v) for k, v in sd.items()} for name, sd in picked.items()}


# ----------------------------------------------------------------------------------------------- key checking


def _compress(keys: list[str], limit: int = 40) -> str:
  """Groups 'blocks.3.x' keys by pattern: 'blocks.{0-29}.x' (so 30 layers missing the same key read as one line)."""
  groups: dict[str, list[int]] = {}
  order: list[str] = []
  for k in keys:
    m = re.search(r"(?<![^.])(\d+)(?=\.)", k)
    pat, idx = (k[:m.start()] + "{}" + k[m.end():], int(m.group(1))) if m else (k, None)
    if pat not in groups:
      groups[pat] = []
      order.append(pat)
    if idx is not None:
      groups[pat].append(idx)
  lines = []
  for pat in order:
    idx = sorted(set(groups[pat]))
    if not idx:
      lines.append(pat)
      continue
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
      if b != a + 1:
        runs.append(str(start) if start == a else f"{start}-{a}")
        start = b
    lines.append(pat.replace("{}", runs[0] if len(idx) == 1 else "{" + ",".join(runs) + "}"))
  if len(lines) > limit:
    lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
  return "\n    ".join(lines)


def check_keys(got: Mapping[str, Any], want: Mapping[str, tuple], source: str, what: str = "model",
               hint: str = "") -> None:
  """Raises one KeyMismatchError listing missing, unexpected and misshaped keys; `got` values need `.shape`."""
  missing = [k for k in want if k not in got]
  extra = sorted(k for k in got if k not in want)
  bad = [k for k in want if k in got and tuple(got[k].shape) != tuple(want[k])]
  if not (missing or extra or bad):
    return
  lines = [f"{source}: the weights do not match the {what} ({len(missing)} missing, {len(extra)} unexpected, "
           f"{len(bad)} misshaped keys)"]
  if missing:
    lines.append("  missing:\n    " + _compress(missing))
  if extra:
    lines.append("  unexpected:\n    " + _compress(extra))
  if bad:
    shown = [f"{k}: {tuple(got[k].shape)}, expected {tuple(want[k])}" for k in bad[:40]]
    lines.append("  misshaped:\n    " + "\n    ".join(shown) + (f"\n    ... and {len(bad) - 40} more"
                                                                 if len(bad) > 40 else ""))
  if hint:
    lines.append("  " + hint)
  raise KeyMismatchError("\n".join(lines))
