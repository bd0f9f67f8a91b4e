"""Training state (one pytree, sharded and checkpointed as a whole) and the optimisers.

Which networks a state holds depends on the stage:
  * 'teacher': teacher (trained) + teacher_opt, and teacher_ema (its EMA, what is exported) when
               `train.teacher_ema_decay` > 0;
  * 'ode':     generator + generator_ema + gen_opt, and an untrained head (exported so the sampler can run fixed-step);
  * 'dsa':     generator, generator_ema, head, critic + their optimiser states, and the DMD running mean d_bar;
  * 'head':    a frozen generator (from train.init_from) and the confidence head, the only network trained: a head
               for an existing few-step generator (e.g. a converted Self Forcing checkpoint), no teacher needed.
Absent networks are None (an empty pytree). The frozen teacher of 'ode'/'dsa' is not part of the state: it is
loaded once, sharded, never donated and never saved with the run.

Parameters are float32 masters (`compute.param_dtype`); the model casts them to `compute.dtype` (bf16) inside.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dsa_jax.models import factory
from dsa_jax.parallel import mesh as mesh_lib

STAGES = ("teacher", "ode", "dsa", "head")
NETWORK_FIELDS = ("generator", "generator_ema", "head", "critic", "teacher", "teacher_ema")
# Networks that are an EMA copy of another: same architecture, initialised equal to it, never optimised.
EMA_OF = {"generator_ema": "generator", "teacher_ema": "teacher"}
OPT_FIELDS = {"generator": "gen_opt", "head": "head_opt", "critic": "critic_opt", "teacher": "teacher_opt"}


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: training iterations done
  rng: jax.Array  # uint32 (2,) base key; step keys are fold_in(rng, step), so a resumed run draws the same numbers
  dbar: jax.Array  # float32 scalar: running mean of the confidence discrepancy (0 before the first update)
  # float32 (2,): running 10th / 90th percentiles of log remaining-change (conf.target 'remaining'; 0 before the first)
  target_range: Any = None
  generator: Any = None
  generator_ema: Any = None
  head: Any = None
  critic: Any = None
  teacher: Any = None  # only when the stage trains the teacher
  teacher_ema: Any = None  # the teacher stage's EMA (train.teacher_ema_decay > 0)
  gen_opt: Any = None
  head_opt: Any = None
  critic_opt: Any = None
  teacher_opt: Any = None

  def networks(self) -> dict:
    return {k: getattr(self, k) for k in NETWORK_FIELDS if getattr(self, k) is not None}


def check_stage(stage: str):
  if stage not in STAGES:
    raise ValueError(f"config.train.stage: expected one of {STAGES}, got {stage!r}")


def stage_networks(stage: str, config=None) -> tuple[str, ...]:
  check_stage(stage)
  if stage == "teacher" and config is not None and float(config.train.teacher_ema_decay) > 0:
    return ("teacher", "teacher_ema")
  return {"teacher": ("teacher",), "ode": ("generator", "generator_ema", "head"),
          "dsa": ("generator", "generator_ema", "head", "critic"), "head": ("generator", "head")}[stage]


def trained_networks(stage: str) -> tuple[str, ...]:
  return {"teacher": ("teacher",), "ode": ("generator",), "dsa": ("generator", "head", "critic"),
          "head": ("head",)}[stage]


def learning_rate(config, lr: float):
  """`train.warmup_steps` of linear warmup, then constant or cosine decay to 5% of `lr` at `train.steps`
  (`train.lr_decay`). A decaying rate is what lets a long run settle instead of hopping between checkpoints."""
  t = config.train
  warmup = int(t.warmup_steps)
  decay = str(t.lr_decay)
  if decay not in ("constant", "cosine"):
    raise ValueError(f"config.train.lr_decay: expected 'constant' or 'cosine', got {decay!r}")
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup > 0 else lr, lr, max(warmup, 1),
                                              max(int(t.steps), warmup + 1), end_value=0.05 * lr)
  if warmup > 0:
    return optax.linear_schedule(0.0, lr, warmup)
  return lr


ADAM_FIRST_MOMENT = ("auto", "keep")


def drops_first_moment(config) -> bool:
  """Whether the generator/critic/teacher optimisers store no first moment (beta1 = 0 and 'auto')."""
  t = config.train
  mode = str(t.get("adam_first_moment", "auto"))
  if mode not in ADAM_FIRST_MOMENT:
    raise ValueError(f"config.train.adam_first_moment: expected one of {ADAM_FIRST_MOMENT}, got {mode!r}")
  return mode == "auto" and float(t.b1) == 0.0


def make_optimizer(config, network: str) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (Self Forcing: betas (0, 0.999), weight decay 0.01, clip 10).

  The confidence head is a fresh small MLP: it uses Adam's usual beta1 = 0.9, `train.conf_lr`, no weight decay.
  With beta1 = 0 (the DSA stage) Adam's first moment equals the gradient, so by default none is stored
  (`train.adam_first_moment='auto'`): the same update from the second moment alone, one fp32 copy of the generator
  and of the critic less in device memory. 'keep' stores it (what optimiser states saved before had).
  """
  t = config.train
  if network == "head":
    tx = optax.adamw(learning_rate(config, t.conf_lr), b1=0.9, b2=0.999, weight_decay=0.0)
  else:
    lr = {"generator": t.lr, "critic": t.critic_lr, "teacher": t.lr}[network]
    if drops_first_moment(config):
      tx = optax.chain(optax.scale_by_rms(decay=t.b2, eps=1e-8, eps_in_sqrt=False, bias_correction=True),
                       optax.add_decayed_weights(t.weight_decay), optax.scale_by_learning_rate(learning_rate(config, lr)))
    else:
      tx = optax.adamw(learning_rate(config, lr), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  if t.grad_clip and t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  return tx


def optimizers(config) -> dict[str, optax.GradientTransformation]:
  stage = config.train.stage
  return {n: make_optimizer(config, n) for n in trained_networks(stage)}


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation (boxed, so that shardings come from the logical names)


def init_boxed_networks(config, key) -> dict:
  """Boxed params of every network of the stage. The EMA starts equal to the generator; the critic is initialised
  randomly here and replaced by the teacher's weights when the trainer has a teacher of the critic's architecture."""
  names = stage_networks(config.train.stage, config)
  keys = dict(zip(NETWORK_FIELDS, jax.random.split(key, len(NETWORK_FIELDS))))
  out = {n: factory.init_network(config, n, keys[n]) for n in names if n not in EMA_OF}
  out.update({n: out[EMA_OF[n]] for n in names if n in EMA_OF})
  return out


def abstract_boxed_networks(config) -> dict:
  return jax.eval_shape(lambda k: init_boxed_networks(config, k), jax.random.PRNGKey(0))


def _replicated_like(tree, mesh):
  return jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), tree)


def state_shardings(config, mesh, rules, abstract_boxed: dict | None = None) -> TrainState:
  """NamedShardings for every leaf of the stage's TrainState: params by logical names, optimiser moments like their
  params, scalars (counts, step, rng, d_bar) replicated."""
  boxed = abstract_boxed if abstract_boxed is not None else abstract_boxed_networks(config)
  net_sh = {n: mesh_lib.param_shardings(b, mesh, rules) for n, b in boxed.items()}
  abstract_params = {n: mesh_lib.unbox(b) for n, b in boxed.items()}
  opt_sh = {}
  for n, tx in optimizers(config).items():
    abstract_opt = jax.eval_shape(tx.init, abstract_params[n])
    opt_sh[OPT_FIELDS[n]] = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, net_sh[n],
        transform_non_params=lambda _: mesh_lib.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  rep = mesh_lib.replicated(mesh)
  return TrainState(step=rep, rng=rep, dbar=rep, target_range=rep, **net_sh, **opt_sh)


def init_state(config, key, *, networks: dict | None = None) -> TrainState:
  """Unsharded construction (run it under jit with out_shardings to create it sharded). `networks` overrides
  freshly initialised params (e.g. the generator from a previous stage); values may be boxed or plain."""
  k_init, k_rng = jax.random.split(key)
  nets = {n: mesh_lib.unbox(b) for n, b in init_boxed_networks(config, k_init).items()}
  networks = dict(networks or {})
  for ema, src in EMA_OF.items():
    if src in networks and ema in nets and ema not in networks:
      networks[ema] = networks[src]
  for n, p in networks.items():
    if n not in nets:
      raise ValueError(f"stage {config.train.stage!r} has no network {n!r} (it has {sorted(nets)})")
    nets[n] = mesh_lib.unbox(p)
  opts = {OPT_FIELDS[n]: tx.init(nets[n]) for n, tx in optimizers(config).items()}
  return TrainState(step=jnp.zeros((), jnp.int32), rng=k_rng,
                    dbar=jnp.zeros((), jnp.float32), target_range=jnp.zeros((2,), jnp.float32), **nets, **opts)


# Fields that never change a compiled program (bookkeeping, data, paths): left out of the cache keys.
_NON_PROGRAM_TRAIN_FIELDS = ("steps", "log_every", "ckpt_every", "keep", "async_ckpt", "init_from", "teacher_from",
                             "critic_from", "ode_pairs", "max_time_s", "tensorboard", "compilation_cache")


def program_key(config) -> str:
  """The part of a config that shapes the compiled programs, as JSON."""
  import json
  d = json.loads(config.to_json_best_effort())
  for k in ("data", "text", "vae", "runlocal", "name"):
    d.pop(k, None)
  for k in _NON_PROGRAM_TRAIN_FIELDS:
    d.get("train", {}).pop(k, None)
  return json.dumps(d, sort_keys=True)


_INIT_FNS: dict = {}


def create_sharded_state(config, mesh, rules, key, *, networks: dict | None = None) -> tuple[TrainState, TrainState]:
  """Initialises the state directly in its shardings (no host copy of a 1.3B model); returns (state, shardings).

  `networks`: params (global arrays in the state's shardings, or host arrays) replacing fresh initialisation.
  Runs outside `activation_context`: flax's init would apply logical constraints to the boxed params, and it
  rejects parameters that repeat a logical name (the DiT's square ('embed', 'embed') projections).
  """
  shardings = state_shardings(config, mesh, rules)
  networks = dict(networks or {})
  names = tuple(sorted(networks))
  cache_key = (program_key(config), tuple(d.id for d in mesh.devices.flat), mesh.devices.shape, names)
  if cache_key not in _INIT_FNS:
    in_sh = (mesh_lib.replicated(mesh), {n: getattr(shardings, n) for n in names})
    _INIT_FNS[cache_key] = jax.jit(lambda k, nets: init_state(config, k, networks=nets), in_shardings=in_sh,
                                   out_shardings=shardings)
  return _INIT_FNS[cache_key](key, networks), shardings


def abstract_state(config, shardings: TrainState | None = None) -> TrainState:
  """ShapeDtypeStructs of the state (with shardings if given): the restore target for orbax."""
  shapes = jax.eval_shape(lambda k: init_state(config, k), jax.random.PRNGKey(0))
  if shardings is None:
    return shapes
  return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
