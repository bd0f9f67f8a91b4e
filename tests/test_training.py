"""Training: losses, rollout, the DSA / ODE / teacher steps, the trainer loop, checkpoints and resume, the CLI.

One process, one CPU device, the tiny config at batch 4 (the programs are shared between tests through the step
cache and, for the CLI subprocesses, jax's persistent compilation cache in a temporary folder).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dsa_jax.checkpoint import params_io
from dsa_jax.config_lib import get_config
from dsa_jax.parallel import mesh as mesh_lib
from dsa_jax.training import checkpointing, losses, ode_pairs, rollout, trainer
from dsa_jax.training import state as state_lib
from dsa_jax.training import steps as steps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
BATCH = ["--config.train.batch_size=4"]


def shared_cache_dir(tmp_path_factory):
  """The tests' persistent compilation cache (conftest.py), shared by xdist workers and by
  test_training_multidevice.py's subprocess; without one configured, a folder per pytest session."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = base / "dsa_jax_xla_cache"
  os.makedirs(path, exist_ok=True)
  return path


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """Persistent compilation cache shared with the CLI subprocesses (identical programs compile once)."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # jax decides once per process
  path = str(shared_cache_dir(tmp_path_factory))
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield path
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  cc.reset_cache()


def tiny(*overrides):
  return get_config(TINY, BATCH + list(overrides))


def init_net(cfg, role, seed):
  """Random params of a DiT ('model', 'teacher', 'critic') or of the 'head', initialised under jit (eager flax init
  dispatches hundreds of tiny ops)."""
  from dsa_jax.models import factory
  if role == "head":
    fn = lambda k: mesh_lib.unbox(factory.init_head(cfg, k))
  else:
    fn = lambda k: mesh_lib.unbox(factory.init_dit(factory.dit_config(cfg, role), cfg, k))
  return jax.jit(fn)(jax.random.PRNGKey(seed))


def flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_mesh_shape_and_specs():
  assert mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(mesh_lib.MeshError, match="do not divide"):
    mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(mesh_lib.MeshError, match="uses 4 devices"):
    mesh_lib.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  devs = np.array([jax.devices()[0]] * 8, dtype=object).reshape(2, 2, 2)  # only the axis sizes matter here
  mesh = jax.sharding.Mesh(devs, mesh_lib.AXES)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
  P = jax.sharding.PartitionSpec
  # a repeated logical name takes the mesh axis once; a dimension the axis does not divide stays replicated
  assert mesh_lib.logical_to_spec(("embed", "embed"), (192, 192), mesh, rules) == P("fsdp", None)
  assert mesh_lib.logical_to_spec(("embed", "mlp"), (7, 512), mesh, rules) == P(None, "tensor")
  assert mesh_lib.logical_to_spec(("batch", None), (4, 3), mesh, rules) == P(("data", "fsdp"), None)
  assert mesh_lib.logical_to_spec(("batch", None), (2, 3), mesh, rules) == P("data", None)
  with pytest.raises(mesh_lib.MeshError, match="batch_size=6 must divide by data x fsdp = 4"):
    mesh_lib.check_batch(6, mesh)


def test_dmd_loss_gradient_is_normalised_direction():
  key = jax.random.PRNGKey(0)
  x0, real, fake = (jax.random.normal(k, (2, 3, 4, 4, 2)) for k in jax.random.split(key, 3))
  g, d, norm = losses.dmd_direction(x0, real, fake)
  np.testing.assert_allclose(norm, np.mean(np.abs(np.asarray(x0 - real)), axis=(1, 2, 3, 4)), rtol=1e-6)
  np.testing.assert_allclose(d, np.mean(np.square(np.asarray(fake - real)), axis=(2, 3, 4)), rtol=1e-6)
  grad = jax.grad(lambda x: losses.dmd_loss(x, g))(x0)
  np.testing.assert_allclose(grad, np.asarray(g) / x0.size, rtol=1e-5, atol=1e-9)  # d/dx0 = g / numel
  assert np.allclose(losses.cfg_combine(2.0, 1.0, 3.0), 5.0)  # cond + 3 (cond - uncond): standard scale 4


def test_confidence_targets_and_calibration():
  d = jnp.array([[0.0, 1.0, 2.0]])
  assert float(losses.update_running_mean(0.0, d, 0.99)) == pytest.approx(1.0)  # first update: the batch mean
  assert float(losses.update_running_mean(2.0, d, 0.5)) == pytest.approx(1.5)
  np.testing.assert_allclose(losses.discrepancy_targets(d, 1.0), np.exp([[0.0, -1.0, -2.0]]), rtol=1e-6)
  logits = jnp.array([10.0, 10.0, -10.0, -10.0])
  m = losses.calibration_metrics(logits, jnp.array([1.0, 1.0, 0.0, 0.0]))
  assert float(m["conf_ece"]) < 1e-3 and float(m["conf_abs_err"]) < 1e-3
  m = losses.calibration_metrics(logits, jnp.array([0.0, 0.0, 1.0, 1.0]))
  assert float(m["conf_ece"]) > 0.99
  # BCE with soft targets is minimised at logit = logit(target)
  y = jnp.array([0.3])
  grad = jax.grad(lambda z: losses.confidence_loss(z, y))(jnp.log(y / (1 - y)))
  assert abs(float(grad[0])) < 1e-6


def test_ode_grid_passes_through_ladder():
  sig = rollout.RolloutSpec.from_config(tiny()).sigmas
  grid, pos = ode_pairs.ode_grid(sig, 12)
  assert grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
  np.testing.assert_allclose(grid[pos], sig, rtol=0, atol=0)
  assert len(grid) - 1 >= 12
  traj = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)[..., None]  # (B, K, F, 1)
  idx = jnp.array([[0, 1, 2, 0], [2, 2, 1, 0]])
  x = ode_pairs.gather_trajectory(traj, idx)
  np.testing.assert_array_equal(np.asarray(x)[..., 0], np.take_along_axis(np.asarray(traj)[..., 0],
                                                                         np.asarray(idx)[:, None], 1)[:, 0])


# ----------------------------------------------------------------------------------------------------------------------
# Steps


@pytest.fixture(scope="module")
def dsa_setup(xla_cache):
  cfg = tiny()
  mesh = mesh_lib.make_mesh(cfg)
  rules = mesh_lib.rules_from_config(cfg)
  bundle = steps_lib.build_steps(cfg, mesh, rules)
  teacher = trainer.load_teacher(cfg, mesh, rules, bundle.teacher_shardings)
  ctx = jax.random.normal(jax.random.PRNGKey(3), (4, cfg.model.text_len, cfg.model.text_dim))
  batch = {"context": jax.device_put(ctx, bundle.batch_sharding)}
  uncond = jnp.zeros((1, cfg.model.text_len, cfg.model.text_dim))
  return cfg, mesh, rules, bundle, teacher, batch, uncond


def test_dsa_losses_decrease_on_fixed_batch(dsa_setup):
  cfg, mesh, rules, bundle, teacher, batch, uncond = dsa_setup
  state, _ = state_lib.create_sharded_state(cfg, mesh, rules, jax.random.PRNGKey(0))
  hist = {}
  for step in range(40):
    state, m = bundle(bundle.step_name(step, cfg), state, teacher, batch, uncond)
    for k, v in jax.device_get(m).items():
      hist.setdefault(k, []).append(float(v))
  for k, v in hist.items():
    assert np.all(np.isfinite(v)), k
  dmd, crit = np.array(hist["loss_dmd"]), np.array(hist["loss_critic"])
  assert len(dmd) == 20 and len(crit) == 40  # generator every critic_ratio=2 steps, critic every step
  assert dmd[-5:].mean() < 0.9 * dmd[:5].mean(), dmd
  assert crit[-8:].mean() < 0.85 * crit[:8].mean(), crit
  # the gradient pass (phase 2, final cache) reproduces the rollout's exit x0 exactly
  assert max(hist["rollout_mismatch"]) < 1e-5
  exits = set(int(e) for e in hist["exit_step"])
  assert exits <= set(range(1, cfg.sampling.max_steps + 1)) and len(exits) >= 3
  assert int(state.step) == 40


def test_rollout_gradient_flows_only_through_exit_step():
  """The rollout's tangent with respect to the generator (its linearisation's matmuls, the primal's subtracted): zero
  for everything phase 1 produces (earlier steps, the exit step's input, the no-grad x0), and for x0 exactly the exit
  forward's own tangent with its inputs (x_in, the final cache) held constant. (Traced only: no compilation. The
  DSA-step test checks the numbers: phase 2 reproduces phase 1's x0.)"""
  from dsa_jax.models import factory
  from dsa_jax.models.dit import init_cache
  cfg = tiny()
  spec = rollout.RolloutSpec.from_config(cfg)
  gcfg = factory.dit_config(cfg, "model")
  params = jax.eval_shape(lambda k: mesh_lib.unbox(factory.init_dit(gcfg, cfg, k)), jax.random.PRNGKey(0))
  ctx = jnp.zeros((1, cfg.model.text_len, cfg.model.text_dim))
  dots = lambda fn, *a: str(jax.make_jaxpr(fn)(*a)).count("dot_general")
  tangent_dots = lambda f: dots(lambda p, t: jax.linearize(f, p)[1](t), params, params) - dots(f, params)

  def rollout_output(key):
    return lambda p: rollout.self_forcing_rollout(gcfg, p, ctx, jax.random.PRNGKey(2), spec, exit_index=2,
                                                  continue_to_last=True)[key]

  for key in ("x0_nograd", "x_in", "x0_last"):
    assert tangent_dots(rollout_output(key)) == 0, key
  x_in = jnp.zeros((1, spec.num_frames, spec.height, spec.width, spec.channels))
  cache = init_cache(gcfg, 1, spec.num_frames, spec.tokens_per_frame)
  exit_tangent = tangent_dots(lambda p: rollout.exit_forward(gcfg, p, ctx, x_in, 2, cache, spec)["x0"])
  assert exit_tangent > 0 and tangent_dots(rollout_output("x0")) == exit_tangent


def _primitive_names(jaxpr) -> set:
  names = set()
  for e in jaxpr.eqns:
    names.add(e.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      names |= _primitive_names(sub)
  return names


def test_rollout_no_grad_phase_runs_without_remat():
  """Phase 1 is never differentiated: its forwards run the blocks without jax.checkpoint (and so with the KV cache
  updated in place) whatever compute.remat says; the differentiated exit forward keeps the configured remat."""
  from dsa_jax.models import factory
  from dsa_jax.models.dit import init_cache
  cfg = tiny()
  cfg.compute.remat = "full"
  spec = rollout.RolloutSpec.from_config(cfg)
  gcfg = factory.dit_config(cfg, "model")
  params = jax.eval_shape(lambda k: mesh_lib.unbox(factory.init_dit(gcfg, cfg, k)), jax.random.PRNGKey(0))
  ctx = jnp.zeros((1, cfg.model.text_len, cfg.model.text_dim))
  phase1 = jax.make_jaxpr(lambda p: rollout.rollout_no_grad(gcfg, p, ctx, jax.random.PRNGKey(2), 1, spec))(params)
  remat_names = {"remat2", "checkpoint"}  # jax.checkpoint's primitive (named by jax version)
  assert not remat_names & _primitive_names(phase1.jaxpr)
  x_in = jnp.zeros((1, spec.num_frames, spec.height, spec.width, spec.channels))
  cache = init_cache(gcfg, 1, spec.num_frames, spec.tokens_per_frame)
  phase2 = jax.make_jaxpr(lambda p: rollout.exit_forward(gcfg, p, ctx, x_in, 1, cache, spec)["x0"])(params)
  assert remat_names & _primitive_names(phase2.jaxpr)


def test_rollout_x0_next_is_one_step_after_the_exit():
  """x0_next (the 'gain' target's reference) is the x0 one step after the exit: the first chunk (whose context does
  not depend on the exit) equals the exit x0 of a rollout that exits one step later; at the last step it is the exit
  x0 itself, and one step before the last it is x0_last."""
  from dsa_jax.models import factory
  cfg = tiny()
  spec = rollout.RolloutSpec.from_config(cfg)
  gcfg = factory.dit_config(cfg, "model")
  params = init_net(cfg, "model", 0)
  ctx = jax.random.normal(jax.random.PRNGKey(1), (1, cfg.model.text_len, cfg.model.text_dim))
  roll = jax.jit(lambda k: rollout.rollout_no_grad(gcfg, params, ctx, jax.random.PRNGKey(3), k, spec,
                                                   continue_to_last=True))
  c, last = spec.chunk_frames, spec.num_steps - 1
  outs = [jax.device_get(roll(jnp.int32(k))) for k in range(spec.num_steps)]
  for k in range(last):
    np.testing.assert_allclose(outs[k]["x0_next"][:, :c], outs[k + 1]["x0"][:, :c], atol=1e-6, err_msg=str(k))
    assert np.abs(outs[k]["x0_next"] - outs[k]["x0"]).max() > 1e-4  # one more step moves x0
  np.testing.assert_array_equal(outs[last]["x0_next"], outs[last]["x0"])
  np.testing.assert_array_equal(outs[last - 1]["x0_next"], outs[last - 1]["x0_last"])


def test_gain_targets_read_the_next_step_on_a_log_scale():
  """'gain': the squared x0 change of one more step on the running log scale ('remaining' measures to the last step
  instead); a frame the next step barely moves gets a target near 1; the scale is not updated at the last step."""
  cfg = tiny("--config.conf.target=gain")
  spec = rollout.RolloutSpec.from_config(cfg)

  class State:
    dbar = jnp.float32(0.0)
    target_range = jnp.zeros((2,), jnp.float32)

  x0 = jnp.zeros((2, 4, 2, 2, 1))
  small, big = 1e-4, 1.0
  nxt = x0 + jnp.asarray([small, big, big, small])[None, :, None, None, None]
  roll = {"x0_next": nxt, "x0_last": x0 + 5.0}  # the last step is far from every frame: 'remaining' sees no difference
  disc, y, _, log_range = steps_lib.head_targets(cfg, spec, State, jnp.int32(1), x0, roll)
  np.testing.assert_allclose(np.asarray(disc), [[small ** 2, big ** 2, big ** 2, small ** 2]] * 2, rtol=1e-5)
  y = np.asarray(y)
  assert (y[:, [0, 3]] == 1.0).all() and (y[:, [1, 2]] == 0.0).all()
  assert np.asarray(log_range)[0] < np.asarray(log_range)[1]
  rem = steps_lib.head_targets(tiny("--config.conf.target=remaining"), spec, State, jnp.int32(1), x0, roll)[1]
  assert np.ptp(np.asarray(rem)) == 0.0
  # at the last step the running scale stays where it was
  _, _, _, unchanged = steps_lib.head_targets(cfg, spec, State, jnp.int32(spec.num_steps - 1), x0, roll)
  np.testing.assert_array_equal(np.asarray(unchanged), np.zeros(2))


def test_confidence_head_learns_planted_target(xla_cache):
  """Frames whose generator input is easy by construction (clean, flat latents) get a low planted discrepancy and
  hence a high target y = exp(-d / mean d); the head, trained with the DSA step's loss and optimiser on the
  generator's features, must learn to rank them above hard (noisy) frames and become calibrated."""
  import optax
  from dsa_jax.models import factory
  from dsa_jax.models.confidence import ConfidenceConfig, ConfidenceHead
  from dsa_jax.models.dit import WanDiT
  cfg = tiny()
  gcfg = factory.dit_config(cfg, "model")
  gen = init_net(cfg, "model", 0)
  head_p = init_net(cfg, "head", 1)
  hcfg = ConfidenceConfig.from_config(cfg)
  tx = state_lib.make_optimizer(cfg, "head")
  opt = tx.init(head_p)
  spec = rollout.RolloutSpec.from_config(cfg)
  b, f = 16, spec.num_frames
  t = jnp.full((b, f), 625.0)

  @jax.jit
  def features(key):
    k1, k2, k3 = jax.random.split(key, 3)
    easy = jax.random.bernoulli(k1, 0.5, (b, f))
    noise = jax.random.normal(k2, (b, f, spec.height, spec.width, spec.channels))
    x = jnp.where(easy[..., None, None, None], 0.0, noise)
    ctx = jax.random.normal(k3, (b, cfg.model.text_len, cfg.model.text_dim))
    return WanDiT(gcfg).apply(gen, x, t, ctx, chunk_frames=spec.chunk_frames)["features"], easy

  pool = [features(jax.random.PRNGKey(100 + i)) for i in range(4)]

  @jax.jit
  def step(head_p, opt, feats, easy, key):
    d = jnp.where(easy, 0.05, 3.0) * jnp.exp(0.1 * jax.random.normal(key, (b, f)))  # planted discrepancy
    y = losses.discrepancy_targets(d, jnp.mean(d))
    steps_idx = jnp.full((b, f), 3, jnp.int32)

    def loss_fn(hp):
      logits = ConfidenceHead(hcfg).apply(hp, feats, steps_idx, t)
      return losses.confidence_loss(logits, y), logits

    (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(head_p)
    upd, opt = tx.update(g, opt, head_p)
    p = jax.nn.sigmoid(logits)
    gap = jnp.sum(p * easy) / jnp.sum(easy) - jnp.sum(p * ~easy) / jnp.sum(~easy)
    return optax.apply_updates(head_p, upd), opt, gap, losses.calibration_metrics(logits, y)["conf_abs_err"]

  out = []
  for i in range(100):
    feats, easy = pool[i % len(pool)]
    head_p, opt, gap, err = step(head_p, opt, feats, easy, jax.random.PRNGKey(i))
    out.append((float(gap), float(err)))
  out = np.array(out)
  assert out[:4, 0].mean() < 0.2  # untrained: no ranking
  assert out[-8:, 0].mean() > 0.5, out[-8:]  # easy frames clearly more confident
  assert out[-8:, 1].mean() < 0.5 * out[:4, 1].mean()  # and better calibrated


# ----------------------------------------------------------------------------------------------------------------------
# Trainer, checkpoints, resume


def _run(cfg, workdir, **kw):
  logs = []
  summary = trainer.train(cfg, str(workdir), log=logs.append, **kw)
  return summary, logs


@contextlib.contextmanager
def first_compile_lock(cache_dir, name: str = "tiny_dsa_trainer"):
  """Serialises, across xdist workers, the runs that compile the tiny DSA trainer's programs: the worker that comes
  second waits and then loads them from the shared persistent cache (seconds) instead of compiling the same programs
  at the same time on the other core (a minute each under contention)."""
  import fcntl
  with open(os.path.join(str(cache_dir), name + ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def reference_run(xla_cache, tmp_path_factory):
  """An uninterrupted 4-step run with checkpoints every 2 steps."""
  cfg = tiny("--config.train.steps=4", "--config.train.ckpt_every=2", "--config.train.async_ckpt=True")
  work = tmp_path_factory.mktemp("ref")
  with first_compile_lock(xla_cache):
    summary, logs = _run(cfg, work)
  return cfg, work, summary, logs


def test_trainer_runs_logs_and_exports(reference_run):
  cfg, work, summary, logs = reference_run
  assert summary["end_step"] == 4
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]
  assert any("step 4/4" in line and "it/s" in line and "ETA" in line for line in logs), logs
  assert any("WARNING: config.data.prompts.path is empty" in line for line in logs), logs
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(work / "tb"))
  params, meta = checkpointing.load_model_from_workdir(str(work / "model"), cfg)
  assert sorted(params) == ["generator", "generator_ema", "head"] and meta["step"] == 4
  ck_params, ck_meta = checkpointing.load_model_from_workdir(str(work), cfg)  # the workdir's latest checkpoint
  for n in params:
    a, b = flat(params[n]), flat(ck_params[n])
    assert all(np.array_equal(a[k], b[k]) for k in a)
  # EMA from ema_start=0 with decay 0.99 differs from the generator after updates
  g, e = flat(params["generator"]), flat(params["generator_ema"])
  assert any(not np.array_equal(g[k], e[k]) for k in g)


def test_kill_and_resume_reproduces_uninterrupted_run(reference_run, tmp_path):
  cfg, ref_work, ref_summary, _ = reference_run
  work = tmp_path / "run"
  s1, _ = _run(cfg, work, stop_after=3)  # "killed" after step 3; the last checkpoint is step 2
  assert s1["end_step"] == 3 and not os.path.exists(work / "model")
  # a save that was killed half-way leaves orbax's temporary folder behind: it must be ignored
  os.makedirs(work / "checkpoints" / "3.orbax-checkpoint-tmp-1234" / "generator")
  with open(work / "checkpoints" / "3.orbax-checkpoint-tmp-1234" / "generator" / "junk", "w") as f:
    f.write("partial")
  s2, logs = _run(cfg, work)
  assert any("resumed from" in line and line.rstrip().endswith("/2") for line in logs), logs
  assert s2["start_step"] == 2 and s2["end_step"] == 4
  a, b = flat(ref_summary["state"]), flat(s2["state"])
  assert a.keys() == b.keys()
  bad = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not bad, bad[:5]
  ck = checkpointing.Checkpointer(str(work), read_only=True)
  ref_ck = checkpointing.Checkpointer(str(ref_work), read_only=True)
  assert ck.read_json(4, "data")["position"] == ref_ck.read_json(4, "data")["position"] == 4 * 4  # 4 batches of 4


def test_time_limit_stops_with_checkpoint_and_resumes(reference_run, tmp_path):
  cfg = reference_run[0].copy_and_resolve_references()
  cfg.train.max_time_s = 1e-6
  s, logs = _run(cfg, tmp_path / "t")
  assert s["stopped"] == "max_time_s" and s["end_step"] == 1 and "model" not in s
  assert sorted(os.listdir(tmp_path / "t" / "checkpoints")) == ["1"]
  assert any("stopped at step 1" in line for line in logs)


def _corrupt_generator(step_dir):
  """Overwrites the generator's array data of a training checkpoint (its metadata stays readable)."""
  for root, _, files in os.walk(step_dir / "generator"):
    for name in files:
      if name not in ("_METADATA", "_sharding", "manifest.ocdbt"):
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")


def test_corrupt_checkpoint_gives_clear_error(reference_run, tmp_path, monkeypatch):
  from dsa_jax.data import pipeline
  cfg, ref_work, _, _ = reference_run
  work = tmp_path / "corrupt"
  shutil.copytree(ref_work, work)
  _corrupt_generator(work / "checkpoints" / "4")
  cfg6 = tiny("--config.train.steps=6", "--config.train.ckpt_every=2")
  with pytest.raises(checkpointing.TrainCheckpointError, match=r"checkpoints/4.*corrupt"):
    checkpointing.load_model_from_workdir(str(work), cfg6)
  # (training falls back to the previous checkpoint: test_faults.py)
  # another stage in the same workdir is refused with a message naming both stages
  # ... and the refused run closes the checkpoint manager and the data loader it had opened (no threads left behind)
  closed = []
  for cls, name in ((checkpointing.Checkpointer, "checkpointer"), (pipeline.Loader, "loader")):
    monkeypatch.setattr(cls, "close", lambda self, close=cls.close, name=name: (closed.append(name), close(self))[1])
  cfg_ode = tiny("--config.train.stage=ode", "--config.train.steps=6")
  with pytest.raises(checkpointing.TrainCheckpointError, match="stage 'dsa'.*stage 'ode'"):
    _run(cfg_ode, work)
  assert set(closed) == {"checkpointer", "loader"}, closed


def test_resume_with_another_optimiser_layout_is_refused_not_set_aside(reference_run, tmp_path):
  """Turning gradient clipping off changes the optimiser states' layout: the resume stops with an error naming the
  changed field and keeps every checkpoint (it moved them all aside as damaged, and the next run started over).
  Checkpoints saved before layouts were recorded get the same answer from the restore's own error."""
  _, ref_work, _, _ = reference_run
  cfg = tiny("--config.train.steps=6", "--config.train.grad_clip=0.0")
  for name in ("recorded", "unrecorded"):
    work = tmp_path / name
    shutil.copytree(ref_work, work)
    if name == "unrecorded":
      for step in ("2", "4"):
        meta_file = work / "checkpoints" / step / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        del meta["state_layout"]
        meta_file.write_text(json.dumps(meta))
    # the trainer's own resume path, without building the rest of a run
    ck = checkpointing.Checkpointer(str(work))
    target = state_lib.abstract_state(cfg, state_lib.state_shardings(cfg, mesh_lib.make_mesh(cfg),
                                                                     mesh_lib.rules_from_config(cfg)))
    try:
      with pytest.raises(checkpointing.TrainStateMismatchError,
                         match=r"checkpoints/4.*differently.*train\.grad_clip \(10\.0 -> 0\.0\)"):
        trainer.restore_latest_readable(ck, target, cfg, print)
    finally:
      ck.close()
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"] and not (work / "corrupt_checkpoints").exists()


def test_ode_pairs_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  from dsa_jax.data import videos
  x0, traj = np.zeros((2, 2, 4, 4, 3), np.float32), np.ones((2, 3, 2, 4, 4, 3), np.float32)
  ode_pairs.write_ode_pairs(str(tmp_path / "pairs.array_record"), x0, traj, ["a", "b"])
  src = videos.VideoClipSource(str(tmp_path / "pairs.array_record"))
  assert len(src) == 2 and src[1]["prompt"] == "b" and src[1]["trajectory"].shape == (3, 2, 4, 4, 3)
  write, calls = videos.VideoRecordWriter.write, []

  def write_then_fail(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("No space left on device")
    return write(self, *args, **kwargs)

  monkeypatch.setattr(videos.VideoRecordWriter, "write", write_then_fail)
  with pytest.raises(OSError, match="No space") as failed:  # (its traceback keeps the writer from the collector)
    ode_pairs.write_ode_pairs(str(tmp_path / "failed.array_record"), x0, traj, ["a", "b"])
  assert sorted(os.listdir(tmp_path)) == ["pairs.array_record"], failed  # no partial file, no temporary left


def test_bad_prompt_file_gives_clear_error(tmp_path, xla_cache):
  from dsa_jax.data.prompts import PromptFileError
  bad = tmp_path / "prompts.txt"
  bad.write_bytes(b"a red ball\n\xff\xfe broken\n")
  with pytest.raises(PromptFileError, match=r"prompts.txt.*line 2.*UTF-8"):
    _run(tiny(f"--config.data.prompts.path={bad}"), tmp_path / "w1")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _run(tiny(f"--config.data.prompts.path={tmp_path / 'missing.txt'}"), tmp_path / "w2")
  with pytest.raises(trainer.TrainingError, match="data.videos"):
    _run(tiny("--config.train.stage=teacher"), tmp_path / "w4")
  # a prompt kind without its file is refused by name; only kind 'text' without a path falls back, and says so
  with pytest.raises(PromptFileError, match=r"data\.prompts\.path: required for kind='csv'"):
    trainer.make_source(tiny("--config.data.prompts.kind=csv", "--config.data.prompts.column=caption"))
  assert trainer.make_source(tiny()).name == trainer.BUILTIN_PROMPTS


def test_ode_stage_on_the_fly_and_stored(tmp_path, xla_cache):
  """Stage 'ode' from a teacher model folder: pairs generated inside the step, then pairs stored in a file.
  (Stage 'teacher' is trained in test_multiprocess.py.)"""
  from dsa_jax.data.videos import write_clips
  spec = rollout.RolloutSpec.from_config(tiny())
  rng = np.random.default_rng(0)
  clips = [{"video": rng.standard_normal((spec.num_frames, spec.height, spec.width, spec.channels)).astype(np.float32),
            "prompt": f"clip {i}"} for i in range(2)]
  videos = tmp_path / "latents.array_record"
  write_clips(str(videos), clips)
  t_cfg = tiny("--config.train.stage=teacher")
  teacher_model = tmp_path / "teacher_model"
  checkpointing.export_networks({"teacher": init_net(t_cfg, "teacher", 7)}, t_cfg, str(teacher_model))
  params, meta = checkpointing.load_model_from_workdir(str(teacher_model), t_cfg, ("teacher",))
  assert meta["stage"] == "teacher"

  o_cfg = tiny("--config.train.stage=ode", "--config.train.steps=2", f"--config.train.teacher_from={teacher_model}")
  s, logs = _run(o_cfg, tmp_path / "ode")
  assert any("initialised generator from the teacher" in line for line in logs), logs
  assert s["end_step"] == 2 and np.isfinite(s["last_metrics"]["loss_ode"])
  # the student started from the teacher: 2 Adam steps of lr 1e-4 move each weight by about 2e-4 at most
  gen = flat(s["state"].generator)
  tea = flat(params["teacher"])
  diff = max(np.abs(gen[k] - tea[k]).max() for k in tea)
  assert 0 < diff < 1e-3, diff

  # stored pairs: `dsa-jax data ode-pairs` writes a file with the teacher, the ode stage trains one step from it
  from dsa_jax import cli
  pairs = tmp_path / "pairs.array_record"
  assert cli.main(["data", "ode-pairs", "--config", TINY, "--out", str(pairs), "--num", "4", "--batch", "2"] + BATCH
                  + [f"--config.train.teacher_from={teacher_model}"]) == 0
  src = ode_pairs.OdePairSource(str(pairs), o_cfg)
  assert cli.main(["data", "ode-pairs", "--config", TINY, "--out", str(tmp_path / "x")]) == 2  # no teacher: refused
  assert not os.path.exists(tmp_path / "x")
  assert len(src) == 4 and src[0]["trajectory"].shape[0] == len(spec.sigmas)
  np.testing.assert_allclose(src[0]["trajectory"][0].std(), 1.0, atol=0.15)  # sigma 1: pure noise
  s, _ = _run(tiny("--config.train.stage=ode", "--config.train.steps=1", f"--config.train.ode_pairs={pairs}",
                   f"--config.train.teacher_from={teacher_model}"), tmp_path / "ode_stored")
  assert s["end_step"] == 1 and np.isfinite(s["last_metrics"]["loss_ode"])
  with pytest.raises(ode_pairs.OdePairsError, match="trajectory"):
    ode_pairs.OdePairSource(str(videos), o_cfg)
  other_ladder = tiny("--config.train.stage=ode", f"--config.train.ladder={tuple(o_cfg.sampling.ladder[::2])}")
  with pytest.raises(ode_pairs.OdePairsError, match=r"recorded at sigmas .*train\.ladder"):
    ode_pairs.OdePairSource(str(pairs), other_ladder)


def test_cli_trains_checkpoints_resumes(tmp_path, xla_cache, reference_run, capsys):
  """`dsa-jax train` end to end in a subprocess (the programs come from the persistent compilation cache)."""
  work = tmp_path / "cli"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  base = ([sys.executable, "-m", "dsa_jax", "train", "--config", TINY, "--workdir", str(work)] + BATCH
          + ["--config.train.tensorboard=False"])  # its writer imports torch: 1.4 s per process
  r = subprocess.run(base + ["--config.train.steps=4"], env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 4/4" in r.stdout and os.path.isdir(work / "checkpoints" / "4") and os.path.isdir(work / "model")
  r = subprocess.run(base + ["--config.train.steps=6"], env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "step 6/6" in r.stdout, r.stdout
  assert json.load(open(work / "model" / "dsa_meta.json"))["step"] == 6
  from dsa_jax import cli  # a bad config value: the same command's one-line error (in-process: no jax work)
  assert cli.main(base[3:] + ["--config.train.stage=nope"]) == 2
  assert "train.stage" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Faults of the training loop: non-finite losses, corrupt latest checkpoint (the reference run's configuration
# and compiled steps)


@pytest.fixture(scope="module")
def train_cfg(reference_run):
  """The reference run's configuration: these runs load its compiled steps (and run after it in this module, so they
  never wait for another worker's compile)."""
  return reference_run[0]


def _poison(monkeypatch, bad_calls):
  """Text contexts of the given encoder calls (0 = the negative prompt, 1 = the first batch) become NaN."""
  from dsa_jax.training import trainer
  real = trainer.make_text_encoder

  def make(config):
    enc, calls = real(config), [0]

    def encode(prompts):
      out = enc(prompts)
      calls[0] += 1
      return out * np.nan if calls[0] - 1 in bad_calls else out
    return encode
  monkeypatch.setattr(trainer, "make_text_encoder", make)


def test_nonfinite_loss_stops_before_saving(train_cfg, tmp_path, monkeypatch):
  from dsa_jax.training import trainer
  _poison(monkeypatch, {3})  # the third batch
  cfg = train_cfg.copy_and_resolve_references()
  cfg.train.update(keep=1, ckpt_every=1)  # saving step 3 would rotate the last good checkpoint away
  logs = []
  with pytest.raises(trainer.NonFiniteError, match=r"step 3: non-finite .*nonfinite_skip"):
    trainer.train(cfg, str(tmp_path), log=logs.append)  # the programs of the reference run
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # the newest finite one stays
  assert not os.path.exists(tmp_path / "model")
  assert not (tmp_path / "train.lock").read_text()  # released


def test_nonfinite_parameters_are_never_saved():
  from dsa_jax.training import trainer

  class State:
    def __init__(self, x):
      self.x = x

    def networks(self):
      return {"generator": {"w": self.x}}
  trainer._check_before_save(State(np.ones(3, np.float32)), 5)
  with pytest.raises(trainer.NonFiniteError, match="step 5: the parameters hold NaN"):
    trainer._check_before_save(State(np.array([1.0, np.inf], np.float32)), 5)
  with pytest.raises(trainer.TrainingError, match="nonfinite_skip"):
    trainer.nonfinite_skip_budget(get_config(TINY, ["--config.train.nonfinite_skip=-1"]))


def test_nonfinite_batches_skipped_up_to_budget(train_cfg, tmp_path, monkeypatch):
  from dsa_jax.training import trainer
  _poison(monkeypatch, {2})
  cfg = train_cfg.copy_and_resolve_references()
  cfg.train.nonfinite_skip = 1
  logs = []
  summary = trainer.train(cfg, str(tmp_path), log=logs.append)
  assert summary["end_step"] == 4 and any("skipped this batch (1 of" in x for x in logs), logs
  from dsa_jax.training import checkpointing
  params, _ = checkpointing.load_model_from_workdir(str(tmp_path / "model"), cfg)
  assert not params_io.nonfinite_leaves(params)


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(reference_run, train_cfg, tmp_path, caplog):
  shutil.copytree(reference_run[1], tmp_path, dirs_exist_ok=True)  # checkpoints 2 and 4
  _corrupt_generator(tmp_path / "checkpoints" / "4")
  caplog.clear()
  with pytest.raises(checkpointing.CheckpointError):
    checkpointing.load_model_from_workdir(str(tmp_path), train_cfg)  # reading alone never moves anything
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert not [r for r in caplog.records if "read only" in r.getMessage()]  # orbax's notices to every reader
  logs = []
  summary = trainer.train(train_cfg, str(tmp_path), log=logs.append)
  assert summary["start_step"] == 2 and summary["end_step"] == 4
  warn = [x for x in logs if "WARNING: checkpoint step 4" in x]
  assert warn and "falling back" in warn[0], logs
  aside = os.listdir(tmp_path / "corrupt_checkpoints")
  assert len(aside) == 1 and aside[0].startswith("4-")
  assert os.path.isdir(tmp_path / "corrupt_checkpoints" / aside[0] / "generator")  # kept, not deleted
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # 4 written again by this run


def test_progress_line_shows_the_fullest_device():
  """On accelerators the progress line carries the memory peak of the device nearest to its limit (on several GPUs
  not necessarily the first); without allocator counters (CPU) it says nothing about memory."""
  rows = [{"device": "cuda:0", "peak_bytes_in_use": 50e9, "bytes_limit": 100e9, "peak_fraction_of_limit": 0.5},
          {"device": "cuda:1", "peak_bytes_in_use": 90e9, "bytes_limit": 100e9, "peak_fraction_of_limit": 0.9}]
  from dsa_jax.eval.profiling import device_peak
  peak = device_peak(rows)
  assert peak == {"device_peak_gb": 90.0, "device_peak_fraction": 0.9}
  line = trainer.progress_line("dsa", 10, 20, {"loss_dmd": 0.5, **peak}, 2.0, 5.0)
  assert line == "[dsa] step 10/20 | dmd 0.5 | 2 it/s | mem 90.0 GB (90 %) | ETA 0:00:05", line
  assert device_peak(None) == {} and "mem" not in trainer.progress_line("dsa", 1, 2, {}, 1.0, 1.0)
