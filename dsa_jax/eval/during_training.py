"""Scores the model being trained every `train.eval_every` steps on held-out prompts (pixel-space configs).

What a stage is judged by: the teacher as a many-step sampler (`train.eval_teacher_steps` Euler steps), the ODE
student at the full ladder (its head is untrained), the DSA / head stages as DSA samples at the config's threshold.
FD and prompt agreement come from the digits evaluator (`dsa_jax.eval.claim.Benchmark`) on `train.eval_num` test
prompts, so a run's curve says when a stage has stopped improving. The trainer logs the scores next to the losses
(TensorBoard group `eval`) and appends them to WORKDIR/eval.jsonl.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from dsa_jax.eval import claim


class TrainingEval:
  """One benchmark (prompts, real statistics, evaluator) built once per run; `__call__(state)` scores a state."""

  def __init__(self, config, log: Callable[[str], None] = print):
    from dsa_jax.sampling.sampler import make_sampler
    t = config.train
    if int(t.eval_num) < 2:
      raise claim.BenchmarkError(f"config.train.eval_num: need at least 2 prompts for a Fréchet distance, got "
                                 f"{t.eval_num}")
    try:
      claim.check_pixel_config(config)
    except claim.BenchmarkError as e:
      raise claim.BenchmarkError(f"config.train.eval_every: in-training evaluation needs a pixel-space config "
                                 f"(the digits evaluator): {e}") from None
    n = int(t.eval_num)
    self.config, self.stage = config, t.stage
    self.bench = claim.Benchmark(config, num=n, evaluator=t.eval_evaluator or None, num_real=max(4 * n, 256),
                                 batch=min(n, 64), fps_prompts=0, log=lambda m: None)
    self.sampler = None if self.stage == "teacher" else make_sampler(config)
    self.log = log

  def __call__(self, state) -> dict[str, Any]:
    host = lambda tree: jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    if self.stage == "teacher":
      teacher = state.teacher_ema if state.teacher_ema is not None else state.teacher
      r = self.bench.run_teacher(host(teacher), int(self.config.train.eval_teacher_steps))
    else:
      gen = state.generator_ema if state.generator_ema is not None else state.generator
      params = {"generator": host(gen), "head": host(state.head)}
      s = self.config.sampling
      # the ODE student's head is untrained: judge it at the full ladder; DSA / head stages as they will sample
      tau = float("inf") if self.stage == "ode" else float(s.threshold)
      r = self.bench.run(self.sampler, params, name=f"{self.stage}-eval", threshold=tau, min_steps=s.min_steps,
                         max_steps=s.max_steps)
    return {"eval_fd": float(r["fd"]), "eval_agreement": float(r["agreement"]),
            "eval_avg_steps": float(r["avg_steps"])}
