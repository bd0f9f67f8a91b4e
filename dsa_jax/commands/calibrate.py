"""Step-budget calibration: records tau -> average steps per frame in a model's metadata, so that sampling can ask
for an average number of steps (`dsa-jax sample --mean-steps 2.5`) instead of a raw threshold.

  dsa-jax calibrate --config digits --ckpt runs/digits/dsa/model [--num 256]
  dsa-jax calibrate --config digits --ckpt dsa_jax/assets/digits_model --head heads/remaining   # into the head folder

A table holds for the steps per frame it was made with (config.sampling.min_steps / max_steps) and the first chunk's
floor (config.sampling.first_chunk_min_steps), both recorded in it. A table made for another range than the model's
first is kept beside it, and a budget uses the table whose averages cover it (the highest floor, then the lowest
ceiling):

  dsa-jax calibrate --config digits --ckpt MODEL --config.sampling.min_steps=1 --config.sampling.max_steps=2 \
      --config.sampling.mean_steps=0                                           # then --mean-steps 1.5 works too

The prompts are the config's training prompts (config.data.prompts), never the held-out evaluation prompts, or a
prompt file given with --prompts (prompts like the ones you will sample fit best).

--fp8 instead stores the activation scales of calibrated fp8 linear layers (sampling with
--config.compute.matmul=fp8 --config.compute.fp8_activations=calibrated then skips its own calibration pass):

  dsa-jax calibrate --config configs/wan_1_3b.py --ckpt MODEL --fp8 --prompts prompts.txt --num 8 --batch 1
"""

from __future__ import annotations

HELP = "store the threshold -> average steps table in a model (for --mean-steps)"


def add_arguments(p):
  p.add_argument("--config", required=True, help="config file or shipped config name (path[:arg])")
  p.add_argument("--ckpt", default=None, help="model folder (default config.sampling.checkpoint)")
  p.add_argument("--head", default=None, help="head folder (dsa-jax convert export-head) to calibrate with the --ckpt "
                 "generator; the table is written into the head folder, not the model (default config.sampling.head; "
                 "empty: the model's own head)")
  p.add_argument("--fp8", action="store_true", help="store the fp8 activation calibration (for "
                 "compute.fp8_activations='calibrated') instead of the step-budget table")
  p.add_argument("--num", type=int, default=None, help="calibration prompts, at least 1 (default 256; 8 with --fp8)")
  p.add_argument("--prompts", default=None, help="a prompt file (one per line) to calibrate on, e.g. prompts like "
                 "the ones you will sample (default: config.data.prompts)")
  p.add_argument("--batch", type=int, default=None, help="prompts per compiled batch, at least 1 (default 64; 1 "
                 "with --fp8: one calibration pass holds a whole video per prompt)")
  p.add_argument("--refine-gap", type=float, default=0.05, help="thresholds are added between neighbours whose "
                 "average steps differ by more than this (default 0.05 steps)")
  p.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt")
  p.add_argument("--dry-run", action="store_true", help="print the table without writing it")


def main(args):
  import json

  from dsa_jax.config_lib import get_config
  from dsa_jax.sampling import budget

  # before the model loads: a batch below 1 samples no prompt, and a table of zeros would be stored
  if args.batch is not None and args.batch < 1:
    raise budget.BudgetError(f"--batch: expected at least 1 prompt per compiled batch, got {args.batch}")
  if args.num is not None and args.num < 1:
    raise budget.BudgetError(f"--num: expected at least 1 calibration prompt, got {args.num}")
  config = get_config(args.config, args.overrides)
  ckpt = config.sampling.checkpoint if args.ckpt is None else args.ckpt
  if args.fp8:
    from dsa_jax.sampling import fp8_calibration
    if args.head:
      raise budget.BudgetError("--fp8: the calibration belongs to the generator (--ckpt); --head has no part in it")
    entry = fp8_calibration.calibrate(config, ckpt, num=8 if args.num is None else args.num,
                                      batch=1 if args.batch is None else args.batch, seed=args.seed,
                                      write=not args.dry_run, prompt_file=args.prompts,
                                      log=lambda m: print(m, flush=True))
    if args.dry_run:
      print(json.dumps(entry))
    return 0
  args.num, args.batch = (256 if args.num is None else args.num), (64 if args.batch is None else args.batch)
  table = budget.calibrate(config, ckpt, num=args.num, batch=args.batch, seed=args.seed, write=not args.dry_run,
                           prompt_file=args.prompts, refine_gap=args.refine_gap, head=args.head,
                           log=lambda m: print(m, flush=True))
  rows = [f"  tau {t:.3f} -> {m:.3f} steps" for t, m in zip(table["thresholds"], table["mean_steps"])]
  print("\n".join(rows[::4] + [rows[-1]]))
  if args.dry_run:
    print(json.dumps(table))
  return 0
