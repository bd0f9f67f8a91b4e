"""Injected faults: each bad checkpoint, bad number, bad path, bad prompt or concurrent run fails loudly (one clear
line, before any compilation where possible) instead of producing a silent wrong result.

The training loop's faults (non-finite losses and parameters, a corrupt latest checkpoint) are in test_training.py,
beside the reference run whose compiled steps they reuse.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jax

from dsa_jax import cli
from dsa_jax.checkpoint import params_io
from dsa_jax.config_lib import ConfigError, get_config
from dsa_jax.sampling import guards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def sample_cli(tmp_path, *extra, prompt="a cat"):
  return cli.main(["sample", "--config", TINY, "--out", str(tmp_path / "out"), "--prompt", prompt, *extra])


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite values: checkpoints, sampler outputs, controls


@pytest.fixture(scope="module")
def tiny_params():
  from dsa_jax.models.dit import DiTConfig
  from dsa_jax.models.factory import random_networks
  config = get_config(TINY)
  dcfg = DiTConfig.from_config(config.model, config.compute)
  params = random_networks(config, ("generator", "head"), jax.random.PRNGKey(0), exact=False)
  return config, dcfg, jax.tree_util.tree_map(np.asarray, params)


def _save_model(path, config, dcfg, params):
  from dsa_jax.training.checkpointing import arch_meta
  meta = {"arch": {"generator": dcfg.to_dict(), "head": arch_meta(config, ["head"])["head"]}}
  return params_io.save_params(str(path), {"generator": params["generator"], "head": params["head"]}, meta)


def test_checkpoint_with_nan_is_refused_by_loader_and_cli(tmp_path, tiny_params, capsys):
  config, dcfg, params = tiny_params
  bad = jax.tree_util.tree_map(np.copy, params)
  leaf = jax.tree_util.tree_leaves(bad["generator"])[3]
  leaf.reshape(-1)[7] = np.nan  # what a flipped exponent bit in a data file gives
  path = _save_model(tmp_path / "model", config, dcfg, bad)
  with pytest.raises(params_io.CheckpointError, match="non-finite"):
    params_io.load_params(path)
  rc = sample_cli(tmp_path, "--ckpt", path)
  err = capsys.readouterr()
  errors = [l for l in err.err.strip().splitlines() if not l.startswith("note:")]  # notes: the loader's fallbacks
  assert rc == 2 and "non-finite" in err.err and "corrupt" in err.err and len(errors) == 1
  assert "compiling" not in err.out and not os.listdir(tmp_path / "out")


def test_sampler_output_nan_raises_instead_of_writing(tmp_path, tiny_params, monkeypatch, capsys):
  """Finite but absurd weights overflow inside the network: the CLI names the weights and writes nothing."""
  config, dcfg, params = tiny_params
  from dsa_jax.checkpoint import loading
  huge = {"generator": jax.tree_util.tree_map(lambda x: x * 1e30, params["generator"]), "head": params["head"]}
  monkeypatch.setattr(loading, "load_sampler_params", lambda *a, **k: (huge, {"path": "HUGE_CKPT"}))
  rc = sample_cli(tmp_path, "--threshold", "inf", "--max-steps", "1")
  err = capsys.readouterr().err
  assert rc == 2 and "non-finite latents" in err and "HUGE_CKPT" in err, err
  assert not [f for f in os.listdir(tmp_path / "out") if not f.startswith(".")]


def test_check_sample_names_causes():
  lat = np.zeros((1, 4, 2, 2, 1), np.float32)
  guards.check_sample(lat, np.zeros((1, 4)))  # finite: nothing
  lat[0, 2] = np.nan
  with pytest.raises(guards.NonFiniteSampleError, match=r"frames \[2\].*guidance scale is nan"):
    guards.check_sample(lat, np.zeros((1, 4)), guidance=float("nan"))
  with pytest.raises(guards.NonFiniteSampleError, match="confidences.*float16"):
    guards.check_sample(np.zeros(3), [0.1, np.inf, 0.2], dtype="float16")


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "nan"], "--guidance: expected a finite number"),
    (["--guidance", "inf"], "--guidance: expected a finite number"),
    (["--seed", "x"], "--seed: expected an integer"),
])
def test_bad_numbers_are_argparse_errors(tmp_path, capsys, extra, message):
  with pytest.raises(SystemExit) as e:
    sample_cli(tmp_path, *extra)
  assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "got -1"),
    (["--seed", str(2**32)], "got 4294967296"),
    (["--seed", "99999999999999999999"], "got 99999999999999999999"),
    (["--config.seed", "4294967295", "--prompts", "TWO"], "4294967295..4294967296 (one per prompt)"),
])
def test_seeds_outside_uint32_are_refused(tmp_path, capsys, extra, message):
  two = tmp_path / "two.txt"
  two.write_text("a\nb\n")
  extra = [str(two) if a == "TWO" else a for a in extra]
  args = ["sample", "--config", TINY, "--out", str(tmp_path / "out")] + extra
  if "--prompts" not in extra:
    args += ["--prompt", "a cat"]
  rc = cli.main(args)
  err = capsys.readouterr().err
  assert rc == 2 and "seed" in err and "[0, 2**32" in err and message in err, err


def test_last_valid_seeds_sample_with_a_padded_batch(tmp_path):
  prompts = tmp_path / "three.txt"
  prompts.write_text("a\nb\nc\n")
  rc = cli.main(["sample", "--config", TINY, "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--seed",
                 str(2**32 - 3), "--batch-size", "2", "--threshold", "inf", "--max-steps", "1", "--formats", "gif"])
  assert rc == 0
  rec = json.loads((tmp_path / "o" / "002_c.steps.json").read_text())
  assert rec["seed"] == 2**32 - 1


def test_sampler_controls_refuse_nan_guidance_and_bad_seeds(tiny_config):
  from dsa_jax.sampling.sampler import make_sampler
  s = make_sampler(tiny_config)
  with pytest.raises(ValueError, match="guidance"):
    s.make_controls(1, guidance=float("nan"))
  for seed in (-1, 2**32, np.array([0, -3])):
    with pytest.raises(ValueError, match="seed"):
      s.make_controls(2, seed=seed)
  with pytest.raises(ValueError, match="seed"):
    s.make_controls(2, seed=2**32 - 1)  # the second sample would wrap to 0
  assert np.asarray(s.make_controls(2, seed=2**32 - 2).seed).tolist() == [2**32 - 2, 2**32 - 1]


# ----------------------------------------------------------------------------------------------------------------------
# Outputs checked before compiling; unique names


def test_out_that_is_a_file_or_unmakeable_fails_before_compiling(tmp_path, capsys):
  f = tmp_path / "afile"
  f.write_text("x")
  for out, message in ((f, "is a file"), (f / "sub", "cannot write into")):
    rc = cli.main(["sample", "--config", TINY, "--out", str(out), "--prompt", "a cat"])
    text = capsys.readouterr()
    assert rc == 2 and message in text.err and "compiling" not in text.out, text


def test_output_names_unique_per_prompt():
  from dsa_jax.commands.sample import output_names
  a, b = output_names(["一只猫"]), output_names(["一只狗"])
  assert a != b and a[0].startswith("sample_") and len(a[0]) == len("sample_") + 6
  assert output_names(["A red ball, bouncing!"]) == ["a_red_ball_bouncing"]
  names = output_names(["a cat!", "a cat?", "a dog", "猫", "狗"])
  assert len(set(names)) == 5 and names[2] == "002_a_dog" and names[0].startswith("000_a_cat_")
  long_a, long_b = "word " * 30 + "one", "word " * 30 + "two"  # slugs cut to the same 48 characters
  assert output_names([long_a]) != output_names([long_b])


def test_data_digits_out_file_is_one_line_error(tmp_path, capsys):
  f = tmp_path / "afile"
  f.write_text("x")
  for out in (f, f / "sub"):  # the file itself, or a folder to be made under it
    rc = cli.main(["data", "digits", "--out", str(out), "--num", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert cli.main(["data", "digits", "--out", str(tmp_path / "d"), "--num", "2", "--digit-size", "0"]) == 2
  assert "digit_size" in capsys.readouterr().err and not (tmp_path / "d").exists()  # 0 is out of range, not "default"


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def test_digits_encoder_warns_about_unknown_words_and_truncation():
  from dsa_jax.data.text_context import UnknownWordsError, make_text_encoder
  config = get_config("digits")
  msgs = []
  enc = make_text_encoder(config, warn=msgs.append)
  enc(["digit 3 moves slowly"])
  assert msgs == []
  enc(["a cat playing piano", "a cat"])
  assert len(msgs) == 1 and "cat, piano, playing" in msgs[0] and "--strict-prompts" in msgs[0]
  enc(["a cat"])  # reported once per word
  assert len(msgs) == 1
  enc(["digit " * 5000])
  assert len(msgs) == 2 and "5000 words is cut to the first 24" in msgs[1]
  enc(["digit " * 5000])  # the same prompt again: not repeated
  assert len(msgs) == 2
  # a training run draws ever new long prompts: a few are named, then one line says more are cut, then silence
  from dsa_jax.data.text_context import MAX_CUT_PROMPTS_LISTED
  enc([f"digit {d} moves " + "slowly " * 30 for d in range(9)])
  cut = msgs[2:]
  assert len(cut) == MAX_CUT_PROMPTS_LISTED  # four more named (the first was above), then the summary line
  assert all("is cut to the first 24" in m for m in cut[:-1]) and "no more of them are listed" in cut[-1]
  enc(["digit 1 moves " + "fast " * 40])
  assert len(msgs) == 2 + MAX_CUT_PROMPTS_LISTED
  strict = make_text_encoder(config, strict=True, warn=msgs.append)
  with pytest.raises(UnknownWordsError, match="piano"):
    strict(["digit 3 plays piano"])


def test_strict_prompts_cli_fails_before_compiling(tmp_path, capsys):
  rc = cli.main(["sample", "--config", "digits", "--out", str(tmp_path / "o"), "--prompt", "a cat playing piano",
                 "--strict-prompts"])
  text = capsys.readouterr()
  assert rc == 2 and "unknown to the text encoder" in text.err and "compiling" not in text.out


# ----------------------------------------------------------------------------------------------------------------------
# One-line CLI errors


def test_cli_argument_forms():
  argv = ["sample", "--config.x", "0.7", "--threshold", "-inf", "--config.y=1", "--seed", "-1"]
  assert cli.split_overrides(argv) == (["--config.x=0.7", "--config.y=1"], ["sample", "--threshold=-inf", "--seed", "-1"])
  from dsa_jax.commands.sample import add_arguments, parse_threshold
  import argparse
  p = argparse.ArgumentParser()
  add_arguments(p)
  _, rest = cli.split_overrides(["--config", "tiny", "--out", "o", "--threshold", "-inf"])
  assert parse_threshold(p.parse_args(rest).threshold) == -np.inf


def test_space_form_override_and_minus_inf_through_cli(tmp_path, monkeypatch):
  from dsa_jax.commands import sample as sample_cmd
  seen = {}

  def fake_main(args):
    seen["config"] = get_config(args.config, args.overrides)
    seen["threshold"] = sample_cmd.parse_threshold(args.threshold)
    return 0
  monkeypatch.setattr(sample_cmd, "main", fake_main)
  assert cli.main(["sample", "--config", "tiny", "--out", str(tmp_path), "--threshold", "-inf",
                   "--config.sampling.context_noise", "7.0"]) == 0
  assert seen["threshold"] == -np.inf and seen["config"].sampling.context_noise == 7.0


def test_config_syntax_error_names_file_and_line(tmp_path, capsys):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=None):\n  x = (\n")
  with pytest.raises(ConfigError, match=r"bad.py:2: syntax error"):
    get_config(str(bad))
  bad.write_text("A = 1\nB = 1 / 0\n")
  with pytest.raises(ConfigError, match=r"bad.py:2: ZeroDivisionError"):
    get_config(str(bad))
  rc = cli.main(["info", "--config", str(bad)])
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1


def test_config_with_nan_guidance_is_refused(tmp_path):
  f = tmp_path / "g.py"
  f.write_text("from dsa_jax.config_defaults import base_config\n\n\ndef get_config(arg=None):\n"
               "  c = base_config()\n  c.sampling.guidance = float('nan')\n  return c\n")
  with pytest.raises(ConfigError, match="sampling.guidance: must be a finite number"):
    get_config(str(f))


def test_library_errors_keep_their_traceback(monkeypatch):
  """A ValueError raised inside numpy is a bug, not bad input: the CLI must not turn it into one quiet line."""
  from dsa_jax.commands import info
  monkeypatch.setattr(info, "main", lambda args: np.zeros(3).reshape(2, 2))
  with pytest.raises(ValueError, match="reshape"):
    cli.main(["info", "--config", "tiny"])
  assert cli.is_input_error(ConfigError("x")) and not cli.is_input_error(KeyError("x"))


def test_truncated_checkpoint_exits_quietly(tmp_path, tiny_params):
  """The executable: one error line, no trailing asyncio traceback."""
  config, dcfg, params = tiny_params
  path = _save_model(tmp_path / "model", config, dcfg, params)
  for root, _, files in os.walk(os.path.join(path, "params")):
    for name in files:
      if os.path.basename(root) == "d":  # the data files
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(10)
  r = subprocess.run([sys.executable, "-m", "dsa_jax", "sample", "--config", TINY, "--ckpt", path, "--out",
                      str(tmp_path / "o"), "--prompt", "a cat"], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [x for x in r.stderr.strip().splitlines() if "RANDOM" not in x and not x.startswith("note:")]
  assert len(lines) == 1 and "could not be read" in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------------
# First use


def test_configs_by_name_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = get_config("digits")
  assert c.name == "digits" and os.path.isdir(c.sampling.checkpoint)
  assert get_config("configs/digits.py:teacher").train.stage == "teacher"  # the old path, also outside the repo
  assert get_config("tiny.py").name == "tiny"
  with pytest.raises(FileNotFoundError, match="digits, tiny, wan_1_3b"):
    get_config("nope")
  assert os.path.realpath(os.path.join(ROOT, "configs", "digits.py")) == os.path.realpath(
      os.path.join(ROOT, "dsa_jax", "configs", "digits.py"))  # one copy


def test_help_describes_every_command(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  out = capsys.readouterr().out
  assert "write datasets" in out and "None" not in out


# ----------------------------------------------------------------------------------------------------------------------
# Workdir lock


def test_workdir_lock_refuses_second_and_takes_over_stale(tmp_path):
  from dsa_jax.training.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError
  msgs = []
  with WorkdirLock(str(tmp_path), msgs.append):
    info = json.loads((tmp_path / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(WorkdirLockedError, match=f"in use by another trainer .*pid {os.getpid()}"):
      WorkdirLock(str(tmp_path)).acquire()
  assert msgs == []
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
  with WorkdirLock(str(tmp_path), msgs.append):
    pass
  assert len(msgs) == 1 and "stale lock" in msgs[0] and dead.stdout.strip() in msgs[0]
  (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(WorkdirLockedError, match="host elsewhere.*delete"):
    WorkdirLock(str(tmp_path)).acquire()


def test_second_trainer_is_refused_in_one_line(tmp_path, capsys):
  """Another process holds the workdir: `dsa-jax train` exits 2 with one line, before building anything."""
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dsa_jax.training.workdir_lock import "
                             "WorkdirLock; l = WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
                             "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "held"
    rc = cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1, err
  finally:
    holder.kill()
    holder.wait()
