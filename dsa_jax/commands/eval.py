"""Evaluates a digits model on held-out prompts: Fréchet distance to real clips, prompt agreement, steps, FPS.

Five actions (a positional word; `run` when omitted):

  dsa-jax eval --config configs/digits.py --ckpt runs/digits/dsa/model --out out/eval [--num 256]
      [--thresholds 0.5 0.8 inf] [--fixed 1 4] [--evaluator DIR]
    samples N test-split prompts once per threshold (and per fixed step count) and writes OUT/eval.json (metrics per
    run), OUT/samples.gif (a grid of samples of the first run; the strip under each frame shows its steps, green =
    1 ... red = max) and OUT/steps_by_event.png (steps per frame against the frames' event labels, as predicted
    by the evaluator on the generated frames, and per frame index).

  dsa-jax eval sweep --config configs/digits.py --model remaining=MODEL [--model dmd=MODEL2 ...] --out docs/claim
      [--num 512] [--thresholds ...] [--deltas ...] [--budgets 1.5 2 2.5 3]
    the quality-vs-steps comparison (also `--sweep`): fixed 1 to all ladder steps, DSA with each model (named by its
    confidence target) at >= 5 thresholds, the x0-change heuristic at several deltas, and at each budget the
    per-frame oracle and the video oracle (steps per chunk, each candidate judged by re-rolling the whole video; --no-video-oracle);
    writes claim.md, claim.json, claim.png, steps_by_event.png, steps_by_place.png (see dsa_jax/eval/claim.py).
    TARGET=MODEL+HEAD takes the head from a head folder (dsa-jax convert export-head) and the generator from MODEL;
    a TARGET that names a confidence target must be the head's own (the shipped digits model's is 'gain'):
      --model gain=dsa_jax/assets/digits_model \\
      --model dmd=dsa_jax/assets/digits_model+dsa_jax/assets/digits_heads/dmd

  dsa-jax eval budgets --config configs/digits.py [--ckpt MODEL] [--head HEAD] --budgets 1.25 1.5 2 2.5 3 --out OUT
      [--num 512]
    the step budget on held-out prompts: tau from the model's calibration table for each requested average
    (`dsa-jax sample --mean-steps`), the achieved average steps, FD and agreement, each against fixed steps at the
    same average (interpolated between the step counts on either side; the paired standard error of the difference)
    -> OUT/budget_check.json.

  dsa-jax eval curves --run teacher=runs/digits/teacher [--run more=runs/digits/teacher2:8000 ...] --out docs/curves
    the in-training evaluation curves (WORKDIR/eval.jsonl, written when train.eval_every > 0): FD and prompt
    agreement against the training step -> OUT/curves.png and OUT/curves.md; `:N` shifts a run that continued
    another one from its step N.

  dsa-jax eval train-evaluator --out dsa_jax/assets/evaluator [--steps 1200] [--size 32 --frames 16]
    trains the evaluator once on the real training split (see dsa_jax/eval/evaluator.py); the repo ships its output.

The evaluator defaults to the shipped one (dsa_jax/assets/evaluator). Metrics: FD between the evaluator's 64-d clip
features of generated and real test clips (with the FD of a disjoint real set as the floor a perfect model reaches
with N samples); agreement = fraction of clips whose predicted digit set equals the prompt's, and per-clip F1;
FPS = frames per second of steady-state sampling (compilation excluded), one video at a time over the first
--fps-prompts prompts (batch 1: where DSA's savings show) and at --batch. For a stable FD use --num >= 256: with
fewer samples than feature dimensions (64) the FD is dominated by estimation bias (see the real-data floor).
"""

from __future__ import annotations

import math

HELP = "FD, prompt agreement, steps and FPS on held-out digits prompts; the claim sweep; the evaluator"

ACTIONS = ("run", "sweep", "budgets", "curves", "train-evaluator")


def add_arguments(p):
  p.add_argument("action", nargs="?", default="run", choices=ACTIONS,
                 help="run (default): evaluate one checkpoint; sweep: the claim table; budgets: the step budget "
                 "check; curves: in-training evaluation curves; train-evaluator. An option the chosen action does "
                 "not use is an error")
  p.add_argument("--run", action="append", default=None, metavar="LABEL=PATH[:STEP]", help="curves: a run's workdir "
                 "(or its eval.jsonl), its steps shifted by STEP when it continued another run (repeat for several)")
  p.add_argument("--title", default="", help="curves: title of the plot")
  p.add_argument("--sweep", action="store_true", help="same as the action 'sweep'")
  p.add_argument("--config", default=None, help="config file (path[:arg]); required for run and sweep")
  p.add_argument("--ckpt", default=None, help="model checkpoint folder or training workdir (default: "
                 "config.sampling.checkpoint; empty string: random weights); the dmd-target model for sweep")
  p.add_argument("--head", default=None, help="confidence head folder (dsa-jax convert export-head) to use with the "
                 "--ckpt generator instead of its own head; its calibration table serves budgets (default "
                 "config.sampling.head). sweep: give each --model its head as TARGET=MODEL+HEAD instead")
  p.add_argument("--model", action="append", default=None, metavar="TARGET=PATH[+HEAD]", help="sweep: a DSA model "
                 "named by its confidence target, with the head of a head folder after a '+' (repeat for several; "
                 "default: --ckpt (+ --head), named by its head's conf_target, else by the config's conf.target)")
  p.add_argument("--budgets", nargs="+", type=float, default=None, help="sweep: average-steps budgets of the oracle "
                 "allocation (default those of 1.5 2 2.5 3 within sampling.min_steps..max_steps); budgets: the requested averages to check")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--num", type=int, default=256, help="held-out prompts to sample (default 256)")
  p.add_argument("--thresholds", nargs="+", default=None, help="confidence thresholds (numbers, inf, -inf); run: "
                 "default config.sampling.threshold; sweep: default picked from a max-steps run")
  p.add_argument("--teacher-steps", default=None, help="run: score the teacher model (--ckpt, a teacher-stage model) "
                 "as a many-step Euler sampler at these step counts, e.g. 16,32, instead of the student")
  p.add_argument("--teacher-guidance", default=None, help="with --teacher-steps: the guidance scales to score the "
                 "teacher at, e.g. 1,2,3 (Self Forcing's convention: cond + g (cond - uncond); default dmd.guidance)")
  p.add_argument("--no-video-oracle", action="store_true",
                 help="sweep: skip the re-rolled video oracle (it samples the prompts about chunks^2 x budget times)")
  p.add_argument("--fixed", nargs="+", type=int, default=None, help="run: also sample with these fixed step "
                 "counts; sweep: default every step count of the ladder; budgets: the fixed step counts each budget "
                 "is compared with (default those on either side of each budget; 0: none)")
  p.add_argument("--deltas", nargs="+", type=float, default=None, help="sweep: x0-change thresholds of the heuristic")
  p.add_argument("--evaluator", default=None, help="evaluator checkpoint (default: dsa_jax/assets/evaluator)")
  p.add_argument("--batch", type=int, default=32, help="prompts per compiled sampling batch (default 32)")
  p.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt (prompt i gets seed+i)")
  p.add_argument("--data-seed", type=int, default=0, help="seed of the test-split clips (prompts and references)")
  p.add_argument("--num-real", type=int, default=1000, help="real test clips for the FD reference, at least 2 "
                 "(default 1000)")
  p.add_argument("--gif-clips", type=int, default=16, help="samples shown in samples.gif (default 16; 0: no gif)")
  p.add_argument("--fps-prompts", type=int, default=8, help="prompts sampled one at a time for the batch-1 FPS "
                 "(default 8; 0: skip)")
  # train-evaluator
  p.add_argument("--steps", type=int, default=1200, help="train-evaluator: training steps (default 1200)")
  p.add_argument("--train-batch", type=int, default=16, help="train-evaluator: clips per step (default 16)")
  p.add_argument("--size", type=int, default=None, help="train-evaluator: canvas size (default: --config's, else 32)")
  p.add_argument("--frames", type=int, default=None, help="train-evaluator: clip frames (default: --config's, else 16)")
  p.add_argument("--num-train", type=int, default=6000, help="train-evaluator: training clips generated (default 6000)")


def parse_models(values) -> dict[str, str | tuple[str, str]]:
  """['remaining=PATH', 'dmd=PATH'] -> {'remaining': PATH, 'dmd': PATH} (order kept: the first serves the baselines);
  'remaining=MODEL+HEAD' -> (MODEL, HEAD), a head folder used with MODEL's generator (a PATH that exists as it is
  stays whole, so a folder name holding '+' still works)."""
  import os
  out = {}
  for v in values:
    name, sep, path = v.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--model: expected TARGET=PATH or TARGET=MODEL+HEAD (e.g. remaining=runs/digits/dsa/model), "
                       f"got {v!r}")
    if name in out:
      raise ValueError(f"--model: {name!r} given twice")
    model, plus, head = path.rpartition("+")
    if plus and not os.path.exists(path):
      if not model or not head:
        raise ValueError(f"--model {v!r}: expected TARGET=MODEL+HEAD with both folders named")
      out[name] = (model, head)
    else:
      out[name] = path
  return out


def _number_list(text, cast, valid, expected: str) -> list:
  """'16,32' or '16 32' -> [16, 32] by `cast`; empty, unparsable or not `valid` -> ValueError(f"{expected}, got ...")."""
  try:
    values = [cast(x) for x in str(text).replace(",", " ").split()]
  except ValueError:
    values = []
  if not values or not all(valid(v) for v in values):
    raise ValueError(f"{expected}, got {text!r}")
  return values


def _head_target(head: str) -> str:
  """The confidence target a head folder records (names its DSA runs in the sweep)."""
  from dsa_jax.checkpoint import heads
  meta = heads.check_head_folder(head)
  kind = (meta.get("conf_target") or {}).get("kind")
  if not kind:
    raise ValueError(f"--head {head!r} records no conf_target: name it with --model TARGET=MODEL+HEAD")
  return str(kind)


def parse_thresholds(values) -> list[float]:
  from dsa_jax.sampling.sampler import parse_threshold
  return [parse_threshold(text, "--thresholds") for text in values]


def _say(msg):
  print(msg, flush=True)


def _train_evaluator(args, config):
  from dsa_jax.eval import evaluator as ev_lib
  size = args.size or (config.video.height if config is not None else 32)
  frames = args.frames or (config.video.num_frames if config is not None else 16)
  summary = ev_lib.train_evaluator(args.out, steps=args.steps, batch=args.train_batch, seed=args.seed, size=size,
                                   frames=frames, num_train=args.num_train)
  summary.pop("params", None)
  _say(f"evaluator: held-out set accuracy {summary['test']['set_acc']:.4f}, {summary['bytes'] / 1e6:.2f} MB at "
       f"{summary['path']}")
  return 0


def parse_runs(values) -> dict[str, tuple[str, int]]:
  """['teacher=runs/t', 'more=runs/t2:8000'] -> {'teacher': ('runs/t', 0), 'more': ('runs/t2', 8000)}."""
  out = {}
  for v in values:
    label, sep, rest = v.partition("=")
    if not sep or not label or not rest:
      raise ValueError(f"--run: expected LABEL=PATH[:STEP] (e.g. teacher=runs/digits/teacher), got {v!r}")
    path, offset = rest, 0
    head, colon, tail = rest.rpartition(":")
    if colon and tail.isdigit():
      path, offset = head, int(tail)
    if label in out:
      raise ValueError(f"--run: {label!r} given twice")
    out[label] = (path, offset)
  return out


def _curves(args):
  from dsa_jax.eval.during_training import plot_curves, read_curve
  if not args.run:
    raise ValueError("--run: the action 'curves' needs at least one LABEL=PATH")
  runs = {label: read_curve(path, offset) for label, (path, offset) in parse_runs(args.run).items()}
  files = plot_curves(runs, args.out, title=args.title)
  _say(f"curves: {files['png']}, {files['md']}")
  return 0


_SAMPLING = ("config", "ckpt", "out", "num", "evaluator", "batch", "seed", "data_seed", "num_real")
# the options each action reads (with --teacher-steps, `run` scores a teacher instead: "teacher"); any other option
# given is an error, not silently dropped
USES = {
    "run": frozenset(_SAMPLING + ("head", "thresholds", "fixed", "gif_clips", "fps_prompts", "teacher_steps",
                                  "teacher_guidance")),
    "teacher": frozenset(_SAMPLING + ("teacher_steps", "teacher_guidance")),
    "sweep": frozenset(_SAMPLING + ("sweep", "head", "model", "budgets", "thresholds", "deltas", "fixed",
                                    "no_video_oracle", "fps_prompts")),
    "budgets": frozenset(_SAMPLING + ("head", "budgets", "fixed")),
    "curves": frozenset(("out", "run", "title")),
    "train-evaluator": frozenset(("config", "out", "seed", "steps", "train_batch", "size", "frames", "num_train")),
}


def _flag(dest: str) -> str:
  return "--" + dest.replace("_", "-")


def check_unused_options(args, action: str):
  """Raises naming every option given (differing from its default) that `action` does not read: a --model or
  --budgets meant for another action would otherwise be dropped and the wrong thing evaluated without a word."""
  from dsa_jax.cli import options_given
  uses = USES[action]
  unused = [d for d in options_given(args, add_arguments) if d not in uses and d not in ("action", "out")]
  if unused and action == "teacher":
    raise ValueError(f"--teacher-steps scores the teacher as a many-step sampler and does not use "
                     f"{', '.join(_flag(d) for d in unused)}: drop them, or evaluate the student without "
                     "--teacher-steps")
  if unused:
    owners = lambda d: ", ".join(a for a in ACTIONS if d in USES[a])
    parts = [f"{_flag(d)} (used by: {owners(d)})" for d in unused]
    raise ValueError(f"the action {action!r} does not use {', '.join(parts)}: drop them, or choose the action that "
                     "uses them")
  overrides = list(getattr(args, "overrides", None) or ())
  if overrides and "config" not in uses:
    raise ValueError(f"the action {action!r} reads no config: drop the config overrides {' '.join(overrides)}")
  if overrides and args.config is None:
    raise ValueError(f"config overrides ({' '.join(overrides)}) need --config")


def main(args):
  from dsa_jax.config_lib import get_config

  action = "sweep" if args.sweep else args.action
  if args.sweep and args.action not in ("run", "sweep"):
    raise ValueError(f"--sweep conflicts with the action {args.action!r}")
  check_unused_options(args, "teacher" if action == "run" and args.teacher_steps else action)
  if args.num < 2:
    raise ValueError(f"--num: need at least 2 prompts, got {args.num}")
  if args.num_real < 2:
    raise ValueError(f"--num-real: need at least 2 real clips for the FD reference, got {args.num_real}")
  if args.fps_prompts < 0:
    raise ValueError(f"--fps-prompts: expected 0 (skip the batch-1 FPS) or more prompts, got {args.fps_prompts}")
  if args.batch < 1:
    raise ValueError(f"--batch: must be >= 1, got {args.batch}")
  if args.gif_clips < 0:
    raise ValueError(f"--gif-clips: expected 0 (no samples.gif) or more clips, got {args.gif_clips}")
  config = get_config(args.config, args.overrides) if args.config else None
  if action == "train-evaluator":
    return _train_evaluator(args, config)
  if action == "curves":
    return _curves(args)
  if config is None:
    raise ValueError(f"--config: required for the action {action!r}")
  ckpt = config.sampling.checkpoint if args.ckpt is None else args.ckpt
  if args.head is not None:  # every loader below reads the head from config.sampling.head
    config.sampling.head = args.head
  head = config.sampling.head
  if head and args.model:
    raise ValueError(f"--head {head!r} (or config.sampling.head) with --model: give each model its head as "
                     "TARGET=MODEL+HEAD")
  thresholds = parse_thresholds(args.thresholds) if args.thresholds else None
  common = dict(num=args.num, evaluator=args.evaluator, batch=args.batch, seed=args.seed, data_seed=args.data_seed,
                num_real=args.num_real, fps_prompts=args.fps_prompts)
  if args.teacher_steps:
    from dsa_jax.eval.claim import evaluate_teacher
    steps = _number_list(args.teacher_steps, int, lambda k: k >= 1,
                         "--teacher-steps: expected positive step counts like 16,32")
    guidances = None if args.teacher_guidance is None else _number_list(
        args.teacher_guidance, float, math.isfinite, "--teacher-guidance: expected finite guidance scales like 1,2,3")
    evaluate_teacher(config, args.ckpt, args.out, steps, guidances=guidances, **common)
    return 0
  if args.teacher_guidance is not None:
    raise ValueError("--teacher-guidance: only with --teacher-steps (it sets the teacher's guidance as a sampler)")
  if action == "budgets":
    from dsa_jax.eval.claim import check_budgets
    if not args.budgets:
      raise ValueError("--budgets: give the average steps per frame to check, e.g. --budgets 1.5 2 2.5 3")
    check_budgets(config, ckpt, args.out, tuple(args.budgets), num=args.num, evaluator=args.evaluator,
                  batch=args.batch, seed=args.seed, data_seed=args.data_seed, num_real=args.num_real,
                  fixed=None if args.fixed is None else tuple(k for k in args.fixed if k != 0))
    return 0
  if action == "sweep":
    from dsa_jax.eval.claim import run_claim
    if args.model:
      models = parse_models(args.model)
    else:
      models = {_head_target(head): (ckpt, head)} if head else {str(config.conf.target): ckpt}
    run_claim(config, models, args.out, thresholds=thresholds, deltas=args.deltas,
              fixed=tuple(args.fixed) if args.fixed else None,
              budgets=tuple(args.budgets) if args.budgets else None,
              video_oracle=not args.no_video_oracle, **common)
    return 0
  from dsa_jax.eval.evaluate import evaluate
  evaluate(config, ckpt, args.out, thresholds=thresholds, fixed=args.fixed, gif_clips=args.gif_clips, **common)
  return 0
