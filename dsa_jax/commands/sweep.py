"""Sweeps any config fields over a grid (or the config file's get_sweep list) and collects one table.

  dsa-jax sweep sample --config configs/digits.py --out out/sweep_tau \\
      --sweep sampling.threshold=0.4:0.8:9 --sweep sampling.min_steps=1,2
  dsa-jax sweep eval --config configs/digits.py --out out/sweep_eval --num 256 --sweep sampling.threshold=0.3,0.6,inf
  dsa-jax sweep train --config configs/digits.py:teacher --out runs/lr --sweep train.lr=1e-4,3e-4
  dsa-jax sweep train --config configs/wan_1_3b.py --out gs://b/lr --sweep train.lr=1e-5,2e-5 --print-commands tpu

--sweep FIELD=a:b:n gives n evenly spaced values from a to b, FIELD=v1,v2,... a list, FIELD=[...] a Python list
literal (for tuple-valued fields); several --sweep options make a grid. Without --sweep the config file's
get_sweep(arg) is used (a list of {field: value} dicts, or {field: [values]} expanded as a grid). Base overrides
(--config.x=y) apply to every point.

Kinds: sample (the same prompt at every point; points that differ only in threshold / min / max steps / guidance /
seed share one compiled program; each point samples with its own config.seed, so --sweep seed=0,1,2 works, unless
--seed is given), eval (the digits benchmark's FD, agreement, steps and FPS per point) and train
(one workdir OUT/runs/NAME per point, run here one after another; --print-commands gpu|tpu prints the per-point
launch/gpu_local.sh or launch/tpu_pod.sh commands instead).

Writes OUT/results.csv, OUT/results.md and OUT/results.png (--metric against the first swept field); each row has
its config diff and the command that reproduces it. Rerunning skips finished points (OUT/points/NAME/result.json);
a failed point is recorded with its error, the others still run, and the next run retries it. A rerun into the same
--out must use the same result options (sample: --ckpt, --prompt, --num, --seed; eval: also --evaluator, --batch,
--num-real, --fps-prompts), kept in OUT/sweep.json: other ones are refused (use a new --out). Exit status 1 when a
point failed.
"""

from __future__ import annotations

HELP = "sweep config fields (grid or get_sweep) for sampling, evaluation or training; one CSV/markdown/plot table"


def add_arguments(p):
  from dsa_jax.eval.sweep import KINDS
  p.add_argument("kind", choices=KINDS, help="sample, eval or train")
  p.add_argument("--config", required=True, help="config file (path[:arg])")
  p.add_argument("--out", required=True, help="output folder (results table, per-point results, training workdirs)")
  p.add_argument("--sweep", action="append", default=[], metavar="FIELD=VALUES",
                 help="a swept field: FIELD=a:b:n, FIELD=v1,v2,... or FIELD=[...]; repeat for a grid (default: the "
                 "config file's get_sweep)")
  p.add_argument("--metric", default=None, help="the plotted metric (default: mean_steps for sample, fd for eval, "
                 "the first training loss for train)")
  p.add_argument("--ckpt", default=None, help="sample/eval: model checkpoint or training workdir (default: "
                 "config.sampling.checkpoint; empty string: random weights)")
  p.add_argument("--prompt", default=None, help="sample: the prompt (default: a digits prompt)")
  p.add_argument("--num", type=int, default=None, help="sample: videos per point (default 4); eval: held-out "
                 "prompts per point (default 256)")
  p.add_argument("--batch", type=int, default=32, help="eval: prompts per compiled batch (default 32)")
  p.add_argument("--seed", type=int, default=None, help="sample/eval: noise seed of the first video or prompt of "
                 "every point (default: each point's config.seed, so a swept seed or --config.seed applies; not "
                 "with a swept seed)")
  p.add_argument("--evaluator", default=None, help="eval: evaluator checkpoint (default: the shipped one)")
  p.add_argument("--num-real", type=int, default=1000, help="eval: real clips of the FD reference (default 1000)")
  p.add_argument("--fps-prompts", type=int, default=8, help="eval: prompts timed one at a time (default 8; 0: skip)")
  p.add_argument("--videos", action="store_true", help="sample: also write a gif + steps plot of each point")
  p.add_argument("--print-commands", nargs="?", const="local", default=None, choices=("local", "gpu", "tpu"),
                 help="train: print each point's command (local: dsa-jax train; gpu: launch/gpu_local.sh; tpu: "
                 "launch/tpu_pod.sh) and run nothing")
  p.add_argument("--tpu", default="TPU_NAME", help="--print-commands tpu: the TPU VM name")
  p.add_argument("--zone", default="ZONE", help="--print-commands tpu: the TPU zone")


def main(args):
  from dsa_jax.eval import sweep as sweep_lib

  if args.num is not None and args.num < 1:
    raise ValueError(f"--num: must be >= 1, got {args.num}")
  if args.batch < 1:
    raise ValueError(f"--batch: must be >= 1, got {args.batch}")
  if args.seed is not None and args.kind == "train":
    raise ValueError("--seed: the train kind takes its seed from the config (--config.seed=N or --sweep seed=...)")
  if args.print_commands is not None:
    if args.kind != "train":
      raise ValueError(f"--print-commands: only for the train kind, not {args.kind!r}")
    points = sweep_lib.build_points(args.config, args.overrides, args.sweep)
    for pt in points:
      print(sweep_lib.launch_command(args.print_commands, args.config, args.overrides, pt, args.out, tpu=args.tpu,
                                     zone=args.zone))
    return 0
  opts = {"ckpt": args.ckpt, "prompt": args.prompt, "seed": args.seed, "videos": args.videos,
          "evaluator": args.evaluator, "batch": args.batch, "num_real": args.num_real,
          "fps_prompts": args.fps_prompts}
  if args.num is not None:
    opts["num"] = args.num
  summary = sweep_lib.run_sweep(args.kind, args.config, args.out, axes=args.sweep, base_overrides=args.overrides,
                                metric=args.metric, opts=opts, log=lambda m: print(m, flush=True))
  return 1 if summary["failed"] else 0
