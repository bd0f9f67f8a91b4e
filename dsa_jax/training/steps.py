"""Jitted, sharded training steps for the stages 'teacher', 'ode' and 'dsa'.

Every step is `jax.jit` with explicit `in_shardings` / `out_shardings` (parameters and optimiser states by their
logical axes, the batch over data x fsdp, scalars replicated) and donates the state. The frozen teacher is an
argument of its own, sharded like a trained network, never donated. Randomness comes from fold_in(state.rng,
state.step), so a resumed run draws exactly what the uninterrupted run drew.

DSA has two step functions, because the generator is updated only every `dmd.critic_ratio`-th iteration
(Self Forcing: the critic every iteration, the generator when step % ratio == 0):
  * `gen`: rollout (both phases) -> DMD loss against the teacher (CFG) and the critic -> generator update, EMA;
    confidence loss at the exit step -> head update; then the critic update on the same rollout's stop-gradient
    samples (Self Forcing draws a second no-grad rollout for the critic; reusing the first saves one rollout);
  * `critic`: no-grad rollout -> critic update.
Keeping them separate (rather than a `lax.cond` inside one function) lets XLA update the donated buffers in place.

Gradient accumulation (`train.grad_accum` = K): every step splits its global batch into K micro-batches and runs
them one after the other (a `lax.scan`), averaging their gradients, then updates once. Micro-batch i holds the rows
i, i + K, i + 2K, ... so that each device's rows split evenly without moving data. Per-sample noise of the teacher
and ODE stages is drawn for the global batch and split with it, so their update does not depend on K; a DSA
micro-batch draws its own exit step and rollout from fold_in(step key, i). Running statistics (d_bar, the target
range) become the mean of the micro-batches' updated values. Steps, EMA, learning rate and the critic ratio count
updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsa_jax.config_lib import LOG_SCALE_TARGETS
from dsa_jax.diffusion import flow
from dsa_jax.models import factory
from dsa_jax.models.confidence import ConfidenceConfig, ConfidenceHead
from dsa_jax.models.dit import WanDiT
from dsa_jax.parallel import mesh as mesh_lib
from dsa_jax.training import losses, ode_pairs, rollout
from dsa_jax.training import state as state_lib
from dsa_jax.training.state import program_key

METRIC_DTYPE = jnp.float32


def ode_guidance(config) -> float:
  """`train.ode_guidance` (Self Forcing's convention, like dmd.guidance); None or negative: use `dmd.guidance`."""
  g = config.train.ode_guidance
  return float(config.dmd.guidance if g is None or g < 0 else g)


def frozen_cast(params, dtype):
  """The frozen teacher's matmul weights in the compute dtype (the layers cast them anyway): half the memory."""
  def cast(path, x):
    name = jax.tree_util.keystr(path)
    if ("kernel" in name or "patch_embedding" in name) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree_util.tree_map_with_path(cast, params)


def _ema(ema, params, decay):
  return jax.tree_util.tree_map(lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
                                              ).astype(e.dtype), ema, params)


def _apply(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def grad_accum(config) -> int:
  """`train.grad_accum`, checked against the global batch (the micro-batches split every device's rows evenly)."""
  k = config.train.get("grad_accum", 1)
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"config.train.grad_accum: expected an int >= 1 (micro-batches per update), got {k!r}")
  b = int(config.train.batch_size)
  if b % k:
    raise ValueError(f"config.train.batch_size={b} must divide by config.train.grad_accum={k} (batch_size is the "
                     f"global batch per update; each micro-batch holds batch_size / grad_accum)")
  return k


def check_grad_accum(config, mesh):
  """Each micro-batch must still split evenly over the batch axes (data x fsdp) of the mesh."""
  k = grad_accum(config)
  b, d = int(config.train.batch_size), mesh_lib.batch_divisor(mesh)
  if (b // k) % d:
    raise ValueError(f"config.train.batch_size={b} / config.train.grad_accum={k} = {b // k} rows per micro-batch must "
                     f"divide by data x fsdp = {d} of the mesh {mesh_lib.mesh_sizes(mesh)}")


class _Micro:
  """Splits a step's batch into K micro-batches and accumulates a function over them (see the module docstring)."""

  def __init__(self, k: int, mesh):
    self.k = k
    self.mesh = mesh

  def split(self, tree):
    """(B, ...) leaves -> (K, B / K, ...): micro-batch i holds rows i, i + K, ...; K = 1: a leading axis of 1."""
    k = self.k

    def one(x):
      x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
      if self.mesh is not None and k > 1:
        spec = jax.sharding.PartitionSpec(None, mesh_lib.BATCH_AXES)
        x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))
      return x
    return jax.tree_util.tree_map(one, tree)

  def keys(self, key):
    """One key per micro-batch: the step key itself when K = 1 (the draws of a run without accumulation)."""
    if self.k == 1:
      return key[None]
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(self.k))

  def mean(self, fn, xs):
    """fn(x) = (tree to average: gradients, metrics; tree of maxima), reduced over the micro-batches xs (leading
    axis K). K = 1 calls fn once, without a scan."""
    first = jax.tree_util.tree_map(lambda x: x[0], xs)
    if self.k == 1:
      return fn(first)
    shapes = jax.eval_shape(fn, first)
    f32 = jnp.float32
    init = (jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, f32), shapes[0]),
            jax.tree_util.tree_map(lambda s: jnp.full(s.shape, -jnp.inf, f32), shapes[1]))

    def body(acc, x):
      mean, mx = fn(x)
      return (jax.tree_util.tree_map(lambda a, o: a + o.astype(f32), acc[0], mean),
              jax.tree_util.tree_map(lambda a, o: jnp.maximum(a, o.astype(f32)), acc[1], mx)), None

    (total, mx), _ = jax.lax.scan(body, init, xs)
    mean = jax.tree_util.tree_map(lambda a, s: (a / self.k).astype(s.dtype), total, shapes[0])
    return mean, jax.tree_util.tree_map(lambda a, s: a.astype(s.dtype), mx, shapes[1])


def _sigma_per_sample(key, b, config, t_min, t_max):
  d = config.diffusion
  return flow.sample_train_sigma(key, (b,), d.shift, d.train_t_sampler, t_min, t_max, d.num_train_timesteps)


@dataclasses.dataclass
class StepBundle:
  """The compiled step functions of a stage plus the shardings they were built with."""
  stage: str
  fns: dict  # name -> callable(state, ...) -> (state, metrics)
  state_shardings: Any
  teacher_shardings: Any
  batch_sharding: Any
  mesh: Any
  rules: Any

  def step_name(self, step: int, config) -> str:
    if self.stage != "dsa":
      return self.stage
    return "gen" if step % int(config.dmd.critic_ratio) == 0 else "critic"

  def __call__(self, name, *args):
    with mesh_lib.activation_context(self.mesh, self.rules):
      return self.fns[name](*args)


# ----------------------------------------------------------------------------------------------------------------------
# DSA


def _critic_grads(critic, ccfg, x0_gen, ctx, key, config):
  """The critic's denoising loss and gradient on (stop-gradient) generated samples."""
  b, f = x0_gen.shape[:2]
  kt, ke = jax.random.split(key)
  sig = _sigma_per_sample(kt, b, config, config.dmd.t_min, config.dmd.t_max)
  sig_f = jnp.broadcast_to(sig[:, None], (b, f))
  eps = jax.random.normal(ke, x0_gen.shape, jnp.float32)
  x0_gen = jax.lax.stop_gradient(x0_gen)
  x_t = flow.add_noise(x0_gen, eps, sig_f)
  t = sig_f * config.diffusion.num_train_timesteps

  def loss_fn(cp):
    v = WanDiT(ccfg).apply(cp, x_t, t, ctx)["velocity"]
    return losses.critic_loss(v, x0_gen, eps)

  return jax.value_and_grad(loss_fn)(critic)


def _critic_apply(state, critic_tx, grads):
  critic, critic_opt = _apply(critic_tx, grads, state.critic_opt, state.critic)
  return state.replace(critic=critic, critic_opt=critic_opt)


# Confidence targets that need the rollout continued past the exit step (every one but 'dmd').
ROLLOUT_TARGETS = ("consistency", "remaining", "gain")


def head_targets(config, spec, state, exit_index, x0_exit, roll, dmd_discrepancy=None):
  """(per-frame discrepancy, soft targets, running mean, running log range) of the confidence target
  config.conf.target at the exit step (all stop-gradient):
  - 'dmd': exp(-d / running mean) of the teacher/critic discrepancy d (`dmd_discrepancy`);
  - 'consistency': the same of the squared x0 distance to the rollout's last step;
  - 'remaining': that distance on a running log scale (1 at its 10th percentile, 0 at its 90th);
  - 'gain': the same log scale on the squared x0 change of ONE more step (exit -> exit + 1), what the next step is
    worth to this frame: confidence >= tau then reads "the next step would change this frame by little"."""
  target = str(config.conf.target)
  decay = float(config.conf.target_ema)
  if target == "dmd":
    disc = dmd_discrepancy
  else:
    ref = roll["x0_next"] if target == "gain" else roll["x0_last"]
    disc = losses.consistency_discrepancy(x0_exit, ref)
  dbar = losses.update_running_mean(state.dbar, disc, decay)
  log_range = state.target_range
  if target in LOG_SCALE_TARGETS:
    # at the last step both changes are 0 everywhere: it would drag the scale's ends to log(1e-12)
    log_range = losses.update_log_range(state.target_range, disc, decay, exit_index < spec.num_steps - 1)
    y = losses.remaining_targets(disc, log_range)
  else:
    c_scale = float(config.conf.consistency_scale)
    scale = jnp.float32(c_scale) if (target == "consistency" and c_scale > 0) else dbar
    y = losses.discrepancy_targets(disc, scale)
  return disc, y, dbar, log_range


def make_dsa_fns(config, mesh, rules):
  """Un-jitted DSA step functions (gen, critic); `build_steps` jits them with shardings."""
  spec = rollout.RolloutSpec.from_config(config)
  gcfg = factory.dit_config(config, "model")
  tcfg = factory.dit_config(config, "teacher")
  ccfg = factory.dit_config(config, "critic")
  hcfg = ConfidenceConfig.from_config(config)
  txs = state_lib.optimizers(config)
  guidance = float(config.dmd.guidance)
  continue_to_last = str(config.conf.target) in ROLLOUT_TARGETS
  conf_w = float(config.conf.loss_weight)
  ema_start, ema_decay = int(config.train.ema_start), float(config.train.ema_decay)
  ntt = config.diffusion.num_train_timesteps
  micro = _Micro(grad_accum(config), mesh)

  def split(state, batch):
    ctx = batch["context"].astype(jnp.float32)
    return micro.split(ctx), micro.keys(jax.random.fold_in(state.rng, state.step))

  def gen_step(state, teacher, batch, uncond):

    def one(inp):
      ctx, key = inp
      k_exit, k_roll, k_dmd, k_crit = jax.random.split(key, 4)
      b, f = ctx.shape[0], spec.num_frames
      exit_index = rollout.sample_exit_index(k_exit, spec)
      roll = rollout.rollout_no_grad(gcfg, state.generator, ctx, k_roll, exit_index, spec,
                                     continue_to_last=continue_to_last, mesh=mesh, rules=rules)
      kt, ke = jax.random.split(k_dmd)
      sig = _sigma_per_sample(kt, b, config, config.dmd.t_min, config.dmd.t_max)
      sig_f = jnp.broadcast_to(sig[:, None], (b, f))
      t_dmd = sig_f * ntt
      eps = jax.random.normal(ke, roll["x0"].shape, jnp.float32)

      def loss_fn(gp, hp):
        ex = rollout.exit_forward(gcfg, gp, ctx, roll["x_in"], exit_index, roll["cache"], spec, mesh=mesh,
                                  rules=rules)
        x0 = ex["x0"]
        x_t = flow.add_noise(jax.lax.stop_gradient(x0), eps, sig_f)
        x0_real = ode_pairs.teacher_x0(tcfg, teacher, x_t, t_dmd, ctx, uncond, guidance, ntt)
        v_fake = WanDiT(ccfg).apply(state.critic, x_t, t_dmd, ctx)["velocity"]
        x0_fake = flow.x0_from_velocity(x_t, v_fake, sig_f)
        g, d, norm = losses.dmd_direction(x0, x0_real, x0_fake)
        l_dmd = losses.dmd_loss(x0, g)
        disc, y, dbar, log_range = head_targets(config, spec, state, exit_index, jax.lax.stop_gradient(x0), roll,
                                                dmd_discrepancy=d)
        step_idx = jnp.full((b, f), exit_index, jnp.int32)
        logits = ConfidenceHead(hcfg).apply(hp, ex["features"], step_idx, ex["t"])
        l_conf = losses.confidence_loss(logits, y)
        aux = {"loss_dmd": l_dmd, "loss_conf": l_conf, "dbar": dbar, "log_range": log_range,
               "dmd_norm": jnp.mean(norm), "discrepancy": jnp.mean(disc),
               # diagnostic: the gradient pass reproduces the rollout's exit x0 (should be ~0)
               "rollout_mismatch": jnp.max(jnp.abs(jax.lax.stop_gradient(x0) - roll["x0"]))}
        aux.update(losses.calibration_metrics(logits, y))
        return l_dmd + conf_w * l_conf, aux

      (_, aux), (g_gen, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state.generator,
                                                                                            state.head)
      l_crit, g_crit = _critic_grads(state.critic, ccfg, roll["x0"], ctx, k_crit, config)
      mx = {"rollout_mismatch": aux.pop("rollout_mismatch")}
      aux.update(loss_critic=l_crit, exit_step=(exit_index + 1).astype(jnp.float32), t_dmd=jnp.mean(t_dmd))
      return {"grads": (g_gen, g_head, g_crit), "aux": aux}, mx

    mean, mx = micro.mean(one, split(state, batch))
    g_gen, g_head, g_crit = mean["grads"]
    aux = mean["aux"]
    gen, gen_opt = _apply(txs["generator"], g_gen, state.gen_opt, state.generator)
    head, head_opt = _apply(txs["head"], g_head, state.head_opt, state.head)
    decay = jnp.where(state.step >= ema_start, ema_decay, 0.0).astype(jnp.float32)
    ema = _ema(state.generator_ema, gen, decay)
    state = state.replace(generator=gen, generator_ema=ema, head=head, gen_opt=gen_opt, head_opt=head_opt,
                          dbar=aux.pop("dbar"), target_range=aux.pop("log_range"))
    state = _critic_apply(state, txs["critic"], g_crit)
    metrics = {**aux, **mx}
    metrics.update(grad_norm_gen=optax.tree.norm(g_gen), grad_norm_head=optax.tree.norm(g_head),
                   grad_norm_critic=optax.tree.norm(g_crit))
    return state.replace(step=state.step + 1), jax.tree_util.tree_map(lambda x: x.astype(METRIC_DTYPE), metrics)

  def critic_step(state, teacher, batch, uncond):
    del teacher, uncond

    def one(inp):
      ctx, key = inp
      k_exit, k_roll, _, k_crit = jax.random.split(key, 4)
      exit_index = rollout.sample_exit_index(k_exit, spec)
      roll = rollout.rollout_no_grad(gcfg, state.generator, ctx, k_roll, exit_index, spec, mesh=mesh, rules=rules)
      loss, grads = _critic_grads(state.critic, ccfg, roll["x0"], ctx, k_crit, config)
      return {"grads": grads, "loss_critic": loss, "exit_step": (exit_index + 1).astype(jnp.float32)}, {}

    mean, _ = micro.mean(one, split(state, batch))
    state = _critic_apply(state, txs["critic"], mean["grads"])
    cm = {"loss_critic": mean["loss_critic"], "grad_norm_critic": optax.tree.norm(mean["grads"]),
          "exit_step": mean["exit_step"]}
    return state.replace(step=state.step + 1), jax.tree_util.tree_map(lambda x: x.astype(METRIC_DTYPE), cm)

  return {"gen": gen_step, "critic": critic_step}


def make_head_fns(config, mesh, rules):
  """The 'head' stage: the confidence head alone on rollouts of a frozen generator (targets 'remaining', 'gain' or
  'consistency', which need no teacher). Same rollout, exit step and target as the 'dsa' stage's head update."""
  spec = rollout.RolloutSpec.from_config(config)
  gcfg = factory.dit_config(config, "model")
  hcfg = ConfidenceConfig.from_config(config)
  tx = state_lib.optimizers(config)["head"]
  micro = _Micro(grad_accum(config), mesh)

  def head_step(state, teacher, batch, uncond):
    del teacher, uncond

    def one(inp):
      ctx, key = inp
      k_exit, k_roll = jax.random.split(key)
      b, f = ctx.shape[0], spec.num_frames
      exit_index = rollout.sample_exit_index(k_exit, spec)
      roll = rollout.rollout_no_grad(gcfg, state.generator, ctx, k_roll, exit_index, spec, continue_to_last=True,
                                     mesh=mesh, rules=rules)
      ex = jax.lax.stop_gradient(rollout.exit_forward(gcfg, state.generator, ctx, roll["x_in"], exit_index,
                                                      roll["cache"], spec, mesh=mesh, rules=rules))
      disc, y, dbar, log_range = head_targets(config, spec, state, exit_index, ex["x0"], roll)
      step_idx = jnp.full((b, f), exit_index, jnp.int32)

      def loss_fn(hp):
        logits = ConfidenceHead(hcfg).apply(hp, ex["features"], step_idx, ex["t"])
        return losses.confidence_loss(logits, y), logits

      (l_conf, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(state.head)
      aux = {"loss_conf": l_conf, "discrepancy": jnp.mean(disc), "exit_step": (exit_index + 1).astype(jnp.float32),
             "dbar": dbar, "log_range": log_range}
      aux.update(losses.calibration_metrics(logits, y))
      return {"grads": g, "aux": aux}, {"rollout_mismatch": jnp.max(jnp.abs(ex["x0"] - roll["x0"]))}

    ctx = batch["context"].astype(jnp.float32)
    mean, mx = micro.mean(one, (micro.split(ctx), micro.keys(jax.random.fold_in(state.rng, state.step))))
    g, metrics = mean["grads"], dict(mean["aux"])
    head, head_opt = _apply(tx, g, state.head_opt, state.head)
    state = state.replace(head=head, head_opt=head_opt, dbar=metrics.pop("dbar"),
                          target_range=metrics.pop("log_range"), step=state.step + 1)
    metrics.update(mx, grad_norm_head=optax.tree.norm(g))
    return state, jax.tree_util.tree_map(lambda x: x.astype(METRIC_DTYPE), metrics)

  return {"head": head_step}


# ----------------------------------------------------------------------------------------------------------------------
# ODE regression


def make_ode_fns(config, mesh, rules, stored: bool):
  spec = rollout.RolloutSpec.from_config(config)
  gcfg = factory.dit_config(config, "model")
  tcfg = factory.dit_config(config, "teacher")
  tx = state_lib.optimizers(config)["generator"]
  grid, pos = ode_pairs.ode_grid(spec.sigmas, int(config.train.ode_steps))
  guidance = ode_guidance(config)
  sigmas = jnp.asarray(spec.sigmas, jnp.float32)
  ema_start, ema_decay = int(config.train.ema_start), float(config.train.ema_decay)
  ntt = config.diffusion.num_train_timesteps

  micro = _Micro(grad_accum(config), mesh)

  def ode_step(state, teacher, batch, uncond):
    key = jax.random.fold_in(state.rng, state.step)
    k_noise, k_idx = jax.random.split(key)
    ctx = batch["context"].astype(jnp.float32)
    b = ctx.shape[0]
    # per-sample draws for the global batch, split with it: the update does not depend on train.grad_accum
    idx = ode_pairs.sample_ladder_indices(k_idx, b, spec.num_frames, spec.chunk_frames, spec.num_steps)
    if stored:
      data = {"traj": batch["trajectory"].astype(jnp.float32), "x0": batch["video"].astype(jnp.float32)}
    else:
      data = {"noise": jax.random.normal(k_noise, (b, spec.num_frames, spec.height, spec.width, spec.channels),
                                         jnp.float32)}

    def one(mb):
      if stored:
        traj, x0 = mb["traj"], mb["x0"]
      else:
        traj, x0 = ode_pairs.teacher_trajectory(tcfg, teacher, mb["noise"], mb["ctx"], uncond, grid, pos, guidance,
                                                ntt)
      traj = traj[:, :spec.num_steps]
      x_in = ode_pairs.gather_trajectory(traj, mb["idx"])
      sig = sigmas[mb["idx"]]

      def loss_fn(gp):
        v = WanDiT(gcfg).apply(gp, x_in, sig * ntt, mb["ctx"], chunk_frames=spec.chunk_frames)["velocity"]
        return losses.ode_regression_loss(flow.x0_from_velocity(x_in, v, sig), x0)

      loss, grads = jax.value_and_grad(loss_fn)(state.generator)
      return {"grads": grads, "loss_ode": loss}, {}

    mean, _ = micro.mean(one, micro.split({"ctx": ctx, "idx": idx, **data}))
    grads = mean["grads"]
    gen, gen_opt = _apply(tx, grads, state.gen_opt, state.generator)
    decay = jnp.where(state.step >= ema_start, ema_decay, 0.0).astype(jnp.float32)
    state = state.replace(generator=gen, gen_opt=gen_opt, generator_ema=_ema(state.generator_ema, gen, decay),
                          step=state.step + 1)
    return state, {"loss_ode": mean["loss_ode"], "grad_norm_gen": optax.tree.norm(grads),
                   "mean_ladder_index": jnp.mean(idx.astype(jnp.float32))}

  return {"ode": ode_step}


# ----------------------------------------------------------------------------------------------------------------------
# Teacher flow matching


def make_teacher_fns(config, mesh, rules):
  tcfg = factory.dit_config(config, "teacher")
  tx = state_lib.optimizers(config)["teacher"]
  p_drop = float(config.train.cfg_dropout)
  teacher_ema_decay = float(config.train.teacher_ema_decay)
  ntt = config.diffusion.num_train_timesteps

  micro = _Micro(grad_accum(config), mesh)

  def teacher_step(state, teacher, batch, uncond):
    del teacher
    key = jax.random.fold_in(state.rng, state.step)
    k_t, k_e, k_d = jax.random.split(key, 3)
    x0 = batch["video"].astype(jnp.float32)
    ctx = batch["context"].astype(jnp.float32)
    b, f = x0.shape[:2]
    # per-sample draws for the global batch, split with it: the update does not depend on train.grad_accum
    if p_drop > 0:  # text dropout, so that the teacher supports classifier-free guidance
      drop = jax.random.bernoulli(k_d, p_drop, (b,))
      ctx = jnp.where(drop[:, None, None], jnp.broadcast_to(uncond.astype(ctx.dtype), ctx.shape), ctx)
    sig = _sigma_per_sample(k_t, b, config, 0.0, float(ntt))
    eps = jax.random.normal(k_e, x0.shape, jnp.float32)

    def one(mb):
      sig_f = jnp.broadcast_to(mb["sig"][:, None], (mb["sig"].shape[0], f))
      x_t = flow.add_noise(mb["x0"], mb["eps"], sig_f)

      def loss_fn(tp):
        v = WanDiT(tcfg).apply(tp, x_t, sig_f * ntt, mb["ctx"])["velocity"]
        return losses.flow_matching_loss(v, mb["x0"], mb["eps"])

      loss, grads = jax.value_and_grad(loss_fn)(state.teacher)
      return {"grads": grads, "loss_fm": loss}, {}

    mean, _ = micro.mean(one, micro.split({"x0": x0, "ctx": ctx, "sig": sig, "eps": eps}))
    grads = mean["grads"]
    teacher_p, opt = _apply(tx, grads, state.teacher_opt, state.teacher)
    state = state.replace(teacher=teacher_p, teacher_opt=opt, step=state.step + 1)
    if state.teacher_ema is not None:
      state = state.replace(teacher_ema=_ema(state.teacher_ema, teacher_p, jnp.float32(teacher_ema_decay)))
    return state, {"loss_fm": mean["loss_fm"], "grad_norm_teacher": optax.tree.norm(grads), "sigma": jnp.mean(sig)}

  return {"teacher": teacher_step}


# ----------------------------------------------------------------------------------------------------------------------


def teacher_shardings(config, mesh, rules):
  """Shardings of the frozen teacher (logical axes like every DiT); None for the stages without one."""
  if config.train.stage in ("teacher", "head"):
    return None
  boxed = factory.abstract_dit_params(factory.dit_config(config, "teacher"), config)
  return mesh_lib.param_shardings(boxed, mesh, rules)


_BUNDLES: dict = {}


def mesh_key(mesh) -> tuple:
  return (tuple(d.id for d in mesh.devices.flat), tuple(mesh.devices.shape), tuple(mesh.axis_names))


def build_steps(config, mesh, rules, *, state_shardings=None, stored_ode_pairs: bool | None = None) -> StepBundle:
  """Jits the stage's step functions with explicit shardings and state donation.

  Bundles are cached per (config, mesh): a second run in the same process (tests, a resumed loop) reuses the
  compiled executables instead of compiling again.
  """
  if stored_ode_pairs is None:
    stored_ode_pairs = bool(config.train.ode_pairs)
  key = (program_key(config), mesh_key(mesh), repr(rules), stored_ode_pairs)
  if key not in _BUNDLES:
    _BUNDLES[key] = _build_steps(config, mesh, rules, state_shardings=state_shardings,
                                 stored_ode_pairs=stored_ode_pairs)
  return _BUNDLES[key]


def _build_steps(config, mesh, rules, *, state_shardings=None, stored_ode_pairs: bool | None = None) -> StepBundle:
  stage = config.train.stage
  state_lib.check_stage(stage)
  check_grad_accum(config, mesh)
  if state_shardings is None:
    state_shardings = state_lib.state_shardings(config, mesh, rules)
  t_sh = teacher_shardings(config, mesh, rules)
  if stage == "dsa":
    fns = make_dsa_fns(config, mesh, rules)
  elif stage == "head":
    fns = make_head_fns(config, mesh, rules)
  elif stage == "ode":
    stored = bool(config.train.ode_pairs) if stored_ode_pairs is None else stored_ode_pairs
    fns = make_ode_fns(config, mesh, rules, stored)
  else:
    fns = make_teacher_fns(config, mesh, rules)
  rep = mesh_lib.replicated(mesh)
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.BATCH_AXES))
  jitted = {name: jax.jit(fn, in_shardings=(state_shardings, t_sh, batch_sh, rep), out_shardings=(state_shardings, rep),
                          donate_argnums=(0,))
            for name, fn in fns.items()}
  return StepBundle(stage=stage, fns=jitted, state_shardings=state_shardings, teacher_shardings=t_sh,
                    batch_sharding=batch_sh, mesh=mesh, rules=rules)
