"""Loading and validating ml_collections configs (big_vision style: one `get_config(arg)` per file).

A config is named on the command line as `--config path/to/file.py[:arg]` or by the name of a shipped config
(`--config digits:teacher`, from dsa_jax/configs/, so an installed package needs no repository checkout) and
overridden field by field with
`--config.train.steps=10`. Every config goes through `validate_config`, so a wrong value fails at load with a
message naming the field, not deep inside a jitted function.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and what was expected."""


BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def builtin_configs() -> list[str]:
  """Names of the configs shipped inside the package (dsa_jax/configs/NAME.py)."""
  return sorted(f[:-3] for f in os.listdir(BUILTIN_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_path(path: str) -> str:
  """A config file path, or the name of a shipped config ('digits', 'digits.py', 'configs/digits.py' when no such
  file exists here): installed packages and other working directories find the shipped configs by name."""
  if os.path.isfile(path):
    return path
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  shipped = os.path.join(BUILTIN_DIR, name + ".py")
  if os.path.dirname(path) in ("", "configs") and name in builtin_configs():
    return shipped
  raise FileNotFoundError(f"config {path!r}: no such file, and not a shipped config (one of "
                          f"{', '.join(builtin_configs())})")


# Confidence-head training targets (dsa_jax.training.losses): 'dmd' (default: the best quality per step on moving
# digits, docs/claim.md) = teacher/critic disagreement on the exit x0; 'remaining' = how little the frame's x0 would
# still change by the last ladder step (log-quantile normalised; its confidence rises with every step);
# 'consistency' = the same distance with a fixed or running-mean scale.
CONF_TARGETS = ("remaining", "gain", "consistency", "dmd")
# targets on a running log scale of an x0 change, whose normalisation (`log_range`) a model records with its head
LOG_SCALE_TARGETS = ("remaining", "gain")
# compute.remat: what the DiT's blocks keep for the backward pass ('none': everything; 'full': only their inputs;
# 'dots' / 'dots_no_batch': also matmul outputs; 'attention_saved': their inputs and the self-attention kernel's
# inputs, output and softmax statistics, the rest recomputed)
REMAT_MODES = ("none", "full", "dots", "dots_no_batch", "attention_saved")


def _load_module(spec: str):
  path = resolve_config_path(spec.partition(":")[0])
  module_name = "dsa_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
  except Exception as e:  # pylint: disable=broad-except  (the user's file failed: say where, in one line)
    raise ConfigError(f"{_where(e, path)}: {type(e).__name__}: {e}") from None
  return module


def _where(error: BaseException, path: str) -> str:
  """'path:line' of the deepest traceback frame inside the config file."""
  line, tb = None, error.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = tb.tb_lineno
    tb = tb.tb_next
  return f"{path}:{line}" if line else path


def load_config_file(spec: str, module=None) -> ml_collections.ConfigDict:
  """Loads `file.py[:arg]` by calling its `get_config(arg)` (`module`: the file, if already loaded)."""
  path, _, arg = spec.partition(":")
  module = module or _load_module(spec)
  path = module.__file__
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, got {type(config).__name__}")
  return config


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as `bfloat16`


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` (or `config.a.b=value`) overrides; unknown fields are errors."""
  config = config.copy_and_resolve_references()
  for item in overrides:
    item = item[2:] if item.startswith("--") else item
    if not item.startswith("config.") or "=" not in item:
      raise ConfigError(f"bad override {item!r}: expected --config.FIELD=VALUE")
    key, _, raw = item[len("config."):].partition("=")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"override {key!r}: config has no field {'.'.join(parts[:i + 1])!r}")
      node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"override {key!r}: config has no field {key!r}")
    value = _parse_value(raw)
    old = node[leaf]
    if isinstance(old, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"  # absl flags and YAML habits: --config.x=false
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, list) and isinstance(value, tuple):
      value = list(value)
    if old is not None and isinstance(value, str) and not isinstance(old, str):
      raise ConfigError(f"override {key!r}: expected a {type(old).__name__}, got {raw!r}")
    try:
      with node.ignore_type():
        node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"override {key!r}={raw!r}: {e}") from e
  return config


def get_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads, overrides and validates a config.

  `--config.runlocal=True` asks for the toy-size variant: a config file that defines `runlocal(config)` shrinks the
  config there, before the other command-line overrides (as in big_vision), so they apply to the toy size too and
  one recipe serves both a GPU/TPU run and a few-minute CPU check.
  """
  module = _load_module(spec)
  config = load_config_file(spec, module)
  is_runlocal = lambda o: o.removeprefix("--").partition("=")[0] == "config.runlocal"
  config = apply_overrides(config, [o for o in overrides if is_runlocal(o)])
  if config.runlocal and hasattr(module, "runlocal"):
    config = module.runlocal(config)
  config = apply_overrides(config, [o for o in overrides if not is_runlocal(o)])
  validate_config(config)
  return config


# ----------------------------------------------------------------------------------------------------------------------
# Validation


def _require(cond: bool, field: str, msg: str):
  if not cond:
    raise ConfigError(f"config.{field}: {msg}")


def validate_model_config(m, field: str = "model"):
  """Checks one DiT config (generator, teacher or critic)."""
  for name in ("dim", "ffn_dim", "num_layers", "num_heads", "text_dim", "text_len", "in_channels", "out_channels",
               "freq_dim"):
    _require(isinstance(m[name], int) and m[name] > 0, f"{field}.{name}", f"must be a positive int, got {m[name]!r}")
  _require(m.dim % m.num_heads == 0, f"{field}.num_heads",
           f"{m.num_heads} heads do not divide {field}.dim={m.dim}")
  head_dim = m.dim // m.num_heads
  _require(head_dim % 2 == 0 and head_dim >= 6, f"{field}.num_heads",
           f"head dim {head_dim} (= dim / num_heads) must be even and >= 6 for the 3D RoPE split")
  _require(m.freq_dim % 2 == 0, f"{field}.freq_dim", f"must be even, got {m.freq_dim}")
  _require(len(m.patch_size) == 3 and all(isinstance(p, int) and p > 0 for p in m.patch_size),
           f"{field}.patch_size", f"must be 3 positive ints (t, h, w), got {m.patch_size!r}")


def latent_hw(config) -> tuple[int, int]:
  """Latent frame height and width (pixels over the VAE's spatial stride)."""
  _, sh, sw = config.video.vae_stride
  return config.video.height // sh, config.video.width // sw


def rollout_exit_steps(config) -> int:
  """How many ladder steps a training rollout may exit at: train.exit_steps, else len(train.ladder) where that is
  set, else sampling.max_steps; at most the training ladder's length."""
  train_ladder = tuple(config.train.get("ladder") or ())
  n = int(config.train.exit_steps or (len(train_ladder) if train_ladder else config.sampling.max_steps))
  return max(1, min(n, len(train_ladder or tuple(config.sampling.ladder))))


def tokens_per_frame(config) -> int:
  """Tokens of one latent frame after patchifying."""
  _, ph, pw = config.model.patch_size
  lh, lw = latent_hw(config)
  return (lh // ph) * (lw // pw)


def pixel_frames(config) -> int:
  """Output video frames: Wan's causal VAE maps 1 + 4k pixel frames to 1 + k latent frames."""
  st = config.video.vae_stride[0]
  return 1 + (config.video.num_frames - 1) * st


def validate_config(config: ml_collections.ConfigDict):
  """Raises ConfigError naming the first invalid field."""
  for section in ("model", "video", "diffusion", "sampling", "compute"):
    _require(section in config, section, "missing section")
  validate_model_config(config.model, "model")
  for other in ("teacher", "critic"):
    if other in config and config[other] is not None:
      validate_model_config(config[other], other)
      for name in ("in_channels", "out_channels", "text_dim", "text_len"):
        _require(config[other][name] == config.model[name], f"{other}.{name}",
                 f"must equal model.{name}={config.model[name]} (teacher, critic and generator share inputs)")
      _require(tuple(config[other].patch_size) == tuple(config.model.patch_size), f"{other}.patch_size",
               "must equal model.patch_size")

  v = config.video
  _require(v.vae_stride[0] >= 1 and v.vae_stride[1] >= 1 and v.vae_stride[2] >= 1, "video.vae_stride",
           f"must be positive, got {v.vae_stride!r}")
  st, sh, sw = v.vae_stride
  pt, ph, pw = config.model.patch_size
  _require(pt == 1, "model.patch_size", "temporal patch must be 1 for per-frame timesteps (got "
           f"{config.model.patch_size!r})")
  _require(v.height % (sh * ph) == 0, "video.height",
           f"{v.height} must divide by vae stride x patch = {sh}x{ph} = {sh * ph}")
  _require(v.width % (sw * pw) == 0, "video.width",
           f"{v.width} must divide by vae stride x patch = {sw}x{pw} = {sw * pw}")
  _require(v.num_frames > 0, "video.num_frames", f"must be positive, got {v.num_frames}")
  _require(isinstance(v.get("fps", 16), (int, float)) and math.isfinite(v.get("fps", 16)) and v.get("fps", 16) > 0,
           "video.fps", f"must be a positive number of frames per second (of the written videos), got {v.get('fps')!r}")
  _require(v.chunk_frames > 0 and v.num_frames % v.chunk_frames == 0, "video.chunk_frames",
           f"{v.chunk_frames} must divide video.num_frames={v.num_frames}")
  _require(v.num_frames <= config.model.rope_max_frames, "video.num_frames",
           f"{v.num_frames} exceeds model.rope_max_frames={config.model.rope_max_frames}")
  _require(v.latent_channels == config.model.in_channels, "video.latent_channels",
           f"{v.latent_channels} must equal model.in_channels={config.model.in_channels}")

  d = config.diffusion
  _require(d.shift > 0, "diffusion.shift", f"must be > 0, got {d.shift}")
  _require(d.num_train_timesteps > 0, "diffusion.num_train_timesteps", "must be positive")

  s = config.sampling
  ladder = list(s.ladder)
  _require(len(ladder) >= 1, "sampling.ladder", "must not be empty")
  _require(all(isinstance(t, (int, float)) for t in ladder), "sampling.ladder", f"must be numbers, got {ladder!r}")
  _require(all(a > b for a, b in zip(ladder, ladder[1:])), "sampling.ladder",
           f"must be strictly decreasing, got {ladder!r}")
  _require(0 < ladder[-1] and ladder[0] <= d.num_train_timesteps, "sampling.ladder",
           f"timesteps must lie in (0, {d.num_train_timesteps}], got {ladder!r}")
  tl = list(config.train.get("ladder") or ())
  _require(all(isinstance(t, (int, float)) for t in tl) and all(a > b for a, b in zip(tl, tl[1:]))
           and all(0 < t <= d.num_train_timesteps for t in tl), "train.ladder",
           f"must be () or strictly decreasing timesteps in (0, {d.num_train_timesteps}], got {tl!r}")
  n_exit = rollout_exit_steps(config)
  first_exit = config.train.get("min_exit_steps", 1)
  _require(isinstance(first_exit, int) and not isinstance(first_exit, bool) and 1 <= first_exit <= n_exit,
           "train.min_exit_steps",
           f"must be an integer in [1, {n_exit}] (the rollout's exit steps), got {first_exit!r}")
  _require(1 <= s.min_steps <= len(ladder), "sampling.min_steps",
           f"must lie in [1, len(sampling.ladder)={len(ladder)}], got {s.min_steps}")
  _require(s.min_steps <= s.max_steps <= len(ladder), "sampling.max_steps",
           f"must lie in [sampling.min_steps={s.min_steps}, len(sampling.ladder)={len(ladder)}], got {s.max_steps}")
  fc = s.get("first_chunk_min_steps", 0)
  _require(isinstance(fc, int) and not isinstance(fc, bool) and 0 <= fc <= len(ladder),
           "sampling.first_chunk_min_steps",
           f"must be 0 (off) or an integer in [1, len(sampling.ladder)={len(ladder)}], got {fc!r}")
  # a budget below min_steps is allowed: it uses the model's calibration table of a lower floor where it has one
  _require(s.mean_steps == 0 or 1 <= s.mean_steps <= s.max_steps, "sampling.mean_steps",
           f"must be 0 (use sampling.threshold) or lie in [1, max_steps] = [1, {s.max_steps}], got {s.mean_steps}")
  _require(isinstance(s.threshold, float) and not math.isnan(s.threshold), "sampling.threshold",
           f"must be a float (inf allowed), got {s.threshold!r}")
  _require(0.0 <= s.context_noise < d.num_train_timesteps, "sampling.context_noise",
           f"must lie in [0, {d.num_train_timesteps}), got {s.context_noise}")

  _require(s.frozen_frames in ("clean", "noisy"), "sampling.frozen_frames",
           f"must be 'clean' or 'noisy', got {s.frozen_frames!r}")

  _require(s.stop_rule in ("confidence", "x0_delta"), "sampling.stop_rule",
           f"must be 'confidence' or 'x0_delta', got {s.stop_rule!r}")
  _require(isinstance(s.guidance, (int, float)) and math.isfinite(s.guidance), "sampling.guidance",
           f"must be a finite number (1 = off), got {s.guidance!r}")

  c = config.compute
  _require(c.dtype in ("float32", "bfloat16", "float16"), "compute.dtype",
           f"must be float32, bfloat16 or float16, got {c.dtype!r}")
  _require(c.param_dtype in ("float32", "bfloat16"), "compute.param_dtype",
           f"must be float32 or bfloat16, got {c.param_dtype!r}")
  _require(c.attention in ("auto", "xla", "cudnn", "splash"), "compute.attention",
           f"must be auto, xla, cudnn or splash, got {c.attention!r}")
  _require(c.remat in REMAT_MODES, "compute.remat", f"must be one of {', '.join(REMAT_MODES)}, got {c.remat!r}")

  t = config.train
  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
  for name, lo, what in (("steps", 1, "optimiser steps to train"), ("log_every", 1, "steps between progress lines"),
                         ("ckpt_every", 1, "steps between checkpoints"), ("keep", 1, "checkpoints kept")):
    _require(is_int(t[name]) and t[name] >= lo, f"train.{name}", f"must be an integer >= {lo} ({what}), got {t[name]!r}")
  _require(is_int(config.dmd.critic_ratio) and config.dmd.critic_ratio >= 1, "dmd.critic_ratio",
           f"must be an integer >= 1 (critic steps per generator step), got {config.dmd.critic_ratio!r}")
  for name in ("lr", "critic_lr", "conf_lr"):
    _require(isinstance(t[name], (int, float)) and math.isfinite(t[name]) and t[name] >= 0, f"train.{name}",
             f"must be a learning rate >= 0, got {t[name]!r}")
  for name in ("ema_decay", "teacher_ema_decay", "cfg_dropout"):
    _require(isinstance(t[name], (int, float)) and 0.0 <= t[name] <= 1.0, f"train.{name}",
             f"must lie in [0, 1], got {t[name]!r}")
  h = config.conf
  _require(h.hidden > 0, "conf.hidden", "must be positive")
  _require(h.target in CONF_TARGETS, "conf.target", f"must be one of {CONF_TARGETS}, got {h.target!r}")
  _require(not (config.train.stage == "head" and h.target == "dmd"), "conf.target",
           "the 'head' stage has no teacher or critic: use 'remaining', 'gain' or 'consistency', not 'dmd'")

  if "mesh" in config:
    shape = dict(config.mesh.shape)
    _require(set(shape) == {"data", "fsdp", "tensor"}, "mesh.shape",
             f"must have exactly the axes data, fsdp, tensor, got {sorted(shape)}")
    _require(sum(1 for x in shape.values() if x == -1) <= 1, "mesh.shape", "at most one axis may be -1")
    _require(all(x == -1 or x >= 1 for x in shape.values()), "mesh.shape", f"sizes must be >= 1 or -1, got {shape}")
    _require(config.model.num_heads % max(shape["tensor"], 1) == 0, "mesh.shape",
             f"tensor={shape['tensor']} must divide model.num_heads={config.model.num_heads}")
