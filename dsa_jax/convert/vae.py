"""diffusers ``AutoencoderKLWan`` checkpoints -> our Flax params (``dsa_jax.models.vae``).

Name mapping: dots become nesting, a numeric index joins its parent (``up_blocks.0`` -> ``up_blocks_0``),
the ``nn.Sequential`` index of the resampler conv is dropped (``resample.1`` -> ``resample``), ``gamma`` ->
``scale``, ``weight`` -> ``kernel``. Layouts: conv3d (O, I, kT, kH, kW) -> (kT, kH, kW, I, O); conv2d
(O, I, kH, kW) -> (kH, kW, I, O); the attention 1x1 convs (O, I, 1, 1) -> (I, O); norm gammas (C, 1, ..) -> (C,).
The converted tree is checked against the model's expected shapes: any missing, extra or misshaped key
raises one ``VAECheckpointError`` listing all of them.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import jax
import numpy as np

from dsa_jax.models.vae import AutoencoderKLWan, WanVAEConfig

__all__ = [
    "VAECheckpointError", "vae_params_from_diffusers", "load_diffusers_vae", "read_safetensors",
    "vae_config_to_dict", "vae_config_from_dict", "save_vae_config", "load_vae_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class VAECheckpointError(ValueError):
  """The checkpoint does not match the VAE architecture (missing / extra / misshaped keys)."""


# ----------------------------------------------------------------------------------------------- config io


def vae_config_to_dict(config: WanVAEConfig) -> dict:
  return config.to_dict()


def vae_config_from_dict(d: dict) -> WanVAEConfig:
  return WanVAEConfig.from_dict(d)


def save_vae_config(path: str | os.PathLike, config: WanVAEConfig) -> None:
  """Write the config as JSON atomically (tmp file + os.replace)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(vae_config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_vae_config(path: str | os.PathLike) -> WanVAEConfig:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"VAE config not found: {path}")
  return vae_config_from_dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------- safetensors


def _np_dtype(name: str, file: Path):
  table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  if name == "BF16":
    import ml_dtypes  # shipped with jax
    return ml_dtypes.bfloat16
  if name not in table:
    raise VAECheckpointError(f"{file}: unsupported safetensors dtype {name}")
  return table[name]


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a .safetensors file into numpy arrays (BF16 via ml_dtypes; no torch needed)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"safetensors file not found: {path}")
  with open(path, "rb") as f:
    raw_len = f.read(8)
    if len(raw_len) != 8:
      raise VAECheckpointError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw_len)
    try:
      header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
      raise VAECheckpointError(f"{path}: bad safetensors header ({e})") from None
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    start, end = info["data_offsets"]
    dt = _np_dtype(info["dtype"], path)
    arr = np.frombuffer(data[start:end], dtype=dt).reshape(info["shape"])
    out[key] = np.array(arr)  # own the memory (file may be closed/replaced later)
  return out


# ----------------------------------------------------------------------------------------------- conversion


def _target_path(key: str) -> tuple[str, ...]:
  parts = key.split(".")
  out: list[str] = []
  for p in parts[:-1]:
    if p.isdigit():
      if out and out[-1] == "resample":  # nn.Sequential(Upsample|ZeroPad, Conv2d): index 1 is the conv
        continue
      if not out:
        raise VAECheckpointError(f"unexpected key {key!r}")
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  leaf = parts[-1]
  out.append({"weight": "kernel", "gamma": "scale"}.get(leaf, leaf))
  return tuple(out)


def _convert_array(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
  leaf = path[-1]
  if leaf == "scale":
    return a.reshape(-1)
  if leaf == "kernel":
    if a.ndim == 5:
      return a.transpose(2, 3, 4, 1, 0)
    if a.ndim == 4:
      if path[-2] in ("to_qkv", "proj"):  # attention 1x1 conv2d -> dense (I, O)
        return a.reshape(a.shape[0], a.shape[1]).T
      return a.transpose(2, 3, 1, 0)
  return a


def _expected_shapes(config: WanVAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  import jax.numpy as jnp
  from flax import linen as nn

  s = config.spatial_factor
  video = jax.ShapeDtypeStruct((1, 1 + config.temporal_factor, s, s, config.in_channels), jnp.float32)
  model = AutoencoderKLWan(config)
  shapes = jax.eval_shape(lambda v: nn.meta.unbox(model.init(jax.random.PRNGKey(0), v)["params"]), video)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in kp): tuple(v.shape) for kp, v in flat}


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def vae_params_from_diffusers(state_dict: dict, config: WanVAEConfig | dict, *, dtype=np.float32) -> dict:
  """diffusers ``AutoencoderKLWan`` state dict (name -> numpy array) -> our params tree (numpy, ``dtype``).

  ``config`` is a ``WanVAEConfig`` or a diffusers config dict. Raises ``VAECheckpointError`` listing every
  missing, unexpected and misshaped key (diffusers names) if the checkpoint does not match.
  """
  if isinstance(config, dict):
    config = WanVAEConfig.from_diffusers_config(config)
  expected = _expected_shapes(config)
  converted: dict[tuple[str, ...], np.ndarray] = {}
  extra, misshaped, bad = [], [], []
  misshaped_paths = set()
  for key, value in state_dict.items():
    try:
      path = _target_path(key)
    except VAECheckpointError:
      bad.append(key)
      continue
    if path not in expected:
      extra.append(key)
      continue
    if hasattr(value, "detach"):  # a torch tensor (any dtype, incl. bf16)
      value = value.detach().float().cpu().numpy()
    a = np.asarray(value)
    a = _convert_array(path, a)
    if tuple(a.shape) != expected[path]:
      misshaped.append(f"{key}: got {tuple(np.shape(value))} -> {tuple(a.shape)}, "
                       f"expected {expected[path]} ({'/'.join(path)})")
      misshaped_paths.add(path)
      continue
    if path in converted:
      bad.append(f"{key} (duplicate target {'/'.join(path)})")
      continue
    converted[path] = a.astype(dtype)
  missing = sorted("/".join(p) for p in expected if p not in converted and p not in misshaped_paths)
  if extra or misshaped or missing or bad:
    lines = ["diffusers AutoencoderKLWan checkpoint does not match WanVAEConfig "
             f"(base_dim={config.base_dim}, z_dim={config.z_dim}, dim_mult={list(config.dim_mult)}, "
             f"num_res_blocks={config.num_res_blocks}):"]
    if missing:
      lines.append(f"  missing ({len(missing)}, our names): " + ", ".join(missing))
    if extra or bad:
      lines.append(f"  unexpected ({len(extra) + len(bad)}): " + ", ".join(sorted(extra + bad)))
    if misshaped:
      lines.append(f"  misshaped ({len(misshaped)}):\n    " + "\n    ".join(misshaped))
    raise VAECheckpointError("\n".join(lines))
  return _nest(converted)


def load_diffusers_vae(path: str | os.PathLike, config: WanVAEConfig | dict | None = None,
                       *, dtype=np.float32) -> tuple[dict, WanVAEConfig]:
  """Load a diffusers VAE: a folder (config.json + diffusion_pytorch_model.safetensors, or a sharded
  ``.index.json``) or a single ``.safetensors`` file (config: the argument, else a config.json beside it,
  else the Wan2.1 defaults). Returns ``(params, WanVAEConfig)``."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"VAE checkpoint not found: {path}")
  folder = path if path.is_dir() else path.parent
  if config is None:
    cfg_file = folder / CONFIG_NAME
    if cfg_file.is_file():
      config = WanVAEConfig.from_diffusers_config(json.loads(cfg_file.read_text()))
    elif path.is_dir():
      raise FileNotFoundError(f"VAE folder {path} has no {CONFIG_NAME}")
    else:
      config = WanVAEConfig()
  elif isinstance(config, dict):
    config = WanVAEConfig.from_diffusers_config(config)

  if path.is_dir():
    index = path / INDEX_NAME
    single = path / WEIGHTS_NAME
    if single.is_file():
      files = [single]
    elif index.is_file():
      weight_map = json.loads(index.read_text()).get("weight_map")
      if not isinstance(weight_map, dict):
        raise VAECheckpointError(f"{index}: no 'weight_map' dict")
      files = [path / f for f in sorted(set(weight_map.values()))]
    else:
      found = sorted(p.name for p in path.glob("*.safetensors"))
      if len(found) == 1:
        files = [path / found[0]]
      else:
        raise FileNotFoundError(
            f"VAE folder {path}: expected {WEIGHTS_NAME} or {INDEX_NAME}, found {found or 'no safetensors'}")
  elif path.suffix == ".safetensors":
    files = [path]
  else:
    raise FileNotFoundError(f"VAE checkpoint {path}: expected a diffusers folder or a .safetensors file")

  state: dict[str, np.ndarray] = {}
  for f in files:
    part = read_safetensors(f)
    dup = sorted(set(part) & set(state))
    if dup:
      raise VAECheckpointError(f"{f}: keys already seen in another shard: {dup[:10]}")
    state.update(part)
  return vae_params_from_diffusers(state, config, dtype=dtype), config
