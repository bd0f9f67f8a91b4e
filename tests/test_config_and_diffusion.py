"""Config loading/validation, the info command, and the flow-matching schedule."""

import io
import json
import os
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax import cli
from dsa_jax.config_lib import ConfigError, get_config
from dsa_jax.diffusion import flow

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
WAN = os.path.join(os.path.dirname(__file__), "..", "configs", "wan_1_3b.py")


@pytest.mark.parametrize("override, field", [
    ("--config.model.num_heads=5", "model.num_heads"),
    ("--config.video.height=60", "video.height"),
    ("--config.video.width=100", "video.width"),
    ("--config.video.chunk_frames=4", "video.chunk_frames"),
    ("--config.sampling.ladder=(1000, 500, 750)", "sampling.ladder"),
    ("--config.sampling.max_steps=9", "sampling.max_steps"),
    ("--config.compute.attention='flash'", "compute.attention"),
    ("--config.conf.target='other'", "conf.target"),
    ("--config.teacher.text_dim=7", "teacher.text_dim"),
    ("--config.mesh.shape.tensor=3", "mesh.shape"),
    ("--config.video.fps=0", "video.fps"),
    ("--config.train.keep=0", "train.keep"),
    ("--config.train.steps=-5", "train.steps"),
    ("--config.train.ckpt_every=0", "train.ckpt_every"),
    ("--config.train.log_every=0", "train.log_every"),
    ("--config.dmd.critic_ratio=0", "dmd.critic_ratio"),
    ("--config.train.lr=-1.0", "train.lr"),
    ("--config.train.ema_decay=1.5", "train.ema_decay"),
    ("--config.train.cfg_dropout=2.0", "train.cfg_dropout"),
])
def test_invalid_values_name_the_field(override, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    get_config(TINY, [override])


@pytest.mark.parametrize("arg", ["tiny.py", "wan_1_3b.py", "digits.py", "digits.py:teacher", "digits.py:ode",
                                 "digits.py:dsa", "digits.py:head"])
def test_every_shipped_config_loads(arg):
  """Each config (and stage) its docstring tells users to run passes validation as shipped."""
  get_config(os.path.join(os.path.dirname(TINY), arg))


def test_overrides():
  c = get_config(TINY, ["--config.train.steps=7", "--config.sampling.threshold=0.25", "--config.compute.dtype=bfloat16",
                        "--config.sampling.ladder=[1000, 500]", "--config.sampling.max_steps=2"])
  assert c.train.steps == 7 and c.sampling.threshold == 0.25 and c.compute.dtype == "bfloat16"
  assert tuple(c.sampling.ladder) == (1000, 500)
  c = get_config(TINY, ["--config.sampling.threshold=1e9"])
  assert c.sampling.threshold == 1e9
  # Every field the code reads is in base_config, so the command line accepts it.
  c = get_config(TINY, ["--config.train.max_time_s=60", "--config.data.num_videos=10", "--config.train.ode_guidance=2",
                        "--config.train.lr_decay=cosine", "--config.train.teacher_ema_decay=0.999"])
  assert (c.train.max_time_s, c.data.num_videos, c.train.ode_guidance) == (60.0, 10, 2.0)
  assert (c.train.lr_decay, c.train.teacher_ema_decay) == ("cosine", 0.999)
  c = get_config(TINY, ["--config.train.continue_head=false", "--config.train.tensorboard=FALSE"])
  assert c.train.continue_head is False and c.train.tensorboard is False
  with pytest.raises(ConfigError, match="continue_head"):
    get_config(TINY, ["--config.train.continue_head=nah"])
  assert get_config(TINY, ["--config.sampling.per_device_loops=False"]).sampling.per_device_loops is False
  with pytest.raises(ConfigError, match="per_device_loops"):
    get_config(TINY, ["--config.sampling.per_device_loops=sometimes"])
  with pytest.raises(ConfigError, match="split_height"):
    get_config(TINY, ["--config.vae.split_height=rows"])
  # runlocal shrinks the recipe first; the other command-line overrides then apply to the toy size.
  digits = os.path.join(os.path.dirname(TINY), "digits.py")
  c = get_config(digits, ["--config.train.ode_steps=4", "--config.runlocal=True", "--config.train.batch_size=2"])
  assert (c.model.num_layers, c.train.ode_steps, c.train.batch_size) == (2, 4, 2)
  with pytest.raises(ConfigError, match="no field 'train.stepz'"):
    get_config(TINY, ["--config.train.stepz=3"])
  with pytest.raises(ConfigError, match="train.steps"):
    get_config(TINY, ["--config.train.steps=ten"])
  with pytest.raises(FileNotFoundError, match="nope.py"):
    get_config("nope.py")


def _info(path):
  buf = io.StringIO()
  with redirect_stdout(buf):
    assert cli.main(["info", "--config", path]) == 0
  return json.loads(buf.getvalue())


def test_info_command():
  tiny = _info(TINY)
  assert tiny["tokens"]["per_frame"] == 24 and tiny["tokens"]["per_chunk"] == 48
  assert tiny["params"]["generator"] > 1e6
  wan = _info(WAN)
  assert 1.2e9 <= wan["params"]["generator"] <= 1.45e9
  assert wan["params"]["head_share_of_generator"] < 0.01
  assert wan["tokens"] == {"per_frame": 1560, "per_chunk": 4680, "per_video": 32760}
  assert wan["video"]["pixel_frames"] == 81
  # ~6 GFLOP per token per forward at 1.3B: 2 per parameter for the matmuls, plus attention over the video.
  per_token = wan["flops_per_forward"]["generator"]["mean_chunk"] / 4680
  assert 5e9 < per_token < 7e9


def test_cli_reports_bad_config_in_one_line(capsys):
  assert cli.main(["info", "--config", TINY, "--config.model.num_heads=5"]) == 2
  err = capsys.readouterr().err
  assert "model.num_heads" in err and "Traceback" not in err


def test_ladder_warping_matches_self_forcing():
  t = flow.warp_ladder([1000, 750, 500, 250, 125], 5.0) * 1000
  np.testing.assert_allclose(t, [1000.0, 937.5, 833.333, 625.0, 416.667], atol=1e-2)
  # Self Forcing's grid lookup: sigma = linspace(1, 0, 1001)[:-1], shifted, indexed at 1000 - t.
  grid = np.linspace(1, 0, 1001)[:-1]
  grid = 5 * grid / (1 + 4 * grid)
  np.testing.assert_allclose(t / 1000, grid[1000 - np.array([1000, 750, 500, 250, 125])], atol=1e-6)


def test_noise_velocity_round_trip():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k1, (2, 3, 4, 4, 2))
  eps = jax.random.normal(k2, x0.shape)
  sigma = jnp.array([[0.1, 0.5, 0.9], [1.0, 0.3, 0.0]])
  xt = flow.add_noise(x0, eps, sigma)
  v = flow.velocity_target(x0, eps)
  np.testing.assert_allclose(flow.x0_from_velocity(xt, v, sigma), x0, atol=1e-5)
  np.testing.assert_allclose(xt[1, 0], eps[1, 0], atol=1e-6)  # sigma = 1 is pure noise
  np.testing.assert_allclose(xt[1, 2], x0[1, 2], atol=1e-6)   # sigma = 0 is clean
  mask = sigma > 0
  v2 = flow.velocity_from_x0(xt, x0, sigma)
  np.testing.assert_allclose(np.asarray(v2)[np.asarray(mask)], np.asarray(v)[np.asarray(mask)], atol=1e-4)
  assert float(jnp.max(flow.flow_matching_loss(v, x0, eps))) < 1e-10
  assert float(jnp.min(flow.flow_matching_loss(v + 1.0, x0, eps))) > 0.9


def test_train_sigma_sampler():
  s = flow.sample_train_sigma(jax.random.PRNGKey(0), (4096,), 5.0, t_min=20, t_max=980)
  assert float(s.min()) >= 0.02 - 1e-6 and float(s.max()) <= 0.98 + 1e-6
  assert float(jnp.mean(s)) > 0.6  # shift 5 favours high noise
  with pytest.raises(ValueError, match="train_t_sampler"):
    flow.sample_train_sigma(jax.random.PRNGKey(0), (4,), 5.0, sampler="bad")


def test_training_ladder_defaults_to_the_sampling_ladder():
  """train.ladder: training rollouts on their own ladder (exits drawn over all of its steps), sampling on another;
  empty = the sampling ladder (exits among its first sampling.max_steps); a bad one is an error naming the field."""
  from dsa_jax.training import rollout
  digits = get_config("digits")
  spec = rollout.RolloutSpec.from_config(digits)
  assert digits.sampling.ladder == (1000, 500, 250) and digits.sampling.max_steps == 3
  assert len(spec.sigmas) == spec.num_steps == 5  # the 5-step training ladder, every step a possible exit
  tiny = get_config("tiny", ["--config.sampling.max_steps=3"])
  spec = rollout.RolloutSpec.from_config(tiny)
  assert len(spec.sigmas) == len(tiny.sampling.ladder) and spec.num_steps == 3
  with pytest.raises(ConfigError, match="train.ladder"):
    get_config("tiny", ["--config.train.ladder=(250,500)"])


def test_min_exit_steps_bounds_the_drawn_exit():
  """train.min_exit_steps: exits below a sampler's step floor are never drawn; out of range is an error naming it."""
  from dsa_jax.training import rollout
  cfg = get_config("tiny", ["--config.sampling.max_steps=3", "--config.train.min_exit_steps=2"])
  spec = rollout.RolloutSpec.from_config(cfg)
  exits = {int(rollout.sample_exit_index(jax.random.PRNGKey(i), spec)) for i in range(200)}
  assert exits == {1, 2}
  spec = rollout.RolloutSpec.from_config(get_config("tiny", ["--config.sampling.max_steps=3"]))
  assert {int(rollout.sample_exit_index(jax.random.PRNGKey(i), spec)) for i in range(200)} == {0, 1, 2}
  with pytest.raises(ConfigError, match="train.min_exit_steps"):
    get_config("tiny", ["--config.sampling.max_steps=3", "--config.train.min_exit_steps=4"])
