"""Will it fit? Per-device bytes of a config's sampler and training step on a mesh, from the compiled programs.

Everything is abstract (`jax.ShapeDtypeStruct`s with shardings): the programs are lowered and compiled for the mesh
but nothing is allocated, so a 14B config can be checked on a laptop. Parameters, optimizer state and the KV cache
are the bytes of each array's shard on one device; peak activations are XLA's temporary buffer size
(`compiled.memory_analysis()`); the total is arguments + outputs - donated (aliased) buffers + temporaries.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.parallel import mesh as mesh_lib

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_bytes(text: str, field: str = "--device-memory") -> int:
  """'16GB' (10^9), '16GiB' (2^30), '8e9' -> bytes."""
  m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"{field}: expected a size like 16GB, 16GiB or 8e9, got {text!r}")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_mesh(text: str, field: str = "--mesh") -> dict[str, int]:
  """'data=1,tensor=8' -> {'data': 1, 'fsdp': 1, 'tensor': 8} (axes not named are 1)."""
  shape = {a: 1 for a in mesh_lib.AXES}
  for part in filter(None, str(text).split(",")):
    name, _, value = part.partition("=")
    if name.strip() not in shape or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"{field}: expected axis=size pairs over {', '.join(mesh_lib.AXES)} (e.g. data=1,tensor=8), "
                       f"got {text!r}")
    shape[name.strip()] = int(value)
  return shape


def shard_bytes(tree) -> int:
  """Bytes of one device's shard of every array in a tree of ShapeDtypeStructs/arrays with shardings."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = tuple(x.shape)
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


def _with_shardings(shapes, shardings):
  return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _compiled_memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  get = lambda name: int(getattr(ma, name, 0) or 0)
  out = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
         "donated": get("alias_size_in_bytes"), "activations_peak": get("temp_size_in_bytes"),
         "code": get("generated_code_size_in_bytes")}
  out["total"] = out["arguments"] + out["outputs"] - out["donated"] + out["activations_peak"]
  return out


def sampling_memory(config, mesh, batch: int, use_cfg: bool | None = None) -> dict:
  """Per-device bytes of the whole-video sampler for `batch` videos (CFG per config.sampling.guidance)."""
  from dsa_jax.checkpoint.loading import cast_params_for_inference
  from dsa_jax.diffusion.guidance import is_on
  from dsa_jax.models import factory
  from dsa_jax.sampling import sampler as sampler_lib

  sm = sampler_lib.make_sampler(config, mesh=mesh)
  use_cfg = is_on(config.sampling.guidance) if use_cfg is None else use_cfg
  # the generator's matmul kernels in the compute dtype, as `dsa-jax sample` loads them
  gen = jax.eval_shape(lambda k: cast_params_for_inference(mesh_lib.unbox(factory.init_dit(sm.dcfg, config, k)),
                                                           sm.dcfg.dtype), jax.random.PRNGKey(0))
  head = mesh_lib.unbox(factory.abstract_head_params(config))
  params = {"generator": gen, "head": head}
  ctx = jax.ShapeDtypeStruct((batch, sm.dcfg.text_len, sm.dcfg.text_dim), jnp.float32)
  args = (params, ctx, ctx if use_cfg else None, sm.make_controls(batch), jax.random.PRNGKey(0),
          jax.eval_shape(lambda: sm.new_cache(batch, use_cfg)))
  if sm.mesh is not None:
    args = tuple(_with_shardings(a, s) if a is not None else None for a, s in zip(args, sm._arg_shardings(args)))
  compiled = sm.lower(args, use_cfg).compile()
  out = {"batch": batch, "cfg": bool(use_cfg), "params": shard_bytes(args[0]), "kv_cache": shard_bytes(args[5])}
  out.update(_compiled_memory(compiled))
  return out


def training_memory(config, mesh) -> dict:
  """Per-device bytes of one training step of config.train.stage ('gen' step for DSA) at train.batch_size."""
  from dsa_jax.models import factory
  from dsa_jax.training import state as state_lib
  from dsa_jax.training import steps as steps_lib

  rules = mesh_lib.rules_from_config(config)
  bundle = steps_lib.build_steps(config, mesh, rules)
  state = state_lib.abstract_state(config, bundle.state_shardings)
  stage = config.train.stage
  teacher = None
  if bundle.teacher_shardings is not None:
    tcfg = factory.dit_config(config, "teacher")
    shapes = jax.eval_shape(lambda k: steps_lib.frozen_cast(mesh_lib.unbox(factory.init_dit(tcfg, config, k)),
                                                            tcfg.dtype), jax.random.PRNGKey(0))
    teacher = _with_shardings(shapes, bundle.teacher_shardings)
  b, text = int(config.train.batch_size), (config.model.text_len, config.model.text_dim)
  batch = {"context": jax.ShapeDtypeStruct((b,) + text, jnp.float32, sharding=bundle.batch_sharding)}
  if stage == "teacher" or (stage == "ode" and config.train.ode_pairs):
    from dsa_jax.config_lib import latent_hw
    lh, lw = latent_hw(config)
    video = (b, config.video.num_frames, lh, lw, config.model.in_channels)
    batch["video"] = jax.ShapeDtypeStruct(video, jnp.float32, sharding=bundle.batch_sharding)
    if stage == "ode":
      traj = (b, int(config.train.ode_steps) + 1) + video[1:]
      batch["trajectory"] = jax.ShapeDtypeStruct(traj, jnp.float32, sharding=bundle.batch_sharding)
  uncond = jax.ShapeDtypeStruct((1,) + text, jnp.float32, sharding=mesh_lib.replicated(mesh))
  name = bundle.step_name(0, config)
  with mesh_lib.activation_context(mesh, rules):
    compiled = bundle.fns[name].lower(state, teacher, batch, uncond).compile()
  opt = [getattr(state, f) for f in ("gen_opt", "head_opt", "critic_opt", "teacher_opt")]
  out = {"stage": stage, "step": name, "batch": b, "params": shard_bytes(state.networks()) + shard_bytes(teacher),
         "optimizer_state": shard_bytes(opt)}
  out.update(_compiled_memory(compiled))
  return out


def fit_report(config, mesh, device_memory: int | None, batch: int,
               programs: tuple[str, ...] = ("sampling", "training")) -> dict:
  """{'sampling': ..., 'training': ...} per-device bytes (of the `programs` asked for) and, with `device_memory`,
  whether each fits."""
  out = {"mesh": mesh_lib.mesh_sizes(mesh), "devices": f"{mesh.size} x {mesh.devices.flat[0].device_kind}"}
  for name, fn in (("sampling", lambda: sampling_memory(config, mesh, batch)),
                   ("training", lambda: training_memory(config, mesh))):
    if name not in programs:
      continue
    r = fn()
    if device_memory:
      r["fits"] = r["total"] <= device_memory
      r["device_memory"] = device_memory
    r["total_gb"] = round(r["total"] / 1e9, 3)
    out[name] = r
  return out
