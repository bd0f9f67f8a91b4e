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
            "eval_avg_steps": float(r["avg_steps"]),
            # what the FD is made of: a shift of the whole set (mean) or shape and spread (cov, spread vs real)
            "eval_fd_mean": float(r["fd_mean"]), "eval_fd_cov": float(r["fd_cov"]),
            "eval_fd_spread": float(r["fd_spread"])}


def read_curve(path: str, offset: int = 0) -> list[dict]:
  """The rows of a run's eval.jsonl (`path` is the file or the workdir holding it), steps shifted by `offset` (a run
  that continued another starts its own count at 0). A line that is not a JSON object names the file and line."""
  import json
  import os
  file = os.path.join(path, "eval.jsonl") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: no eval.jsonl (a run writes one when train.eval_every > 0)")
  rows = []
  with open(file) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{n}: not a JSON line ({e.msg})") from None
      if not isinstance(row, dict) or "step" not in row:
        raise ValueError(f"{file}:{n}: expected an object with a 'step' field, got {line.strip()[:80]!r}")
      rows.append({**row, "step": int(row["step"]) + int(offset)})
  if not rows:
    raise ValueError(f"{file}: no evaluations in it")
  return sorted(rows, key=lambda r: r["step"])


def plot_curves(runs: dict[str, list[dict]], out_dir: str, *, title: str = "") -> dict[str, str]:
  """FD and prompt agreement against training step for each run -> OUT/curves.png and a table OUT/curves.md."""
  import os
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from dsa_jax.atomic import write_figure, write_text
  os.makedirs(out_dir, exist_ok=True)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for label, rows in runs.items():
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r.get("eval_fd", np.nan) for r in rows], "o-", label=label)
    axes[1].plot(steps, [r.get("eval_agreement", np.nan) for r in rows], "o-", label=label)
  axes[0].set(xlabel="training step", ylabel="FD (lower is better)", yscale="log")
  axes[1].set(xlabel="training step", ylabel="prompt agreement (higher is better)", ylim=(0, 1))
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  png = write_figure(fig, os.path.join(out_dir, "curves.png"), dpi=110)
  plt.close(fig)
  lines = ["| run | step | FD | prompt agreement | steps/frame |", "| --- | ---: | ---: | ---: | ---: |"]
  for label, rows in runs.items():
    for r in rows:
      lines.append(f"| {label} | {r['step']} | {r.get('eval_fd', float('nan')):.1f} | "
                   f"{r.get('eval_agreement', float('nan')):.3f} | {r.get('eval_avg_steps', float('nan')):.2f} |")
  md = os.path.join(out_dir, "curves.md")
  write_text(md, "\n".join(lines) + "\n")
  return {"png": png, "md": md}
