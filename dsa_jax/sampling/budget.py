"""A step budget instead of a raw threshold: `mean_steps` -> tau through a calibration table stored with the model.

What a threshold tau means depends on the model's head, so users ask for an average number of denoising steps per
frame instead. `calibrate` samples a set of calibration prompts (the config's training prompts, not the held-out
ones) at a grid of thresholds and records the average steps of each; the table lives in the model checkpoint's
metadata (`calibration`), written by `dsa-jax calibrate`, or in a head folder's when the head came from one
(`--head`: the table belongs to the head, whose confidences it measures). `threshold_for` inverts it by linear
interpolation on the monotone envelope (average steps never fall as tau rises).

A tau gives its average only under the floor and ceiling (min_steps, max_steps) the table was made with, so a model
may carry one table per step range: the first in `calibration`, tables for other ranges beside it in
`calibration_ranges` ({"1-2": table}). `pick_table` chooses the one a budget uses: the sampler's own range where its
table covers the budget, else the table that covers it with the highest floor, then the lowest ceiling (a budget of
1.5 steps on a model whose default range is 2-3 uses its 1-2 table where it has one, else its 1-3 table).

A table also holds only for the first chunk's floor it was made with (`sampling.first_chunk_min_steps`, recorded in
the table): that floor lifts the fewest average steps a table can give above min_steps (`table_bounds`).

For streams, `FpsController` moves tau chunk by chunk from measured chunk times so that a stream holds a target
frame rate where the hardware allows it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dsa_jax.sampling.stop_rules import config_first_chunk_floor, config_stop_rule

DEFAULT_THRESHOLDS = tuple(float(t) for t in np.round(np.linspace(0.02, 0.98, 49), 4))
# The x0-change rule's tau is a mean |x0 change| between steps (latent units, small): a geometric grid.
DEFAULT_X0_THRESHOLDS = tuple(float(t) for t in np.round(np.geomspace(0.004, 1.0, 17), 5))


def meta_key(rule: str) -> str:
  """The metadata key of a stop rule's table: 'calibration' for the head's (in the model, or in a head folder),
  'calibration_x0_delta' for the x0-change rule's (in the model: it depends on the generator only)."""
  return "calibration" if rule == "confidence" else f"calibration_{rule}"


def ranges_key(rule: str) -> str:
  """The metadata key of a stop rule's tables for other step ranges than its first table's."""
  return f"{meta_key(rule)}_ranges"


def range_name(step_range: Sequence[int]) -> str:
  return f"{int(step_range[0])}-{int(step_range[1])}"


class BudgetError(ValueError):
  """A step budget cannot be honoured (no calibration table, or a budget outside what the table covers)."""


def table_rule(calibration: dict) -> str:
  """The stop rule a table was made for: 'confidence' (the head; tables without the field) or 'x0_delta'."""
  return str(calibration.get("stop_rule", "confidence"))


def fewest_steps(rule: str, min_steps: float, max_steps: float) -> float:
  """The fewest average steps per frame a rule can take: min_steps, or for the x0-change rule (which decides from
  its second prediction on) at least 2 where the ladder allows."""
  return max(min_steps, min(2.0, max_steps)) if rule == "x0_delta" else min_steps


def table_first_chunk(calibration: dict) -> int:
  """The first chunk's floor the table was made with (sampling.first_chunk_min_steps; 0 for tables without it)."""
  return int(calibration.get("first_chunk_min_steps", 0) or 0)


def table_bounds(calibration: dict) -> tuple[float, float]:
  """(fewest, most) average steps per frame the table's sampler can give: every frame at its floor (the rule's
  `fewest_steps`, the first chunk's frames at the first-chunk floor) or at max_steps."""
  lo, hi = table_step_range(calibration)
  per_frame = fewest_steps(table_rule(calibration), lo, hi)
  fc = table_first_chunk(calibration)
  if fc:
    c, f = int(calibration["chunk_frames"]), int(calibration["num_frames"])
    per_frame = (c * min(max(per_frame, fc), hi) + (f - c) * per_frame) / f
  return float(per_frame), float(hi)


def _table(calibration: dict) -> tuple[np.ndarray, np.ndarray]:
  """(taus, steps) ordered so that steps never fall: the monotone envelope of the table, read from the end where
  the rule takes the fewest steps (a confidence threshold gives more steps as it rises, an x0-change one fewer)."""
  taus = np.asarray(calibration["thresholds"], np.float64)
  steps = np.asarray(calibration["mean_steps"], np.float64)
  if table_rule(calibration) == "x0_delta":
    taus, steps = taus[::-1], steps[::-1]
  return taus, np.maximum.accumulate(steps)


def table_step_range(calibration: dict) -> tuple[int, int]:
  """(min_steps, max_steps) per frame the table was made with: a tau gives its average only under the same floor
  and ceiling (a floor of 2 steps moves every average of a table made with a floor of 1)."""
  return int(calibration["min_steps"]), int(calibration["max_steps"])


def check_table_values(calibration: dict, *, source: str = "the model", what: Optional[str] = None,
                       remedy: str = "remake it with `dsa-jax calibrate`"):
  """Raises unless every average of the table lies in its [min_steps, max_steps]: a table outside them (all zeros
  from a calibration that sampled nothing) would turn every budget into the same end of tau, without a word."""
  what = what or f"{source}: its calibration table"
  lo, hi = table_step_range(calibration)
  taus = np.asarray(calibration.get("thresholds", []), np.float64).reshape(-1)
  steps = np.asarray(calibration.get("mean_steps", []), np.float64).reshape(-1)
  if not steps.size or steps.size != taus.size:
    raise BudgetError(f"{what} is malformed: expected as many mean_steps as thresholds (at "
                      f"least one), got {steps.size} and {taus.size}; {remedy}")
  bad = steps[~(np.isfinite(steps) & (steps >= lo - 1e-6) & (steps <= hi + 1e-6))]
  if bad.size:
    raise BudgetError(f"{what} ({range_name((lo, hi))} steps per frame) holds average steps "
                      f"outside [min_steps, max_steps] = [{lo}, {hi}] (e.g. {float(bad[0]):g}, {bad.size} of "
                      f"{steps.size}): it does not describe a sampler; {remedy}")


def threshold_for(calibration: Optional[dict], mean_steps: float, *, source: str = "the model",
                  step_range: Optional[tuple[int, int]] = None, ladder: Optional[Sequence[float]] = None,
                  first_chunk: Optional[int] = None) -> float:
  """tau whose calibrated average steps per frame is `mean_steps` (+inf / -inf at the table's ends).

  `step_range`: the (min_steps, max_steps) the sampler will use; `ladder`: its timestep ladder
  (config.sampling.ladder); `first_chunk`: its first chunk's floor (config.sampling.first_chunk_min_steps). A table
  made with another range, ladder or first-chunk floor is an error (its taus would give other averages)."""
  if not calibration:
    raise BudgetError(f"{source} has no step-budget calibration table; make one with `dsa-jax calibrate --config "
                      "CONFIG --ckpt MODEL [--head DIR]` with the sampling overrides you sample with (e.g. "
                      "--config.sampling.stop_rule=x0_delta), or pass --threshold instead of --mean-steps")
  m = float(mean_steps)
  if not math.isfinite(m):
    raise BudgetError(f"--mean-steps: expected a finite number, got {mean_steps!r}")
  check_table_fits(calibration, step_range=step_range, ladder=ladder, first_chunk=first_chunk, source=source)
  check_table_values(calibration, source=source)
  lo, hi = float(calibration["min_steps"]), float(calibration["max_steps"])
  if not lo <= m <= hi:
    raise BudgetError(f"--mean-steps {m:g}: must lie in [min_steps, max_steps] = [{lo:g}, {hi:g}]")
  rule = table_rule(calibration)
  if m < fewest_steps(rule, lo, hi):
    raise BudgetError(f"--mean-steps {m:g}: the x0-change rule (sampling.stop_rule='x0_delta') decides from the "
                      "second step on, so it takes at least 2 steps per frame; smaller budgets need the confidence head")
  floor = table_bounds(calibration)[0]
  if m < floor - 1e-9:
    fc = table_first_chunk(calibration)
    raise BudgetError(f"--mean-steps {m:g}: the {range_name((lo, hi))} steps table of {source} gives at least "
                      f"{floor:.4g} steps per frame on average (its first chunk takes at least {min(fc, int(hi))} "
                      f"steps, sampling.first_chunk_min_steps={fc}); ask for {floor:.4g} or more, or for less with a "
                      "table of a lower floor (`dsa-jax calibrate ... --config.sampling.min_steps=N "
                      "--config.sampling.first_chunk_min_steps=N`, sampled with the same)")
  fewest, most = (float("-inf"), float("inf")) if rule == "confidence" else (float("inf"), float("-inf"))
  taus, steps = _table(calibration)
  if m <= steps[0]:
    return fewest if m <= floor else float(taus[0])
  if m >= steps[-1]:
    return most if m >= hi else float(taus[-1])
  i = int(np.searchsorted(steps, m, side="left"))
  s0, s1, t0, t1 = steps[i - 1], steps[i], taus[i - 1], taus[i]
  return float(t0 if s1 == s0 else t0 + (m - s0) * (t1 - t0) / (s1 - s0))


def check_step_range(calibration: dict, step_range: Optional[tuple[int, int]], *, source: str = "the model"):
  """Raises when the sampler's (min_steps, max_steps) differ from those the calibration table was made with."""
  if step_range is None:
    return
  lo, hi = table_step_range(calibration)
  mn, mx = (int(v) for v in step_range)
  if (mn, mx) != (lo, hi):
    raise BudgetError(
        f"{source}: its calibration table was made with {lo}-{hi} steps per frame, the sampler is set to {mn}-{mx} "
        f"(--min-steps / --max-steps, config.sampling.min_steps / max_steps); a budget needs the table's range: use "
        f"--min-steps {lo} --max-steps {hi}, or make a table for {mn}-{mx} with `dsa-jax calibrate ... "
        f"--config.sampling.min_steps={mn} --config.sampling.max_steps={mx}`")


def sampling_mismatch(calibration: dict, ladder: Optional[Sequence[float]], first_chunk: Optional[int] = None, *,
                      source: str = "the model") -> Optional[str]:
  """Why the table cannot serve a sampler on timestep ladder `ladder` with first-chunk floor `first_chunk` (made with
  other ones), or None (the same, nothing given to compare, or a table that predates the ladder's record and is
  taken as it is)."""
  made_fc = table_first_chunk(calibration)
  if first_chunk is not None and made_fc != int(first_chunk):
    fc = int(first_chunk)
    return (f"{source}: its calibration table was made with sampling.first_chunk_min_steps={made_fc}, the sampler "
            f"uses {fc}: the first chunk's floor moves every average; sample with "
            f"--config.sampling.first_chunk_min_steps={made_fc}, or make a table with `dsa-jax calibrate ... "
            f"--config.sampling.first_chunk_min_steps={fc}`")
  made = calibration.get("ladder")
  if ladder is None or made is None:
    return None
  want, have = [float(x) for x in made], [float(x) for x in ladder]
  if want == have:
    return None
  fmt = lambda xs: "(" + ",".join(f"{x:g}" for x in xs) + ")"
  return (f"{source}: its calibration table was made with the timestep ladder {fmt(want)}, the sampler uses "
          f"{fmt(have)} (config.sampling.ladder): a threshold gives other step counts on another ladder; sample with "
          f"--config.sampling.ladder='{fmt(want)}', or make a table for this ladder with `dsa-jax calibrate ... "
          f"--config.sampling.ladder='{fmt(have)}'`")


def check_table_fits(calibration: dict, *, step_range: Optional[tuple[int, int]] = None,
                     ladder: Optional[Sequence[float]] = None, first_chunk: Optional[int] = None,
                     source: str = "the model"):
  """Raises when the table was made on another timestep ladder or first-chunk floor (checked first: there its step
  range means nothing either) or with another (min_steps, max_steps) than the sampler's."""
  why = sampling_mismatch(calibration, ladder, first_chunk, source=source)
  if why:
    raise BudgetError(why)
  check_step_range(calibration, step_range, source=source)


def source_tables(source: dict) -> list[dict]:
  """Every calibration table of a `load_sampler_params` source: its first table, then those of other step ranges."""
  first = source.get("calibration")
  more = source.get("calibration_ranges") or {}
  return ([first] if first else []) + [t for _, t in sorted(more.items()) if t]


def pick_table(source: dict, mean_steps: Optional[float], *, step_range: Optional[Sequence[int]] = None,
               prefer: Optional[Sequence[int]] = None, ladder: Optional[Sequence[float]] = None,
               first_chunk: Optional[int] = None) -> Optional[dict]:
  """The table a budget of `mean_steps` uses among the source's tables (None when it has none).

  `step_range`: the range the user fixed (--min-steps / --max-steps): its table, else the first (whose mismatch the
  caller's check then names). Otherwise the table of `prefer` (the config's range) where it covers the budget, else
  the first table where it covers it, else the covering table with the highest floor, then the lowest ceiling; a
  table covers the averages of its `table_bounds`; tables made on another ladder than `ladder` or with another
  first-chunk floor than `first_chunk` are passed over. With no covering table, the nearest one (the caller's range
  check then says what it covers)."""
  tables = source_tables(source)
  if not tables:
    return None
  if step_range is not None:
    want = tuple(int(v) for v in step_range)
    return next((t for t in tables if table_step_range(t) == want), tables[0])
  if mean_steps is None or not math.isfinite(float(mean_steps)):
    return tables[0]
  m = float(mean_steps)
  covers = [t for t in tables if sampling_mismatch(t, ladder, first_chunk) is None
            and table_bounds(t)[0] - 1e-9 <= m <= table_bounds(t)[1]]
  if prefer is not None:
    own = [t for t in covers if table_step_range(t) == tuple(int(v) for v in prefer)]
    if own:
      return own[0]
  if not covers:
    usable = [t for t in tables if sampling_mismatch(t, ladder, first_chunk) is None] or tables[:1]
    return min(usable, key=lambda t: max(table_bounds(t)[0] - m, m - table_bounds(t)[1]))
  if covers[0] is tables[0]:
    return tables[0]
  # the highest floor, then the lowest ceiling: of a 1-2 and a 1-3 table, a budget of 1.8 uses the 1-2 one, which
  # cannot spend steps on a third step while other frames stop after one
  return min(covers, key=lambda t: (-table_step_range(t)[0], table_step_range(t)[1]))


def stored_tables(meta: dict, rule: str, table: dict) -> dict[str, Any]:
  """The metadata updates that store `table` (made for `rule`) beside a model's or head folder's existing tables:
  it becomes the first table when there is none, when the first was made with the same step range or on another
  ladder (it is remade), else it joins the tables of other step ranges under its range's name."""
  key, more_key = meta_key(rule), ranges_key(rule)
  first = meta.get(key)
  rng = table_step_range(table)
  made_with = (table.get("ladder"), table_first_chunk(table))
  if not first or table_step_range(first) == rng or sampling_mismatch(first, *made_with):
    # tables of another range made on another ladder or first-chunk floor go with the first one they stood beside
    more = {k: v for k, v in (meta.get(more_key) or {}).items()
            if k != range_name(rng) and not sampling_mismatch(v, *made_with)}
    return {key: table, more_key: more} if more_key in meta else {key: table}
  more = dict(meta.get(more_key) or {})
  more[range_name(rng)] = table
  return {more_key: more}


def budget_controls(calibration: Optional[dict], mean_steps: float, *, source: str = "the model",
                    ladder: Optional[Sequence[float]] = None, first_chunk: Optional[int] = None) -> dict[str, Any]:
  """The sampler controls of a step budget: tau from the table and the table's own step range, ready for
  `sampler.make_controls(batch, **budget_controls(table, 2.5))`; `ladder` (config.sampling.ladder) and
  `first_chunk` (config.sampling.first_chunk_min_steps) are checked against the table's."""
  tau = threshold_for(calibration, mean_steps, source=source, ladder=ladder, first_chunk=first_chunk)
  lo, hi = table_step_range(calibration)
  return {"threshold": tau, "min_steps": lo, "max_steps": hi}


def sampler_settings(config) -> dict[str, Any]:
  """What a table must have been made with to serve `config`'s sampler besides its step range, as the keyword
  arguments `ladder` and `first_chunk` of `pick_table`, `threshold_for`, `check_table_fits`, `sampling_mismatch`."""
  return {"ladder": config.sampling.ladder, "first_chunk": config_first_chunk_floor(config)}


def controls_for_budget(source: dict, mean_steps: float, config, *, source_name: str = "the model"
                        ) -> dict[str, Any]:
  """`budget_controls` of a `load_sampler_params` source: the table of the step range that covers `mean_steps` (the
  config's own range where it does, `pick_table`), checked against the config's ladder and first-chunk floor:
  `sampler.make_controls(1, **controls_for_budget(source, 1.5, config))`."""
  s, made_with = config.sampling, sampler_settings(config)
  table = pick_table(source, mean_steps, prefer=(int(s.min_steps), int(s.max_steps)), **made_with)
  return budget_controls(table, mean_steps, source=source_name, **made_with)


def _check_batch(batch, name: str):
  if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
    raise BudgetError(f"{name}: expected at least 1 prompt per compiled batch (a whole number), got {batch!r}")


def calibration_table(sampler, params, contexts: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                      batch: int = 64, seed: int = 0, guidance: float = 0.0, uncond=None, refine_gap: float = 0.15,
                      refine_rounds: int = 3, extend_rounds: int = 4,
                      log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Average steps per frame at each threshold over `contexts` (N, text_len, text_dim); one compiled program.

  Where the grid's lowest (highest) threshold still gives more (fewer) than min_steps (max_steps) by over
  `refine_gap`, thresholds ten times closer to 0 (to 1) are added, for up to `extend_rounds` rounds: a head whose
  confidences crowd an end of (0, 1) (the 'remaining' target is about 0.04 after the first step) otherwise leaves
  small budgets out of the table. Under the x0-change rule (`sampling.stop_rule='x0_delta'`, tau = the largest
  mean |x0 change| at which a frame stops; fewer steps as tau rises, never fewer than 2) the ends are extended the
  other way: ten times closer to 0 while the lowest tau gives too few steps, ten times larger while the highest
  gives too many. Where neighbouring thresholds differ by more than `refine_gap` average steps (a
  head's confidences often bunch in a narrow band of tau), their midpoint is added, for up to `refine_rounds`
  rounds, so that interpolating the table lands within a small fraction of a step of the request."""
  _check_batch(batch, "batch")
  s = sampler.config.sampling
  n = contexts.shape[0]
  if n < 1:
    raise BudgetError("contexts: expected at least one calibration prompt, got none")
  b = min(int(batch), n)
  uc = None if uncond is None else np.broadcast_to(uncond, (b,) + uncond.shape[1:])
  t0 = time.time()

  def mean_steps(tau):
    total = 0.0
    for start in range(0, n, b):
      idx = np.minimum(np.arange(start, start + b), n - 1)
      controls = sampler.make_controls(b, threshold=float(tau), guidance=guidance,
                                       seed=seed + np.arange(start, start + b))
      out = sampler.sample(params, contexts[idx], controls, uncond_context=uc)
      total += float(np.asarray(out.steps)[:min(b, n - start)].sum())
    avg = total / (n * sampler.num_frames)
    log(f"  tau {float(tau):.4g}: {avg:.3f} steps per frame ({time.time() - t0:.0f} s)")
    return avg

  rule = config_stop_rule(sampler.config)
  table = {float(t): mean_steps(t) for t in thresholds}
  fc = config_first_chunk_floor(sampler.config)
  made_with = {"min_steps": int(s.min_steps), "max_steps": int(s.max_steps)}
  if rule != "confidence":
    made_with["stop_rule"] = rule
  if fc:  # what turns the floor into the fewest average (`table_bounds`)
    made_with.update(first_chunk_min_steps=fc, chunk_frames=int(sampler.chunk_frames),
                     num_frames=int(sampler.num_frames))
  lo, hi = table_bounds(made_with)  # the fewest average steps reachable (a first-chunk floor lifts it above min_steps)
  for _ in range(int(extend_rounds)):
    taus = sorted(table)
    ends = []
    if rule == "x0_delta":
      if table[taus[0]] < hi - refine_gap and taus[0] > 0.0:
        ends.append(taus[0] / 10.0)
      if table[taus[-1]] > lo + refine_gap and taus[-1] > 0.0:
        ends.append(taus[-1] * 10.0)
    else:
      if table[taus[0]] > lo + refine_gap and 0.0 < taus[0] <= 1.0:
        ends.append(taus[0] / 10.0)
      if table[taus[-1]] < hi - refine_gap and 0.0 <= taus[-1] < 1.0:
        ends.append(1.0 - (1.0 - taus[-1]) / 10.0)
    if not ends:
      break
    table.update({float(t): mean_steps(t) for t in ends})
  for _ in range(int(refine_rounds)):
    taus = sorted(table)
    new = [(a + c) / 2 for a, c in zip(taus, taus[1:]) if abs(table[c] - table[a]) > refine_gap]
    if not new:
      break
    table.update({float(t): mean_steps(t) for t in new})
  taus = sorted(table)
  log(f"calibrated {len(taus)} thresholds on {n} prompts in {time.time() - t0:.1f}s")
  out = {"thresholds": taus, "mean_steps": [table[t] for t in taus], "num_prompts": int(n), "seed": int(seed),
         **made_with}
  ladder = s.get("ladder")
  if ladder is not None:  # what the taus mean depends on it (see `sampling_mismatch`)
    out["ladder"] = [float(x) for x in ladder]
  return out


def calibration_prompts(config, num: int, prompt_file: Optional[str] = None) -> list[str]:
  """The first `num` prompts of `prompt_file` (one per line), else of the config's training prompts: calibration
  never sees the held-out evaluation prompts; a file of prompts like the ones a user will sample fits best."""
  from dsa_jax.data import prompts as prompts_lib
  try:
    src = (prompts_lib.TextPromptSource(prompt_file) if prompt_file
           else prompts_lib.prompt_source_from_config(config.data.prompts))
  except prompts_lib.PromptFileError as e:
    raise BudgetError(f"calibration prompts come from config.data.prompts: {e}") from None
  n = min(int(num), len(src))
  out = []
  for i in range(n):
    item = src[i]
    out.append(item["prompt"] if isinstance(item, dict) else str(item))
  return out


class FpsController:
  """Chunk-by-chunk threshold control for streams: after each chunk, the measured seconds per frame move tau so that
  the stream holds `target_fps` (fewer steps when too slow, more when there is time to spare).

  Multiplicative control on the step budget: budget <- budget * (measured fps / target fps) ** gain, clipped to
  [min_steps, max_steps]; tau follows from the calibration table. The clock is injectable (tests simulate it)."""

  def __init__(self, calibration: dict, target_fps: float, *, initial_steps: Optional[float] = None,
               gain: float = 0.7):
    if not target_fps > 0 or not math.isfinite(target_fps):
      raise BudgetError(f"--target-fps: expected a positive number, got {target_fps!r}")
    if not calibration:
      raise BudgetError("--target-fps needs the model's step-budget calibration table (dsa-jax calibrate)")
    check_table_values(calibration, source="the model (--target-fps)")
    self.calibration, self.target, self.gain = calibration, float(target_fps), float(gain)
    self.lo, self.hi = table_bounds(calibration)
    self.budget = float(initial_steps) if initial_steps is not None else (self.lo + self.hi) / 2

  @property
  def threshold(self) -> float:
    return threshold_for(self.calibration, self.budget)

  def update(self, frames: int, seconds: float) -> float:
    """Records one chunk (`frames` frames in `seconds`) and returns the threshold for the next chunk."""
    if seconds > 0 and frames > 0:
      fps = frames / seconds
      self.budget = float(np.clip(self.budget * (fps / self.target) ** self.gain, self.lo, self.hi))
    return self.threshold


def check_model_folder(ckpt: str, what: str):
  """Raises unless `ckpt` is an exported model folder, whose metadata is where `what` is stored."""
  import os

  from dsa_jax.checkpoint import params_io
  if not ckpt or not os.path.isfile(os.path.join(ckpt, params_io.META_FILE)):
    raise BudgetError(f"--ckpt {ckpt!r}: expected an exported model folder (with {params_io.META_FILE}); {what} is "
                      "stored in its metadata (export a training workdir first)")


def calibration_inputs(config, num: int, prompt_file: Optional[str] = None) -> tuple[list[str], np.ndarray, Any]:
  """(prompts, their text contexts, the negative prompt's context or None without guidance) of a calibration on
  `calibration_prompts`."""
  from dsa_jax.data.text_context import make_text_encoder
  encode = make_text_encoder(config)
  prompts = calibration_prompts(config, num, prompt_file)
  uncond = (np.asarray(encode([config.text.negative_prompt]), np.float32) if float(config.sampling.guidance) != 0.0
            else None)
  return prompts, np.asarray(encode(prompts), np.float32), uncond


def calibration_prompts_note(config, count: int, prompt_file: Optional[str] = None) -> str:
  """Where a calibration's `count` prompts came from, as its record says."""
  return (f"{prompt_file}, first {count}" if prompt_file else
          f"config.data.prompts ({config.data.prompts.kind}), first {count}")


def calibrate(config, ckpt: str, *, num: int = 256, thresholds: Optional[Sequence[float]] = None,
              batch: int = 64, seed: int = 0, write: bool = True, prompt_file: Optional[str] = None,
              refine_gap: float = 0.05, head: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Makes the calibration table of the model at `ckpt` (a model folder) on the config's training prompts and, with
  `write`, stores it in the model's metadata, where `--mean-steps` finds it. With a head folder (`head`, default
  config.sampling.head) the head comes from there and the table goes into the head folder's metadata, not the
  model's: the model's own table stays that of its own head."""
  import os

  from dsa_jax.checkpoint import loading, params_io
  from dsa_jax.sampling.sampler import make_sampler

  head = loading.config_head(config) if head is None else head
  if not head:
    check_model_folder(ckpt, "the table")
  if head and not ckpt:
    raise BudgetError(f"--head {head!r}: needs the generator it was trained with as --ckpt (a model folder or "
                      "training workdir); got none")
  if int(num) < 1:
    raise BudgetError(f"--num: expected at least 1 calibration prompt, got {num}")
  _check_batch(batch, "--batch")
  if not refine_gap > 0:
    raise BudgetError(f"--refine-gap: expected a positive number of steps, got {refine_gap!r}")
  rule = config_stop_rule(config)
  if rule != "confidence" and head:
    raise BudgetError(f"--head {head!r}: the x0-change rule (sampling.stop_rule={rule!r}) uses no confidence head; "
                      "its table goes into the model folder (--ckpt)")
  params, source = loading.load_sampler_params(config, ckpt, warn=log, cast=True, head=head)
  if thresholds is None:
    thresholds = DEFAULT_THRESHOLDS if rule == "confidence" else DEFAULT_X0_THRESHOLDS
  sampler = make_sampler(config)
  prompts, contexts, uncond = calibration_inputs(config, num, prompt_file)
  g = float(config.sampling.guidance)
  table = calibration_table(sampler, params, contexts, thresholds, batch=batch, seed=seed, guidance=g, uncond=uncond,
                            refine_gap=refine_gap, refine_rounds=5, log=log)
  table["prompts"] = calibration_prompts_note(config, len(prompts), prompt_file)
  owner = head or ckpt
  # never store (or print as a result) a table that no sampler of its range could have given
  check_table_values(table, what=f"the calibration table made for {os.path.join(owner, params_io.META_FILE)!r}",
                     remedy="it was not written" if write else "it is not a result")
  if write:
    updates = stored_tables(params_io.read_meta(owner), rule, table)
    params_io.update_meta(owner, **updates)
    where = ("" if meta_key(rule) in updates else
             f" for {range_name(table_step_range(table))} steps per frame, beside its table for another step range")
    log(f"wrote the calibration table{'' if rule == 'confidence' else ' of the x0-change rule'}{where} into "
        f"{os.path.join(owner, params_io.META_FILE)}")
  return table
