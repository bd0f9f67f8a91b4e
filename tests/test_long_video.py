"""Long videos on the tiny config (CPU, random weights): the ring-buffer window with attention sinks, continuation
from given frames and the per-chunk prompt schedule."""

import numpy as np
import pytest

import jax

from dsa_jax.models import rope as rope_lib
from dsa_jax.sampling import reference as R
from dsa_jax.sampling import sampler as S
from dsa_jax.sampling import stream as ST

TOL = 2e-5


def _cfg(tiny_config, window=0, sink=0):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.sampling.update(window_frames=window, sink_frames=sink)
  return cfg


@pytest.fixture(scope="module")
def base(sampler):
  """The tiny config's sampler with the whole-video cache (the reference for windows); params/context: conftest."""
  return sampler


@pytest.fixture(scope="module")
def long_sampler(tiny_config):
  """12 latent frames (2x the config) through a window of 4 frames after 2 sink frames: the ring wraps at chunk 3."""
  return S.make_sampler(_cfg(tiny_config, window=4, sink=2), num_frames=12)


def _np(out):
  return jax.tree_util.tree_map(np.asarray, out)


def _tau(sampler, params, context, seed):
  probe = _np(sampler.sample(params, context, sampler.make_controls(2, threshold=np.inf, max_steps=3, seed=seed)))
  return float(np.median(probe.conf_trace[:, :, 0]))


@pytest.mark.parametrize("window, sink", [(6, 0), (4, 2), (8, 2)])
def test_window_at_least_the_video_equals_todays_sampler(tiny_config, base, params, context, window, sink):
  sm = S.make_sampler(_cfg(tiny_config, window, sink))
  assert sm.cache_frames == base.num_frames
  tau = _tau(base, params, context, seed=4)
  ctl = base.make_controls(2, threshold=tau, min_steps=1, max_steps=3, seed=4)
  want = _np(base.sample(params, context, ctl))
  got = _np(sm.sample(params, context, ctl))
  assert (want.steps != want.steps.max()).any()  # stopping differs between frames: the DSA path is exercised
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_ten_times_longer_has_the_same_cache(tiny_config, params, context):
  cfg = _cfg(tiny_config, window=4, sink=2)
  one, ten = S.make_sampler(cfg), S.make_sampler(cfg, num_frames=60)
  assert ten.num_chunks == 10 * one.num_chunks
  shapes = []
  for sm in (one, ten):
    args, _ = sm.prepare(params, context, sm.make_controls(2))
    _, cache = jax.eval_shape(lambda *a: sm.program(*a), *args)
    shapes.append((args[5]["k"].shape, cache["k"].shape, cache["v"].shape))
  assert shapes[0] == shapes[1] and shapes[0][0][2] == 6 * one.tokens_per_frame
  # Without a window the cache holds the whole video.
  assert S.make_sampler(tiny_config, num_frames=60).new_cache(1)["k"].shape[2] == 60 * one.tokens_per_frame


def test_ring_buffer_equals_a_linear_cache_of_the_visible_chunks(long_sampler, base, params, context):
  m = 2
  out = _np(long_sampler.sample(params, context, long_sampler.make_controls(2, threshold=np.inf, max_steps=m, seed=5)))
  ref = R.sample_window_reference(long_sampler, params, context, m, seed=5)
  np.testing.assert_allclose(out.latents, ref, atol=TOL)
  assert np.isfinite(out.latents).all() and (out.steps == m).all()
  # Until the ring wraps the video is today's; later chunks see less than the whole past, so they differ from it.
  whole = R.sample_fixed(S.make_sampler(base.config, num_frames=12), params, context, m, seed=5)
  np.testing.assert_allclose(out.latents[:, :6], whole[:, :6], atol=TOL)
  assert np.abs(out.latents[:, 6:] - whole[:, 6:]).max() > 1e-3


def test_ring_buffer_with_unrolled_layers(tiny_config, long_sampler, params, context):
  """The per-layer cache buffers of the unrolled DiT through the same wrapping ring with sinks: the same video."""
  cfg = _cfg(tiny_config, window=4, sink=2)
  cfg.sampling.unroll_layers = True
  unrolled = S.make_sampler(cfg, num_frames=12)
  ctl = long_sampler.make_controls(2, threshold=np.inf, max_steps=2, seed=5)
  np.testing.assert_allclose(_np(unrolled.sample(params, context, ctl)).latents,
                             _np(long_sampler.sample(params, context, ctl)).latents, atol=TOL)


def test_sinks_are_rotated_not_rewritten():
  """Moving rotated keys by s frames equals rotating them at their position + s (RoPE rotations compose)."""
  tables = rope_lib.rope_tables(48, 64, 2, 3, 10000.0)
  x = np.random.RandomState(0).standard_normal((1, 12, 2, 48)).astype(np.float32)
  at = lambda p: rope_lib.rope_for_grid(tables, p, 2, 2, 3)
  moved = rope_lib.apply_rope(rope_lib.apply_rope(x, *at(3)), *rope_lib.temporal_shift(tables, 17, 12))
  np.testing.assert_allclose(moved, rope_lib.apply_rope(x, *at(20)), atol=1e-5)
  same = rope_lib.apply_rope(x, *rope_lib.temporal_shift(tables, 0, 12))
  np.testing.assert_array_equal(same, x)


@pytest.mark.parametrize("window", [0, 4])
def test_continuation_from_own_frames_equals_the_uninterrupted_video(tiny_config, params, context, window):
  sm = S.make_sampler(_cfg(tiny_config, window, 2 if window else 0), num_frames=10)
  tau = _tau(sm, params, context, seed=6)
  ctl = sm.make_controls(2, threshold=tau, min_steps=1, max_steps=3, seed=6)
  full = _np(sm.sample(params, context, ctl))
  cont = _np(sm.sample(params, context, ctl, init_latents=full.latents[:, :4]))
  np.testing.assert_array_equal(cont.latents[:, :4], full.latents[:, :4])
  assert (cont.steps[:, :4] == 0).all() and (cont.chunk_iters[:2] == 0).all() and (cont.confidences[:, :4] == 1).all()
  np.testing.assert_allclose(cont.latents[:, 4:], full.latents[:, 4:], atol=TOL)
  np.testing.assert_array_equal(cont.steps[:, 4:], full.steps[:, 4:])
  # A partial chunk: frame 2 is given, frame 3 (its chunk neighbour) is sampled next to it; no recompilation.
  entries = sm.program._cache_size()
  part = _np(sm.sample(params, context, ctl, init_latents=full.latents[0, :3]))
  assert sm.program._cache_size() == entries
  given = np.broadcast_to(full.latents[:1, :3], (2, 3) + full.latents.shape[2:])
  np.testing.assert_array_equal(part.latents[:, :3], given)
  assert (part.steps[:, :3] == 0).all() and (part.steps[:, 3:] > 0).all() and np.isfinite(part.latents).all()
  # Streaming gives the same continuation.
  col = ST.collect(ST.stream(sm, params, context, ctl, init_latents=full.latents[:, :4]))
  np.testing.assert_allclose(col["latents"], cont.latents, atol=TOL)


def test_prompt_switch_keeps_earlier_chunks_and_never_recompiles(base, params, context):
  other = np.random.RandomState(1).standard_normal(context.shape).astype(np.float32)
  both = np.stack([context, other], axis=1)  # (B, 2 prompts, L, D)
  ctl = base.make_controls(2, threshold=np.inf, max_steps=2, seed=2)
  plain = _np(base.sample(params, context, ctl))
  same = _np(base.sample(params, both, ctl, prompt_index=[0, 0, 0]))
  entries = base.program._cache_size()
  switched = _np(base.sample(params, both, ctl, prompt_index=[0, 0, 1]))
  early = _np(base.sample(params, both, ctl, prompt_index=[0, 1, 1]))
  assert base.program._cache_size() == entries
  np.testing.assert_allclose(same.latents, plain.latents, atol=TOL)
  np.testing.assert_array_equal(switched.latents[:, :4], same.latents[:, :4])
  assert np.abs(switched.latents[:, 4:] - same.latents[:, 4:]).max() > 1e-3
  np.testing.assert_array_equal(early.latents[:, :2], same.latents[:, :2])
  assert np.abs(early.latents[:, 2:4] - same.latents[:, 2:4]).max() > 1e-3
  col = ST.collect(ST.stream(base, params, both, ctl, prompt_index=[0, 0, 1]))
  np.testing.assert_allclose(col["latents"], switched.latents, atol=TOL)


def test_bad_long_video_inputs(tiny_config, base, params, context):
  with pytest.raises(ValueError, match="window_frames: expected a multiple"):
    S.make_sampler(_cfg(tiny_config, window=3))
  with pytest.raises(ValueError, match="sinks need a window"):
    S.make_sampler(_cfg(tiny_config, sink=2))
  with pytest.raises(ValueError, match="num_frames: expected a positive multiple"):
    S.make_sampler(tiny_config, num_frames=7)
  ctl = base.make_controls(2)
  lat = np.zeros((2, 0) + base.chunk_shape[1:], np.float32)
  with pytest.raises(ValueError, match="zero frames"):
    base.sample(params, context, ctl, init_latents=lat)
  sm = S.make_sampler(_cfg(tiny_config, window=2, sink=2), num_frames=12)
  with pytest.raises(ValueError, match="exceed the attention window of 4"):
    sm.sample(params, context, sm.make_controls(2), init_latents=np.zeros((5,) + base.chunk_shape[1:], np.float32))
  with pytest.raises(ValueError, match="leave nothing to sample"):
    base.sample(params, context, ctl, init_latents=np.zeros((6,) + base.chunk_shape[1:], np.float32))
  with pytest.raises(ValueError, match="init_latents: expected"):
    base.sample(params, context, ctl, init_latents=np.zeros((2, 4, 4), np.float32))
  with pytest.raises(ValueError, match=r"prompt_index: values must lie in \[0, 1\)"):
    base.sample(params, context[:, None], ctl, prompt_index=[0, 1, 0])
  with pytest.raises(ValueError, match="prompt_index: expected integers of shape"):
    base.sample(params, context[:, None], ctl, prompt_index=[0, 0])
  with pytest.raises(ValueError, match="with a prompt schedule expected"):
    base.sample(params, context, ctl, prompt_index=[0, 0, 0])


def test_given_frames_in_noisy_frozen_mode(tiny_config, params, context):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.sampling.frozen_frames = "noisy"
  sm = S.make_sampler(cfg)
  ctl = sm.make_controls(2, threshold=np.inf, max_steps=2, seed=1)
  full = _np(sm.sample(params, context, ctl))
  part = _np(sm.sample(params, context, ctl, init_latents=full.latents[:, :3]))
  np.testing.assert_array_equal(part.latents[:, :3], full.latents[:, :3])
  assert (part.steps[:, :3] == 0).all() and (part.steps[:, 3:] == 2).all() and np.isfinite(part.latents).all()
  whole = _np(sm.sample(params, context, ctl, init_latents=full.latents[:, :2]))
  np.testing.assert_allclose(whole.latents, full.latents, atol=TOL)


def test_speed_bench_with_no_length_that_runs_exits_nonzero_and_keeps_its_json(tmp_path, monkeypatch):
  """Every length failing (here: the one run raises) gives exit status 1, the JSON of the errors and no plot, instead
  of a KeyError from the plot's title."""
  import json
  import subprocess
  from dsa_jax.eval import long_video
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ValueError: 5 frames"))
  out = tmp_path / "speed.json"
  assert long_video.main(["speed", "--config", "tiny", "--frames", "5", "--window", "4", "--sink", "0",
                          "--json", str(out)]) == 1
  rows = json.loads(out.read_text())
  assert len(rows) == 1 and rows[0]["error"] == "ValueError: 5 frames"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.json"]
