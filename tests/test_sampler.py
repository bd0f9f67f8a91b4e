"""The DSA sampler on the tiny config with random weights: fixed-step modes, KV cache vs full recompute, stopping
rule, per-sample stopping, no recompilation, streaming, CFG."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dsa_jax.checkpoint import loading
from dsa_jax.sampling import decode
from dsa_jax.sampling import reference as R
from dsa_jax.sampling import sampler as S
from dsa_jax.sampling import stream as ST

TOL = 2e-5


def _np(out):
  return jax.tree_util.tree_map(np.asarray, out)


def test_fixed_step_modes_equal_self_forcing(sampler, params, context):
  m = 3
  fixed = R.sample_fixed(sampler, params, context, m, seed=7)
  hi = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, max_steps=m, seed=7)))
  lo = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=-np.inf, min_steps=m, seed=7)))
  assert (hi.steps == m).all() and (lo.steps == m).all()
  assert (hi.chunk_iters == m).all()
  np.testing.assert_allclose(hi.latents, fixed, atol=TOL)
  np.testing.assert_allclose(lo.latents, fixed, atol=TOL)
  # The full ladder at tau = +inf is the longest fixed sampler; and another seed gives another video.
  full = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, seed=7)))
  np.testing.assert_allclose(full.latents, R.sample_fixed(sampler, params, context, sampler.num_steps, seed=7),
                             atol=TOL)
  other = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, max_steps=m, seed=8)))
  assert np.abs(other.latents - fixed).max() > 1e-2


def _mixed_threshold(sampler, params, context, seed):
  """A tau at the median of the first-step confidences, so frames of one chunk stop at different steps."""
  probe = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, seed=seed)))
  return float(np.median(probe.conf_trace[:, :, 0]))


def test_kv_cache_sampler_equals_full_recompute(sampler, params, context):
  tau = _mixed_threshold(sampler, params, context, seed=1)
  controls = sampler.make_controls(2, threshold=tau, min_steps=1, max_steps=4, seed=1)
  out = _np(sampler.sample(params, context, controls))
  ref = R.sample_reference(sampler, params, context, controls)
  steps = out.steps.reshape(2, sampler.num_chunks, sampler.chunk_frames)
  # The planted threshold makes frames of a chunk stop at different steps (finished frames feed their neighbours).
  assert (steps.max(-1) != steps.min(-1)).any(), out.steps
  np.testing.assert_array_equal(out.steps, ref.steps)
  np.testing.assert_array_equal(out.chunk_iters, ref.chunk_iters)
  np.testing.assert_allclose(out.latents, ref.latents, atol=TOL)
  np.testing.assert_allclose(out.confidences, ref.confidences, atol=1e-5)
  np.testing.assert_allclose(out.conf_trace, ref.conf_trace, atol=1e-5)


def test_steps_follow_the_rule_and_respect_min_max(sampler, params, context):
  rs = np.random.RandomState(3)
  f, n = sampler.num_frames, sampler.num_steps
  mn = rs.randint(1, 4, size=(2, f))
  mx = np.minimum(mn + rs.randint(0, 3, size=(2, f)), n)
  tau = _mixed_threshold(sampler, params, context, seed=2)
  out = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=tau, min_steps=mn, max_steps=mx,
                                                                  seed=2)))
  assert (out.steps >= mn).all() and (out.steps <= mx).all()
  assert len(np.unique(out.steps)) > 1
  for b in range(2):
    for i in range(f):
      trace = out.conf_trace[b, i]
      # The first step k >= min at which the confidence reached tau, else max.
      hits = [k + 1 for k in range(mn[b, i] - 1, mx[b, i]) if trace[k] >= tau]
      assert out.steps[b, i] == (hits[0] if hits else mx[b, i])
      assert np.isfinite(trace[:out.steps[b, i]]).all() and np.isnan(trace[out.steps[b, i]:]).all()
      assert out.confidences[b, i] == trace[out.steps[b, i] - 1]
    per_chunk = out.steps[b].reshape(sampler.num_chunks, -1).max(-1)
    assert (out.chunk_iters >= per_chunk).all()


def test_hard_and_easy_samples_stop_independently(sampler, params, context):
  """Per-sample thresholds: sample 0 is 'easy' (tau = -inf), sample 1 'hard' (tau = +inf); each stops on its own
  and its video equals the one it gets in a batch of its own kind (finished samples are frozen)."""
  mixed = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=[-np.inf, np.inf], seed=[4, 5])))
  easy = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=-np.inf, seed=[4, 5])))
  hard = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, seed=[4, 5])))
  assert (mixed.steps[0] == 1).all() and (mixed.steps[1] == sampler.num_steps).all()
  assert (mixed.chunk_iters == sampler.num_steps).all()
  np.testing.assert_allclose(mixed.latents[0], easy.latents[0], atol=TOL)
  np.testing.assert_allclose(mixed.latents[1], hard.latents[1], atol=TOL)
  assert np.abs(easy.latents[0] - hard.latents[0]).max() > 1e-2


def test_controls_do_not_recompile(sampler, params, context):
  sampler.sample(params, context, sampler.make_controls(2))
  before = sampler.trace_counts["program"]
  entries = sampler.program._cache_size()
  assert before >= 1 and entries >= 1
  outs = []
  for tau, seed, mn, mx, g in [(0.3, 0, 1, 5, 1.0), (0.9, 11, 2, 3, 2.0), (np.inf, 5, 1, 2, 1.0),
                               (-np.inf, 123456, 4, 4, 1.0), ([0.1, 0.7], [1, 2], 1, 5, 1.0)]:
    outs.append(_np(sampler.sample(params, context, sampler.make_controls(2, threshold=tau, seed=seed,
                                                                          min_steps=mn, max_steps=mx, guidance=g))))
  assert sampler.trace_counts["program"] == before
  assert sampler.program._cache_size() == entries
  assert (outs[3].steps == 4).all() and (outs[2].steps == 2).all()


def test_streaming_equals_one_program(sampler, params, context):
  controls = sampler.make_controls(2, threshold=0.55, seed=9)
  out = _np(sampler.sample(params, context, controls))
  dec = decode.PixelDecoder(sampler.config)
  chunks = list(ST.stream(sampler, params, context, controls, decoder=dec))
  assert [ch.index for ch in chunks] == list(range(sampler.num_chunks))
  assert chunks[0].pixels.shape == (2, sampler.chunk_frames, 64, 96, 3)
  col = ST.collect(chunks)
  np.testing.assert_allclose(col["latents"], out.latents, atol=1e-6)
  np.testing.assert_array_equal(col["steps"], out.steps)
  np.testing.assert_array_equal(col["chunk_iters"], out.chunk_iters)
  # A second stream with another threshold reuses the compiled per-chunk function.
  n = sampler.trace_counts["chunk_step"]
  list(ST.stream(sampler, params, context, sampler.make_controls(2, threshold=0.9, seed=1)))
  assert sampler.trace_counts["chunk_step"] == n == 1
  assert sampler.trace_counts["fill_step"] == 1


def test_the_last_chunk_fills_no_cache(sampler, params, context):
  """The whole-video program skips the last chunk's cache fill (nothing attends to it): its returned cache holds
  every earlier chunk's clean keys/values, exactly as per-chunk loops followed by their fills would, but not the
  last one's."""
  controls = sampler.make_controls(2, threshold=0.55, seed=4)
  args, use_cfg = sampler.prepare(params, context, controls)
  _, cache = sampler.program(*args, use_cfg=use_cfg)
  args, _ = sampler.prepare(params, context, controls)
  p, ctx, uc, ctl, rng, full, cond = args
  for i in range(sampler.num_chunks):  # every chunk's loop, then its fill (the last one's too), as two programs
    out, full = sampler.chunk_step(p, ctx, uc, ctl, rng, full, np.int32(i), cond, fill=False)
    full = sampler.fill_step(p, ctx, uc, ctl, rng, full, np.int32(i), out.latents, cond)
  k, k_full = np.asarray(cache["k"]), np.asarray(full["k"])  # (layers, B, frames * tokens, heads, head_dim)
  start = (sampler.num_chunks - 1) * sampler.chunk_frames * sampler.tokens_per_frame
  np.testing.assert_allclose(k[:, :, :start], k_full[:, :, :start], atol=1e-5)
  assert np.abs(k[:, :, start:] - k_full[:, :, start:]).max() > 1e-3


def test_classifier_free_guidance(sampler, params, context):
  uncond = np.random.RandomState(5).standard_normal((1, 8, 32)).astype(np.float32)
  plain = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, max_steps=2, seed=3)))
  g1 = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, max_steps=2, seed=3,
                                                                 guidance=0.0), uncond_context=uncond))
  np.testing.assert_allclose(g1.latents, plain.latents, atol=1e-4)  # v_c + 0 (v_c - v_u) = v_c
  controls = sampler.make_controls(2, threshold=np.inf, max_steps=2, seed=3, guidance=[3.0, 5.0])
  g3 = _np(sampler.sample(params, context, controls, uncond_context=uncond))
  assert np.abs(g3.latents - plain.latents).max() > 1e-2
  ref = R.sample_reference(sampler, params, context, controls, uncond_context=uncond)
  np.testing.assert_allclose(g3.latents, ref.latents, atol=1e-4)
  assert sampler.trace_counts["program"] >= 2  # the CFG program is a separate compilation


def test_bad_inputs(sampler, params, context):
  with pytest.raises(ValueError, match="min_steps"):
    sampler.make_controls(2, min_steps=0)
  with pytest.raises(ValueError, match="max_steps"):
    sampler.make_controls(2, max_steps=sampler.num_steps + 1)
  with pytest.raises(ValueError, match="exceed"):
    sampler.make_controls(2, min_steps=4, max_steps=2)
  with pytest.raises(ValueError, match="threshold"):
    sampler.make_controls(2, threshold=float("nan"))
  with pytest.raises(ValueError, match="context"):
    sampler.sample(params, context[:, :, :5], sampler.make_controls(2))
  with pytest.raises(ValueError, match="controls"):
    sampler.sample(params, context, sampler.make_controls(3))
  # controls edited by hand, wrong shapes and non-finite inputs are named, not left to XLA (or to an all-NaN video)
  ctl = sampler.make_controls(2)
  for bad, field in ((ctl.replace(threshold=jnp.full((2,), jnp.nan)), "controls.threshold.*nan"),
                     (ctl.replace(threshold=0.3), "controls.threshold"), (ctl.replace(seed=5), "controls.seed"),
                     (ctl.replace(max_steps=jnp.array([2, 2])), "controls.max_steps")):
    with pytest.raises(ValueError, match=field):
      sampler.sample(params, context, bad)
  with pytest.raises(ValueError, match="context: contains NaN"):
    sampler.sample(params, context * jnp.nan, ctl)
  with pytest.raises(ValueError, match="uncond_context: expected a batch of 1 or 2"):
    sampler.sample(params, context, ctl, uncond_context=jnp.zeros((3,) + context.shape[1:]))
  for kwargs, field in (({"threshold": np.zeros((2, sampler.num_frames))}, "threshold"), ({"seed": [1, 2, 3]}, "seed"),
                        ({"guidance": np.ones((2, 4))}, "guidance")):
    with pytest.raises(ValueError, match=f"sampling {field}: expected a scalar or one value per sample"):
      sampler.make_controls(2, **kwargs)
  with pytest.raises(ValueError, match="batch"):
    sampler.make_controls(0)
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    loading.load_sampler_params(sampler.config, "/tmp/does-not-exist-ckpt", warn=lambda m: None)


def test_load_params_from_checkpoint(tmp_path, sampler, params, context):
  from dsa_jax.checkpoint import params_io
  path = str(tmp_path / "ckpt")
  gen_ema = jax.tree_util.tree_map(lambda x: x * 0.5, params["generator"])
  params_io.save_params(path, {"generator": params["generator"], "generator_ema": gen_ema, "head": params["head"]},
                        {"arch": {"generator": sampler.dcfg.to_dict(), "generator_ema": sampler.dcfg.to_dict()}})
  loaded, source = loading.load_sampler_params(sampler.config, path, warn=lambda m: None)
  assert source["generator"] == "generator_ema"
  a = jax.tree_util.tree_leaves(loaded["generator"])
  b = jax.tree_util.tree_leaves(gen_ema)
  assert all(np.allclose(x, y) for x, y in zip(a, b))
  loaded, source = loading.load_sampler_params(sampler.config, path, use_ema=False, warn=lambda m: None)
  assert source["generator"] == "generator"


def test_first_chunk_floor(tiny_config, sampler, params, context):
  """sampling.first_chunk_min_steps: the first chunk's frames take at least that many steps (never above their
  ceiling); later chunks keep min_steps; a fixed count or a forced allocation is left as it is. The same video as
  the plain sampler given those floors frame by frame."""
  config = tiny_config.copy_and_resolve_references()
  with config.unlocked():
    config.sampling.first_chunk_min_steps = 3
  sm = S.make_sampler(config)
  c, f = sm.chunk_frames, sm.num_frames
  ctl = sm.make_controls(2, threshold=-np.inf, min_steps=1, max_steps=4, seed=3)
  want = np.ones((2, f), np.int32)
  want[:, :c] = 3
  np.testing.assert_array_equal(np.asarray(ctl.min_steps), want)
  np.testing.assert_array_equal(np.asarray(sm.make_controls(2, min_steps=1, max_steps=2).min_steps)[:, :c], 2)
  forced = np.tile(np.arange(f) % 2 + 1, (2, 1))
  np.testing.assert_array_equal(np.asarray(sm.make_controls(2, min_steps=forced, max_steps=forced).min_steps), forced)
  out = _np(sm.sample(params, context, ctl))
  np.testing.assert_array_equal(out.steps, want)
  plain = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=-np.inf, min_steps=want, max_steps=4,
                                                                    seed=3)))
  np.testing.assert_allclose(out.latents, plain.latents, atol=TOL)
  for bad in (-1, sm.num_steps + 1, True):
    config.sampling.first_chunk_min_steps = bad
    with pytest.raises(ValueError, match="sampling.first_chunk_min_steps"):
      from dsa_jax.config_lib import validate_config
      validate_config(config)


def test_noisy_frozen_frames_mode(tiny_config, params, context):
  """sampling.frozen_frames='noisy': finished frames keep feeding their last noisy input; cache == recompute."""
  config = tiny_config.copy_and_resolve_references()
  with config.unlocked():
    config.sampling.frozen_frames = "noisy"
  sm = S.make_sampler(config)
  tau = _mixed_threshold(sm, params, context, seed=1)
  controls = sm.make_controls(2, threshold=tau, max_steps=4, seed=1)
  out = _np(sm.sample(params, context, controls))
  ref = R.sample_reference(sm, params, context, controls)
  steps = out.steps.reshape(2, sm.num_chunks, sm.chunk_frames)
  assert (steps.max(-1) != steps.min(-1)).any(), out.steps
  np.testing.assert_array_equal(out.steps, ref.steps)
  np.testing.assert_allclose(out.latents, ref.latents, atol=TOL)
  config.sampling.frozen_frames = "bogus"
  with pytest.raises(ValueError, match="frozen_frames"):
    S.make_sampler(config)


def test_load_params_from_training_workdir(tmp_path, sampler, params):
  """A folder without dsa_meta.json goes to the training loader (here: a workdir holding only an exported model/)."""
  pytest.importorskip("dsa_jax.training.checkpointing")
  from dsa_jax.checkpoint import params_io
  run = tmp_path / "run"
  params_io.save_params(str(run / "model"), {"generator": params["generator"], "head": params["head"]},
                        {"arch": {"generator": sampler.dcfg.to_dict()}})
  notes = []
  loaded, source = loading.load_sampler_params(sampler.config, str(run), warn=notes.append)
  assert source["source"] == "workdir" and source["generator"] == "generator"
  assert any("generator_ema" in n for n in notes)  # fell back from the EMA, and said so
  a = jax.tree_util.tree_leaves(loaded["head"])
  b = jax.tree_util.tree_leaves(params["head"])
  assert all(np.allclose(x, y) for x, y in zip(a, b))
  with pytest.raises(ValueError, match="neither a model checkpoint"):
    loading.load_sampler_params(sampler.config, str(tmp_path), warn=notes.append)
