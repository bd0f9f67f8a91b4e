"""Config-driven sweeps: a grid (or list) of config points, run as sampling, evaluation or training, in one table.

A point is a dict {field: value} over any config fields (`sampling.threshold`, `train.lr`, ...). Points come from
`--sweep FIELD=SPEC` grids (SPEC: `a:b:n` for n evenly spaced values, `v1,v2,...`, or a Python list literal) or from
the config file's `get_sweep(arg)` beside its `get_config(arg)` (a list of point dicts, or a dict field -> values
that is expanded as a grid). Every point becomes `--config.FIELD=VALUE` overrides on top of the base config, so each
row of the table carries the exact command that reproduces it.

Kinds:
  sample  samples the same prompts at every point; points that differ only in the sampler's traced controls
          (threshold, min/max steps, guidance, seed) share one compiled program.
  eval    the digits benchmark (`dsa_jax.eval.claim.Benchmark`: evaluator FD, prompt agreement, steps, FPS) per point.
  train   one workdir per point, named by its config diff; run here one after another, or printed as launch
          commands (`launch/gpu_local.sh`, `launch/tpu_pod.sh`).

Resumable: each finished point leaves OUT/points/NAME/result.json and is not rerun; a failed point is recorded with
its error (and retried by the next run) and does not stop the others. The run options that change results (checkpoint,
prompt, number of videos or prompts, seed, evaluator, ...) are stored in OUT/sweep.json and each point's record: a
rerun into the same folder with other options is refused, since its skipped points would report the old ones.
"""

from __future__ import annotations

import ast
import csv
import itertools
import json
import math
import os
import re
import shlex
import time
import traceback
from typing import Callable, Optional, Sequence

import numpy as np

from dsa_jax.atomic import write_figure
from dsa_jax.config_lib import ConfigError

KINDS = ("sample", "eval", "train")
# Fields the sampler takes as traced inputs (SamplingControls): changing them never recompiles.
CONTROL_FIELDS = ("sampling.threshold", "sampling.min_steps", "sampling.max_steps", "sampling.guidance", "seed")
# Fields the benchmark takes per run (the rest of a point's diff needs its own benchmark).
EVAL_RUN_FIELDS = ("sampling.threshold", "sampling.min_steps", "sampling.max_steps")
DEFAULT_METRIC = {"sample": "mean_steps", "eval": "fd", "train": None}
DEFAULT_PROMPT = "digits 3 and 7 move slowly; then an 8 enters"
# Per kind, the run options that change a point's results, with their defaults (seed None: the point's config.seed).
# Only these are compared on a rerun into the same folder: the others (--videos, --metric) may change on a resume.
RESULT_OPTIONS = {
    "sample": {"ckpt": None, "prompt": DEFAULT_PROMPT, "num": 4, "seed": None},
    "eval": {"ckpt": None, "num": 256, "seed": None, "evaluator": None, "batch": 32, "num_real": 1000,
             "fps_prompts": 8},
    "train": {},
}


class SweepError(ConfigError):
  """Bad sweep input (field, values, output folder); raised before any point runs."""


# ----------------------------------------------------------------------------------------------------------------------
# Points


def _strip(field: str) -> str:
  field = field.strip()
  field = field[2:] if field.startswith("--") else field
  return field[len("config."):] if field.startswith("config.") else field


def _lookup(config, field: str):
  import ml_collections
  node = config
  parts = field.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(f"sweep field {field!r}: the config has no field {'.'.join(parts[:i + 1])!r}")
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f"sweep field {field!r}: is a section of the config, not a field (name one of its fields: "
                     f"{', '.join(field + '.' + k for k in node.keys())})")
  return node


def check_value(config, field: str, value):
  """The value coerced to the field's type (int for integral floats of an int field, float for an int of a float
  field); a SweepError naming the field otherwise."""
  old = _lookup(config, field)
  bad = lambda want: SweepError(f"sweep field {field!r}: expected {want}, got {value!r}")
  if old is None:
    return value
  if isinstance(old, bool):
    if not isinstance(value, bool):
      raise bad("True or False")
    return value
  if isinstance(old, int):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad("an int")
    if isinstance(value, float):
      if not math.isfinite(value) or value != int(value):
        raise bad("an int")
      value = int(value)
    return value
  if isinstance(old, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad("a number")
    if math.isnan(value):
      raise bad("a number (inf allowed)")
    return float(value)
  if isinstance(old, str):
    if not isinstance(value, str):
      raise bad("a string")
    return value
  if isinstance(old, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      raise bad("a list or tuple")
    return type(old)(value)
  return value


def _literal(text: str):
  text = text.strip()
  if text in ("inf", "+inf", "-inf"):
    return float(text)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as bfloat16


def parse_axis(text: str) -> tuple[str, list]:
  """'FIELD=a:b:n' | 'FIELD=v1,v2' | 'FIELD=[...]' | 'FIELD=v' -> (field, values); values not yet type-checked."""
  if "=" not in text:
    raise SweepError(f"--sweep {text!r}: expected FIELD=VALUES (a:b:n, v1,v2,... or a list)")
  field, _, spec = text.partition("=")
  field, spec = _strip(field), spec.strip()
  if not field:
    raise SweepError(f"--sweep {text!r}: no field name before '='")
  if not spec:
    raise SweepError(f"--sweep {field}: no values after '='")
  if spec.startswith("["):
    values = _literal(spec)
    if not isinstance(values, list):
      raise SweepError(f"--sweep {field}: {spec!r} is not a list literal")
  elif spec.count(":") == 2 and "," not in spec:
    a, b, n = (_literal(p) for p in spec.split(":"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
      raise SweepError(f"--sweep {field}={spec}: a range needs numbers START:STOP:COUNT")
    if not isinstance(n, int) or isinstance(n, bool):
      raise SweepError(f"--sweep {field}={spec}: COUNT must be an int, got {n!r}")
    if n < 1:
      raise SweepError(f"--sweep {field}={spec}: empty range (COUNT must be >= 1, got {n})")
    values = [round(float(v), 12) for v in np.linspace(float(a), float(b), n)]
    if isinstance(a, int) and isinstance(b, int) and all(v == int(v) for v in values):
      values = [int(v) for v in values]
  else:
    parts = spec.split(",")
    if any(not p.strip() for p in parts):
      raise SweepError(f"--sweep {field}={spec}: an empty value in the list")
    values = [_literal(p) for p in parts]
  if not values:
    raise SweepError(f"--sweep {field}: no values")
  return field, values


def grid(axes: Sequence[tuple[str, list]]) -> list[dict]:
  """The cartesian product of (field, values) axes, the first axis varying slowest."""
  fields = [f for f, _ in axes]
  dup = {f for f in fields if fields.count(f) > 1}
  if dup:
    raise SweepError(f"--sweep: field {sorted(dup)[0]!r} given twice")
  return [dict(zip(fields, combo)) for combo in itertools.product(*[v for _, v in axes])]


def load_sweep(spec: str) -> Optional[list[dict]]:
  """The points of the config file's `get_sweep(arg)` (None when it defines none).

  get_sweep returns a list of {field: value} dicts, or one {field: [values]} dict expanded as a grid.
  """
  from dsa_jax import config_lib
  module = config_lib._load_module(spec)  # the same file and arg resolution as get_config
  if not hasattr(module, "get_sweep"):
    return None
  path, _, arg = spec.partition(":")
  out = module.get_sweep(arg or None)
  if isinstance(out, dict):
    for f, v in out.items():
      if not isinstance(v, (list, tuple)) or not v:
        raise SweepError(f"{path}: get_sweep()[{f!r}]: expected a non-empty list of values, got {v!r}")
    return grid([(_strip(f), list(v)) for f, v in out.items()])
  if not isinstance(out, (list, tuple)) or not all(isinstance(p, dict) for p in out):
    raise SweepError(f"{path}: get_sweep must return a list of {{field: value}} dicts or a {{field: [values]}} "
                     f"dict, got {type(out).__name__}")
  return [{_strip(f): v for f, v in p.items()} for p in out]


def format_value(v) -> str:
  """A value as an override string that `--config.FIELD=...` parses back to it (inf as 1e999)."""
  if isinstance(v, float) and math.isinf(v):
    return "1e999" if v > 0 else "-1e999"
  if isinstance(v, str):
    return v if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", v) and _literal(v) == v else repr(v)
  return repr(v)


def _short(v) -> str:
  if isinstance(v, float):
    return f"{v:.6g}"
  if isinstance(v, (list, tuple)):
    return "-".join(_short(x) for x in v)
  return str(v)


def point_names(points: Sequence[dict]) -> list[str]:
  """A folder-safe name per point from its diff: last field component = value, joined by '_' (full dotted names
  where last components collide); unique."""
  fields = list(dict.fromkeys(f for p in points for f in p))
  leaves = [f.split(".")[-1] for f in fields]
  label = {f: (l if leaves.count(l) == 1 else f) for f, l in zip(fields, leaves)}
  names = []
  for p in points:
    name = "_".join(f"{label[f]}={_short(v)}" for f, v in p.items()) or "base"
    names.append(re.sub(r"[^A-Za-z0-9._=+-]", "-", name)[:150])
  seen = {}
  for i, n in enumerate(names):
    if names.count(n) > 1:
      seen[n] = seen.get(n, 0) + 1
      names[i] = f"{n}_{seen[n]}"
  return names


class Point:
  """One sweep point: its name, diff {field: value}, `--config.` overrides and validated config."""

  def __init__(self, name: str, diff: dict, overrides: list[str], config):
    self.name, self.diff, self.overrides, self.config = name, diff, overrides, config

  def key(self, ignore: Sequence[str]) -> tuple:
    return tuple((f, repr(v)) for f, v in self.diff.items() if f not in ignore)


def build_points(config_spec: str, base_overrides: Sequence[str], axes: Sequence[str] = (),
                 points: Optional[list[dict]] = None) -> list[Point]:
  """Parses and checks every point (fields, types, whole-config validation) before anything runs."""
  from dsa_jax.config_lib import get_config

  base = get_config(config_spec, base_overrides)
  if axes:
    points = grid([parse_axis(a) for a in axes])
  elif points is None:
    points = load_sweep(config_spec)
    if points is None:
      raise SweepError(f"nothing to sweep: give --sweep FIELD=VALUES or define get_sweep(arg) in "
                       f"{config_spec.partition(':')[0]}")
  if not points:
    raise SweepError("the sweep has no points")
  checked = [{f: check_value(base, f, v) for f, v in p.items()} for p in points]
  out = []
  for name, diff in zip(point_names(checked), checked):
    overrides = [f"--config.{f}={format_value(v)}" for f, v in diff.items()]
    try:
      config = get_config(config_spec, list(base_overrides) + overrides)
    except ConfigError as e:
      raise SweepError(f"sweep point {name}: {e}") from None
    out.append(Point(name, diff, overrides, config))
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Commands that reproduce a point


def _cmd(parts: Sequence[str]) -> str:
  return " ".join(shlex.quote(str(p)) for p in parts)


def point_seed(opts: dict, config) -> int:
  """The noise seed of a point: --seed when given, else its own config.seed (so a swept seed reaches it)."""
  return int(config.seed if opts.get("seed") is None else opts["seed"])


def result_options(kind: str, opts: dict, config) -> dict:
  """The options of `opts` that change this kind's results, defaults filled in so that leaving an option out and
  giving its default compare equal; seed resolved against `config`."""
  out = {}
  for k, default in RESULT_OPTIONS[kind].items():
    v = opts.get(k)
    out[k] = default if v is None or (k == "prompt" and not v) else v
  if "seed" in out:
    out["seed"] = point_seed(opts, config)
  return out


def point_command(kind: str, config_spec: str, base_overrides: Sequence[str], point: Point, out_dir: str,
                  opts: dict) -> str:
  over = list(base_overrides) + point.overrides
  ckpt = ["--ckpt", opts["ckpt"]] if opts.get("ckpt") is not None else []
  if kind == "sample":
    return _cmd(["dsa-jax", "sample", "--config", config_spec, "--out", os.path.join(out_dir, "points", point.name),
                 "--prompt", opts.get("prompt") or DEFAULT_PROMPT, "--seed", point_seed(opts, point.config), *ckpt,
                 *over])
  if kind == "eval":
    ev = ["--evaluator", opts["evaluator"]] if opts.get("evaluator") else []
    return _cmd(["dsa-jax", "eval", "--config", config_spec, "--out", os.path.join(out_dir, "points", point.name),
                 "--num", opts.get("num", 256), "--batch", opts.get("batch", 32),
                 "--seed", point_seed(opts, point.config), "--num-real", opts.get("num_real", 1000),
                 "--fps-prompts", opts.get("fps_prompts", 8), *ckpt, *ev, *over])
  return _cmd(["dsa-jax", "train", "--config", config_spec, "--workdir", train_workdir(out_dir, point), *over])


def launch_command(launcher: str, config_spec: str, base_overrides: Sequence[str], point: Point, out_dir: str, *,
                   tpu: str = "TPU_NAME", zone: str = "ZONE") -> str:
  """The per-point training command for a launch script (gpu: launch/gpu_local.sh, tpu: launch/tpu_pod.sh)."""
  over = list(base_overrides) + point.overrides
  workdir = train_workdir(out_dir, point)
  if launcher == "gpu":
    return _cmd(["bash", "launch/gpu_local.sh", config_spec, workdir, *over])
  if launcher == "tpu":
    return _cmd(["bash", "launch/tpu_pod.sh", tpu, zone, config_spec, workdir, *over])
  return point_command("train", config_spec, base_overrides, point, out_dir, {})


def train_workdir(out_dir: str, point: Point) -> str:
  return os.path.join(out_dir, "runs", point.name)


# ----------------------------------------------------------------------------------------------------------------------
# Runners: each returns (metrics dict, artifacts dict) for one point, or raises.


def _scalars(d: dict) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, (bool, np.bool_)):
      out[k] = bool(v)
    elif isinstance(v, (int, float, np.integer, np.floating)) or (isinstance(v, np.ndarray) and v.ndim == 0):
      out[k] = float(v) if not isinstance(v, (int, np.integer)) else int(v)
  return out


class SampleRunner:
  """Samples `num` copies of one prompt (seeds seed..seed+num-1) per point; one sampler per structural group."""

  def __init__(self, opts: dict, log: Callable[[str], None]):
    self.opts, self.log = opts, log
    self.groups = {}  # structural key -> (sampler, params, context, uncond, decoder, source)
    self._warm = set()

  def programs_compiled(self) -> int:
    return sum(int(g[0].trace_counts.get("program", 0)) for g in self.groups.values())

  def _group(self, point: Point):
    config = point.config
    key = point.key(CONTROL_FIELDS) + (("cfg", float(config.sampling.guidance) != 0.0),)
    if key not in self.groups:
      from dsa_jax.data.text_context import make_text_encoder
      from dsa_jax.checkpoint import loading
      from dsa_jax.sampling import sampler as sampler_lib
      from dsa_jax.sampling.decode import PixelDecoder
      ckpt = config.sampling.checkpoint if self.opts.get("ckpt") is None else self.opts["ckpt"]
      params, source = loading.load_sampler_params(config, ckpt, warn=self.log)
      sampler = sampler_lib.make_sampler(config)
      encode = make_text_encoder(config)
      n = int(self.opts.get("num", 4))
      context = np.repeat(encode([self.opts.get("prompt") or DEFAULT_PROMPT]), n, axis=0)
      uncond = None
      if float(config.sampling.guidance) != 0.0:
        uncond = np.repeat(encode([config.text.negative_prompt]), n, axis=0)
      self.groups[key] = (sampler, params, context, uncond, PixelDecoder(config), source)
    return self.groups[key]

  def run(self, point: Point, out_dir: str):
    import jax
    sampler, params, context, uncond, decoder, source = self._group(point)
    s = point.config.sampling
    n = context.shape[0]
    controls = sampler.make_controls(n, threshold=s.threshold, min_steps=s.min_steps, max_steps=s.max_steps,
                                     guidance=s.guidance, seed=point_seed(self.opts, point.config))
    before = self.programs_compiled()
    compile_s = 0.0
    if id(sampler) not in self._warm:  # compile outside the timed call (once per group)
      compile_s = sampler.compile(params, context, controls, uncond_context=uncond)
      self._warm.add(id(sampler))
    t0 = time.perf_counter()
    out = jax.device_get(sampler.sample(params, context, controls, uncond_context=uncond))
    seconds = time.perf_counter() - t0
    steps = np.asarray(out.steps)
    metrics = {"mean_steps": float(steps.mean()), "std_steps": float(steps.std()), "min_steps_taken": int(steps.min()),
               "max_steps_taken": int(steps.max()), "chunk_forwards": float(np.mean(out.chunk_iters)),
               "sample_s": seconds, "fps": float(steps.size / seconds) if seconds > 0 else float("nan"),
               "compile_s": compile_s, "programs_compiled": self.programs_compiled() - before}
    artifacts = {"steps": steps.tolist(), "chunk_iters": np.asarray(out.chunk_iters).tolist(), "checkpoint": source}
    if self.opts.get("videos"):
      from dsa_jax.sampling import outputs
      pixels = np.asarray(decoder.decode_video(out.latents[:1]))
      record = {"name": point.name, "diff": point.diff, "steps": steps[0], "confidences": out.confidences[0]}
      artifacts["files"] = outputs.write_sample(os.path.join(out_dir, "points", point.name), "sample", pixels[0],
                                                record, fps=point.config.video.fps,
                                                chunk_frames=point.config.video.chunk_frames, formats=["gif"])
    return metrics, artifacts


class EvalRunner:
  """The digits benchmark per point; one Benchmark, sampler and params per group of points that differ only in
  threshold / min / max steps."""

  METRICS = ("avg_steps", "fd", "fd_bootstrap_std", "agreement", "agreement_std", "digit_f1", "fps_batch1",
             "latency_batch1", "fps", "chunk_forwards")

  def __init__(self, opts: dict, log: Callable[[str], None]):
    self.opts, self.log = opts, log
    self.groups = {}

  @staticmethod
  def check(points: Sequence[Point]):
    from dsa_jax.eval import claim
    for p in points:
      try:
        claim.check_pixel_config(p.config)
      except ValueError as e:
        raise SweepError(f"sweep point {p.name}: the eval kind needs a pixel-space digits config: {e}") from None

  def run(self, point: Point, out_dir: str):
    from dsa_jax.checkpoint import loading
    from dsa_jax.eval import claim
    from dsa_jax.sampling import sampler as sampler_lib
    config = point.config
    key = point.key(EVAL_RUN_FIELDS)
    if key not in self.groups:
      ckpt = config.sampling.checkpoint if self.opts.get("ckpt") is None else self.opts["ckpt"]
      params, source = loading.load_sampler_params(config, ckpt, warn=self.log)
      bench = claim.Benchmark(config, num=int(self.opts.get("num", 256)), evaluator=self.opts.get("evaluator"),
                              batch=int(self.opts.get("batch", 32)), seed=point_seed(self.opts, config),
                              num_real=int(self.opts.get("num_real", 1000)),
                              fps_prompts=int(self.opts.get("fps_prompts", 8)), log=self.log)
      self.groups[key] = (bench, sampler_lib.make_sampler(config), params, source)
    bench, sampler, params, source = self.groups[key]
    s = config.sampling
    r = claim.public(bench.run(sampler, params, name=point.name, threshold=float(s.threshold),
                               min_steps=int(s.min_steps), max_steps=int(s.max_steps)))
    metrics = {k: r[k] for k in self.METRICS if k in r}
    return _scalars(metrics), {"result": r, "checkpoint": source, "real_floor": bench.real_floor}


class TrainRunner:
  """Trains each point in its own workdir (the trainer resumes a half-done workdir)."""

  def __init__(self, opts: dict, log: Callable[[str], None]):
    self.opts, self.log = opts, log

  def run(self, point: Point, out_dir: str):
    import jax
    from dsa_jax.training.trainer import train
    workdir = train_workdir(out_dir, point)
    summary = train(point.config, workdir)
    summary.pop("state", None)
    end, total = int(summary.get("end_step", 0)), int(point.config.train.steps)
    if end < total:
      raise RuntimeError(f"training stopped at step {end} of {total} ({summary.get('stopped')})")
    metrics = {"end_step": end, **{k: v for k, v in _scalars(summary.get("last_metrics") or {}).items()
                                   if k != "step"}}
    jax.clear_caches()
    return metrics, {"workdir": workdir, "model": summary.get("model")}


RUNNERS = {"sample": SampleRunner, "eval": EvalRunner, "train": TrainRunner}


# ----------------------------------------------------------------------------------------------------------------------
# The sweep


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj) -> str:
  from dsa_jax.sampling import outputs
  return outputs.write_json(path, obj)


def _show(v) -> str:
  return "not given" if v is None else repr(v) if isinstance(v, str) else str(v)


def _option_changes(old: dict, new: dict) -> str:
  """"--num was 1, now 3; --prompt was 'a', now 'b'" for the options that differ."""
  keys = list(dict.fromkeys(list(new) + list(old)))
  return "; ".join(f"--{k.replace('_', '-')} was {_show(old.get(k))}, now {_show(new.get(k))}" for k in keys
                   if old.get(k) != new.get(k))


def _check_out_dir(out_dir: str, spec: dict):
  """A folder holds one sweep (kind, config, base overrides, result options); more points may be added to it later.
  A folder written before options were stored is not checked for them."""
  path = os.path.join(out_dir, "sweep.json")
  if os.path.isfile(path):
    old = _read_json(path)
    for k in ("kind", "config", "overrides"):
      if old.get(k) != spec[k]:
        raise SweepError(f"--out {out_dir!r} holds a sweep with {k} {old.get(k)!r}, not {spec[k]!r}; use another "
                         f"--out (or delete that folder)")
    if "options" in old and old["options"] != spec["options"]:
      raise SweepError(f"--out {out_dir!r} holds a {spec['kind']} sweep run with other options ("
                       f"{_option_changes(old['options'], spec['options'])}); its finished points would be skipped "
                       f"with the old results: use a new --out (or delete that folder)")


def _finished(out_dir: str, pts: Sequence[Point], point_opts: dict) -> set:
  """Names of the points with an ok result; one recorded with other result options is refused, not reused."""
  done = set()
  for p in pts:
    path = os.path.join(out_dir, "points", p.name, "result.json")
    if not os.path.isfile(path):
      continue
    record = _read_json(path)
    if record.get("status") != "ok":
      continue
    if "options" in record and record["options"] != point_opts[p.name]:
      raise SweepError(f"--out {out_dir!r}: point {p.name} was run with other options ("
                       f"{_option_changes(record['options'], point_opts[p.name])}); use a new --out (or delete "
                       f"{os.path.dirname(path)})")
    done.add(p.name)
  return done


def run_sweep(kind: str, config_spec: str, out_dir: str, *, axes: Sequence[str] = (),
              points: Optional[list[dict]] = None, base_overrides: Sequence[str] = (), metric: Optional[str] = None,
              opts: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
  """Runs every point not finished yet; writes OUT/results.{csv,md}, OUT/results.png; returns the summary.

  Summary: rows (one per point, in order), paths, ran / skipped / failed names, programs_compiled (sample kind).
  """
  if kind not in KINDS:
    raise SweepError(f"sweep kind: expected one of {', '.join(KINDS)}, got {kind!r}")
  opts = dict(opts or {})
  pts = build_points(config_spec, base_overrides, axes, points)
  if opts.get("seed") is not None and "seed" in RESULT_OPTIONS[kind]:
    swept = [p.name for p in pts if "seed" in p.diff]
    if swept:
      raise SweepError(f"--seed {opts['seed']} and the swept field 'seed' (point {swept[0]}) both set the noise seed; "
                       "drop --seed to give each point its own seed, or stop sweeping seed")
  if kind == "eval":
    EvalRunner.check(pts)
  if "://" in out_dir:
    raise SweepError(f"--out {out_dir!r}: the results table and local runs need a local folder (remote workdirs: "
                     "--print-commands)")
  from dsa_jax.config_lib import get_config
  # The base config's seed stands for every point's unless seed is swept (then the points differ by name).
  spec = {"kind": kind, "config": config_spec, "overrides": list(base_overrides),
          "options": result_options(kind, opts, get_config(config_spec, base_overrides))}
  _check_out_dir(out_dir, spec)
  point_opts = {p.name: result_options(kind, opts, p.config) for p in pts}
  done = _finished(out_dir, pts, point_opts)
  os.makedirs(out_dir, exist_ok=True)
  _write_json(os.path.join(out_dir, "sweep.json"), {**spec, "points": [{"name": p.name, "diff": p.diff}
                                                                       for p in pts]})
  runner = RUNNERS[kind](opts, log)
  ran, skipped, failed = [], [], []
  for i, p in enumerate(pts):
    folder = os.path.join(out_dir, "points", p.name)
    result_path = os.path.join(folder, "result.json")
    if p.name in done:
      skipped.append(p.name)
      log(f"[{i + 1}/{len(pts)}] {p.name}: done before, skipped")
      continue
    log(f"[{i + 1}/{len(pts)}] {p.name}: running")
    t0 = time.perf_counter()
    record = {"name": p.name, "diff": p.diff, "overrides": p.overrides, "options": point_opts[p.name],
              "command": point_command(kind, config_spec, base_overrides, p, out_dir, opts)}
    try:
      metrics, artifacts = runner.run(p, out_dir)
      record.update(status="ok", metrics=metrics, artifacts=artifacts, error="")
      ran.append(p.name)
    except Exception as e:  # a failed point is recorded and the sweep goes on
      msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
      record.update(status="failed", metrics={}, error=msg, traceback=traceback.format_exc())
      failed.append(p.name)
      log(f"[{i + 1}/{len(pts)}] {p.name}: FAILED: {msg}")
    record["seconds"] = time.perf_counter() - t0
    _write_json(result_path, record)
    if record["status"] == "ok":
      shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in list(record["metrics"].items())[:4])
      log(f"[{i + 1}/{len(pts)}] {p.name}: {shown} ({record['seconds']:.1f} s)")
  rows = [table_row(_read_json(os.path.join(out_dir, "points", p.name, "result.json")), p)
          for p in pts if os.path.isfile(os.path.join(out_dir, "points", p.name, "result.json"))]
  fields = list(dict.fromkeys(f for p in pts for f in p.diff))
  metric = metric or DEFAULT_METRIC[kind] or _first_metric(rows, fields)
  paths = write_table(out_dir, rows, fields, metric, title=f"{kind} sweep of {config_spec}")
  if metric and "png" not in paths and any(r["status"] == "ok" for r in rows):
    log(f"note: no plot: metric {metric!r} is not a number in the results (columns: "
        f"{', '.join(_columns(rows, fields))})")
  summary = {"kind": kind, "rows": rows, "paths": paths, "ran": ran, "skipped": skipped, "failed": failed,
             "metric": metric}
  if kind == "sample":
    summary["programs_compiled"] = runner.programs_compiled()
  log(f"{len(ran)} ran, {len(skipped)} skipped, {len(failed)} failed; wrote {', '.join(paths.values())}")
  return summary


def table_row(record: dict, point: Point) -> dict:
  row = {"name": record["name"], "status": record["status"]}
  row.update({f: point.diff.get(f) for f in point.diff})
  row.update(record.get("metrics", {}))
  row["seconds"] = record.get("seconds")
  row["error"] = record.get("error", "")
  row["config_diff"] = " ".join(record.get("overrides", point.overrides))
  row["command"] = record.get("command", "")
  return row


def _first_metric(rows, fields) -> Optional[str]:
  skip = set(fields) | {"name", "status", "seconds", "error", "config_diff", "command", "end_step"}
  for r in rows:  # a loss first
    for k, v in r.items():
      if k not in skip and "loss" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
        return k
  for r in rows:
    for k, v in r.items():
      if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool):
        return k
  return None


def _columns(rows, fields):
  tail = ["seconds", "error", "config_diff", "command"]
  cols = ["name", "status"] + list(fields)
  for r in rows:
    cols += [k for k in r if k not in cols and k not in tail]
  return cols + tail


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


def write_table(out_dir: str, rows: list[dict], fields: Sequence[str], metric: Optional[str], *, title: str = ""
                ) -> dict[str, str]:
  """results.csv, results.md and (when the metric is numeric somewhere) results.png: metric against the first swept
  field, one line per value of the other fields."""
  from dsa_jax.sampling import outputs
  cols = _columns(rows, fields)
  paths = {}
  with outputs.atomic_path(os.path.join(out_dir, "results.csv")) as tmp:
    with open(tmp, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=cols)
      w.writeheader()
      for r in rows:
        w.writerow({c: _cell(r.get(c)) for c in cols})
  paths["csv"] = os.path.join(out_dir, "results.csv")
  md = [f"# {title}", ""] if title else []
  md += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
  for r in rows:
    cells = []
    for c in cols:
      s = _cell(r.get(c)).replace("|", "\\|")
      cells.append(f"`{s}`" if c == "command" and s else s)
    md.append("| " + " | ".join(cells) + " |")
  with outputs.atomic_path(os.path.join(out_dir, "results.md")) as tmp:
    with open(tmp, "w") as f:
      f.write("\n".join(md) + "\n")
  paths["md"] = os.path.join(out_dir, "results.md")
  png = plot_metric(os.path.join(out_dir, "results.png"), rows, fields, metric, title=title)
  if png:
    paths["png"] = png
  return paths


def plot_metric(path: str, rows: list[dict], fields: Sequence[str], metric: Optional[str], *, title: str = ""
                ) -> Optional[str]:
  ok = [r for r in rows if r["status"] == "ok" and isinstance(r.get(metric), (int, float))
        and not isinstance(r.get(metric), bool)]
  if not ok or not fields or metric is None:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x_field, others = fields[0], list(fields[1:])
  xs_all = list(dict.fromkeys(repr(r.get(x_field)) for r in ok))
  numeric = all(isinstance(r.get(x_field), (int, float)) and not isinstance(r.get(x_field), bool) for r in ok)
  lines = {}
  for r in ok:
    label = ", ".join(f"{f}={_short(r.get(f))}" for f in others)
    lines.setdefault(label, []).append(r)
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, rs in lines.items():
    if numeric:
      rs = sorted(rs, key=lambda r: r[x_field])
      xs = [r[x_field] for r in rs]
    else:
      xs = [xs_all.index(repr(r.get(x_field))) for r in rs]
    ax.plot(xs, [r[metric] for r in rs], "o-", label=label or None)
  if not numeric:
    ax.set_xticks(range(len(xs_all)))
    ax.set_xticklabels([_short(_literal(x)) for x in xs_all], rotation=30)
  ax.set_xlabel(x_field)
  ax.set_ylabel(metric)
  if title:
    ax.set_title(title, fontsize=9)
  if any(lines):
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  write_figure(fig, path, dpi=100)
  plt.close(fig)
  return path
