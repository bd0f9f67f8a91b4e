"""Sampler speed levers on the tiny config (fp32, random weights): they change nothing in what is sampled."""

import numpy as np
import pytest

import jax

from dsa_jax.sampling import sampler as S
from dsa_jax.sampling import stream as ST


@pytest.fixture(scope="module")
def plain(tiny_config):
  """The same sampler computing the text keys/values at every forward."""
  sm = S.make_sampler(tiny_config)
  sm.precompute_text = False
  return sm


@pytest.fixture(scope="module")
def last_head(tiny_config):
  """Runs the confidence head at tau = +-inf only where a frame finishes."""
  cfg = tiny_config.copy_and_resolve_references()
  cfg.sampling.fixed_step_head = "last"
  return S.make_sampler(cfg)


def _np(out):
  return jax.tree_util.tree_map(np.asarray, out)


def _same(a, b):
  for name in ("latents", "steps", "confidences", "conf_trace", "chunk_iters"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_text_kv_once_per_video_is_exact(sampler, plain, params, context):
  controls = sampler.make_controls(2, threshold=0.5, seed=3)
  _same(_np(sampler.sample(params, context, controls)), _np(plain.sample(params, context, controls)))
  # A prompt schedule (every prompt's keys/values once, picked per chunk), with classifier-free guidance.
  rs = np.random.RandomState(1)
  prompts = rs.standard_normal((2, 3, 8, 32)).astype(np.float32)
  uncond = rs.standard_normal((1, 8, 32)).astype(np.float32)
  index = np.array([[2, 0, 1], [1, 1, 0]], np.int32)
  ctl = sampler.make_controls(2, threshold=0.5, guidance=2.0, seed=4)
  got = _np(sampler.sample(params, prompts, ctl, uncond_context=uncond, prompt_index=index))
  want = _np(plain.sample(params, prompts, ctl, uncond_context=uncond, prompt_index=index))
  _same(got, want)


def test_streaming_text_kv_per_chunk_is_exact(sampler, plain, params, context):
  controls = sampler.make_controls(2, threshold=0.5, seed=5)
  got = ST.collect(ST.stream(sampler, params, context, controls))
  want = _np(plain.sample(params, context, controls))
  np.testing.assert_array_equal(got["latents"], want.latents)
  np.testing.assert_array_equal(got["steps"], want.steps)


def _text_dots(sm, params, context):
  """dot_generals on the raw text context (B, text_len, text_dim) in the whole-video program's StableHLO."""
  args, use_cfg = sm.prepare(params, context, sm.make_controls(2))
  b, n, d = context.shape
  operand = f"tensor<{b}x{n}x{d}xf32>, tensor<{d}x"
  return [line for line in sm.lower(args, use_cfg).as_text().splitlines() if "dot_general" in line and operand in line]


def test_text_projection_is_traced_once_outside_the_loops(sampler, plain, params, context):
  assert len(_text_dots(sampler, params, context)) == 1
  assert len(_text_dots(plain, params, context)) >= 2  # the denoising forward and the cache fill


@pytest.mark.parametrize("tau, never, kw", [(np.inf, 2.0, dict(max_steps=3)), (-np.inf, -1.0, dict(min_steps=2)),
                                            (np.inf, 2.0, dict(max_steps=np.array([[1, 2, 3, 1, 2, 3]])))])
def test_infinite_threshold_skips_the_head_with_the_same_frames(sampler, last_head, params, context, tau, never, kw):
  """With fixed_step_head='last', tau = +-inf gives the frames and steps of a finite tau that acts the same (2: never
  ready, -1: always) and of the default sampler, the confidence at each frame's last step, and nan where the head
  was skipped."""
  got = _np(last_head.sample(params, context, last_head.make_controls(2, threshold=tau, seed=6, **kw)))
  ref = _np(last_head.sample(params, context, last_head.make_controls(2, threshold=never, seed=6, **kw)))
  every = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=tau, seed=6, **kw)))
  _same(every, ref)
  for name in ("latents", "steps", "confidences", "chunk_iters"):
    np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
  ran = ~np.isnan(got.conf_trace)
  assert not ran.all() and ran.any()  # skipped at some steps, ran at others
  np.testing.assert_array_equal(got.conf_trace[ran], ref.conf_trace[ran])
  last = np.take_along_axis(ran, got.steps[..., None] - 1, axis=-1)
  assert last.all()


def test_threshold_between_finite_and_infinite_does_not_recompile(last_head, params, context):
  sm = last_head
  sm.sample(params, context, sm.make_controls(2, threshold=0.5))
  traces, entries = sm.trace_counts["program"], sm.program._cache_size()
  for tau in (np.inf, -np.inf, [0.3, np.inf], 0.7):
    jax.block_until_ready(sm.sample(params, context, sm.make_controls(2, threshold=tau)))
  assert sm.trace_counts["program"] == traces and sm.program._cache_size() == entries


def test_bad_fixed_step_head(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.sampling.fixed_step_head = "never"
  with pytest.raises(ValueError, match="sampling.fixed_step_head"):
    S.make_sampler(cfg)


def _program_memory(tiny_config, num_frames):
  sm = S.make_sampler(tiny_config, num_frames=num_frames)
  ctx = np.zeros((2, sm.dcfg.text_len, sm.dcfg.text_dim), np.float32)
  args, use_cfg = sm.prepare(sm.init_params(jax.random.PRNGKey(0)), ctx, sm.make_controls(2))
  cache = sum(x.nbytes for x in jax.tree_util.tree_leaves(args[5]))
  return cache, sm.lower(args, use_cfg).compile().memory_analysis()


def test_kv_cache_is_exact_donated_and_never_copied(tiny_config, sampler):
  """The cache holds exactly the video's keys/values, is donated (aliased to the output cache), and the compiled
  program's scratch memory grows by less than one cache when the cache grows (no second copy of it)."""
  d = sampler.dcfg
  want = (d.num_layers, 4, sampler.num_frames * sampler.tokens_per_frame, d.num_heads, d.head_dim)
  assert all(a.shape == want and a.dtype == d.dtype for a in sampler.new_cache(2, use_cfg=True).values())
  small, m_small = _program_memory(tiny_config, 6)
  big, m_big = _program_memory(tiny_config, 12)
  assert m_small.alias_size_in_bytes == small and m_big.alias_size_in_bytes == big
  # Measured on the CPU: 0.75 cache (the attention's per-layer key/value reads); 3 caches with the cache as the
  # layer scan's input and output.
  assert m_big.temp_size_in_bytes - m_small.temp_size_in_bytes < big - small


@pytest.fixture(scope="module")
def unrolled(tiny_config):
  """The DiT's layers unrolled over one KV-cache buffer per layer."""
  cfg = tiny_config.copy_and_resolve_references()
  cfg.sampling.unroll_layers = True
  return S.make_sampler(cfg)


def test_unrolled_layers_sample_the_same_video(sampler, unrolled, params, context):
  """Scanned variables go in as they are; program, stream and mixed stopping equal the scanned sampler's, and the
  cache is one (B, frames * tokens, heads, head_dim) buffer per layer, donated."""
  d = unrolled.dcfg
  cache = unrolled.new_cache(2)
  assert not d.scan_layers and sorted(cache) == ["k", "v"] and len(cache["k"]) == d.num_layers
  assert all(a.shape == (2, unrolled.num_frames * unrolled.tokens_per_frame, d.num_heads, d.head_dim)
             for a in cache["k"] + cache["v"])
  probe = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, seed=3)))
  tau = float(np.median(probe.conf_trace[:, :, 0]))
  for controls in (sampler.make_controls(2, threshold=np.inf, max_steps=3, seed=3),
                   sampler.make_controls(2, threshold=tau, seed=3)):
    want = _np(sampler.sample(params, context, controls))
    got = _np(unrolled.sample(params, context, controls))
    for name in ("steps", "chunk_iters"):
      np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for name in ("latents", "confidences", "conf_trace"):
      np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5, err_msg=name)
  streamed = np.concatenate([np.asarray(o.latents) for o in ST.stream(unrolled, params, context, controls)], 1)
  np.testing.assert_allclose(streamed, want.latents, atol=1e-5, rtol=1e-5)
  args, use_cfg = unrolled.prepare(params, context, controls)
  mem = unrolled.lower(args, use_cfg).compile().memory_analysis()
  assert mem.alias_size_in_bytes == sum(x.nbytes for x in jax.tree_util.tree_leaves(args[5]))

