"""Moving-digits evaluation: Fréchet distance, prompt agreement, evaluator, x0-change heuristic, eval command."""

import json
import os

import jax
import numpy as np
import pytest

from dsa_jax.eval import metrics


# ----------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _random_spd(rng, d, scale=1.0):
  a = rng.standard_normal((d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_frechet_closed_form_diagonal():
  mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
  va, vb = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
  got = metrics.frechet_from_stats(mu_a, np.diag(va), mu_b, np.diag(vb))
  assert got == pytest.approx(want, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_on_non_commuting_covariances():
  scipy_linalg = pytest.importorskip("scipy.linalg")
  rng = np.random.default_rng(0)
  d = 12
  s_a, s_b = _random_spd(rng, d), _random_spd(rng, d, 3.0)
  mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
  covmean = scipy_linalg.sqrtm(s_a @ s_b).real
  want = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
  assert metrics.frechet_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(want, rel=1e-8)
  # symmetric in its arguments
  assert metrics.frechet_from_stats(mu_b, s_b, mu_a, s_a) == pytest.approx(want, rel=1e-8)


def test_frechet_of_samples_approaches_the_gaussian_value():
  rng = np.random.default_rng(1)
  d = 4
  s_a, s_b = _random_spd(rng, d), _random_spd(rng, d)
  mu_a, mu_b = np.zeros(d), np.full(d, 0.5)
  want = metrics.frechet_from_stats(mu_a, s_a, mu_b, s_b)
  xa = rng.multivariate_normal(mu_a, s_a, size=40000)
  xb = rng.multivariate_normal(mu_b, s_b, size=40000)
  assert metrics.frechet_distance(xa, xb) == pytest.approx(want, abs=0.05 * want + 0.01)


def test_frechet_zero_for_identical_sets_and_grows_with_shift():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((300, 16))
  assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  fds = [metrics.frechet_distance(x, x + s) for s in (0.1, 0.5, 1.0)]
  assert fds == pytest.approx([16 * s * s for s in (0.1, 0.5, 1.0)], rel=1e-6)  # a shift adds |shift|^2
  assert fds[0] < fds[1] < fds[2]


def test_frechet_terms_split_a_shift_from_lost_spread():
  """A shifted set's FD is all mean term (spread 1); a shrunk set's is all covariance term (spread 0.25)."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((400, 8))
  x -= x.mean(0)  # centred: scaling it moves no mean
  stats = lambda a: metrics.feature_stats(a)
  shifted = metrics.frechet_terms(*stats(x + 0.5), *stats(x))
  assert shifted["mean"] == pytest.approx(8 * 0.25, rel=1e-6) and abs(shifted["cov"]) < 1e-6
  assert shifted["spread"] == pytest.approx(1.0)
  shrunk = metrics.frechet_terms(*stats(0.5 * x), *stats(x))
  assert shrunk["mean"] < 1e-12 and shrunk["cov"] > 1.0 and shrunk["spread"] == pytest.approx(0.25)
  assert shrunk["mean"] + shrunk["cov"] == pytest.approx(metrics.frechet_distance(0.5 * x, x))


def test_frechet_is_finite_with_fewer_samples_than_features():
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal((10, 64)), rng.standard_normal((10, 64)) + 0.3
  fd = metrics.frechet_distance(a, b)
  assert np.isfinite(fd) and fd > 0


def test_frechet_rejects_bad_input():
  with pytest.raises(metrics.MetricError, match="features"):
    metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
  with pytest.raises(metrics.MetricError, match="NaN"):
    metrics.frechet_distance(np.full((4, 3), np.nan), np.zeros((5, 3)))
  with pytest.raises(metrics.MetricError, match="frechet_distance"):
    metrics.frechet_distance(np.zeros((4, 3)), np.zeros((5, 2)))


# ----------------------------------------------------------------------------------------------------------------------
# Prompt agreement


def test_prompt_digits_parses_the_digits_grammar():
  assert metrics.prompt_digits("digits 3 and 7 move slowly; then an 8 enters; then cut to digit 2 moving fast") == \
      {2, 3, 7, 8}
  assert metrics.prompt_digits("digits 2, 8 and 0 move slowly; then the 2 and the 8 swap places") == {0, 2, 8}
  assert metrics.prompt_digits("digit 5 stands still") == {5}
  with pytest.raises(metrics.MetricError, match="12"):
    metrics.prompt_digits("digit 12 moves")


def test_prompt_digits_match_the_clip_metadata():
  from dsa_jax.data import digits
  for i in range(40):
    clip = digits.make_clip(i, split="test", frames=16, size=32)
    shown = {int(d) for d in np.unique(clip["digits"]) if d >= 0}
    assert metrics.prompt_digits(clip["prompt"]) == shown, clip["prompt"]


def test_prompt_agreement_and_f1():
  target = metrics.multi_hot([{1, 2}, {3}, {4, 5, 6}, set()])
  pred = metrics.multi_hot([{1, 2}, {3, 9}, {4}, set()])
  a = metrics.prompt_agreement(pred, target)
  assert a["set_agreement"] == pytest.approx(0.5)
  f1 = metrics.digit_f1(pred, target)
  assert f1 == pytest.approx([1.0, 2 / 3, 0.5, 1.0])
  assert a["digit_f1"] == pytest.approx(np.mean(f1))
  assert a["precision"] == pytest.approx(4 / 5) and a["recall"] == pytest.approx(4 / 6)
  # prompts are parsed when given as text
  b = metrics.prompt_agreement(pred, ["digits 1 and 2 move", "digit 3 moves", "digits 4, 5 and 6 move", "x"])
  assert b == a
  with pytest.raises(metrics.MetricError):
    metrics.prompt_agreement(pred[:, :5], target[:, :5])


def test_by_event_groups_steps():
  steps = np.array([[1, 2, 5], [1, 3, 5]])
  labels = np.array([[0, 0, 3], [0, 1, 3]])
  out = metrics.by_event(steps, labels, ["none", "enter", "swap", "cut"])
  assert out["none"]["mean"] == pytest.approx(4 / 3) and out["none"]["count"] == 3
  assert out["cut"]["mean"] == 5 and out["enter"]["mean"] == 3
  assert out["swap"]["count"] == 0 and np.isnan(out["swap"]["mean"])


# ----------------------------------------------------------------------------------------------------------------------
# Heuristic stop rule


def test_x0_delta_stop():
  import jax.numpy as jnp
  from dsa_jax.eval import heuristic
  prev = jnp.zeros((2, 3, 4, 4, 1))
  x0 = prev.at[0, 1].set(0.5).at[1, 2].set(0.05)
  d = np.asarray(heuristic.x0_delta(prev, x0))
  assert d == pytest.approx(np.array([[0, 0.5, 0], [0, 0, 0.05]]), abs=1e-7)
  done = np.asarray(heuristic.x0_delta_stop(prev, x0, 0.1))
  assert done.tolist() == [[True, False, True], [True, True, True]]
  done = np.asarray(heuristic.x0_delta_stop(prev, x0, jnp.array([1.0, 0.01])))  # per-sample deltas
  assert done.tolist() == [[True, True, True], [True, True, False]]
  with pytest.raises(ValueError):
    heuristic.x0_delta(prev, x0[:, :2])


def test_simulate_and_pick_thresholds():
  from dsa_jax.eval import heuristic
  trace = np.array([[[0.1, 0.6, 0.9], [0.7, 0.8, 0.95]]])  # (N=1, F=2, L=3)
  assert heuristic.simulate_stops(trace, 0.5).tolist() == [[2, 1]]
  assert heuristic.simulate_stops(trace, 0.99).tolist() == [[3, 3]]
  assert heuristic.simulate_stops(trace, 0.5, min_steps=2).tolist() == [[2, 2]]
  dtrace = np.array([[[np.nan, 0.3, 0.01], [np.nan, 0.02, 0.01]]])
  assert heuristic.simulate_stops(dtrace, 0.05, rule="x0_delta").tolist() == [[3, 2]]
  taus = heuristic.pick_thresholds(trace, [1.0, 2.0, 3.0])
  assert [heuristic.simulate_stops(trace, t).mean() for t in taus] == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluator


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
  """A tiny evaluator (16px, 8 frames) trained for a few steps and saved: serves the round-trip and the e2e test."""
  from dsa_jax.eval import evaluator as ev
  out = str(tmp_path_factory.mktemp("evaluator") / "ev")
  logs = []
  summary = ev.train_evaluator(out, steps=12, batch=4, seed=0, size=16, frames=8, frame_batch=64, num_train=48,
                               num_test=16, workers=1, log_every=4, log=logs.append, augment=False,
                               cfg=ev.EvaluatorConfig(channels=(8, 16, 16), frame_dim=32, feature_dim=16))
  return out, summary, logs


def test_evaluator_trains_saves_and_loads(tiny_evaluator):
  from dsa_jax.eval import evaluator as ev
  out, summary, logs = tiny_evaluator
  assert any("it/s" in line and "ETA" in line for line in logs)
  assert summary["bytes"] < 3e6 and os.path.isfile(os.path.join(out, "dsa_meta.json"))
  loaded = ev.load_evaluator(out)
  assert loaded.cfg.size == 16 and loaded.cfg.feature_dim == 16
  clips = ev.make_clip_arrays(5, split="test", seed=3, frames=8, size=16, workers=1)
  a = ev.Evaluator(summary["params"], loaded.cfg).outputs(clips["video"], batch=2)
  b = loaded.outputs(clips["video"], batch=4)
  np.testing.assert_allclose(a["features"], b["features"], atol=1e-5)
  assert b["features"].shape == (5, 16) and b["digit_logits"].shape == (5, 10)
  assert b["event_logits"].shape == (5, 8, 6)
  with pytest.raises(ev.EvaluatorError, match="16x16"):
    loaded.outputs(np.zeros((2, 8, 32, 32, 1), np.float32))
  with pytest.raises(FileNotFoundError, match="train-evaluator"):
    ev.load_evaluator(out + "_missing")


def test_diverged_evaluator_training_stops_at_the_first_bad_step():
  from dsa_jax.eval import evaluator as ev
  ev.check_training_losses([2.0, 1.5, 1.2], 12, 100, 3e-3)  # finite: nothing happens
  with pytest.raises(ev.EvaluatorError, match=r"non-finite at step 11 of 100 \(lr=0.003\); nothing was saved"):
    ev.check_training_losses([2.0, float("nan"), float("inf")], 12, 100, 3e-3)


def test_augment_frames_warps_within_range():
  import jax
  from dsa_jax.eval import evaluator as ev
  frames = -np.ones((6, 16, 16, 1), np.float32)
  frames[:, 4:12, 6:10] = 1.0
  out = np.asarray(ev.augment_frames(jax.random.PRNGKey(0), frames, max_noise=0.0))
  assert out.shape == frames.shape and np.isfinite(out).all()
  assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5
  assert not np.allclose(out, frames)  # warped
  ink = (out > 0).mean(axis=(1, 2, 3))
  assert np.all(ink > 0.5 * (frames[0] > 0).mean())  # the shape stays on the canvas
  same = np.asarray(ev.augment_frames(jax.random.PRNGKey(0), frames, max_rot=0.0, scale=(1.0, 1.0), max_shear=0.0,
                                      max_shift=0.0, contrast=(1.0, 1.0), max_noise=0.0))
  np.testing.assert_allclose(same, frames, atol=1e-5)  # the identity transform


def test_shipped_evaluator_beats_chance_on_real_test_clips():
  from dsa_jax.eval import evaluator as ev
  assert os.path.isfile(os.path.join(ev.DEFAULT_DIR, "dsa_meta.json")), "the evaluator must ship with the package"
  loaded = ev.load_evaluator()
  assert ev.dir_size(ev.DEFAULT_DIR) < 3e6
  clips = ev.make_clip_arrays(96, split="test", seed=7, frames=loaded.cfg.frames, size=loaded.cfg.size, workers=1)
  acc = loaded.accuracy(clips["video"], clips["digits"], clips["labels"], clips["kind"])
  # chance: predicting the most common set (one digit) gets < 5% of clips exactly right
  assert acc["set_acc"] > 0.6, acc
  assert acc["digit_f1"] > 0.85, acc


# ----------------------------------------------------------------------------------------------------------------------
# Samplers and the eval command (tiny random weights)


@pytest.fixture(scope="module")
def digits_toy_config(repo_root):
  from dsa_jax.config_lib import get_config
  path = os.path.join(repo_root, "configs", "digits.py")
  # the toy runs without the shipped model's floor of 2 steps: half the sampling of most tests here
  return get_config(path, ["--config.runlocal=True", "--config.compute.dtype=float32", "--config.sampling.min_steps=1"])


def test_heuristic_sampler_matches_fixed_steps_and_stops_early(digits_toy_config):
  import jax
  from dsa_jax.eval import heuristic
  from dsa_jax.sampling import sampler as sampler_lib
  config = digits_toy_config
  base = sampler_lib.make_sampler(config)
  params = base.init_params(jax.random.PRNGKey(0))
  ctx = np.random.default_rng(0).standard_normal((2, config.model.text_len, config.model.text_dim)).astype(np.float32)
  h = heuristic.make_heuristic_sampler(config)
  L = base.num_steps
  ref = base.sample(params, ctx, base.make_controls(2, threshold=np.inf, min_steps=1, max_steps=3, seed=5))
  never = h.sample(params, ctx, h.make_controls(2, threshold=0.0, min_steps=1, max_steps=3, seed=5))
  assert np.asarray(never.steps).tolist() == np.full((2, config.video.num_frames), 3).tolist()
  np.testing.assert_allclose(np.asarray(never.latents), np.asarray(ref.latents), atol=1e-5)
  trace = np.asarray(never.conf_trace)
  assert np.isnan(trace[..., 0]).all() and np.isfinite(trace[..., 1:3]).all()  # x0 change from step 2 on
  always = h.sample(params, ctx, h.make_controls(2, threshold=np.inf, min_steps=1, max_steps=L, seed=5))
  # stops at the first step where a change can be measured, the first chunk at its own floor
  first = max(2, min(int(config.sampling.first_chunk_min_steps), L))
  assert (np.asarray(always.steps)[:, base.chunk_frames:] == 2).all()
  assert (np.asarray(always.steps)[:, :base.chunk_frames] == first).all()
  # a delta between the measured changes stops some frames at 2 and some later
  mid = float(np.median(trace[..., 1]))
  some = h.sample(params, ctx, h.make_controls(2, threshold=mid, min_steps=1, max_steps=L, seed=5))
  s = np.asarray(some.steps)
  assert s.min() == 2 and s.max() > 2


def test_eval_command_end_to_end(digits_toy_config, tiny_evaluator, tmp_path, repo_root):
  from dsa_jax import cli
  out = tmp_path / "eval"
  ev_dir, _, _ = tiny_evaluator
  rc = cli.main(["eval", "--config", os.path.join(repo_root, "configs", "digits.py"), "--config.runlocal=True",
                 "--config.compute.dtype=float32", "--config.sampling.min_steps=1", "--ckpt", "", "--out", str(out),
                 "--num", "4", "--batch", "2",
                 "--num-real", "6", "--thresholds", "0.5", "inf", "--fixed", "1", "--evaluator", ev_dir,
                 "--fps-prompts", "1"])
  assert rc == 0
  res = json.loads((out / "eval.json").read_text())
  assert [r["name"] for r in res["runs"]] == ["dsa-tau0.5", "dsa-tauinf", "fixed-1"]
  cfg = digits_toy_config
  for r in res["runs"]:
    assert np.isfinite(r["fd"]) and r["fd"] > 0 and 0 <= r["agreement"] <= 1 and r["fps"] > 0
    assert r["fd_mean"] + r["fd_cov"] == pytest.approx(r["fd"]) and r["fd_mean"] >= 0 and r["fd_spread"] > 0
    assert r["fps_batch1"] > 0
    assert len(r["steps_by_frame"]) == cfg.video.num_frames
    assert set(r["steps_by_event_pred"]) == {"none", "enter", "swap", "cut", "speed", "bounce"}
  assert res["runs"][1]["avg_steps"] == cfg.sampling.max_steps  # tau = inf: always max steps
  assert res["runs"][2]["avg_steps"] == 1
  assert res["runs"][1]["fd"] != res["runs"][2]["fd"]  # FD follows the videos: 1 step and all steps differ
  assert np.isfinite(res["benchmark"]["real_floor"]["fd"])
  assert (out / "samples.gif").stat().st_size > 0 and (out / "steps_by_event.png").stat().st_size > 0


def test_eval_outputs_without_a_gif(tmp_path, monkeypatch, digits_toy_config):
  """--gif-clips 0 writes no samples.gif (it used to divide by zero after all the sampling was done)."""
  from dsa_jax.eval import claim, evaluate
  monkeypatch.setattr(claim, "plot_steps_by_event", lambda path, *a, **k: path)
  run = {"_arrays": {"video": np.zeros((2, 4, 16, 16, 1), np.float32), "steps": np.ones((2, 4), np.int32)}}
  bench = type("B", (), {"event_names": ["none"]})()
  paths = evaluate.write_outputs(str(tmp_path), [run], bench, digits_toy_config, gif_clips=0)
  assert "gif" not in paths and not (tmp_path / "samples.gif").exists()
  paths = evaluate.write_outputs(str(tmp_path), [run], bench, digits_toy_config, gif_clips=1)
  assert (tmp_path / "samples.gif").stat().st_size > 0


def test_video_oracle_credits_an_early_chunk_with_what_follows():
  """A stand-in video whose chunk c loses q_c = (1 + 0.05 c) (max - steps_c) + q_(c-1) / 2 (its own missing steps,
  later chunks weighing a little more, plus half of what its context lost); the latents are sqrt(q_c), so the
  distance to the max-step video is the mean q. Judged chunk by chunk (a per-frame oracle), the last chunk's step is
  worth most (1.15); re-rolled, a step on the first chunk is worth 1 + 1/2 + 1/4 + 1/8 = 1.875 and wins."""
  from dsa_jax.eval import oracle
  n, frames, chunk, mx = 3, 8, 2, 5

  def sample_latents(steps):
    s = np.asarray(steps)[:, ::chunk].astype(np.float64)
    q = np.zeros_like(s)
    for c in range(s.shape[1]):
      q[:, c] = (1 + 0.05 * c) * (mx - s[:, c]) + (0.5 * q[:, c - 1] if c else 0.0)
    return np.repeat(np.sqrt(q), chunk, axis=1)[..., None]

  plans = oracle.video_oracle(sample_latents, n, frames, chunk, [1.0, 1.25, 2.0, 5.0], 1, mx)
  assert plans[1.0]["avg_steps"] == 1.0 and plans[2.0]["avg_steps"] == 2.0
  np.testing.assert_array_equal(plans[1.25]["steps"][:, ::chunk], [[2, 1, 1, 1]] * n)  # the first chunk first
  assert (plans[5.0]["steps"] == mx).all() and np.allclose(plans[5.0]["distance"], 0.0)
  assert (plans[2.0]["distance"] < plans[1.25]["distance"]).all()
  with pytest.raises(ValueError, match="budget 6"):
    oracle.video_oracle(sample_latents, n, frames, chunk, [6.0], 1, mx)


def test_claim_sweep_tiny(digits_toy_config, tiny_evaluator, tmp_path):
  from dsa_jax.eval import claim
  ev_dir, _, _ = tiny_evaluator
  bench = claim.Benchmark(digits_toy_config, num=4, evaluator=ev_dir, num_real=6, batch=4, fps_prompts=0,
                          log=lambda s: None)
  # with a floor of 2 steps per frame (the shipped digits config's) an oracle budget below it is refused before
  # anything is sampled
  digits_toy_config.sampling.min_steps = 2
  L = len(digits_toy_config.sampling.ladder)
  with pytest.raises(claim.BenchmarkError, match=rf"--budgets.*\[2, {L}\].*1\.5"):
    claim.run_claim(digits_toy_config, {"remaining": ""}, str(tmp_path), budgets=(1.5, 2.0), bench=bench,
                    log=lambda s: None)
  digits_toy_config.sampling.min_steps = 1  # the sweep without the floor
  res = claim.run_claim(digits_toy_config, {"remaining": ""}, str(tmp_path), fixed=(1, 3), thresholds=[0.3, 0.6],
                        deltas=[0.0, 1e9], budgets=(1.5, 2.0), bench=bench, log=lambda s: None)
  g = res["groups"]
  assert [r["avg_steps"] for r in g["fixed"]] == [1, 3]
  assert len(g["dsa_remaining"]) == 2
  # the rule's fewest: 2 steps per frame, the first chunk's frames at their floor
  v, fc = digits_toy_config.video, max(2, min(digits_toy_config.sampling.first_chunk_min_steps, 3))
  fewest = (v.chunk_frames * fc + (v.num_frames - v.chunk_frames) * 2) / v.num_frames
  assert [r["avg_steps"] for r in g["heuristic"]] == [digits_toy_config.sampling.max_steps, fewest]
  assert [r["avg_steps"] for r in g["oracle"]] == [1.5, 2.0]  # the oracle spends exactly its budget
  # the video oracle: exactly its budget too, one step count per chunk, and at least as close to the max-step video
  # as it gets with a larger budget
  c = digits_toy_config.video.chunk_frames
  assert [r["avg_steps"] for r in g["oracle_video"]] == [1.5, 2.0]
  for r in g["oracle_video"]:
    steps = np.asarray(r["steps_by_frame"])  # mean over prompts: constant within each chunk as well
    assert np.allclose(steps.reshape(-1, c), steps[::c, None])
  d = [r["distance_to_max_steps"] for r in g["oracle_video"]]
  assert d[1] <= d[0]
  head = res["heads"]["remaining"]
  assert len(head["median_conf_by_step"]) == len(digits_toy_config.sampling.ladder)
  assert head["median_remaining_by_step"][-1] == 0.0 and head["median_remaining_by_step"][0] > 0
  # efficiency against each oracle, the video oracle first
  assert [(r["oracle"], r["budget"]) for r in res["efficiency"]["remaining"]] == [
      ("oracle_video", 1.5), ("oracle_video", 2.0), ("oracle", 1.5), ("oracle", 2.0)]
  md = (tmp_path / "claim.md").read_text()
  assert "fixed steps" in md and "x0-change heuristic" in md and "per-frame oracle" in md and "real test clips" in md
  assert "video oracle (re-rolled)" in md
  assert "Allocation efficiency" in md and "median c, step 1" in md
  assert (tmp_path / "claim.png").stat().st_size > 0 and (tmp_path / "claim.json").is_file()
  assert (tmp_path / "steps_by_place.png").stat().st_size > 0


def test_eval_command_errors(tmp_path, repo_root):
  from dsa_jax import cli
  rc = cli.main(["eval", "--out", str(tmp_path)])
  assert rc == 2  # --config missing
  rc = cli.main(["eval", "--config", os.path.join(repo_root, "configs", "tiny.py"), "--out", str(tmp_path),
                 "--ckpt", ""])
  assert rc == 2  # not a pixel-space config


def test_trace_rollout_is_the_full_ladder_sampler(digits_toy_config):
  """The oracle's trace runs the sampler's own program: its last-step x0 is the fixed-L video and its confidences
  are the sampler's conf_trace."""
  from dsa_jax.eval import oracle
  from dsa_jax.sampling import sampler as sampler_lib
  cfg = digits_toy_config
  s = sampler_lib.make_sampler(cfg)
  params = s.init_params(jax.random.PRNGKey(3))
  L = s.num_steps
  ctx = np.random.default_rng(0).standard_normal((2, cfg.model.text_len, cfg.model.text_dim)).astype(np.float32)
  controls = s.make_controls(2, threshold=float("inf"), min_steps=L, max_steps=L, guidance=0.0, seed=5)
  ref = s.sample(params, ctx, controls)
  t = oracle.trace_rollout(s, params, ctx, controls)
  assert t["x0"].shape[:3] == (2, cfg.video.num_frames, L)
  np.testing.assert_allclose(t["x0"][:, :, -1], np.asarray(ref.latents), atol=1e-5)
  np.testing.assert_allclose(t["conf"], np.asarray(ref.conf_trace), atol=1e-5)
  assert np.all(t["remaining"][..., -1] == 0) and np.all(t["remaining"][..., 0] > 0)
  # the next-step change: step k's x0 to step k + 1's, 0 at the last step; one step before the last it is the remaining
  step = np.mean(np.square(t["x0"][:, :, 2] - t["x0"][:, :, 1]), axis=(2, 3, 4))
  np.testing.assert_allclose(t["gain"][:, :, 1], step, rtol=1e-6)
  assert np.all(t["gain"][..., -1] == 0) and np.allclose(t["gain"][..., -2], t["remaining"][..., -2])


def test_oracle_allocation_greedy_by_gain():
  from dsa_jax.eval import oracle
  # frame 0 gains a lot from step 2 only; frame 1 gains steadily; frame 2 is done after one step
  rem = np.array([[10.0, 1.0, 0.9, 0.0], [6.0, 4.0, 2.0, 0.0], [0.01, 0.005, 0.001, 0.0]])
  np.testing.assert_array_equal(oracle.oracle_allocation(rem, 1.0), [1, 1, 1])
  np.testing.assert_array_equal(oracle.oracle_allocation(rem, 4 / 3), [2, 1, 1])  # 9 > 2 > 0.005
  np.testing.assert_array_equal(oracle.oracle_allocation(rem, 5 / 3), [2, 2, 1])
  np.testing.assert_array_equal(oracle.oracle_allocation(rem, 4.0), [4, 4, 4])
  alloc = oracle.oracle_allocation(np.random.default_rng(0).random((8, 6, 5)), 2.5, 1, 5)
  assert alloc.shape == (8, 6) and alloc.mean() == 2.5 and alloc.min() >= 1 and alloc.max() <= 5
  with pytest.raises(ValueError, match="budget"):
    oracle.oracle_allocation(rem, 4.5)


def test_head_report_reads_a_rising_confidence():
  from dsa_jax.eval import oracle
  rng = np.random.default_rng(0)
  rem = np.sort(rng.random((16, 4, 5)), axis=-1)[..., ::-1].copy()
  rem[..., -1] = 0.0
  good = oracle.remaining_target(rem, oracle.remaining_log_range(rem))
  rep = oracle.head_report({"conf": good, "remaining": rem})
  assert rep["conf_rises"] and rep["ece"] < 1e-9 and rep["calibrated_against"] == "remaining"
  flat = oracle.head_report({"conf": np.full_like(rem, 0.9), "remaining": rem})  # overconfident, flat
  assert not flat["conf_rises"] and flat["step1_spread"] == 0.0 and flat["ece"] > 0.1
  # a 'gain' head is judged against the next-step change, not against the change to the last step
  gain = np.concatenate([rem[..., :1], rem[..., :-1]], axis=-1)[..., ::-1].copy()
  gain[..., -1] = 0.0
  y = oracle.remaining_target(gain, oracle.remaining_log_range(gain))
  own = oracle.head_report({"conf": y, "remaining": rem, "gain": gain}, target_kind="gain")
  assert own["calibrated_against"] == "gain" and own["ece"] < 1e-9
  assert oracle.head_report({"conf": y, "remaining": rem, "gain": gain})["ece"] > 1e-3


def test_training_evaluates_every_n_steps(digits_toy_config, tiny_evaluator, tmp_path):
  """train.eval_every: the teacher is scored as a sampler during training; the curve lands in eval.jsonl."""
  from dsa_jax.training import trainer
  ev_dir, _, _ = tiny_evaluator
  cfg = digits_toy_config.copy_and_resolve_references()
  cfg.train.update(stage="teacher", steps=2, batch_size=2, log_every=1, ckpt_every=2, eval_every=1, eval_num=4,
                   eval_evaluator=ev_dir, eval_teacher_steps=2, teacher_ema_decay=0.9)
  cfg.data.videos = "digits:train"
  cfg.data.num_videos = 8
  logs = []
  summary = trainer.train(cfg, str(tmp_path), log=logs.append)
  rows = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["eval_fd"]) and r["eval_fd"] > 0 and 0 <= r["eval_agreement"] <= 1 for r in rows)
  assert rows[0]["eval_fd"] != rows[1]["eval_fd"]  # the model changed between the two evaluations
  assert all(r["eval_fd_mean"] + r["eval_fd_cov"] == pytest.approx(r["eval_fd"]) for r in rows)
  assert summary["last_eval"] == {k: v for k, v in rows[-1].items() if k != "step"}
  assert any("eval at step 2: FD" in m and "spread" in m for m in logs)


def test_eval_scores_a_teacher_at_several_guidance_scales(digits_toy_config, tiny_evaluator, tmp_path, repo_root,
                                                           capsys):
  """`dsa-jax eval --teacher-steps 2 --teacher-guidance 0,2`: one run per guidance scale, named apart, in teacher.json;
  a bad scale or the flag without --teacher-steps is an error naming it."""
  import jax
  from dsa_jax import cli
  from dsa_jax.models import factory
  from dsa_jax.training import checkpointing
  ev_dir, _, _ = tiny_evaluator
  cfg = digits_toy_config.copy_and_resolve_references()
  cfg.train.stage = "teacher"
  teacher = str(tmp_path / "teacher")
  checkpointing.export_networks(factory.random_networks(cfg, ["teacher"], jax.random.PRNGKey(0), exact=False), cfg,
                                teacher, step=0)
  base = ["eval", "--config", os.path.join(repo_root, "configs", "digits.py"), "--config.runlocal=True",
          "--config.compute.dtype=float32", "--ckpt", teacher, "--num", "4", "--batch", "4", "--num-real", "8",
          "--evaluator", ev_dir, "--out", str(tmp_path / "out")]
  assert cli.main(base + ["--teacher-steps", "2", "--teacher-guidance", "0,2"]) == 0
  runs = json.loads((tmp_path / "out" / "teacher.json").read_text())["runs"]
  assert [(r["name"], r["guidance"]) for r in runs] == [("teacher-2-g0", 0.0), ("teacher-2-g2", 2.0)]
  assert runs[0]["fd"] != runs[1]["fd"] and all(np.isfinite(r["fd"]) for r in runs)
  assert cli.main(base + ["--teacher-steps", "2", "--teacher-guidance", "lots"]) == 2
  assert "--teacher-guidance" in capsys.readouterr().err
  assert cli.main(base + ["--teacher-guidance", "1"]) == 2
  assert "only with --teacher-steps" in capsys.readouterr().err


def test_verdict_judges_differences_against_paired_replicates():
  """Runs scored on the same resampled prompts share their sampling error: a small, consistent gain is significant
  against the paired spread but not against the two runs' spreads combined; without shared error it is neither."""
  from dsa_jax.eval import claim
  rng = np.random.default_rng(0)
  shared = rng.normal(0.0, 10.0, 50)

  def run(name, steps, fd, noise):
    reps = fd + noise
    return {"name": name, "avg_steps": steps, "fd": fd, "fd_bootstrap_std": float(np.std(reps)),
            "fd_bootstrap": list(reps)}

  fixed = [run("fixed-1", 1.0, 100.0, shared), run("fixed-3", 3.0, 80.0, shared)]
  paired = {"fixed": fixed, "dsa_x": [run("dsa", 2.0, 85.0, shared + rng.normal(0, 0.5, 50))]}
  v = claim.verdict(paired)["dsa_x"]["fixed"]
  assert v["better"] == 1 and v["significant"] == 0 and v["significant_paired"] == 1
  assert v["points"][0]["fixed_fd"] == 90.0 and v["points"][0]["paired_se"] < 1.0
  unpaired = {"fixed": fixed, "dsa_x": [run("dsa", 2.0, 85.0, rng.normal(0.0, 10.0, 50))]}
  v = claim.verdict(unpaired)["dsa_x"]["fixed"]
  assert v["better"] == 1 and v["significant_paired"] == 0 and v["points"][0]["paired_se"] > 5.0
  # runs without replicates (older claim.json files): no paired verdict, the independent one still works
  old = {g: [{k: x for k, x in r.items() if k != "fd_bootstrap"} for r in rs] for g, rs in paired.items()}
  v = claim.verdict(old)["dsa_x"]["fixed"]
  assert v["significant_paired"] is None and v["compared"] == 1
  assert "paired" not in claim.verdict_text({"fd": claim.verdict(old)})
  assert "1 by more than 2 paired standard errors" in claim.verdict_text({"fd": claim.verdict(paired)})


def test_budget_check_on_held_out_prompts(digits_toy_config, tiny_evaluator, tmp_path, capsys):
  """`dsa-jax eval budgets`: tau from the model's table for each requested average, the achieved average on
  held-out prompts; without a table it says how to make one before sampling anything."""
  import jax
  from dsa_jax import cli
  from dsa_jax.eval import claim
  from dsa_jax.sampling import budget
  from dsa_jax.sampling import sampler as sampler_lib
  from dsa_jax.training import checkpointing
  config = digits_toy_config
  ev_dir, _, _ = tiny_evaluator
  model = tmp_path / "model"
  checkpointing.export_networks(sampler_lib.make_sampler(config).init_params(jax.random.PRNGKey(0)), config,
                                str(model))
  with pytest.raises(budget.BudgetError, match="dsa-jax calibrate"):
    claim.check_budgets(config, str(model), str(tmp_path / "none"), (2.0,), num=4, evaluator=ev_dir, batch=4,
                        num_real=6, log=lambda s: None)
  assert not (tmp_path / "none").exists()
  # a stored table (what `dsa-jax calibrate` writes; made by hand here: this test is about the check)
  from dsa_jax.checkpoint import params_io
  table = {"thresholds": [0.0, 0.4, 0.6, 1.0], "mean_steps": [1.2, 1.8, 2.6, 3.0], "num_prompts": 4, "min_steps": 1,
           "max_steps": config.sampling.max_steps, "seed": 0,
           "first_chunk_min_steps": config.sampling.first_chunk_min_steps, "chunk_frames": config.video.chunk_frames,
           "num_frames": config.video.num_frames}
  params_io.update_meta(str(model), calibration=table)
  with pytest.raises(claim.BenchmarkError, match=r"--fixed.*\[1, \d+\].*\[0\]"):
    claim.check_budgets(config, str(model), str(tmp_path / "bad"), (1.5,), fixed=(0, 2), num=4, evaluator=ev_dir,
                        batch=4, num_real=6, log=lambda s: None)
  L = config.sampling.max_steps
  res = claim.check_budgets(config, str(model), str(tmp_path / "check"), (1.5, 2.5), num=4, evaluator=ev_dir,
                            batch=4, num_real=6, fixed=(1, L), log=lambda s: None)
  rows = res["rows"]
  assert [r["requested"] for r in rows] == [1.5, 2.5]
  assert [r["tau"] for r in rows] == [budget.threshold_for(table, 1.5), budget.threshold_for(table, 2.5)]
  for r in rows:
    assert 1.0 <= r["achieved"] <= config.sampling.max_steps and r["error"] == r["achieved"] - r["requested"]
  assert res["max_abs_error"] == max(abs(r["error"]) for r in rows)
  saved = json.loads((tmp_path / "check" / "budget_check.json").read_text())
  assert saved["rows"] == rows
  # each budget against fixed steps at its achieved average: the fixed runs' curve interpolated, paired replicates kept
  runs = {r["name"]: r for r in saved["runs"]}
  assert set(runs) == {"mean-steps-1.5", "mean-steps-2.5", "fixed-1", f"fixed-{L}"}
  f1, fL = runs["fixed-1"], runs[f"fixed-{L}"]
  assert f1["avg_steps"] == 1.0 and fL["avg_steps"] == L and len(f1["fd_bootstrap"]) == len(fL["fd_bootstrap"]) > 1
  for r in rows:
    want = np.interp(r["achieved"], [1.0, L], [f1["fd"], fL["fd"]])
    assert r["fixed_fd"] == pytest.approx(want) and r["fd_better_than_fixed"] == pytest.approx(want - r["fd"])
    assert np.isfinite(r["fd_paired_se"]) and isinstance(r["fd_significant_paired"], bool)
    assert r["agreement_better_than_fixed"] == pytest.approx(r["agreement"] - r["fixed_agreement"])
  # under the x0-change rule too the fixed runs take their step counts (its tau = inf would stop every frame at once)
  x0 = config.copy_and_resolve_references()
  x0.sampling.stop_rule = "x0_delta"
  params_io.update_meta(str(model), calibration_x0_delta=dict(table, thresholds=[1.0, 0.6, 0.4, 0.0],
                                                              mean_steps=[2.3, 2.4, 2.8, 3.0], min_steps=2,
                                                              stop_rule="x0_delta"))
  res = claim.check_budgets(x0, str(model), str(tmp_path / "x0"), (2.5,), num=4, evaluator=ev_dir, batch=4,
                            num_real=6, fixed=(2, L), log=lambda s: None)
  assert [r["avg_steps"] for r in res["runs"][1:]] == [2.0, float(L)]
  assert claim.bracketing_steps((1.5, 2.5), 5) == (1, 2, 3) and claim.bracketing_steps((2.0,), 5) == (2, 3)
  assert claim.bracketing_steps((3.0, 1.0), 3) == (1, 2, 3)
  # the command line: --budgets is required for this action
  assert cli.main(["eval", "budgets", "--config", "digits", "--ckpt", str(model), "--out", str(tmp_path / "c2"),
                   "--num", "4", "--batch", "4", "--evaluator", ev_dir, "--num-real", "6",
                   "--config.runlocal=True", "--config.compute.dtype=float32"]) == 2
  assert "--budgets" in capsys.readouterr().err


def test_eval_refuses_options_its_action_does_not_use(tmp_path, repo_root, capsys):
  """Options of another action are an error naming each (the action would otherwise evaluate something else
  without a word), and --num-real / --fps-prompts out of range are errors naming them, not clamped; all before any
  model loads."""
  from dsa_jax import cli
  digits = os.path.join(repo_root, "configs", "digits.py")
  out = str(tmp_path / "out")
  base = ["eval", "--config", digits, "--out", out, "--num", "4", "--batch", "4"]
  assert cli.main(base + ["--model", "gain=/nonexistent/model", "--budgets", "2", "--deltas", "0.1",
                          "--no-video-oracle"]) == 2
  err = capsys.readouterr().err
  assert "'run' does not use" in err and all(f in err for f in ("--model", "--budgets", "--deltas",
                                                               "--no-video-oracle"))
  assert "--num " not in err and "--batch " not in err  # what the run reads is not named
  assert cli.main(base + ["--num-real", "0"]) == 2
  assert "--num-real: need at least 2" in capsys.readouterr().err
  assert cli.main(base + ["--fps-prompts", "-3"]) == 2
  assert "--fps-prompts: expected 0" in capsys.readouterr().err
  assert cli.main(["eval", "budgets", "--config", digits, "--out", out, "--budgets", "2", "--gif-clips", "3",
                   "--thresholds", "0.5"]) == 2
  err = capsys.readouterr().err
  assert "'budgets' does not use" in err and "--gif-clips" in err and "--thresholds" in err
  assert cli.main(["eval", "sweep", "--config", digits, "--out", out, "--teacher-steps", "4"]) == 2
  assert "--teacher-steps (used by: run)" in capsys.readouterr().err
  assert cli.main(["eval", "curves", "--run", "a=x", "--out", out, "--config", digits]) == 2
  assert "'curves' does not use --config" in capsys.readouterr().err
  assert cli.main(["eval", "train-evaluator", "--out", out, "--evaluator", "x"]) == 2
  assert "--evaluator" in capsys.readouterr().err
  assert cli.main(base + ["--teacher-steps", "2", "--thresholds", "0.5", "--gif-clips", "2"]) == 2
  err = capsys.readouterr().err
  assert "--teacher-steps" in err and "--thresholds" in err and "--gif-clips" in err
  assert not os.path.exists(out)


def test_benchmark_refuses_too_few_real_clips_and_negative_fps_prompts():
  from dsa_jax.eval import claim
  with pytest.raises(claim.BenchmarkError, match=r"num_real \(--num-real\).*got 1"):
    claim.Benchmark(None, num=4, num_real=1)
  with pytest.raises(claim.BenchmarkError, match=r"fps_prompts \(--fps-prompts\).*got -1"):
    claim.Benchmark(None, num=4, fps_prompts=-1)


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "9"])
def test_eval_budgets_needs_finite_budgets_within_the_ladder(value, tmp_path, repo_root, capsys):
  """--budgets inf used to end in an OverflowError traceback, nan in an error that named no option."""
  from dsa_jax import cli
  from dsa_jax.eval import claim
  assert cli.main(["eval", "budgets", "--config", os.path.join(repo_root, "configs", "digits.py"), "--out",
                   str(tmp_path / "out"), "--budgets", "2", value]) == 2
  assert "--budgets: expected finite average steps per frame within [1, 3]" in capsys.readouterr().err
  with pytest.raises(claim.BenchmarkError, match=r"--budgets.*\[1, 3\]"):
    claim.check_budget_values((2.0, float(value)), 3)
  claim.check_budget_values((1.0, 2.5, 3.0), 3)
