"""Trains one stage ('teacher', 'ode' or 'dsa', from config.train.stage) in a workdir; resumes automatically.

  dsa-jax train --config configs/tiny.py --workdir /tmp/x
  dsa-jax train --config configs/wan_1_3b.py --workdir gs://bucket/run --config.data.prompts.path=prompts.txt \\
      --config.train.init_from=ODE_WORKDIR/model --config.train.teacher_from=WAN14B_MODEL

Run the same command on every host of a multi-host job (see launch/); `jax.distributed.initialize()` is called
when the environment says there are several hosts. Each stage exports WORKDIR/model (params_io) at the end.
"""

from __future__ import annotations

HELP = "train a stage (teacher / ode / dsa) in a workdir; resumes from its latest checkpoint"


def add_arguments(p):
  p.add_argument("--config", required=True, help="config: a shipped one by name (digits, tiny, wan_1_3b) or a "
                 "file, with an optional :arg (digits:teacher, path.py:arg)")
  p.add_argument("--workdir", required=True, help="run folder: checkpoints/, tb/, model/")
  p.add_argument("--coordinator", default=None,
                 help="multi-process runs without auto-detection: coordinator host:port (with --num-processes and "
                      "--process-id); TPU pods, SLURM and DSA_JAX_COORDINATOR need none of these")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)


def main(args):
  from dsa_jax.parallel.mesh import maybe_initialize_distributed
  # Before anything asks jax for devices.
  maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from dsa_jax.config_lib import get_config
  from dsa_jax.training.trainer import train
  config = get_config(args.config, args.overrides)
  summary = train(config, args.workdir)
  return 0 if summary.get("end_step", 0) >= int(config.train.steps) else 1
