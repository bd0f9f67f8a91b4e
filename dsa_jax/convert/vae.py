"""diffusers ``AutoencoderKLWan`` checkpoints -> our Flax params (``dsa_jax.models.vae``).

Name mapping: dots become nesting, a numeric index joins its parent (``up_blocks.0`` -> ``up_blocks_0``),
the ``nn.Sequential`` index of the resampler conv is dropped (``resample.1`` -> ``resample``), ``gamma`` ->
``scale``, ``weight`` -> ``kernel``. Layouts: conv3d (O, I, kT, kH, kW) -> (kT, kH, kW, I, O); conv2d
(O, I, kH, kW) -> (kH, kW, I, O); the attention 1x1 convs (O, I, 1, 1) -> (I, O); norm gammas (C, 1, ..) -> (C,).
Files are found and read by `dsa_jax.convert.common`; the converted tree is checked against the model's expected
shapes, and any missing, extra or misshaped key raises one `KeyMismatchError` listing all of them.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from dsa_jax.convert import common
from dsa_jax.models.vae import AutoencoderKLWan, WanVAEConfig

__all__ = ["vae_params_from_diffusers", "load_diffusers_vae"]


# ----------------------------------------------------------------------------------------------- conversion


def _target_path(key: str) -> tuple[str, ...]:
  parts = key.split(".")
  out: list[str] = []
  for p in parts[:-1]:
    if p.isdigit():
      if out and out[-1] == "resample":  # nn.Sequential(Upsample|ZeroPad, Conv2d): index 1 is the conv
        continue
      if not out:
        raise common.ConversionError(f"unexpected key {key!r}")
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
      if path[-2] in ("to_qkv", "proj") and a.shape[2:] == (1, 1):  # attention 1x1 conv2d -> dense (I, O)
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


def vae_params_from_diffusers(state_dict: dict, config: WanVAEConfig | dict, *, dtype=np.float32,
                              source: str = "state dict") -> dict:
  """diffusers ``AutoencoderKLWan`` state dict (name -> array) -> our params tree (numpy, ``dtype``).

  ``config`` is a ``WanVAEConfig`` or a diffusers config dict. Raises ``KeyMismatchError`` listing every missing
  (our names), unexpected (diffusers names) and misshaped key if the checkpoint does not match.
  """
  if isinstance(config, dict):
    config = WanVAEConfig.from_diffusers_config(config)
  expected = {"/".join(p): shape for p, shape in _expected_shapes(config).items()}
  got: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    try:
      path = "/".join(_target_path(key))
    except common.ConversionError:
      path = key
    if path not in expected:
      path = key  # reported under the checkpoint's own name
    if path in got:
      raise common.ConversionError(f"{source}: {key} maps to {path}, which another key already filled")
    a = common.to_numpy(value)
    got[path] = _convert_array(tuple(path.split("/")), a) if path != key else a
  common.check_keys(got, expected, source, what=(
      f"Wan VAE config (base_dim={config.base_dim}, z_dim={config.z_dim}, dim_mult={list(config.dim_mult)}, "
      f"num_res_blocks={config.num_res_blocks})"))
  return _nest({tuple(p.split("/")): np.array(a, dtype=common.np_dtype(dtype)) for p, a in got.items()})


def is_vae_config(d: dict) -> bool:
  """A diffusers VAE config.json (`_class_name` AutoencoderKL*, or none with the VAE's base_dim / z_dim)."""
  cls = d.get("_class_name")
  return "Autoencoder" in str(cls) if cls is not None else ("base_dim" in d or "z_dim" in d)


def load_diffusers_vae(path: str | os.PathLike, config: WanVAEConfig | dict | None = None,
                       *, dtype=np.float32, log=None) -> tuple[dict, WanVAEConfig]:
  """Loads a diffusers VAE: a folder (config.json + diffusion_pytorch_model.safetensors, or shards with an
  ``.index.json``) or a single weights file (config: the argument, else a VAE config.json beside it, else the Wan2.1
  defaults). Returns ``(params, WanVAEConfig)``."""
  path = os.fspath(path)
  log = log or (lambda m: None)
  files, found = common.find_weight_files(path, accepts=is_vae_config, what="VAE", log=log)
  cfg_file = common.config_path(path)
  if config is None:
    if found is None and os.path.isdir(path):
      raise FileNotFoundError(f"VAE folder {path} has no config.json")
    if found is None:
      log("no VAE config.json for the weights: using the Wan2.1 VAE defaults")
    config = WanVAEConfig() if found is None else found
  else:
    cfg_file = "the given VAE config"
  if isinstance(config, dict):
    try:
      config = WanVAEConfig.from_diffusers_config(config)
    except (ValueError, TypeError) as e:
      raise common.ConversionError(f"{cfg_file}: {e}") from e
  state_dicts = common.read_weight_files(files)
  if len(state_dicts) != 1:
    raise common.ConversionError(f"{path}: holds several state dicts {sorted(state_dicts)}; expected one VAE")
  (state,) = state_dicts.values()
  return vae_params_from_diffusers(state, config, dtype=dtype, source=path), config
