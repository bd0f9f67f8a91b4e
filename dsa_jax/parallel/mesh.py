"""Device mesh, logical-axis shardings and multi-host start-up.

The mesh has the axes ('data', 'fsdp', 'tensor'); `config.mesh.shape` gives their sizes, one of which may be -1
("all remaining devices"). Parameters carry logical axis names (flax `LogicallyPartitioned` boxes); the rules in
`config.mesh.rules` map them to mesh axes. Two details the stock flax helpers do not handle and we need:
  * a logical name may occur twice in one parameter (e.g. ('embed', 'embed') for a square projection): only the first
    occurrence takes the mesh axis, later ones stay replicated;
  * a dimension that a mesh axis does not divide (a 16-channel output head over fsdp=32) stays replicated instead of
    failing at `device_put`.
Activations: `activation_context` turns on the model's activation constraints (`constrain_activation`, by the
activation_* logical names); our own code constrains the large arrays it creates (KV cache, rollout outputs).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """The configured mesh does not fit the available devices or the batch."""


def resolve_mesh_shape(shape: dict | Any, num_devices: int) -> dict[str, int]:
  """Fills in a -1 size so that the product equals `num_devices`; checks that it does."""
  shape = {k: int(shape[k]) for k in AXES}
  unknown = [k for k, v in shape.items() if v == -1]
  if len(unknown) > 1:
    raise MeshError(f"config.mesh.shape: at most one axis may be -1, got {shape}")
  known = math.prod(v for v in shape.values() if v != -1)
  if any(v == 0 or v < -1 for v in shape.values()):
    raise MeshError(f"config.mesh.shape: sizes must be >= 1 or -1, got {shape}")
  if unknown:
    if num_devices % known:
      raise MeshError(f"config.mesh.shape: {num_devices} devices do not divide by the fixed axes {shape} "
                      f"(product {known})")
    shape[unknown[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise MeshError(f"config.mesh.shape: {shape} uses {math.prod(shape.values())} devices but {num_devices} are "
                    "available (use -1 on one axis to take the rest)")
  return shape


def make_mesh(config=None, devices: Sequence[jax.Device] | None = None, shape: dict | None = None) -> Mesh:
  """Mesh ('data', 'fsdp', 'tensor') over `devices` (default: all, every host) from `config.mesh.shape`."""
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = dict(config.mesh.shape) if config is not None else {"data": -1, "fsdp": 1, "tensor": 1}
  sizes = resolve_mesh_shape(shape, len(devices))
  dims = tuple(sizes[a] for a in AXES)
  try:  # topology-aware order on TPU/GPU (ICI rings); plain order where the helper cannot place the shape
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices, dtype=object).reshape(dims)
  return Mesh(arr, AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def rules_from_config(config) -> tuple:
  """`config.mesh.rules` as a tuple of (logical name, mesh axes) pairs."""
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in config.mesh.rules)


def _rule_table(rules) -> dict[str, Any]:
  table = {}
  for name, axes in rules:
    table.setdefault(name, axes)  # first rule wins, as in flax
  return table


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None, mesh: Mesh, rules) -> P:
  """PartitionSpec for one array: logical names -> mesh axes, each mesh axis used once, non-dividing axes dropped."""
  if names is None:
    return P()
  table = _rule_table(rules)
  sizes = mesh_sizes(mesh)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = table.get(name) if isinstance(name, str) else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in sizes and a not in used and sizes[a] > 1)
    if shape is not None and axes:
      # keep the longest prefix of axes whose product divides the dimension
      keep = []
      for a in axes:
        if shape[i] % (math.prod(sizes[b] for b in keep) * sizes[a]) == 0:
          keep.append(a)
        else:
          break
      axes = tuple(keep)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned) or isinstance(x, nn.Partitioned)


def unbox(tree):
  """Plain values of a boxed tree without flax's sharding constraint (which rejects repeated logical names)."""
  return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def param_specs(boxed_tree, mesh: Mesh, rules):
  """Tree of PartitionSpecs for a boxed (LogicallyPartitioned) parameter tree; unboxed leaves are replicated."""
  def one(x):
    if _is_box(x):
      value = x.value
      return logical_to_spec(x.names, getattr(value, "shape", None), mesh, rules)
    return P()
  return jax.tree_util.tree_map(one, boxed_tree, is_leaf=_is_box)


def param_shardings(boxed_tree, mesh: Mesh, rules):
  """Tree of NamedShardings (same structure as the unboxed params) for a boxed parameter tree."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(boxed_tree, mesh, rules),
                                is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  sizes = mesh_sizes(mesh)
  return sizes["data"] * sizes["fsdp"]


def check_batch(global_batch: int, mesh: Mesh, field: str = "train.batch_size"):
  d = batch_divisor(mesh)
  if global_batch % d:
    raise MeshError(f"config.{field}={global_batch} must divide by data x fsdp = {d} of the mesh {mesh_sizes(mesh)}")
  if global_batch % jax.process_count():
    raise MeshError(f"config.{field}={global_batch} must divide by the number of hosts {jax.process_count()}")


def check_process_batch_layout(mesh: Mesh):
  """Every host must own distinct rows of the batch (each host feeds its own examples): the batch axes (data, fsdp)
  may span hosts, the 'tensor' axis must stay inside a host."""
  if jax.process_count() == 1:
    return
  sizes = mesh_sizes(mesh)
  owners: dict[int, set] = {}
  for idx in np.ndindex(mesh.devices.shape):
    block = idx[0] * sizes["fsdp"] + idx[1]
    owners.setdefault(block, set()).add(mesh.devices[idx].process_index)
  shared = sorted(b for b, o in owners.items() if len(o) > 1)
  if shared:
    raise MeshError(f"config.mesh.shape {sizes}: the 'tensor' axis spans hosts, so several hosts would have to feed "
                    f"the same batch rows ({len(shared)} of {len(owners)} batch blocks); keep tensor parallelism "
                    "within a host (tensor <= devices per host)")


def constrain(x, names: Sequence[str | None], mesh: Mesh | None, rules):
  """`with_sharding_constraint` by logical names (divisibility-aware); a no-op without a mesh."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("dsa_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_context(mesh: Mesh | None, rules, *, model_constraints: bool = True):
  """The mesh in context while tracing a step or the sampler, and (by default) the model's activation constraints.

  With `model_constraints`, every `constrain_activation` in the model (the residual stream, attention queries, the
  FFN hidden layer, by their activation_* logical names) becomes a sharding constraint under `rules`; without, XLA
  propagates shardings from the parameters and inputs alone. Our own constraint (rather than flax's
  `nn.logical_axis_rules`) keeps flax from also constraining the boxed parameters, and is divisibility-aware like
  the parameter shardings.
  """
  if mesh is None:
    yield
    return
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    token = _ACTIVATIONS.set((mesh, tuple(rules), model_constraints) if mesh.size > 1 else None)
    stack.callback(_ACTIVATIONS.reset, token)
    yield


@contextlib.contextmanager
def without_activation_constraints():
  """For a per-device body (`jax.shard_map`) traced inside `activation_context`: the model's activation constraints
  name mesh axes that are manual there, so they are off until the body is traced."""
  token = _ACTIVATIONS.set(None)
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain_activation(x, names: Sequence[str | None]):
  """Constrains a model activation by logical names inside `activation_context`; a no-op elsewhere."""
  active = _ACTIVATIONS.get()
  if active is None or not active[2]:
    return x
  return constrain(x, names, active[0], active[1])


def active_mesh():
  """(mesh, rules) of the enclosing `activation_context` over more than one device, else None (kernels that XLA
  cannot partition, like splash attention, run per shard under `shard_map` with it)."""
  active = _ACTIVATIONS.get()
  return None if active is None else active[:2]


# ----------------------------------------------------------------------------------------------------------------------
# Multi-host


_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "DSA_JAX_COORDINATOR")


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, local_device_ids=None) -> bool:
  """Calls `jax.distributed.initialize()` when this is (or says it is) a multi-host run; returns whether it did.

  Must run before anything touches `jax.devices()`. Triggers: explicit arguments; the environment variables
  DSA_JAX_COORDINATOR (host:port) with DSA_JAX_NUM_PROCESSES and DSA_JAX_PROCESS_ID (our launch scripts for GPU
  boxes), or JAX_COORDINATOR_ADDRESS (jax's own); a TPU pod slice (several TPU_WORKER_HOSTNAMES), SLURM with
  several tasks, or Open MPI — where jax discovers everything itself.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  if coordinator_address is None and env.get("DSA_JAX_COORDINATOR"):
    coordinator_address = env["DSA_JAX_COORDINATOR"]
    num_processes = int(env.get("DSA_JAX_NUM_PROCESSES", num_processes or 0)) or None
    process_id = int(env["DSA_JAX_PROCESS_ID"]) if "DSA_JAX_PROCESS_ID" in env else process_id
  explicit = coordinator_address is not None
  auto = (
      "JAX_COORDINATOR_ADDRESS" in env
      or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
      or int(env.get("SLURM_NTASKS", "1") or 1) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
  )
  if not (explicit or auto):
    return False
  kwargs = {}
  if coordinator_address is not None:
    kwargs.update(coordinator_address=coordinator_address)
  if num_processes is not None:
    kwargs.update(num_processes=num_processes)
  if process_id is not None:
    kwargs.update(process_id=process_id)
  if local_device_ids is not None:
    kwargs.update(local_device_ids=local_device_ids)
  jax.distributed.initialize(**kwargs)
  return True


def describe(mesh: Mesh) -> str:
  sizes = mesh_sizes(mesh)
  return (f"mesh data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']} over {mesh.size} "
          f"{mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es)")
