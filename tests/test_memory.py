"""The per-device memory estimate (`dsa-jax info --device-memory`): exact shard bytes, compiled peaks, input errors."""

import json

import pytest

from dsa_jax import cli
from dsa_jax.models import factory
from dsa_jax.parallel import memory
from dsa_jax.parallel import mesh as mesh_lib


def test_parse():
  assert memory.parse_bytes("16GB") == 16 * 10**9 and memory.parse_bytes("16GiB") == 16 * 2**30
  assert memory.parse_bytes("8e9") == 8 * 10**9
  with pytest.raises(ValueError, match="--device-memory"):
    memory.parse_bytes("lots")
  assert memory.parse_mesh("data=1,tensor=8") == {"data": 1, "fsdp": 1, "tensor": 8}
  with pytest.raises(ValueError, match="--mesh"):
    memory.parse_mesh("model=8")


def test_sampling_and_training_estimates(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  mesh = mesh_lib.make_mesh(cfg)
  s = memory.sampling_memory(cfg, mesh, batch=2)
  n_params = (factory.param_count(factory.abstract_dit_params(factory.dit_config(cfg, "model"), cfg))
              + factory.param_count(factory.abstract_head_params(cfg)))
  assert s["params"] == 4 * n_params  # float32
  m = cfg.model
  assert s["kv_cache"] == 2 * m.num_layers * 2 * cfg.video.num_frames * 24 * m.dim * 4  # k and v, batch 2, 24 tokens
  assert s["donated"] == s["kv_cache"]  # the cache is donated
  assert s["activations_peak"] > 0 and s["total"] >= s["params"] + s["activations_peak"]
  cfg.train.stage = "teacher"
  t = memory.training_memory(cfg, mesh)
  teacher = 4 * factory.param_count(factory.abstract_dit_params(factory.dit_config(cfg, "teacher"), cfg))
  # Adam's moments of the trained teacher: both with beta1 > 0, only the second at beta1 = 0 (the first is the gradient)
  assert abs(t["optimizer_state"] - 2 * teacher) < 0.01 * teacher if cfg.train.b1 > 0 else \
      abs(t["optimizer_state"] - teacher) < 0.01 * teacher
  cfg.train.b1 = 0.9
  assert abs(memory.training_memory(cfg, mesh)["optimizer_state"] - 2 * teacher) < 0.01 * teacher
  assert t["params"] >= teacher
  assert t["activations_peak"] > 0 and t["total"] > t["params"] + t["optimizer_state"]


def test_info_says_whether_it_fits(capsys, repo_root):
  tiny = f"{repo_root}/configs/tiny.py"
  assert cli.main(["info", "--config", tiny, "--device-memory", "1MB", "--config.train.stage=teacher"]) == 0
  report = json.loads(capsys.readouterr().out)["memory_per_device"]
  assert report["sampling"]["fits"] is False and report["training"]["fits"] is False
  assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert cli.main(["info", "--config", tiny, "--device-memory", "lots"]) == 2
  assert "--device-memory" in capsys.readouterr().err
  assert cli.main(["info", "--config", tiny, "--device-memory", "1GB", "--programs", "sampling"]) == 0
  report = json.loads(capsys.readouterr().out)["memory_per_device"]
  assert report["sampling"]["fits"] is True and "training" not in report
  assert cli.main(["info", "--config", tiny, "--device-memory", "1GB", "--programs", "inference"]) == 2
  assert "--programs" in capsys.readouterr().err
