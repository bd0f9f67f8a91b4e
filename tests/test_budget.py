"""Step budgets: the calibration table, tau from a requested average, the stream's frame-rate controller."""

import json
import os
import types

import ml_collections
import numpy as np
import pytest

from dsa_jax.sampling import budget

TABLE = {"thresholds": [0.1, 0.3, 0.5, 0.7, 0.9], "mean_steps": [1.2, 1.8, 2.6, 3.4, 4.6], "min_steps": 1,
         "max_steps": 5}


def test_threshold_for_inverts_the_table():
  assert budget.threshold_for(TABLE, 2.6) == pytest.approx(0.5)
  assert budget.threshold_for(TABLE, 2.2) == pytest.approx(0.4)  # linear between 1.8 @ 0.3 and 2.6 @ 0.5
  assert budget.threshold_for(TABLE, 1.0) == float("-inf") and budget.threshold_for(TABLE, 5.0) == float("inf")
  wobbly = dict(TABLE, mean_steps=[1.2, 1.9, 1.85, 3.4, 4.6])  # noise in a table: its monotone envelope is used
  assert 0.3 < budget.threshold_for(wobbly, 2.5) < 0.7
  with pytest.raises(budget.BudgetError, match="dsa-jax calibrate"):
    budget.threshold_for(None, 2.5, source="'m'")
  with pytest.raises(budget.BudgetError, match=r"\[1, 5\]"):
    budget.threshold_for(TABLE, 6.0)


def test_a_budget_needs_the_tables_step_range():
  """A tau gives its calibrated average only under the floor / ceiling the table was made with."""
  assert budget.threshold_for(TABLE, 2.6, step_range=(1, 5)) == pytest.approx(0.5)
  with pytest.raises(budget.BudgetError, match=r"made with 1-5 steps per frame.*set to 2-5.*--min-steps 1"):
    budget.threshold_for(TABLE, 2.6, source="'m'", step_range=(2, 5))
  floor2 = dict(TABLE, min_steps=2, mean_steps=[2.0, 2.3, 2.6, 3.4, 4.6])
  assert budget.budget_controls(floor2, 2.6) == {"threshold": pytest.approx(0.5), "min_steps": 2, "max_steps": 5}


def test_a_budget_needs_the_tables_ladder():
  """A table records the timestep ladder it was made with; a sampler on another ladder is refused (a tau gives other
  step counts there), with the override that samples on the table's ladder and the calibrate command for its own."""
  table = dict(TABLE, ladder=[1000.0, 750.0, 500.0, 250.0, 125.0])
  assert budget.threshold_for(table, 2.6, ladder=(1000, 750, 500, 250, 125)) == pytest.approx(0.5)
  assert budget.threshold_for(TABLE, 2.6, ladder=(1000, 500, 250, 125)) == pytest.approx(0.5)  # an older table
  with pytest.raises(budget.BudgetError, match=r"'m'.*ladder \(1000,750,500,250,125\).*uses \(1000,500,250,125\).*"
                                               r"calibrate .*--config.sampling.ladder='\(1000,500,250,125\)'"):
    budget.budget_controls(table, 2.6, source="'m'", ladder=(1000, 500, 250, 125))


def test_a_model_keeps_a_table_per_step_range_and_a_budget_picks_the_one_that_covers_it():
  """A floor of 2 steps cannot give 1.5 steps per frame: a model calibrated for 2-5 and for 1-5 steps answers 2.6
  with its 2-5 table (the sampler's own range) and 1.5 with its 1-5 table; a fixed range picks its own table."""
  floor2 = dict(TABLE, mean_steps=[2.0, 2.3, 2.9, 3.6, 4.7], min_steps=2)
  meta = {}
  meta.update(budget.stored_tables(meta, "confidence", floor2))
  assert meta == {"calibration": floor2}
  meta.update(budget.stored_tables(meta, "confidence", TABLE))  # another range: kept beside the first
  assert meta["calibration"] is floor2 and meta["calibration_ranges"] == {"1-5": TABLE}
  remade = dict(floor2, thresholds=[0.1, 0.2, 0.5, 0.7, 0.9])
  meta.update(budget.stored_tables(meta, "confidence", remade))  # the same range again: the first is remade
  assert meta["calibration"] is remade and meta["calibration_ranges"] == {"1-5": TABLE}
  other_ladder = dict(TABLE, ladder=[1000.0, 500.0, 250.0], max_steps=3)
  five = [1000.0, 750.0, 500.0, 250.0, 125.0]
  assert budget.stored_tables({"calibration": dict(floor2, ladder=five), "calibration_ranges": {"1-5": dict(
      TABLE, ladder=five)}}, "confidence", other_ladder) == {"calibration": other_ladder, "calibration_ranges": {}}
  x0 = budget.stored_tables({"calibration": floor2}, "x0_delta", dict(TABLE_X0))
  assert x0 == {"calibration_x0_delta": TABLE_X0}

  source = {"calibration": floor2, "calibration_ranges": {"1-5": TABLE}}
  assert budget.pick_table(source, 2.6, prefer=(2, 5)) is floor2
  assert budget.pick_table(source, 2.6, prefer=(1, 5)) is TABLE  # the config's own range where it covers
  assert budget.pick_table(source, 1.5, prefer=(2, 5)) is TABLE  # below the floor: the table that covers it
  assert budget.pick_table(source, 2.6, step_range=(1, 5)) is TABLE
  assert budget.pick_table(source, 2.6, step_range=(3, 5)) is floor2  # none of that range: the check names it
  assert budget.pick_table(source, 9.0, prefer=(2, 5)) is floor2  # covered by none: the first says its range
  assert budget.pick_table({}, 2.0) is None
  assert budget.budget_controls(budget.pick_table(source, 1.5), 1.5)["min_steps"] == 1
  cfg = ml_collections.ConfigDict({"sampling": {"min_steps": 2, "max_steps": 5, "ladder": (1000, 750, 500, 250, 125)}})
  assert budget.controls_for_budget(source, 1.5, cfg) == budget.budget_controls(TABLE, 1.5)
  assert budget.controls_for_budget(source, 2.6, cfg) == {"threshold": pytest.approx(budget.threshold_for(floor2, 2.6)),
                                                          "min_steps": 2, "max_steps": 5}
  # a table of another ladder is passed over when one of the sampler's ladder covers the budget
  mixed = {"calibration": dict(floor2, ladder=[1000.0, 750.0, 500.0, 250.0, 125.0]),
           "calibration_ranges": {"1-5": dict(TABLE, ladder=[1000.0, 800.0, 600.0, 400.0, 200.0])}}
  assert budget.pick_table(mixed, 1.5, ladder=(1000, 750, 500, 250, 125)) is mixed["calibration"]
  # of two covering tables with the same floor the narrower one: 1-3 answers 1.5 (no third steps while frames stop
  # after one), 1-5 answers what 1-3 cannot
  one_three = dict(TABLE, mean_steps=[1.0, 1.3, 1.8, 2.4, 3.0], max_steps=3)
  both = {"calibration": floor2, "calibration_ranges": {"1-5": TABLE, "1-3": one_three}}
  assert budget.pick_table(both, 1.5, prefer=(2, 5)) is one_three
  assert budget.pick_table(both, 3.5, prefer=(2, 5)) is floor2
  assert budget.controls_for_budget(both, 1.5, cfg)["max_steps"] == 3


class _CrowdedHead:
  """A stand-in sampler whose frames stop once tau falls below a confidence that crowds near 0 (as the 'remaining'
  head's does after its first step): average steps = 1 + 4 * clip(log10(tau / 1e-4) / log10(0.9 / 1e-4), 0, 1)."""
  num_frames = 4

  def __init__(self):
    self.config = ml_collections.ConfigDict({"sampling": {"min_steps": 1, "max_steps": 5}})

  def make_controls(self, b, threshold, guidance=0.0, seed=0):
    return float(threshold)

  def sample(self, params, contexts, tau, uncond_context=None):
    frac = np.clip(np.log10(max(tau, 1e-12) / 1e-4) / np.log10(0.9 / 1e-4), 0.0, 1.0)
    steps = np.full((contexts.shape[0], self.num_frames), 1.0 + 4.0 * frac)
    return types.SimpleNamespace(steps=steps)


def test_calibration_reaches_the_ends_of_a_crowded_head():
  """The default grid starts at tau 0.02, where this head still takes 2.7 steps: the table extends towards 0 (and
  1) until the fewest (most) steps are in it, so small budgets are honoured instead of clipped to the grid's end."""
  sampler = _CrowdedHead()
  table = budget.calibration_table(sampler, None, np.zeros((3, 2, 2)), refine_gap=0.1)
  assert min(table["thresholds"]) < 0.02 and table["mean_steps"][0] <= 1.1, table["mean_steps"][:3]
  assert table["mean_steps"][-1] >= 4.9
  tau = budget.threshold_for(table, 1.5)
  assert abs(float(sampler.sample(None, np.zeros((1, 2, 2)), tau).steps.mean()) - 1.5) < 0.1
  short = budget.calibration_table(sampler, None, np.zeros((3, 2, 2)), refine_gap=0.1, extend_rounds=0)
  assert short["mean_steps"][0] > 2.5  # what the grid alone gave


def test_tables_made_with_a_first_chunk_floor():
  """sampling.first_chunk_min_steps lifts the fewest average a table gives (2-3 steps, first chunk of 2 of 16
  frames at 3: 2.125); a budget below it uses a table of a lower floor, and a table made with another first-chunk
  floor than the sampler's is passed over, or refused with what to do."""
  made = {"first_chunk_min_steps": 3, "chunk_frames": 2, "num_frames": 16}
  two_three = dict(TABLE, min_steps=2, max_steps=3, mean_steps=[2.25, 2.4, 2.6, 2.8, 3.0], **made)
  one_two = dict(TABLE, min_steps=1, max_steps=2, mean_steps=[1.2, 1.4, 1.6, 1.8, 1.95], **made)
  assert budget.table_bounds(two_three) == (2.125, 3.0) and budget.table_bounds(one_two) == (1.125, 2.0)
  assert budget.table_bounds(TABLE) == (1.0, 5.0)
  with pytest.raises(budget.BudgetError, match=r"at least 2\.125 .*first_chunk_min_steps=3"):
    budget.threshold_for(two_three, 2.0)
  assert budget.threshold_for(two_three, 2.125) == float("-inf")
  source = {"calibration": two_three, "calibration_ranges": {"1-2": one_two}}
  assert budget.pick_table(source, 2.0, prefer=(2, 3), first_chunk=3) is one_two
  assert budget.pick_table(source, 2.5, prefer=(2, 3), first_chunk=3) is two_three
  # a budget no table covers gets the nearest table, whose check says what it covers
  assert budget.pick_table(source, 2.1, prefer=(2, 3), first_chunk=3) is two_three
  assert budget.pick_table(source, 1.0, prefer=(2, 3), first_chunk=3) is one_two
  with pytest.raises(budget.BudgetError, match=r"1-2 steps table .* at least 1\.125"):
    budget.threshold_for(one_two, 1.0)
  cfg = ml_collections.ConfigDict({"sampling": {"min_steps": 2, "max_steps": 3, "ladder": (1000, 500, 250),
                                                "first_chunk_min_steps": 3}})
  assert budget.controls_for_budget(source, 2.0, cfg) == {"threshold": float("inf"), "min_steps": 1, "max_steps": 2}
  why = budget.sampling_mismatch(two_three, None, 0)
  assert "first_chunk_min_steps=3" in why and "dsa-jax calibrate" in why
  assert budget.sampling_mismatch(two_three, None, 3) is None and budget.sampling_mismatch(two_three, None) is None
  with pytest.raises(budget.BudgetError, match="first_chunk_min_steps"):
    budget.threshold_for(two_three, 2.5, first_chunk=0)
  with pytest.raises(budget.BudgetError, match="first_chunk_min_steps"):
    budget.controls_for_budget(source, 2.5, _with_floor(cfg, 0))
  # a table made with another floor replaces the first and drops the other ranges' tables of the old floor
  plain = dict(TABLE, min_steps=2, max_steps=3, mean_steps=[2.0, 2.3, 2.6, 2.8, 3.0])
  assert budget.stored_tables(source, "confidence", plain) == {"calibration": plain, "calibration_ranges": {}}
  # calibration records the floor, and the fewest average it allows
  sampler = _CrowdedHead()
  sampler.config.sampling.first_chunk_min_steps = 2
  sampler.chunk_frames = 2
  table = budget.calibration_table(sampler, None, np.zeros((3, 2, 2)), refine_gap=0.1)
  assert {k: table[k] for k in made} == {"first_chunk_min_steps": 2, "chunk_frames": 2, "num_frames": 4}
  assert budget.table_bounds(table) == (1.5, 5.0)


def _with_floor(cfg, floor):
  out = cfg.copy_and_resolve_references()
  out.sampling.first_chunk_min_steps = floor
  return out


def test_fps_controller_on_a_simulated_clock():
  """A device whose chunk time grows with the steps taken: the controller finds the budget that holds the rate."""
  ctl = budget.FpsController(TABLE, target_fps=10.0, initial_steps=4.5)
  seconds_per_step = 0.05  # 2 frames per chunk: fps = 2 / (0.05 * steps) -> 10 fps at 4 steps
  for _ in range(30):
    tau = ctl.threshold
    steps = float(np.interp(tau, TABLE["thresholds"], TABLE["mean_steps"])) if np.isfinite(tau) else (
        5.0 if tau > 0 else 1.0)
    ctl.update(2, seconds_per_step * steps)
  assert ctl.budget == pytest.approx(4.0, abs=0.1)
  slow = budget.FpsController(TABLE, target_fps=1000.0)
  for _ in range(20):
    slow.update(2, 0.1)
  assert slow.budget == 1.0 and slow.threshold == float("-inf")  # the hardware cannot: fewest steps
  with pytest.raises(budget.BudgetError, match="target-fps"):
    budget.FpsController(TABLE, target_fps=0.0)


def test_calibrate_then_sample_with_a_budget(tmp_path, repo_root, capsys):
  import jax

  from dsa_jax import cli
  from dsa_jax.config_lib import get_config
  from dsa_jax.sampling.sampler import make_sampler
  from dsa_jax.training import checkpointing

  tiny = os.path.join(repo_root, "configs", "tiny.py")
  cfg = get_config(tiny)
  small = ["--config.video.num_frames=4"]  # two chunks: what is tested holds for any length

  def cli_main(args):
    return cli.main(args + small)
  params = make_sampler(cfg).init_params(jax.random.PRNGKey(0))
  model = tmp_path / "model"
  checkpointing.export_networks(params, cfg, str(model))
  out = tmp_path / "out"
  rc = cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a", "--mean-steps",
                 "2.5"])
  assert rc == 2 and "dsa-jax calibrate" in capsys.readouterr().err  # no table yet: says how to make one
  assert cli_main(["calibrate", "--config", tiny, "--ckpt", str(model), "--num", "2"]) == 2
  assert "config.data.prompts" in capsys.readouterr().err  # tiny has no prompt source: named
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red ball\na blue cube\n")
  assert cli_main(["calibrate", "--config", tiny, "--ckpt", str(model), "--num", "2", "--dry-run",
                   "--prompts", str(prompts)]) == 0
  assert "calibration" not in json.loads((model / "dsa_meta.json").read_text())  # a dry run writes nothing
  assert cli_main(["calibrate", "--config", tiny, "--ckpt", str(model), "--num", "2", "--refine-gap", "0",
                   "--prompts", str(prompts)]) == 2
  assert "--refine-gap" in capsys.readouterr().err
  assert cli_main(["calibrate", "--config", tiny, "--ckpt", str(model), "--num", "2",
                   "--refine-gap", "0.5", "--config.data.prompts.kind=digits"]) == 0
  table = json.loads((model / "dsa_meta.json").read_text())["calibration"]
  assert len(table["thresholds"]) == len(table["mean_steps"]) >= len(budget.DEFAULT_THRESHOLDS)
  assert table["ladder"] == [float(t) for t in cfg.sampling.ladder]  # what its taus mean
  assert table["thresholds"] == sorted(table["thresholds"]) and table["num_prompts"] == 2
  assert table["mean_steps"][0] <= table["mean_steps"][-1]
  rc = cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a", "--mean-steps",
                 "2.5"])
  assert rc == 0
  rec = json.loads((out / "a.steps.json").read_text())
  want = budget.threshold_for(table, 2.5)
  assert rec["threshold"] == (want if np.isfinite(want) else str(want))
  # The table was made with 1-5 steps: an explicit other floor is refused; a config with another floor is overruled
  # by the table (what the budget was calibrated for), with a note.
  rc = cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a", "--mean-steps",
                 "2.5", "--min-steps", "2"])
  assert rc == 2 and "--min-steps 1 --max-steps" in capsys.readouterr().err
  rc = cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a", "--mean-steps",
                 "2.5", "--config.sampling.min_steps=2"])
  assert rc == 0 and "calibration table's 1-" in capsys.readouterr().err
  assert json.loads((out / "a.steps.json").read_text())["min_steps"] == 1
  # A table for 2-5 steps joins the 1-5 one: a config with floor 2 now samples 2.5 with its own table, and 1.5 (below
  # its floor) with the 1-5 table, saying so
  assert cli_main(["calibrate", "--config", tiny, "--ckpt", str(model), "--num", "2",
                   "--refine-gap", "0.5", "--config.data.prompts.kind=digits", "--config.sampling.min_steps=2"]) == 0
  assert "beside its table for another step range" in capsys.readouterr().out
  meta = json.loads((model / "dsa_meta.json").read_text())
  assert meta["calibration"] == table and meta["calibration_ranges"]["2-5"]["min_steps"] == 2
  floor2 = ["--config.sampling.min_steps=2"]
  assert cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a",
                   "--mean-steps", "2.5"] + floor2) == 0
  rec = json.loads((out / "a.steps.json").read_text())
  want = budget.threshold_for(meta["calibration_ranges"]["2-5"], 2.5)
  assert rec["min_steps"] == 2 and rec["threshold"] == (want if np.isfinite(want) else str(want))
  assert cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a",
                   "--mean-steps", "1.5"] + floor2) == 0
  assert "calibration table's 1-5" in capsys.readouterr().err
  assert json.loads((out / "a.steps.json").read_text())["min_steps"] == 1
  assert cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a",
                   "--config.sampling.mean_steps=1.5"] + floor2) == 0  # the config's own budget, below its floor
  rec = json.loads((out / "a.steps.json").read_text())
  want = budget.threshold_for(table, 1.5)
  assert rec["min_steps"] == 1 and rec["threshold"] == (want if np.isfinite(want) else str(want))
  # a stream holding a frame rate steers tau with the table of the range it samples with (here 2-5, not the first)
  assert cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a", "--stream",
                   "--target-fps", "1000", "--mean-steps", "2.5"] + floor2) == 0
  rec = json.loads((out / "a.steps.json").read_text())
  assert rec["min_steps"] == 2 and rec["target_fps"] == 1000
  assert len(rec["chunk_thresholds"]) == len(rec["chunk_iters_batch"]), rec  # the tau of every chunk
  assert cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a", "--stream",
                   "--target-fps", "1000", "--threshold", "inf"]) == 2  # tau is the controller's: refused by name
  assert "--target-fps and --threshold" in capsys.readouterr().err
  # On another ladder the table's taus mean other step counts: an explicit budget is refused, saying what to do; the
  # config's own budget falls back to its threshold with a warning that says the same.
  other = ["--config.sampling.ladder=(1000,500,250)", "--config.sampling.max_steps=3"]
  rc = cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a", "--mean-steps",
                 "2"] + other)
  err = capsys.readouterr().err
  assert rc == 2 and "timestep ladder (1000,750,500,250,125)" in err and "--config.sampling.ladder='(1000,500,250)'" in err
  rc = cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a",
                 "--config.sampling.mean_steps=2"] + other)
  assert rc == 0 and "config.sampling.mean_steps=2 cannot be used" in capsys.readouterr().err
  assert json.loads((out / "a.steps.json").read_text())["threshold"] == cfg.sampling.threshold
  # The x0-change rule's own table: made with the rule's override, stored beside the head's, used by --mean-steps
  x0 = ["--config.sampling.stop_rule=x0_delta"]
  assert cli_main(["calibrate", "--config", tiny, "--ckpt", str(model), "--head", "h", "--num", "2"] + x0) == 2
  assert "uses no confidence head" in capsys.readouterr().err
  assert cli_main(["calibrate", "--config", tiny, "--ckpt", str(model), "--num", "2",
                   "--refine-gap", "0.5", "--config.data.prompts.kind=digits"] + x0) == 0
  meta = json.loads((model / "dsa_meta.json").read_text())
  assert meta["calibration"] == table and meta["calibration_x0_delta"]["stop_rule"] == "x0_delta"
  assert cli_main(["sample", "--config", tiny, "--ckpt", str(model), "--out", str(out), "--prompt", "a",
                   "--mean-steps", "2.5"] + x0) == 0
  want = budget.threshold_for(meta["calibration_x0_delta"], 2.5)
  rec = json.loads((out / "a.steps.json").read_text())
  assert rec["threshold"] == (want if np.isfinite(want) else str(want)) and rec["stop_rule"] == "x0_delta"


TABLE_X0 = {"thresholds": [0.02, 0.05, 0.1, 0.2, 0.5], "mean_steps": [4.8, 4.0, 3.0, 2.4, 2.0], "min_steps": 2,
            "max_steps": 5, "stop_rule": "x0_delta"}


def test_a_table_of_the_x0_change_rule_runs_the_other_way():
  """Under the x0-change rule a larger tau stops frames sooner: the table is inverted from its other end, and its
  ends are +inf (fewest steps: stop at the second prediction) and -inf (never ready: max_steps)."""
  assert budget.threshold_for(TABLE_X0, 3.0) == pytest.approx(0.1)
  assert budget.threshold_for(TABLE_X0, 3.5) == pytest.approx(0.075)  # between 4.0 @ 0.05 and 3.0 @ 0.1
  assert budget.threshold_for(TABLE_X0, 2.0) == float("inf") and budget.threshold_for(TABLE_X0, 5.0) == float("-inf")
  with pytest.raises(budget.BudgetError, match="second step"):
    budget.threshold_for(dict(TABLE_X0, min_steps=1), 1.5)
  ctl = budget.FpsController(TABLE_X0, target_fps=10.0, initial_steps=3.0)
  assert ctl.threshold == pytest.approx(0.1)


class _X0Rule(_CrowdedHead):
  """Frames stop once their x0 change falls below tau; changes crowd near 0: average steps = 2 + 3 * clip(log10(0.5 /
  tau) / log10(0.5 / 1e-4), 0, 1) (2 at tau >= 0.5, 5 at tau <= 1e-4)."""

  def __init__(self):
    self.config = ml_collections.ConfigDict({"sampling": {"min_steps": 2, "max_steps": 5, "stop_rule": "x0_delta"}})

  def sample(self, params, contexts, tau, uncond_context=None):
    frac = np.clip(np.log10(0.5 / max(tau, 1e-12)) / np.log10(0.5 / 1e-4), 0.0, 1.0)
    return types.SimpleNamespace(steps=np.full((contexts.shape[0], self.num_frames), 2.0 + 3.0 * frac))


def test_calibration_of_the_x0_change_rule():
  """The grid (tau 0.02-0.98) gives this rule 2-3.1 steps: the table extends towards 0 until it holds the most steps,
  records its rule, and a budget read from it is what the rule then takes."""
  rule = _X0Rule()
  table = budget.calibration_table(rule, None, np.zeros((3, 2, 2)), refine_gap=0.1)
  assert table["stop_rule"] == "x0_delta" and min(table["thresholds"]) < 0.02
  assert max(table["mean_steps"]) >= 4.9 and min(table["mean_steps"]) == 2.0
  for m in (2.5, 3.5, 4.5):
    tau = budget.threshold_for(table, m)
    assert abs(float(rule.sample(None, np.zeros((1, 2, 2)), tau).steps.mean()) - m) < 0.1


def test_a_table_outside_its_step_range_is_refused():
  """A table whose averages leave [min_steps, max_steps] (all zeros from a calibration that sampled nothing) would
  turn every budget into the same end of tau: using it is an error naming the model and the range it should hold."""
  zeros = dict(TABLE, mean_steps=[0.0] * 5)
  with pytest.raises(budget.BudgetError, match=r"'m'.*1-5 steps.*outside \[min_steps, max_steps\] = \[1, 5\]"):
    budget.threshold_for(zeros, 2.5, source="'m'")
  with pytest.raises(budget.BudgetError, match="outside"):
    budget.controls_for_budget({"calibration": zeros}, 2.5, ml_collections.ConfigDict(
        {"sampling": {"min_steps": 1, "max_steps": 5, "ladder": (1000, 750, 500, 250, 125)}}))
  with pytest.raises(budget.BudgetError, match="outside"):
    budget.FpsController(dict(TABLE, mean_steps=[1.2, 1.8, 2.6, 3.4, 7.0]), target_fps=10.0)
  with pytest.raises(budget.BudgetError, match="as many mean_steps as thresholds"):
    budget.threshold_for(dict(TABLE, mean_steps=[1.2, 1.8]), 1.5)
  budget.check_table_values(dict(TABLE, mean_steps=[1.0, 1.8, 2.6, 3.4, 5.0]))  # its ends are fine


@pytest.mark.parametrize("batch", [0, -1])
def test_calibration_needs_a_batch_of_at_least_one(batch, tmp_path, capsys):
  """A batch below 1 sampled no prompt (range(0, n, -1) is empty) and stored a table of zeros: refused by the
  table's maker, by `calibrate` and by the command, each naming the batch, before any model loads."""
  with pytest.raises(budget.BudgetError, match=r"batch: expected .*at least 1"):
    budget.calibration_table(_CrowdedHead(), None, np.zeros((3, 2, 2)), batch=batch)
  from dsa_jax.checkpoint import params_io
  model = tmp_path / "model"
  model.mkdir()
  (model / params_io.META_FILE).write_text("{}")
  cfg = ml_collections.ConfigDict({"sampling": {"head": "", "stop_rule": "confidence"}})
  with pytest.raises(budget.BudgetError, match=r"--batch: expected at least 1"):
    budget.calibrate(cfg, str(model), num=2, batch=batch, log=lambda m: None)
  from dsa_jax import cli
  assert cli.main(["calibrate", "--config", "digits", "--ckpt", str(model), "--num", "2", "--batch", str(batch)]) == 2
  assert "--batch: expected at least 1" in capsys.readouterr().err


def test_calibrate_does_not_write_a_table_outside_its_step_range(tmp_path, monkeypatch):
  """Whatever went wrong in sampling, a table of averages outside the sampler's range never reaches the model."""
  from dsa_jax.checkpoint import loading, params_io
  from dsa_jax.sampling import sampler as sampler_lib
  model = tmp_path / "model"
  model.mkdir()
  (model / params_io.META_FILE).write_text("{}")
  monkeypatch.setattr(loading, "load_sampler_params", lambda *a, **k: ({}, {}))
  monkeypatch.setattr(sampler_lib, "make_sampler", lambda config: None)
  monkeypatch.setattr(budget, "calibration_inputs", lambda *a: (["p"], np.zeros((1, 2, 2)), None))
  monkeypatch.setattr(budget, "calibration_table", lambda *a, **k: dict(TABLE, mean_steps=[0.0] * 5))
  cfg = ml_collections.ConfigDict({"sampling": {"head": "", "stop_rule": "confidence", "guidance": 0.0},
                                   "data": {"prompts": {"kind": "digits"}}})
  with pytest.raises(budget.BudgetError, match=rf"{params_io.META_FILE}.*outside.*not written"):
    budget.calibrate(cfg, str(model), num=1, batch=1, log=lambda m: None)
  assert json.loads((model / params_io.META_FILE).read_text()) == {}
