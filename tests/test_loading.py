"""The one network loader: what substitutes for a missing network, and that every substitution is said."""

import os

import jax
import numpy as np
import pytest

from dsa_jax.checkpoint import loading, params_io
from dsa_jax.models import factory


@pytest.fixture(scope="module")
def nets(tiny_config):
  return factory.random_networks(tiny_config, ("generator", "head"), jax.random.PRNGKey(3), exact=False)


def _same(a, b):
  return all(np.allclose(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_teacher_stands_in_for_the_generator_only_when_asked(tmp_path, tiny_config, nets):
  path = str(tmp_path / "base")
  arch = factory.dit_config(tiny_config, "model").to_dict()
  params_io.save_params(path, {"teacher": nets["generator"]}, {"arch": {"teacher": arch}})
  with pytest.raises(params_io.CheckpointError, match="holds no 'generator'.*teacher"):
    loading.load_networks(tiny_config, path, ("generator",), log=lambda m: None)
  notes = []
  got, chosen = loading.load_networks(tiny_config, path, ("generator", "head"),
                                      fallbacks={**loading.INIT_FROM_FALLBACKS, "head": (loading.RANDOM,)},
                                      log=notes.append)
  assert chosen == {"generator": "teacher", "head": loading.RANDOM}
  assert _same(got["generator"], nets["generator"])
  assert len(notes) == 2 and "'teacher' in its place" in notes[0] and "RANDOM" in notes[1]


def test_teacher_of_another_architecture_is_no_substitute(tmp_path, tiny_config, nets):
  path = str(tmp_path / "base")
  arch = dict(factory.dit_config(tiny_config, "model").to_dict(), num_layers=7)
  params_io.save_params(path, {"teacher": nets["generator"]}, {"arch": {"teacher": arch}})
  with pytest.raises(params_io.CheckpointError, match="'teacher' has another architecture"):
    loading.load_networks(tiny_config, path, ("generator",), fallbacks=loading.INIT_FROM_FALLBACKS,
                          log=lambda m: None)


def test_sampler_params_say_nothing_when_nothing_is_substituted(tmp_path, tiny_config, nets):
  path = str(tmp_path / "model")
  params_io.save_params(path, dict(nets), {"arch": {"generator": factory.dit_config(tiny_config).to_dict()}})
  notes = []
  got, source = loading.load_sampler_params(tiny_config, path, use_ema=False, warn=notes.append)
  assert notes == [] and source == {"source": "checkpoint", "path": path, "generator": "generator"}
  assert _same(got["head"], nets["head"])


def test_vae_loads_with_its_stored_architecture(tmp_path):
  import dataclasses
  from dsa_jax.models.vae import WanVAEConfig
  from dsa_jax.sampling.decode import random_vae_params
  cfg = WanVAEConfig(base_dim=8, num_res_blocks=1, z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
  params = random_vae_params(cfg)
  params_io.save_params(str(tmp_path / "vae"), {"vae": params}, {"arch": {"vae": dataclasses.asdict(cfg)}})
  got_cfg, got = loading.load_vae(str(tmp_path / "vae"), log=lambda m: pytest.fail(m))
  assert got_cfg == cfg and _same(got, params)
  params_io.save_params(str(tmp_path / "bare"), {"vae": params}, {})
  notes = []
  assert loading.load_vae(str(tmp_path / "bare"), log=notes.append)[0] == WanVAEConfig()
  assert len(notes) == 1 and "Wan2.1" in notes[0]
  with pytest.raises(FileNotFoundError, match="config.vae.path"):
    loading.load_vae(str(tmp_path / "missing"))


def test_saving_a_model_replaces_only_a_model_checkpoint(tmp_path):
  """A model folder is replaced whole, so saving refuses a folder that holds anything but a model checkpoint (an
  export pointed at a training workdir must not delete its checkpoints), and leaves a sibling '<name>.old' alone."""
  params = {"head": {"w": np.arange(3, dtype=np.float32)}}
  work = tmp_path / "work"
  (work / "checkpoints" / "4").mkdir(parents=True)
  (work / "notes.txt").write_text("keep me")
  with pytest.raises(params_io.CheckpointError, match=r"work'.*not a dsa_jax model checkpoint"):
    params_io.save_params(str(work), params, {"arch": {}})
  assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "notes.txt"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(params_io.CheckpointError, match="file"):
    params_io.save_params(str(tmp_path / "file"), params, {"arch": {}})
  (tmp_path / "model").mkdir()  # empty: fine
  (tmp_path / "model.old").mkdir()
  (tmp_path / "model.old" / "mine.txt").write_text("mine")
  params_io.save_params(str(tmp_path / "model"), params, {"arch": {}, "n": 1})
  params_io.save_params(str(tmp_path / "model"), params, {"arch": {}, "n": 2})  # an earlier model: replaced
  assert params_io.read_meta(str(tmp_path / "model"))["n"] == 2
  mask = os.umask(0)
  os.umask(mask)
  assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~mask  # the usual permissions, not mkdtemp's 0700
  assert (tmp_path / "model.old" / "mine.txt").read_text() == "mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model", "model.old", "work"]  # no temporaries
