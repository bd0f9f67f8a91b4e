"""Two CPU processes joined by `jax.distributed` on localhost train the tiny DSA config together.

Each process has one device; the mesh spans both (data=2), every process feeds its own half of the global batch
(grain shards the prompt stream by process), orbax writes the checkpoint from both, and process 0 exports the model
through a single-process subprocess.
"""

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(port: int, pid: int, workdir: str, out: str):
  from dsa_jax.parallel.mesh import maybe_initialize_distributed
  assert maybe_initialize_distributed(f"localhost:{port}", 2, pid)
  import jax
  from dsa_jax.config_lib import get_config
  from dsa_jax.training import trainer

  assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
  cfg = get_config(os.path.join(ROOT, "configs", "tiny.py"),
                   ["--config.train.steps=2", "--config.train.ckpt_every=2", "--config.dmd.critic_ratio=1",
                    "--config.train.log_every=1"])
  summary = trainer.train(cfg, workdir)
  with open(out, "w") as f:
    json.dump({"end_step": summary["end_step"], "metrics": summary.get("last_metrics", {}),
               "process": jax.process_index(), "devices": len(jax.devices())}, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_a_step(tmp_path):
  port = _free_port()
  work = tmp_path / "work"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), str(work),
                             str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  deadline = time.time() + 420
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(1, deadline - time.time()))
      logs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
  outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert [o["process"] for o in outs] == [0, 1] and all(o["devices"] == 2 for o in outs)
  assert all(o["end_step"] == 2 for o in outs)
  m0, m1 = outs[0]["metrics"], outs[1]["metrics"]
  assert m0 and m0 == m1  # replicated metrics of the global step
  assert all(v == v for v in m0.values()) and "loss_dmd" in m0 and "loss_critic" in m0
  assert "step 2/2" in logs[0] and "step 2/2" not in logs[1]  # only process 0 logs
  assert os.path.isdir(work / "checkpoints" / "2")
  meta = json.loads((work / "model" / "dsa_meta.json").read_text())
  assert meta["step"] == 2 and sorted(meta["networks"]) == ["generator", "generator_ema", "head"]


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
