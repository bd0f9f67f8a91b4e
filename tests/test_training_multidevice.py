"""Sharded training on 8 simulated CPU devices (mesh data=2, fsdp=2, tensor=2), in a subprocess so that
`XLA_FLAGS=--xla_force_host_platform_device_count=8` is set before jax starts.

The worker (this file run as a script) runs one DSA generator step sharded and the same step on one device,
saves the sharded state with orbax and restores it onto a 4-device mesh; the test checks what it reports.
"""

import json
import os
import subprocess
import sys

import pytest
from simulated_devices import eight_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(out_path: str, ckpt_dir: str):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P

  from dsa_jax.config_lib import get_config
  from dsa_jax.parallel import mesh as mesh_lib
  from dsa_jax.training import checkpointing, trainer
  from dsa_jax.training import state as state_lib
  from dsa_jax.training import steps as steps_lib

  assert len(jax.devices()) == 8, jax.devices()
  spec_json = lambda spec: [a if a is None or isinstance(a, str) else list(a) for a in spec]
  # the tiny config at one layer per network and 4 frames (2 chunks): the sharding is the same per layer and per
  # chunk, and the programs compile in a fraction of the time
  cfg = get_config(os.path.join(ROOT, "configs", "tiny.py"),
                   ["--config.train.batch_size=4", "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=2",
                    "--config.mesh.shape.tensor=2", "--config.model.num_layers=1", "--config.teacher.num_layers=1",
                    "--config.critic.num_layers=1", "--config.video.num_frames=4", "--config.train.exit_steps=2"])
  rules = mesh_lib.rules_from_config(cfg)
  ctx = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, cfg.model.text_len, cfg.model.text_dim)))
  uncond = jnp.zeros((1, cfg.model.text_len, cfg.model.text_dim))
  report = {}

  def one_step(mesh):
    bundle = steps_lib.build_steps(cfg, mesh, rules)
    teacher = trainer.load_teacher(cfg, mesh, rules, bundle.teacher_shardings)
    state, _ = state_lib.create_sharded_state(cfg, mesh, rules, jax.random.PRNGKey(0))
    report.setdefault("init", jax.device_get(state.networks()))
    batch = {"context": jax.device_put(ctx, bundle.batch_sharding)}
    state, metrics = bundle("gen", state, teacher, batch, uncond)
    return state, jax.device_get(metrics)

  mesh8 = mesh_lib.make_mesh(cfg)
  report["mesh"] = mesh_lib.mesh_sizes(mesh8)
  state8, m8 = one_step(mesh8)
  kernel = state8.generator["params"]["blocks"]["ffn_in"]["kernel"]  # (layers, embed, mlp)
  report["ffn_in_spec"] = spec_json(kernel.sharding.spec)
  report["ffn_in_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
  nu = state8.gen_opt[1][0].nu["params"]["blocks"]["ffn_in"]["kernel"]  # adam moment sharded like its param
  report["adam_nu_spec"] = spec_json(nu.sharding.spec)
  report["metrics8"] = {k: float(v) for k, v in m8.items()}

  mesh1 = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1], shape={"data": 1, "fsdp": 1, "tensor": 1})
  state1, m1 = one_step(mesh1)
  report["metrics1"] = {k: float(v) for k, v in m1.items()}
  a = jax.tree_util.tree_leaves(jax.device_get(state8))
  init = report.pop("init")
  n8, n1 = jax.device_get(state8.networks()), jax.device_get(state1.networks())
  report["max_param_diff"] = {}
  report["update_rel_diff"] = {}
  for name in ("generator", "head", "critic"):
    x8, x1, x0 = (np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree_util.tree_leaves(t[name])])
                  for t in (n8, n1, init))
    report["max_param_diff"][name] = float(np.max(np.abs(x8 - x1)))
    # the one-step update agrees: |u8 - u1| relative to |u1| (Adam with beta1 = 0 normalises each gradient entry, so
    # entries with near-zero gradients can differ by up to 2 lr; on average they must agree closely)
    report["update_rel_diff"][name] = float(np.sum(np.abs(x8 - x1)) / np.sum(np.abs(x1 - x0)))

  # Save on 8 devices, restore onto 4 (data=1, fsdp=2, tensor=2).
  ck = checkpointing.Checkpointer(ckpt_dir, keep=2, async_save=True)
  ck.save(1, state8, config=cfg, data_state={"position": 4})
  ck.wait()
  mesh4 = mesh_lib.make_mesh(cfg, devices=jax.devices()[:4], shape={"data": 1, "fsdp": 2, "tensor": 2})
  sh4 = state_lib.state_shardings(cfg, mesh4, rules)
  restored, data_state = ck.restore(1, state_lib.abstract_state(cfg, sh4), config=cfg)
  ck.close()
  r_leaves = jax.tree_util.tree_leaves(restored)
  report["restored_devices"] = sorted({len(x.sharding.device_set) for x in r_leaves})
  report["restored_equal"] = all(np.array_equal(np.asarray(x), np.asarray(y))
                                 for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(restored)), a))
  rk = restored.generator["params"]["blocks"]["ffn_in"]["kernel"]
  report["restored_spec"] = spec_json(rk.sharding.spec)
  report["restored_data_state"] = data_state
  with open(out_path, "w") as f:
    json.dump(report, f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multidevice")
  out = tmp / "report.json"
  # The worker shares the tests' persistent compilation cache (a program built again is loaded, not compiled); its
  # 1-layer, 4-frame networks are not test_training.py's, so it shares no program with that file.
  from test_training import shared_cache_dir
  cache = shared_cache_dir(tmp_path_factory)  # the folder test_training.py uses
  env = eight_device_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  res = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), str(tmp / "ckpt")], env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-4000:]
  return json.loads(out.read_text())


def test_sharded_dsa_step_runs_with_finite_losses(report):
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  m = report["metrics8"]
  for k in ("loss_dmd", "loss_critic", "loss_conf", "grad_norm_gen", "grad_norm_critic"):
    assert k in m and m[k] == m[k] and abs(m[k]) < 1e6, (k, m.get(k))
  # FSDP over the model dim, tensor parallelism over the FFN hidden dim; Adam moments sharded like their params
  assert report["ffn_in_spec"] == [None, "fsdp", "tensor"], report["ffn_in_spec"]
  assert report["ffn_in_shard_shape"] == [1, 96, 256]  # (layers, embed / fsdp, mlp / tensor)
  assert report["adam_nu_spec"] == report["ffn_in_spec"]


def test_sharded_step_equals_single_device_step(report):
  m8, m1 = report["metrics8"], report["metrics1"]
  for k in m1:
    assert abs(m8[k] - m1[k]) <= 1e-4 * max(1.0, abs(m1[k])), (k, m8[k], m1[k])
  for name, rel in report["update_rel_diff"].items():
    assert rel < 1e-4, (name, rel, report["max_param_diff"])
  assert max(report["max_param_diff"].values()) < 1e-4  # lr = 1e-4: no parameter moved differently by a full step


def test_restore_onto_fewer_devices(report):
  assert report["restored_devices"] in ([1], [1, 4], [4])  # scalars replicated, sharded arrays on 4 devices
  assert 4 in report["restored_devices"]
  assert report["restored_equal"]
  assert report["restored_spec"] == [None, "fsdp", "tensor"]
  assert report["restored_data_state"] == {"position": 4}


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1], sys.argv[2])
