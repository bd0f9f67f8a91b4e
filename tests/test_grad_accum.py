"""Gradient accumulation (`train.grad_accum`): K micro-batches per update give the update of one batch of K x B.

The teacher stage draws its per-sample noise for the global batch and splits it with the batch, so K = 1 and K = 2
must agree to float tolerance. A DSA micro-batch draws its own exit step and rollout; the comparison matches them
by giving every micro-batch the step's key and the same prompts, so that the K-micro-batch update must equal the
one-batch update exactly as averaging requires (generator, head, critic, EMA, d_bar and the step counter).
The teacher comparison runs on 8 simulated CPU devices (mesh data=2 x fsdp=2 x tensor=2) in a subprocess.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from simulated_devices import eight_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _cfg(overrides):
  from dsa_jax.config_lib import get_config
  return get_config(TINY, ["--config.train.log_every=1"] + list(overrides))


def _flat(tree):
  import jax
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


def _one_step(cfg, mesh, batch_np, name, same_keys=False):
  """(initial networks, state after one `name` step, metrics), from PRNGKey(0), on `mesh`."""
  import jax
  import jax.numpy as jnp

  from dsa_jax.parallel import mesh as mesh_lib
  from dsa_jax.training import state as state_lib
  from dsa_jax.training import steps as steps_lib
  from dsa_jax.training import trainer
  rules = mesh_lib.rules_from_config(cfg)
  bundle = steps_lib.build_steps(cfg, mesh, rules)
  teacher = None
  if cfg.train.stage in ("ode", "dsa"):
    teacher = trainer.load_teacher(cfg, mesh, rules, bundle.teacher_shardings)
  state, _ = state_lib.create_sharded_state(cfg, mesh, rules, jax.random.PRNGKey(0))
  init = jax.device_get(state.networks())
  batch = {k: jax.device_put(v, bundle.batch_sharding) for k, v in batch_np.items()}
  uncond = jnp.zeros((1, cfg.model.text_len, cfg.model.text_dim))
  orig = steps_lib._Micro.keys
  if same_keys:  # every micro-batch gets the step key: the same exit step and rollout noise as a K = 1 step
    steps_lib._Micro.keys = lambda self, key: jnp.broadcast_to(key, (self.k,) + key.shape)
  try:
    if same_keys:  # a program of its own, not the cached one
      bundle = steps_lib._build_steps(cfg, mesh, rules)
    state, metrics = bundle(name, state, teacher, batch, uncond)
  finally:
    steps_lib._Micro.keys = orig
  return init, jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}


def compare(cfg_overrides, k, batch_np, name, mesh_fn, same_keys=False, batch_k=None):
  """Relative differences between the K = 1 and K = k updates (see `update_diff`) and both metric dicts."""
  cfg1 = _cfg(cfg_overrides + [f"--config.train.batch_size={len(next(iter(batch_np.values())))}"])
  batch_k = batch_np if batch_k is None else batch_k
  cfgk = _cfg(cfg_overrides + [f"--config.train.batch_size={len(next(iter(batch_k.values())))}",
                               f"--config.train.grad_accum={k}"])
  init, s1, m1 = _one_step(cfg1, mesh_fn(cfg1), batch_np, name)
  _, sk, mk = _one_step(cfgk, mesh_fn(cfgk), batch_k, name, same_keys=same_keys)
  out = {"steps": [int(s1.step), int(sk.step)], "metrics1": m1, "metricsk": mk, "update_rel_diff": {},
         "max_abs_diff": {}, "dbar": [float(s1.dbar), float(sk.dbar)]}
  for n, p0 in init.items():
    x0, x1, xk = _flat(p0), _flat(getattr(s1, n)), _flat(getattr(sk, n))
    # Adam's first step normalises each gradient entry: an entry whose gradient is ~0 may move by up to 2 lr in one
    # run and not the other, so the update is compared as a whole (summed |difference| / summed |update|)
    out["update_rel_diff"][n] = float(np.sum(np.abs(xk - x1)) / max(np.sum(np.abs(x1 - x0)), 1e-30))
    out["max_abs_diff"][n] = float(np.max(np.abs(xk - x1)))
  opt = [_flat([getattr(s, f) for f in ("teacher_opt", "gen_opt", "head_opt", "critic_opt")]) for s in (s1, sk)]
  out["opt_max_abs_diff"] = float(np.max(np.abs(opt[0] - opt[1])))
  return out


def teacher_batch(cfg, b, seed=0):
  from dsa_jax.training.rollout import RolloutSpec
  s = RolloutSpec.from_config(cfg)
  rng = np.random.default_rng(seed)
  return {"video": rng.standard_normal((b, s.num_frames, s.height, s.width, s.channels)).astype(np.float32),
          "context": rng.standard_normal((b, cfg.model.text_len, cfg.model.text_dim)).astype(np.float32)}


def prompt_batch(cfg, b, seed=0):
  rng = np.random.default_rng(seed)
  return {"context": rng.standard_normal((b, cfg.model.text_len, cfg.model.text_dim)).astype(np.float32)}


# one layer per network, 4 frames, 2 exit steps: the programs compile in seconds
SMALL = ["--config.model.num_layers=1", "--config.teacher.num_layers=1", "--config.critic.num_layers=1",
         "--config.video.num_frames=4", "--config.train.exit_steps=2"]
TEACHER = SMALL + ["--config.train.stage=teacher", "--config.train.teacher_ema_decay=0.9"]
DSA = SMALL


def run_all(mesh_fn, b_teacher=0, k_teacher=0, b_dsa=0, k_dsa=0, dsa_step="", dsa_overrides=()) -> dict:
  cfg = _cfg(TEACHER)
  report = {}
  if b_teacher:
    report["teacher"] = compare(TEACHER, k_teacher, teacher_batch(cfg, b_teacher), "teacher", mesh_fn)
  if not dsa_step:
    return report
  one = prompt_batch(cfg, b_dsa)
  # micro-batch i holds the rows i, i + K, ...: repeating each prompt K times gives every micro-batch the prompts
  same = {"context": np.repeat(one["context"], k_dsa, axis=0)}
  report["dsa"] = compare(list(dsa_overrides), k_dsa, one, dsa_step, mesh_fn, same_keys=True, batch_k=same)
  report["dsa_step"] = dsa_step
  return report


def _check(report, teacher_tol=1e-4, dsa_tol=1e-4):
  assert report, "nothing compared"
  if "teacher" in report:
    t = report["teacher"]
    assert t["steps"] == [1, 1]  # one update, not one per micro-batch
    for key in ("loss_fm", "grad_norm_teacher", "sigma"):
      np.testing.assert_allclose(t["metricsk"][key], t["metrics1"][key], rtol=1e-5, err_msg=key)
    assert set(t["update_rel_diff"]) == {"teacher", "teacher_ema"}
    for n, v in t["update_rel_diff"].items():
      assert v < teacher_tol, (n, v)
  if "dsa" not in report:
    return
  d = report["dsa"]
  assert d["steps"] == [1, 1]
  gen = report["dsa_step"] == "gen"
  keys = ("loss_critic", "grad_norm_critic", "exit_step") + (
      ("loss_dmd", "loss_conf", "grad_norm_gen", "grad_norm_head", "discrepancy") if gen else ())
  for key in keys:
    np.testing.assert_allclose(d["metricsk"][key], d["metrics1"][key], rtol=1e-4, atol=1e-7, err_msg=key)
  assert set(d["update_rel_diff"]) == {"generator", "generator_ema", "head", "critic"}
  for n, v in d["update_rel_diff"].items():
    assert v < dsa_tol, (n, v)
  if gen:
    np.testing.assert_allclose(d["dbar"][1], d["dbar"][0], rtol=1e-5)
    assert d["dbar"][0] > 0


try:  # the persistent compilation cache of test_training.py: the K = 1 DSA step below is its program
  from test_training import xla_cache  # noqa: E402,F401
except ImportError:
  pass


def _single(cfg):
  from dsa_jax.parallel import mesh as mesh_lib
  return mesh_lib.make_mesh(cfg)


def test_dsa_micro_batches_give_the_one_batch_update(xla_cache):
  # the DSA reference is test_training.py's step (tiny, batch 4): loaded from the shared cache, not compiled again.
  # The teacher stage's comparison runs on the 8-device mesh below (the same split, sharded).
  _check(run_all(_single, b_dsa=4, k_dsa=2, dsa_step="gen", dsa_overrides=[]))


def test_dsa_micro_batches_draw_their_own_exit_step():
  import jax

  from dsa_jax.training import rollout
  cfg = _cfg(DSA + ["--config.train.batch_size=4", "--config.train.grad_accum=4", "--config.train.exit_steps=4"])
  _, state, m = _one_step(cfg, _single(cfg), prompt_batch(cfg, 4), "critic")
  spec = rollout.RolloutSpec.from_config(cfg)
  step_key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(0))[1], 0)  # init_state's rng, step 0
  exits = [int(rollout.sample_exit_index(jax.random.split(jax.random.fold_in(step_key, i), 4)[0], spec)) + 1
           for i in range(4)]
  assert int(state.step) == 1
  np.testing.assert_allclose(m["exit_step"], np.mean(exits), rtol=1e-6)
  assert len(set(exits)) > 1, exits  # the key derivation above draws distinct exit steps for these micro-batches


@pytest.mark.parametrize("batch,k,field", [(3, 2, "train.grad_accum=2"), (4, 0, "train.grad_accum")])
def test_bad_grad_accum_is_a_clear_error(batch, k, field):
  from dsa_jax.parallel import mesh as mesh_lib
  from dsa_jax.training import steps as steps_lib
  cfg = _cfg([f"--config.train.batch_size={batch}", f"--config.train.grad_accum={k}"])
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    steps_lib.check_grad_accum(cfg, mesh_lib.make_mesh(cfg))


def _mesh8(cfg):
  import jax

  from dsa_jax.parallel import mesh as mesh_lib
  assert len(jax.devices()) == 8
  return mesh_lib.make_mesh(cfg, shape={"data": 2, "fsdp": 2, "tensor": 2})


def test_micro_batches_on_8_devices(tmp_path):
  out = tmp_path / "report.json"
  env = eight_device_env()
  res = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-4000:]
  # the K = 1 and K = 2 programs partition their reductions differently over 8 devices: a looser tolerance
  _check(json.loads(out.read_text()), teacher_tol=1e-3)


if __name__ == "__main__":
  # the teacher stage (the cheapest programs): the micro-batch split over the mesh is the same for every stage
  rep = run_all(_mesh8, b_teacher=16, k_teacher=2)
  with open(sys.argv[1], "w") as f:
    json.dump(rep, f)
