"""Confidence heads apart from their generator: export-head, the generator fingerprint, sample/calibrate --head."""

import json
import os

import jax
import numpy as np
import pytest

from dsa_jax import cli
from dsa_jax.checkpoint import heads, loading, params_io
from dsa_jax.config_lib import LOG_SCALE_TARGETS
from dsa_jax.sampling import budget

# Two calibration tables that ask different thresholds for the same budget (the tiny ladder has 5 steps).
TABLE_OWN = {"thresholds": [0.1, 0.5, 0.9], "mean_steps": [1.0, 3.0, 5.0], "min_steps": 1, "max_steps": 5,
             "num_prompts": 2, "seed": 0}
TABLE_HEAD = {"thresholds": [0.01, 0.02, 0.04], "mean_steps": [1.0, 2.0, 5.0], "min_steps": 1, "max_steps": 5,
              "num_prompts": 2, "seed": 0}


@pytest.fixture(scope="module")
def tiny(repo_root):
  return os.path.join(repo_root, "configs", "tiny.py")


@pytest.fixture(scope="module")
def models(tiny_config, tmp_path_factory):
  """'model': generator + its own head (TABLE_OWN); 'trained': the same generator with another head (remaining
  target, TABLE_HEAD); 'other': another generator; 'head': the head of 'trained', exported on its own."""
  from dsa_jax.sampling.sampler import make_sampler
  from dsa_jax.training import checkpointing
  root = tmp_path_factory.mktemp("heads")
  nets = make_sampler(tiny_config).init_params(jax.random.PRNGKey(0))
  second = jax.tree_util.tree_map(lambda x: x * 1.5 + 0.01, nets["head"])
  paths = {k: str(root / k) for k in ("model", "trained", "other", "head")}
  checkpointing.export_networks(nets, tiny_config, paths["model"])
  params_io.update_meta(paths["model"], calibration=TABLE_OWN)
  checkpointing.export_networks({"generator": nets["generator"], "head": second}, tiny_config, paths["trained"])
  params_io.update_meta(paths["trained"], calibration=TABLE_HEAD, conf_target={"kind": "remaining"})
  other = jax.tree_util.tree_map(lambda x: x * 0.5, nets["generator"])
  checkpointing.export_networks({"generator": other, "head": nets["head"]}, tiny_config, paths["other"])
  assert cli.main(["convert", "export-head", "--src", paths["trained"], "--out", paths["head"]]) == 0
  return {"nets": nets, "second": second, **paths}


def _bitwise_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.asarray(x).dtype == np.asarray(y).dtype and
                                    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_fingerprint_depends_on_the_values_only(models):
  gen = models["nets"]["generator"]
  fp = heads.generator_fingerprint(gen)
  assert len(fp) == 16 and fp == heads.generator_fingerprint({"params": gen["params"]})  # wrapper or not
  assert fp == heads.generator_fingerprint(jax.tree_util.tree_map(np.asarray, gen))
  assert fp != heads.generator_fingerprint(jax.tree_util.tree_map(lambda x: x * 0.5, gen))
  # training exports record it, so a full model folder can be checked too
  assert params_io.read_meta(models["model"])[heads.FINGERPRINT_KEY] == fp


def test_export_head_round_trip(models, tiny_config):
  meta = params_io.read_meta(models["head"])
  assert meta["networks"] == ["head"] and set(meta["arch"]) == {"head"}
  assert meta["calibration"] == TABLE_HEAD and meta["conf_target"] == {"kind": "remaining"}
  assert meta[heads.FINGERPRINT_KEY] == heads.generator_fingerprint(models["nets"]["generator"])
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(models["head"]) for f in fs)
  assert size < 200_000  # the head alone, no generator
  notes = []
  got, source = loading.load_sampler_params(tiny_config, models["model"], head=models["head"], use_ema=False,
                                            warn=notes.append)
  assert notes == []
  assert _bitwise_equal(got["head"], models["second"]) and not _bitwise_equal(got["head"], models["nets"]["head"])
  assert _bitwise_equal(got["generator"], models["nets"]["generator"])
  assert source["calibration"] == TABLE_HEAD and source["conf_target"] == {"kind": "remaining"}  # the head's own
  assert source["head"] == models["head"] and source["path"] == models["model"]
  # config.sampling.head is the default of the Python API
  config = tiny_config.copy_and_resolve_references()
  config.sampling.head = models["head"]
  got2, source2 = loading.load_sampler_params(config, models["model"], warn=notes.append)
  assert _bitwise_equal(got2["head"], models["second"]) and source2["calibration"] == TABLE_HEAD


def test_attach_head_makes_it_the_models_own(models, tiny_config, tmp_path, capsys):
  """attach-head is export-head's inverse: the model's own head, conf_target and table become the head folder's;
  its generator and other tables stay; a head for another generator is refused; --out may be --ckpt itself."""
  import shutil
  model = str(tmp_path / "model")
  shutil.copytree(models["model"], model)
  params_io.update_meta(model, calibration_x0_delta=TABLE_OWN)
  out = str(tmp_path / "attached")
  assert cli.main(["convert", "attach-head", "--ckpt", model, "--head", models["head"], "--out", out]) == 0
  meta = params_io.read_meta(out)
  assert meta["conf_target"] == {"kind": "remaining"} and meta["calibration"] == TABLE_HEAD
  assert meta["calibration_x0_delta"] == TABLE_OWN and meta["source"]["command"] == "convert attach-head"
  got, source = loading.load_sampler_params(tiny_config, out, use_ema=False, warn=lambda m: None)
  assert _bitwise_equal(got["head"], models["second"]) and _bitwise_equal(got["generator"], models["nets"]["generator"])
  assert source["calibration"] == TABLE_HEAD
  # exporting the attached head again gives the same head folder contents
  again = str(tmp_path / "again")
  heads.export_head(out, again)
  assert params_io.read_meta(again)[heads.FINGERPRINT_KEY] == params_io.read_meta(models["head"])[heads.FINGERPRINT_KEY]
  with pytest.raises(params_io.CheckpointError, match="trained for another generator"):
    heads.attach_head(models["other"], models["head"], str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")
  heads.attach_head(model, models["head"], model)  # in place
  assert params_io.read_meta(model)["conf_target"] == {"kind": "remaining"}
  # The tables of other step ranges travel with their head: the head folder's arrive, the model's old ones go
  params_io.update_meta(model, calibration_ranges={"2-5": dict(TABLE_OWN, min_steps=2)})
  head2 = str(tmp_path / "head2")
  shutil.copytree(models["head"], head2)
  params_io.update_meta(head2, calibration_ranges={"3-5": dict(TABLE_HEAD, min_steps=3)})
  capsys.readouterr()
  assert cli.main(["convert", "attach-head", "--ckpt", model, "--head", head2, "--out", model]) == 0
  assert "its calibration tables (steps per frame 1-5, 3-5)" in capsys.readouterr().out
  assert params_io.read_meta(model)["calibration_ranges"] == {"3-5": dict(TABLE_HEAD, min_steps=3)}
  assert cli.main(["convert", "export-head", "--src", model, "--out", str(tmp_path / "head3")]) == 0
  assert params_io.read_meta(str(tmp_path / "head3"))["calibration_ranges"] == {"3-5": dict(TABLE_HEAD, min_steps=3)}


def test_head_commands_never_replace_a_model(models, tmp_path, capsys):
  """export-head / attach-head replace their --out whole: a model folder there (--src itself above all) would lose
  its generators, so only a new folder, an earlier head folder, or (attach-head) --ckpt itself is written."""
  import shutil
  model, other = str(tmp_path / "model"), str(tmp_path / "other")
  shutil.copytree(models["model"], model)
  shutil.copytree(models["other"], other)
  nets = params_io.read_meta(model)["networks"]
  for out in (model, model + "/", other):
    assert cli.main(["convert", "export-head", "--src", model, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"--out {out!r}" in err and ("is --src itself" in err or "not replaced" in err), err
  head = str(tmp_path / "head")
  shutil.copytree(models["head"], head)
  for out in (head, other):
    assert cli.main(["convert", "attach-head", "--ckpt", model, "--head", models["head"], "--out", out]) == 2
    assert f"--out {out!r} exists" in capsys.readouterr().err
  assert params_io.read_meta(model)["networks"] == nets and params_io.read_meta(other)["networks"] == nets
  assert params_io.load_params(model)[0].keys() == set(nets) and heads.is_head_folder(head)
  # an earlier head folder is replaced by a new export
  assert cli.main(["convert", "export-head", "--src", model, "--out", head]) == 0
  assert heads.is_head_folder(head) and params_io.read_meta(head)["calibration"] == TABLE_OWN


def test_head_for_another_generator_is_refused(models, tiny_config):
  other_fp = heads.generator_fingerprint(jax.tree_util.tree_map(lambda x: x * 0.5, models["nets"]["generator"]))
  mine = params_io.read_meta(models["head"])[heads.FINGERPRINT_KEY]
  with pytest.raises(params_io.CheckpointError, match=f"trained for another generator \\(fingerprint {mine} vs "
                                                       f"{other_fp}"):
    loading.load_sampler_params(tiny_config, models["other"], head=models["head"], warn=lambda m: None)


def test_head_without_fingerprint_loads_with_a_warning(models, tiny_config, tmp_path):
  bare = str(tmp_path / "bare")
  arch = params_io.read_meta(models["head"])["arch"]
  params_io.save_params(bare, {"head": models["second"]}, {"arch": arch})
  notes = []
  got, source = loading.load_sampler_params(tiny_config, models["other"], head=bare, use_ema=False,
                                            warn=notes.append)
  assert len(notes) == 1 and "records no generator fingerprint" in notes[0] and bare in notes[0]
  assert _bitwise_equal(got["head"], models["second"]) and "calibration" not in source  # not the model's table


def test_head_of_another_architecture_and_misplaced_folders(models, tiny_config, tmp_path):
  from dsa_jax.checkpoint.workdir import arch_meta
  from dsa_jax.models import factory
  config = tiny_config.copy_and_resolve_references()
  config.conf.hidden = 16
  wide = str(tmp_path / "wide")
  head = factory.random_networks(config, ("head",), jax.random.PRNGKey(1))["head"]
  meta = {"arch": arch_meta(config, ["head"]), heads.FINGERPRINT_KEY: "0" * 16}
  params_io.save_params(wide, {"head": head}, meta)
  with pytest.raises(params_io.CheckpointError, match=f"--head: {wide}: network 'head' was saved with another "
                                                       "architecture \\(hidden: checkpoint 16 vs config 32\\)"):
    loading.load_sampler_params(tiny_config, models["model"], head=wide, warn=lambda m: None)
  with pytest.raises(params_io.CheckpointError, match="holds only a confidence head: pass it as --head"):
    loading.load_sampler_params(tiny_config, models["head"], warn=lambda m: None)
  with pytest.raises(FileNotFoundError, match="--head '/nonexistent/head' does not exist"):
    loading.load_sampler_params(tiny_config, models["model"], head="/nonexistent/head", warn=lambda m: None)
  with pytest.raises(params_io.CheckpointError, match="--src .* holds no generator"):
    heads.export_head(wide, str(tmp_path / "x"))  # a head folder has no generator to fingerprint


def test_sample_with_head_takes_tau_from_the_heads_table(models, tiny, tmp_path, capsys):
  out = tmp_path / "out"
  rc = cli.main(["sample", "--config", tiny, "--ckpt", models["model"], "--head", models["head"], "--out", str(out),
                 "--prompt", "a", "--mean-steps", "2.5", "--formats", "gif"])
  assert rc == 0, capsys.readouterr().err
  rec = json.loads((out / "a.steps.json").read_text())
  want = budget.threshold_for(TABLE_HEAD, 2.5)
  assert rec["threshold"] == pytest.approx(want) and want != pytest.approx(budget.threshold_for(TABLE_OWN, 2.5))
  assert rec["checkpoint"]["head"] == models["head"] and rec["checkpoint"]["conf_target"]["kind"] == "remaining"
  assert f"head: {models['head']} (remaining target)" in capsys.readouterr().out
  rc = cli.main(["sample", "--config", tiny, "--ckpt", models["other"], "--head", models["head"], "--out", str(out),
                 "--prompt", "a"])
  assert rc == 2 and "was trained for another generator" in capsys.readouterr().err


def test_calibrate_with_head_writes_into_the_head_folder(models, tiny_config, tiny, tmp_path, capsys):
  import shutil
  head = str(tmp_path / "head")
  shutil.copytree(models["head"], head)
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red ball\na blue cube\n")
  table = budget.calibrate(tiny_config, models["model"], head=head, num=2, batch=2, thresholds=(0.2, 0.8),
                           refine_gap=10.0, prompt_file=str(prompts), log=lambda m: None)
  assert params_io.read_meta(head)["calibration"] == table and table["thresholds"] == [0.2, 0.8]
  assert params_io.read_meta(models["model"])["calibration"] == TABLE_OWN  # the model's own table is untouched
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # written atomically: no temporary left
  assert cli.main(["calibrate", "--config", tiny, "--ckpt", models["model"], "--head", str(tmp_path / "none"),
                   "--num", "2"]) == 2
  assert "--head" in capsys.readouterr().err


def test_sweep_refuses_a_target_name_that_is_not_the_heads(models, tiny_config, tmp_path):
  """A sweep's model name labels its rows and verdicts: 'dmd=' on a model whose head is a 'remaining' head is refused
  before anything is sampled; the right name, or the head given apart, is taken."""
  from dsa_jax.eval import claim
  with pytest.raises(claim.BenchmarkError, match="trained on 'remaining'; name it remaining="):
    claim.run_claim(tiny_config, {"dmd": models["trained"]}, str(tmp_path), log=lambda s: None)
  with pytest.raises(claim.BenchmarkError, match="trained on 'remaining'"):
    claim.run_claim(tiny_config, {"gain": (models["model"], models["head"])}, str(tmp_path), log=lambda s: None)
  assert not os.listdir(tmp_path)


def test_sweep_model_specs_take_a_head():
  from dsa_jax.commands.eval import parse_models
  assert parse_models(["dmd=A", "remaining=A+H"]) == {"dmd": "A", "remaining": ("A", "H")}
  with pytest.raises(ValueError, match="both folders"):
    parse_models(["remaining=A+"])


@pytest.mark.parametrize("kind", ["remaining", "gain", "dmd"])
def test_shipped_heads_fit_the_shipped_generator(repo_root, kind):
  from dsa_jax.config_lib import get_config
  config = get_config("digits")
  head = os.path.join(repo_root, "dsa_jax", "assets", "digits_heads", kind)
  notes = []
  _, source = loading.load_sampler_params(config, config.sampling.checkpoint, head=head, warn=notes.append)
  assert notes == [] and source["conf_target"]["kind"] == kind  # the fingerprint matched, nothing said
  if kind in LOG_SCALE_TARGETS:
    lo, hi = source["conf_target"]["log_range"]  # the normalisation its confidence was trained with
    assert lo < hi
  # its table was made with the config's floor and gives a budget's tau inside (0, 1)
  assert budget.table_step_range(source["calibration"]) == (config.sampling.min_steps, config.sampling.max_steps)
  assert 0.0 < budget.threshold_for(source["calibration"], 2.5) < 1.0
