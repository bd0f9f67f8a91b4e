"""The training optimisers: AdamW without a stored first moment at beta1 = 0, and resuming older optimiser states."""

import os

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from dsa_jax.config_lib import get_config
from dsa_jax.training import checkpointing
from dsa_jax.training import state as state_lib

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (6, 5)), "b": jnp.zeros((5,)), "s": jax.random.normal(k2, (3,))}


def _grads(i):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(10 + i), 3)
  return {"w": jax.random.normal(k1, (6, 5)) * (1.0 + i), "b": jax.random.normal(k2, (5,)) * 1e-3,
          "s": jax.random.normal(k3, (3,))}


def _run(tx, steps=6):
  p, opt = _params(), None
  opt = tx.init(p)
  for i in range(steps):
    u, opt = tx.update(_grads(i), opt, p)
    p = optax.apply_updates(p, u)
  return p, opt


def _param_like_leaves(opt):
  return sum(1 for x in jax.tree_util.tree_leaves(opt) if getattr(x, "shape", ()) == (6, 5))


def test_zero_beta1_stores_one_moment_and_matches_adamw():
  cfg = get_config(TINY, ["--config.train.b1=0.0", "--config.train.lr=3e-3", "--config.train.warmup_steps=2",
                          "--config.train.lr_decay=cosine", "--config.train.steps=6", "--config.train.grad_clip=4.0"])
  assert state_lib.drops_first_moment(cfg)
  ours, ours_opt = _run(state_lib.make_optimizer(cfg, "generator"))
  ref_tx = optax.chain(optax.clip_by_global_norm(4.0),
                       optax.adamw(state_lib.learning_rate(cfg, 3e-3), b1=0.0, b2=cfg.train.b2,
                                   weight_decay=cfg.train.weight_decay))
  ref, ref_opt = _run(ref_tx)
  assert _param_like_leaves(ours_opt) == 1 and _param_like_leaves(ref_opt) == 2  # nu only vs mu + nu
  for k in ref:
    np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(ref[k]), rtol=1e-6, atol=1e-7)
  moved = float(jnp.max(jnp.abs(ours["w"] - _params()["w"])))
  assert moved > 1e-3  # the comparison is not between two no-ops


def test_keep_and_nonzero_beta1_store_the_first_moment():
  keep = get_config(TINY, ["--config.train.b1=0.0", "--config.train.adam_first_moment=keep"])
  assert not state_lib.drops_first_moment(keep)
  assert _param_like_leaves(_run(state_lib.make_optimizer(keep, "critic"), 1)[1]) == 2
  momentum = get_config(TINY, ["--config.train.b1=0.9"])
  assert not state_lib.drops_first_moment(momentum)
  assert _param_like_leaves(_run(state_lib.make_optimizer(momentum, "generator"), 1)[1]) == 2


def test_bad_first_moment_mode_names_the_field():
  cfg = get_config(TINY, ["--config.train.adam_first_moment=never"])
  with pytest.raises(ValueError, match="train.adam_first_moment"):
    state_lib.make_optimizer(cfg, "generator")


def test_resuming_older_optimizer_states_keeps_the_first_moment():
  cfg = get_config(TINY, ["--config.train.b1=0.0"])
  said = []
  old = checkpointing.resume_compatible(cfg, {"stage": "dsa", "step": 10}, said.append)
  assert old.train.adam_first_moment == "keep" and cfg.train.adam_first_moment == "auto"
  assert said and "adam_first_moment='keep'" in said[0]
  new_meta = {"stage": "dsa", "step": 10, "optimizer": {"adam_first_moment": "none"}}
  assert checkpointing.resume_compatible(cfg, new_meta, said.append).train.adam_first_moment == "auto"
  assert checkpointing.resume_compatible(cfg, None, said.append) is cfg
  assert len(said) == 1
  # a run asked to keep the moment resumes states saved without it as they were saved
  keep = get_config(TINY, ["--config.train.b1=0.0", "--config.train.adam_first_moment=keep"])
  assert checkpointing.resume_compatible(keep, new_meta, said.append).train.adam_first_moment == "auto"
  assert checkpointing.resume_compatible(keep, {"stage": "dsa", "step": 10}, said.append) is keep
  assert len(said) == 2 and "do not hold" in said[1]
