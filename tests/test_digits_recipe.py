"""The digits recipe: the shipped default model loads and samples; the three-stage chain runs at toy size on CPU."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsa_jax import cli
from dsa_jax.config_lib import get_config


def _digits(repo_root, *overrides):
  return get_config(os.path.join(repo_root, "configs", "digits.py"), list(overrides))


def test_shipped_model_loads_and_samples(repo_root):
  from dsa_jax.data.text_context import make_text_encoder
  from dsa_jax.checkpoint.loading import load_sampler_params
  from dsa_jax.sampling.sampler import make_sampler
  config = _digits(repo_root, "--config.compute.dtype=float32")
  assert config.sampling.checkpoint.endswith(os.path.join("assets", "digits_model"))
  params, source = load_sampler_params(config, config.sampling.checkpoint, warn=lambda *_: None)
  assert "digits_model" in str(source)
  sampler = make_sampler(config)
  ctx = make_text_encoder(config)(["digit 5 moves slowly"])
  out = sampler.sample(params, ctx, sampler.make_controls(1, threshold=np.inf, max_steps=2, seed=0))
  frames = np.asarray(out.latents)
  assert frames.shape == (1, 16, 32, 32, 1)
  assert (np.asarray(out.steps) == 2).all()
  assert np.isfinite(frames).all()
  # A trained model draws bright digits on a dark canvas: mostly background (-1), a few bright pixels.
  assert np.median(frames) < -0.7 and np.percentile(frames, 99.5) > 0.3
  # The default step budget, through the model's calibration table (and its step range): over a few calibration
  # prompts the head spends different numbers of steps on different frames, on average between the floor and the
  # maximum (an easy prompt alone may take the floor everywhere).
  from dsa_jax.sampling import budget
  controls = budget.budget_controls(source["calibration"], config.sampling.mean_steps)
  assert controls["min_steps"] == config.sampling.min_steps == 2  # the table was made with the config's floor
  prompts = budget.calibration_prompts(config, 4)
  dyn = sampler.sample(params, make_text_encoder(config)(prompts),
                       sampler.make_controls(len(prompts), seed=np.arange(len(prompts)), **controls))
  steps = np.asarray(dyn.steps)
  assert steps.min() >= 2 and len(np.unique(steps)) > 1 and 2 < steps.mean() < config.sampling.max_steps, steps
  c = sampler.chunk_frames
  assert config.sampling.first_chunk_min_steps == 3 and (steps[:, :c] == 3).all()  # the first chunk at full steps
  # Below the floor the model's 1-2 table answers: frames may stop after one step, fewer steps on average
  low = budget.controls_for_budget(source, 1.5, config)
  assert low["min_steps"] == 1 and low["threshold"] < controls["threshold"]
  few = np.asarray(sampler.sample(params, make_text_encoder(config)(prompts),
                                  sampler.make_controls(len(prompts), seed=np.arange(len(prompts)), **low)).steps)
  assert few.min() == 1 and few.mean() < steps.mean() and (few[:, :c] == 2).all(), few
  # The training-free x0-change rule has its own table in the shipped model, served under that rule: made with the
  # same floor, fewer steps as its threshold rises, and covering the budgets from the floor to the maximum.
  x0_config = _digits(repo_root, "--config.compute.dtype=float32", "--config.sampling.stop_rule=x0_delta")
  _, x0_source = load_sampler_params(x0_config, x0_config.sampling.checkpoint, warn=lambda *_: None)
  table = x0_source["calibration"]
  assert table["stop_rule"] == "x0_delta" and table is not source["calibration"]
  assert budget.table_step_range(table) == (2, config.sampling.max_steps)
  order = np.argsort(table["thresholds"])
  assert (np.diff(np.asarray(table["mean_steps"])[order]) <= 1e-6).all()
  fewest = budget.table_bounds(table)[0]  # 2 steps, the first chunk's frames 3
  assert fewest == (2 * (16 - c) + 3 * c) / 16
  assert min(table["mean_steps"]) <= fewest + 0.01 and max(table["mean_steps"]) >= config.sampling.max_steps - 0.05
  taus = [budget.budget_controls(table, m, ladder=config.sampling.ladder)["threshold"] for m in (2.25, 2.5, 2.75)]
  assert taus[0] > taus[1] > taus[2] > 0, taus
  # both tables were made on the ladder the config samples with
  assert table["ladder"] == source["calibration"]["ladder"] == [float(t) for t in config.sampling.ladder]


def test_runlocal_chain_teacher_ode_dsa(repo_root, tmp_path):
  """teacher -> ODE init -> DSA at toy size, each stage resuming from the previous stage's exported model."""
  cfg = os.path.join(repo_root, "configs", "digits.py")
  # one step per stage: the chain (export, init from the previous stage) is what is tested; the DSA stage's first
  # step is a generator step (the critic-only step is covered by test_training.py)
  # (TensorBoard off: its writer imports torch, 1.4 s per process; test_training.py checks its event files)
  common = ["--config.runlocal=True", "--config.train.steps=1", "--config.train.ckpt_every=1",
            "--config.train.log_every=1", "--config.train.tensorboard=False"]
  t, o, d = (str(tmp_path / n) for n in ("teacher", "ode", "dsa"))
  # `dsa-jax train` in subprocesses with the suite's XLA flags (conftest.py: backend optimisation off, the chain is
  # compile-bound)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo_root)
  log = ""
  for args in ([cfg + ":teacher", "--workdir", t],
               [cfg + ":ode", "--workdir", o, f"--config.train.teacher_from={t}/model", "--config.train.ode_steps=4"],
               [cfg + ":dsa", "--workdir", d, f"--config.train.teacher_from={t}/model",
                f"--config.train.init_from={o}/model"]):
    r = subprocess.run([sys.executable, "-m", "dsa_jax", "train", "--config"] + args + common, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log += r.stdout + r.stderr
  for stage in ("teacher", "ode", "dsa"):
    assert os.path.isfile(os.path.join(tmp_path, stage, "model", "dsa_meta.json"))
    assert f"[{stage}] done: 1 steps" in log
  # each stage starts from the previous one's model
  assert f"[ode] initialised generator from the teacher {t}/model" in log
  assert f"[dsa] initialised generator from {o}/model" in log
  # A sampling-only copy (EMA generator + head) continues the DSA stage: generator from the EMA, the head kept.
  from dsa_jax.training import checkpointing, trainer
  slim = str(tmp_path / "slim")
  checkpointing.slim_model(f"{d}/model", slim)
  config = get_config(cfg + ":dsa", common + [f"--config.train.teacher_from={t}/model",
                                              f"--config.train.init_from={slim}"])
  nets, sources = trainer.initial_networks(config, lambda: None)
  assert sources["generator"] == sources["head"] == slim and sources["critic"].startswith("the teacher")
  from dsa_jax.checkpoint.loading import load_networks
  stored = load_networks(config, slim, ("generator_ema", "head"), log=lambda *_: None)[0]
  for mine, theirs in ((nets["generator"], stored["generator_ema"]), (nets["head"], stored["head"])):
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(theirs)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The head stage continues a head of the same target (a longer head run in two parts), else starts afresh.
  # (the DSA head's 'dmd' target needs a teacher: the head stage trains 'remaining' or 'consistency', so a copy of
  # the model whose meta says 'remaining' stands for a head-stage model)
  import json
  import shutil
  rem = str(tmp_path / "slim_remaining")
  shutil.copytree(slim, rem)
  with open(os.path.join(rem, "dsa_meta.json")) as f:
    meta = json.load(f)
  meta["conf_target"] = {"kind": "remaining"}
  with open(os.path.join(rem, "dsa_meta.json"), "w") as f:
    json.dump(meta, f)
  cases = (("remaining", [], True), ("consistency", [], False),
           ("remaining", ["--config.train.continue_head=False"], False))
  for target, extra, continues in cases:
    hcfg = get_config(cfg + ":head", common + [f"--config.train.init_from={rem}", f"--config.conf.target={target}"]
                      + extra)
    hnets, hsources = trainer.initial_networks(hcfg, lambda: None)
    assert ("head" in hnets) == continues and hsources["generator"] == rem, (target, extra, hsources)
    if continues:
      for a, b in zip(jax.tree_util.tree_leaves(hnets["head"]), jax.tree_util.tree_leaves(stored["head"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the DSA stage likewise keeps a head only of its own target: the 'remaining' copy's head starts afresh for 'dmd'
  for target, continues in (("dmd", False), ("remaining", True)):
    dcfg = get_config(cfg + ":dsa", common + [f"--config.train.teacher_from={t}/model", f"--config.train.init_from={rem}",
                                              f"--config.conf.target={target}"])
    dnets, dsources = trainer.initial_networks(dcfg, lambda: None)
    assert ("head" in dnets) == continues and dsources["generator"] == rem, (target, dsources)
  out = tmp_path / "sample"
  assert cli.main(["sample", "--config", cfg, "--config.runlocal=True", "--ckpt", f"{d}/model", "--out", str(out),
                   "--prompt", "digit 3 moves fast"]) == 0
  assert (out / "digit_3_moves_fast.steps.json").is_file()


def test_launch_script_stages_name_real_config_stages(repo_root):
  """Every stage of launch/digits_gpu.sh names a stage that configs/digits.py accepts, and the script parses."""
  import re
  script = os.path.join(repo_root, "launch", "digits_gpu.sh")
  subprocess.run(["bash", "-n", script], check=True)
  calls = re.findall(r"^stage (\S+) (\S+) ", open(script).read(), flags=re.M)
  assert [c[0] for c in calls] == ["teacher", "ode", "dsa", "polish", "polish2", "polish3", "polish4", "ladder3",
                                   "ladder3b", "ladder3c"], calls
  digits = os.path.join(repo_root, "configs", "digits.py")
  for _, cfg_stage in calls:
    assert get_config(digits + ":" + cfg_stage).train.stage == cfg_stage
  # the sampling-ladder stages' shared overrides are a valid config (exits at 2 or 3 of the 3 steps)
  l3 = re.search(r'^L3="([^"]+)"', open(script).read(), flags=re.M).group(1).split()
  c = get_config(digits + ":dsa", l3)
  assert tuple(c.train.ladder) == (1000, 500, 250) and c.train.min_exit_steps == 2 and c.dmd.guidance == 0.5


def test_launch_script_starts_from_a_kept_teacher(repo_root, tmp_path):
  """TEACHER=DIR copies a model folder in as the teacher stage's model (so its stage is skipped); a folder that is not
  a model stops the script before any work, naming it."""
  script = os.path.join(repo_root, "launch", "digits_gpu.sh")
  env = dict(os.environ, RUN=str(tmp_path / "run"), STAGES="none", NUM_SHARDS="1", CLIPS_PER_SHARD="2",
             PY=sys.executable, PYTHONPATH=repo_root)
  bad = subprocess.run(["bash", script], env=dict(env, TEACHER=str(tmp_path / "nowhere")), cwd=repo_root,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "nowhere: not a model folder" in bad.stderr, bad.stderr
  assert not (tmp_path / "run" / "data" / "prompts.txt").exists()
  teacher = tmp_path / "kept"
  teacher.mkdir()
  (teacher / "dsa_meta.json").write_text('{"stage": "teacher"}')
  ok = subprocess.run(["bash", script], env=dict(env, TEACHER=str(teacher)), cwd=repo_root, capture_output=True,
                      text=True)
  assert ok.returncode == 0, ok.stderr
  assert "teacher: copied from" in ok.stdout
  assert (tmp_path / "run" / "teacher" / "model" / "dsa_meta.json").read_text() == '{"stage": "teacher"}'
