"""Two CPU processes joined by `jax.distributed` on localhost train the tiny config together.

Each process has one device; the mesh spans both (data=2), every process feeds its own half of the global batch
(grain shards the clip stream by process; global arrays from process-local data), orbax writes the checkpoint from
both, only process 0 logs, and process 0 exports the model through a single-process subprocess. The stage is
'teacher' (flow matching on stored latent clips): the multi-host machinery is the same for every stage, and this
step compiles fastest (the sharded DSA step is covered by test_training_multidevice.py).
"""

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(port: int, pid: int, workdir: str, out: str, videos: str):
  from dsa_jax.parallel.mesh import maybe_initialize_distributed
  assert maybe_initialize_distributed(f"localhost:{port}", 2, pid)
  import jax
  from dsa_jax.config_lib import get_config
  from dsa_jax.training import trainer

  assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
  cfg = get_config(os.path.join(ROOT, "configs", "tiny.py"),
                   ["--config.train.stage=teacher", f"--config.data.videos={videos}", "--config.train.steps=2",
                    "--config.train.ckpt_every=2", "--config.train.log_every=1"])
  summary = trainer.train(cfg, workdir)
  with open(out, "w") as f:
    json.dump({"end_step": summary["end_step"], "metrics": summary.get("last_metrics", {}),
               "process": jax.process_index(), "devices": len(jax.devices())}, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _write_clips(path):
  import numpy as np
  from dsa_jax.config_lib import get_config, latent_hw
  from dsa_jax.data.videos import write_clips
  cfg = get_config(os.path.join(ROOT, "configs", "tiny.py"))
  h, w = latent_hw(cfg)
  rng = np.random.default_rng(0)
  write_clips(path, [{"video": rng.standard_normal((cfg.video.num_frames, h, w, cfg.model.in_channels)
                                                   ).astype(np.float32), "prompt": f"clip {i}"} for i in range(8)])


def test_two_processes_train_a_step(tmp_path):
  port = _free_port()
  videos = str(tmp_path / "latents.array_record")
  _write_clips(videos)
  work = tmp_path / "work"
  # the suite's XLA flags (conftest.py: backend optimisation off, the two processes are compile-bound)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), str(work),
                             str(tmp_path / f"out{i}.json"), videos], env=env, stdout=subprocess.PIPE,
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
  perf = ("it_per_s", "samples_per_s", "frames_per_s")
  m0, m1 = ({k: v for k, v in o["metrics"].items() if k not in perf} for o in outs)
  assert m0 and m0 == m1  # replicated metrics of the global step
  assert all(v == v for v in m0.values()) and m0["loss_fm"] > 0
  assert "step 2/2" in logs[0] and "step 2/2" not in logs[1]  # only process 0 logs
  assert os.path.isdir(work / "checkpoints" / "2")
  meta = json.loads((work / "model" / "dsa_meta.json").read_text())
  assert meta["step"] == 2 and meta["networks"] == ["teacher"]
  data = json.loads((work / "checkpoints" / "2" / "data" / "metadata").read_text())
  assert data["position"] == 4  # 2 steps x global batch 2: one clip per process per step


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])


def test_multi_gpu_checks_refuse_bad_arguments_before_running(tmp_path):
  """The multi-GPU check script says what is wrong (fewer than 2 GPUs, an unknown stage) and runs nothing."""
  script = os.path.join(ROOT, "launch", "multi_gpu_checks.sh")
  run = lambda env: subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True,
                                   env={**os.environ, **env}, timeout=60)
  one = run({"GPUS": "1"})
  assert one.returncode == 2 and "needs GPUS >= 2 (got '1')" in one.stderr
  bad = run({"GPUS": "2", "STAGES": "train sampler-typo"})  # checked before the first stage runs
  assert bad.returncode == 2 and "unknown stage 'sampler-typo' (sampler, train, resume)" in bad.stderr
  assert not os.path.exists(tmp_path / "out")
