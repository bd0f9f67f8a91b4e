"""Sweeps: grid parsing and checks, a sampling sweep that compiles once, a resumable training sweep."""

import csv
import json
import os

import pytest

from dsa_jax.eval import sweep as sweep_lib


def _rows(out):
  with open(os.path.join(out, "results.csv")) as f:
    return list(csv.DictReader(f))


def test_parse_axis_forms():
  assert sweep_lib.parse_axis("sampling.threshold=0.4:0.8:5") == ("sampling.threshold", [0.4, 0.5, 0.6, 0.7, 0.8])
  assert sweep_lib.parse_axis("--config.sampling.min_steps=1,2") == ("sampling.min_steps", [1, 2])
  assert sweep_lib.parse_axis("sampling.ladder=[(1000, 500), (1000, 750, 500)]")[1] == [(1000, 500),
                                                                                        (1000, 750, 500)]
  assert sweep_lib.parse_axis("sampling.threshold=0.5,inf")[1] == [0.5, float("inf")]
  assert len(sweep_lib.grid([("a", [1, 2, 3]), ("b", [4, 5])])) == 6


@pytest.mark.parametrize("axes, match", [
    (["sampling.nope=1,2"], "no field 'sampling.nope'"),
    (["sampling.min_steps=1.5"], "expected an int"),
    (["sampling.threshold=0.2:0.8:0"], "empty range"),
    (["sampling.threshold=0.2,,0.3"], "empty value"),
    (["compute.dtype=3"], "expected a string"),
    (["sampling.min_steps=1,9"], "sampling.min_steps: must lie in"),
    (["sampling=1"], "is a section"),
    (["sampling.min_steps=1", "sampling.min_steps=2"], "given twice"),
    ([], "nothing to sweep"),
])
def test_bad_input_fails_before_running(tmp_path, axes, match):
  out = str(tmp_path / "s")
  with pytest.raises(sweep_lib.SweepError, match=match):
    sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes)
  assert not os.path.exists(out)


def test_remote_out_needs_print_commands():
  with pytest.raises(sweep_lib.SweepError, match="local folder"):
    sweep_lib.run_sweep("train", "configs/tiny.py", "gs://bucket/x", axes=["train.lr=1e-4"])


def test_get_sweep_from_config_file(tmp_path, monkeypatch, capsys):
  """Also: through the CLI each point samples with its own config.seed (swept, else --config.seed), not --seed's
  default, and its command reproduces that seed."""
  from dsa_jax import cli
  from dsa_jax.sampling import sampler as sampler_lib
  path = tmp_path / "cfg.py"
  path.write_text("import importlib.util, os\n"
                  "spec = importlib.util.spec_from_file_location('t', os.path.join(%r, 'configs/tiny.py'))\n"
                  "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                  "get_config = m.get_config\n"
                  "def get_sweep(arg):\n"
                  "  return [{'sampling.threshold': 0.3}, {'config.sampling.threshold': 0.6, 'seed': 2}]\n"
                  % os.getcwd())
  pts = sweep_lib.build_points(str(path), [])
  assert [p.name for p in pts] == ["threshold=0.3", "threshold=0.6_seed=2"]
  assert pts[1].config.seed == 2 and pts[1].config.sampling.threshold == 0.6

  seeds, make = [], sampler_lib.make_sampler

  def spy(config):
    sampler = make(config)
    controls = sampler.make_controls
    sampler.make_controls = lambda n, **kw: (seeds.append(kw["seed"]), controls(n, **kw))[1]
    return sampler

  monkeypatch.setattr(sampler_lib, "make_sampler", spy)
  out = str(tmp_path / "s")
  argv = ["sweep", "sample", "--config", str(path), "--out", out, "--num", "1", "--config.seed=5"]
  assert cli.main(argv) == 0
  assert seeds == [5, 2]
  rows = _rows(out)
  assert [r["command"].split(" --seed ")[1].split()[0] for r in rows] == ["5", "2"]
  assert cli.main(argv + ["--seed", "1"]) == 2
  assert "--seed 1 and the swept field 'seed' (point threshold=0.6_seed=2)" in capsys.readouterr().err
  assert seeds == [5, 2]  # refused before sampling


def test_sample_sweep_six_points_compile_once(tmp_path):
  out = str(tmp_path / "s")
  axes = ["sampling.threshold=0.3:0.7:3", "sampling.min_steps=1,2"]
  res = sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes, opts={"num": 2}, log=lambda m: None)
  rows = _rows(out)
  assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
  assert res["programs_compiled"] == 1  # the controls are traced: one program for the whole sweep
  assert float(rows[1]["mean_steps"]) >= 2  # min_steps=2 is honoured
  assert all(r["command"].startswith("dsa-jax sample --config configs/tiny.py") for r in rows)
  assert "--config.sampling.threshold=0.5 --config.sampling.min_steps=2" in rows[3]["config_diff"]
  assert os.path.isfile(os.path.join(out, "results.md")) and os.path.isfile(os.path.join(out, "results.png"))
  again = sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes, opts={"num": 2}, log=lambda m: None)
  assert len(again["skipped"]) == 6 and not again["ran"]
  # Options that leave a sample's results as they were (the default seed given, eval-only ones, --videos) resume.
  same = {"num": 2, "seed": 0, "batch": 7, "fps_prompts": 0, "videos": True}
  again = sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes, opts=same, log=lambda m: None)
  assert len(again["skipped"]) == 6 and not again["ran"]
  # Others would reuse results of another run: refused, naming each option with its old and new value.
  with pytest.raises(sweep_lib.SweepError, match=r"holds a sample sweep run with other options \(--prompt was "
                     r"'.*', now 'digit 9'; --num was 2, now 3\).*new --out"):
    sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes, opts={"num": 3, "prompt": "digit 9"})
  with pytest.raises(sweep_lib.SweepError, match=r"--seed was 0, now 5\)"):
    sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes, opts={"num": 2, "seed": 5})
  with open(os.path.join(out, "sweep.json")) as f:
    spec = json.load(f)
  assert spec["options"] == {"ckpt": None, "prompt": sweep_lib.DEFAULT_PROMPT, "num": 2, "seed": 0}
  os.remove(os.path.join(out, "sweep.json"))  # each point's record holds its options too
  with pytest.raises(sweep_lib.SweepError, match=r"point threshold=0.3_min_steps=1 was run with other options \(--num"):
    sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes, opts={"num": 3})
  del spec["options"]  # a folder from before options were kept: not checked
  with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump(spec, f)
  for name in os.listdir(os.path.join(out, "points")):
    rec_path = os.path.join(out, "points", name, "result.json")
    with open(rec_path) as f:
      rec = json.load(f)
    del rec["options"]
    with open(rec_path, "w") as f:
      json.dump(rec, f)
  again = sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=axes, opts={"num": 3}, log=lambda m: None)
  assert len(again["skipped"]) == 6 and not again["ran"]
  with pytest.raises(sweep_lib.SweepError, match="holds a sweep"):
    sweep_lib.run_sweep("train", "configs/tiny.py", out, axes=axes)


def test_failed_point_is_recorded_and_others_run(tmp_path):
  out = str(tmp_path / "s")
  res = sweep_lib.run_sweep("sample", "configs/tiny.py", out, axes=["sampling.threshold=0.3,0.6"],
                            opts={"num": 1, "ckpt": str(tmp_path / "missing")}, log=lambda m: None)
  rows = _rows(out)
  assert len(res["failed"]) == 2 and [r["status"] for r in rows] == ["failed", "failed"]
  assert "does not exist" in rows[0]["error"]


def test_train_sweep_two_workdirs_then_skips(tmp_path):
  out = str(tmp_path / "t")
  base = ["--config.runlocal=True", "--config.train.steps=1", "--config.train.ckpt_every=1",
          "--config.train.log_every=1"]
  kw = dict(axes=["train.lr=1e-4,3e-4"], base_overrides=base, log=lambda m: None)
  res = sweep_lib.run_sweep("train", "configs/digits.py:teacher", out, **kw)
  assert res["ran"] == ["lr=0.0001", "lr=0.0003"] and not res["failed"]
  runs = sorted(os.listdir(os.path.join(out, "runs")))
  assert runs == ["lr=0.0001", "lr=0.0003"]
  assert all(os.path.isdir(os.path.join(out, "runs", r, "model")) for r in runs)
  rows = _rows(out)
  assert [r["end_step"] for r in rows] == ["1", "1"]
  assert "--workdir " + os.path.join(out, "runs", "lr=0.0001") in rows[0]["command"]
  again = sweep_lib.run_sweep("train", "configs/digits.py:teacher", out, **kw)
  assert again["skipped"] == ["lr=0.0001", "lr=0.0003"] and not again["ran"]


def test_cli_print_commands(capsys):
  from dsa_jax import cli
  rc = cli.main(["sweep", "train", "--config", "configs/digits.py:teacher", "--out", "runs/lr", "--sweep",
                 "train.lr=1e-4,3e-4", "--print-commands", "gpu", "--config.runlocal=True"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert rc == 0 and lines == [
      "bash launch/gpu_local.sh configs/digits.py:teacher runs/lr/runs/lr=0.0001 --config.runlocal=True "
      "--config.train.lr=0.0001",
      "bash launch/gpu_local.sh configs/digits.py:teacher runs/lr/runs/lr=0.0003 --config.runlocal=True "
      "--config.train.lr=0.0003"]


def test_eval_points_share_a_benchmark_per_group(tmp_path, monkeypatch):
  """Threshold / min / max steps are per-run arguments of one Benchmark; other fields get their own."""
  from dsa_jax.eval import claim
  from dsa_jax.sampling import sampler as sampler_lib
  from dsa_jax.checkpoint import loading

  made, runs = [], []

  class FakeBenchmark:
    real_floor = {"fd": 1.0}

    def __init__(self, config, **kw):
      made.append((config.sampling.guidance, kw["num"], kw["seed"]))

    def run(self, sampler, params, *, name, threshold, min_steps, max_steps):
      runs.append((name, threshold, min_steps, max_steps))
      return {"name": name, "avg_steps": 2.0, "fd": 10.0 * threshold, "agreement": 0.5, "_arrays": {}}

  monkeypatch.setattr(claim, "Benchmark", FakeBenchmark)
  monkeypatch.setattr(loading, "load_sampler_params", lambda config, ckpt, warn: ({}, {"source": "fake"}))
  monkeypatch.setattr(sampler_lib, "make_sampler", lambda config: object())
  out = str(tmp_path / "e")
  res = sweep_lib.run_sweep("eval", "configs/digits.py", out, opts={"num": 4}, base_overrides=["--config.seed=3"],
                            axes=["sampling.guidance=1.0,2.0", "sampling.threshold=0.5,0.7"], log=lambda m: None)
  assert made == [(1.0, 4, 3), (2.0, 4, 3)]  # the config's seed (no --seed given)
  assert [r[1] for r in runs] == [0.5, 0.7, 0.5, 0.7]
  rows = _rows(out)
  assert [float(r["fd"]) for r in rows] == [5.0, 7.0, 5.0, 7.0] and res["metric"] == "fd"
  assert all(" --seed 3 " in r["command"] for r in rows)
  assert os.path.isfile(os.path.join(out, "results.png"))
  with pytest.raises(sweep_lib.SweepError, match="pixel-space digits config"):
    sweep_lib.run_sweep("eval", "configs/tiny.py", str(tmp_path / "t"), axes=["sampling.threshold=0.5"])
