"""Benchmark of a training step: step time, peak memory, model FLOP utilisation (random weights).

  dsa-jax bench train --config configs/wan_1_3b.py --teacher-like-model --steps 5 --json out/bench_train.json
  dsa-jax bench train --config configs/wan_1_3b.py --teacher-like-model --steps 2 --profile /tmp/prof_train  # + traces
  dsa-jax bench train --config configs/wan_1_3b.py --stage ode --steps 5 --json out/bench_train_ode.json

`--stage ode` times the ODE-regression step on stored pairs (random trajectories, as `train.ode_pairs` feeds them):
the causal student's forward and backward on the whole video under the block-causal mask (3 forwards of model
FLOPs, attention counted over the keys the mask lets through); the teacher is not run (stored pairs), so it gets
the student's architecture whatever the config says. The rest of this text is about the default, `--stage dsa`.

Batch 1 per device and micro-batch (global batch = devices x `--grad-accum`), the config's mesh (default: all devices
on 'data'). `--grad-accum K` accumulates K micro-batches per update (train.grad_accum): compare K = 1 and K = 4 to see
what a K times larger batch costs in memory. Both
step functions are timed: 'gen' (rollout + DMD + generator/head update + critic update, every `dmd.critic_ratio`-th
iteration) and 'critic' (no-grad rollout + critic update); `mean_iteration_s` weights them as training does.

Memory: `compiled_memory` is XLA's own account of each compiled step (`compiled.memory_analysis()`: arguments,
outputs, temporaries; `peak_gb` = arguments + outputs - donated aliases + temporaries, per device), on every
platform; `peak_memory_gb` is the device allocator's peak where the platform reports one. Generator, EMA, head and
critic are trained (fp32 masters + AdamW moments), the teacher is frozen (matmul
weights in the compute dtype). Self Forcing's 14B teacher does not fit one 80 GB card next to a 1.3B trio:
`--teacher-like-model` gives the teacher the generator's architecture (the 1.3B teacher of a same-size
distillation), or shrink it field by field with `--config.teacher.num_layers=...` etc.

Model FLOPs count what the algorithm needs per iteration (Self Forcing's minimum): per chunk the k* no-grad steps,
the exit step's forward and backward (3 forwards), the cache fill; the teacher (2 forwards with guidance) and the
critic's fake-score forward on the whole video; the critic's training forward and backward (3 forwards). Our
implementation also repeats each chunk's exit forward once (two-phase rollout) and recomputes activations under
remat: those are overhead, not model FLOPs. MFU = model FLOPs / (step time x devices x peak bf16 dense FLOP/s).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import numpy as np

from dsa_jax.eval.profiling import device_memory, xla_environment

# Dense bf16 peak per device (vendor datasheets), by substring of `device_kind`.
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("v6", 918e12),
             ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12))


def add_bench_train_arguments(p):
  p.add_argument("--config", required=True, help="config file (path[:arg])")
  p.add_argument("--steps", type=int, default=5, help="timed steps per step function (after one warm-up call)")
  p.add_argument("--json", default="", help="write the results here")
  p.add_argument("--teacher-like-model", action="store_true",
                 help="give the teacher the generator's architecture (a 14B teacher does not fit one 80 GB card "
                      "next to a trained 1.3B generator, head and critic)")
  p.add_argument("--per-device-batch", type=int, default=1, help="videos per device in each micro-batch")
  p.add_argument("--grad-accum", type=int, default=None,
                 help="micro-batches accumulated per update (default: the config's train.grad_accum)")
  p.add_argument("--stage", choices=("dsa", "ode"), default="dsa",
                 help="the training stage whose step is timed (default dsa; ode: ODE regression on stored pairs)")
  p.add_argument("--only", choices=("gen", "critic"), default=None, help="time one step function only (dsa)")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="after timing, write a jax.profiler trace of one step of each step function to DIR/<gen|critic> "
                      "and print its top kernels by time (also in the JSON)")


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for key, value in PEAK_BF16:
    if key.lower() in kind.lower():
      return value
  return None


def step_model_flops(config, exit_steps, kind: str) -> float:
  """Model FLOPs of one iteration per video (see the module docstring) for exit index k* = exit_steps - 1 (unused
  for kind 'ode': the student's forward and backward on the block-causal video)."""
  from dsa_jax.config_lib import tokens_per_frame
  from dsa_jax.models import factory
  gcfg = factory.dit_config(config, "model")
  tcfg = factory.dit_config(config, "teacher")
  ccfg = factory.dit_config(config, "critic")
  tpf = tokens_per_frame(config)
  c, f = config.video.chunk_frames, config.video.num_frames
  n = f // c
  chunk = [factory.dit_forward_flops(gcfg, c * tpf, (i + 1) * c * tpf, c) for i in range(n)]
  full = lambda d: factory.dit_forward_flops(d, f * tpf, f * tpf, f)
  if kind == "ode":  # block-causal over the whole video = the chunks' forwards against the keys before them
    return 3 * sum(chunk)
  k_before = exit_steps - 1
  critic_train = 3 * full(ccfg)
  if kind == "critic":
    return sum(chunk) * (k_before + 1 + 1) + critic_train
  guided = 2 if float(config.dmd.guidance) != 0.0 else 1
  return sum(chunk) * (k_before + 3 + 1) + guided * full(tcfg) + full(ccfg) + critic_train


def memory_analysis(compiled) -> dict | None:
  """Per-device bytes XLA plans for a compiled program, in GB; None where the backend does not say."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not implemented on some backends)
    return None
  if m is None:
    return None
  get = lambda k: float(getattr(m, k, 0) or 0)
  out = {k.replace("_size_in_bytes", "_gb"): get(k) / 1e9 for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
      "generated_code_size_in_bytes")}
  out["peak_gb"] = out["argument_gb"] + out["output_gb"] - out["alias_gb"] + out["temp_gb"]
  return out


def run_bench_train(args) -> dict:
  import jax
  import jax.numpy as jnp

  from dsa_jax.atomic import check_file_target
  if args.json:
    check_file_target(args.json, "--json")  # before the run, whose results a bad path would lose

  from dsa_jax.config_lib import get_config
  from dsa_jax.parallel import mesh as mesh_lib
  from dsa_jax.training import state as state_lib
  from dsa_jax.training import steps as steps_lib
  from dsa_jax.training import trainer

  config = get_config(args.config, getattr(args, "overrides", []))
  stage = getattr(args, "stage", "dsa")
  if stage == "ode" and args.only:
    raise ValueError("bench train: --only picks a DSA step function (gen or critic); --stage ode has one step")
  if args.teacher_like_model or stage == "ode":  # stored ODE pairs: the teacher is an unused argument
    config.teacher = config.model.copy_and_resolve_references()
  config.train.stage = stage
  config.train.teacher_from = ""
  n_dev = jax.device_count()
  if getattr(args, "grad_accum", None) is not None:
    config.train.grad_accum = int(args.grad_accum)
  accum = steps_lib.grad_accum(config)
  config.train.batch_size = int(args.per_device_batch) * n_dev * accum
  mesh = mesh_lib.make_mesh(config)
  rules = mesh_lib.rules_from_config(config)
  mesh_lib.check_batch(config.train.batch_size, mesh)
  dev = jax.local_devices()[0]

  t0 = time.time()
  bundle = steps_lib.build_steps(config, mesh, rules, stored_ode_pairs=stage == "ode")
  teacher = trainer.load_teacher(config, mesh, rules, bundle.teacher_shardings)
  state, _ = state_lib.create_sharded_state(config, mesh, rules, jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  init_s = time.time() - t0
  b = config.train.batch_size
  ctx = np.random.default_rng(0).standard_normal((b, config.model.text_len, config.model.text_dim), np.float32)
  batch = {"context": trainer.place(ctx, bundle.batch_sharding)}
  if stage == "ode":  # stored pairs: a trajectory at the ladder's sigmas and its end, random
    from dsa_jax.training.rollout import RolloutSpec
    spec = RolloutSpec.from_config(config)
    rs = np.random.default_rng(1)
    frames = (b, spec.num_frames, spec.height, spec.width, spec.channels)
    batch["trajectory"] = trainer.place(rs.standard_normal((frames[0], spec.num_steps) + frames[1:], np.float32),
                                        bundle.batch_sharding)
    batch["video"] = trainer.place(rs.standard_normal(frames, np.float32), bundle.batch_sharding)
  uncond = trainer.place(np.zeros((1, config.model.text_len, config.model.text_dim), np.float32),
                         mesh_lib.replicated(mesh))

  result = {"config": args.config, "name": config.name, "devices": n_dev, "device_kind": dev.device_kind,
            "platform": dev.platform, "mesh": mesh_lib.mesh_sizes(mesh), "global_batch": b,
            "per_device_batch": int(args.per_device_batch), "grad_accum": accum,
            "critic_ratio": int(config.dmd.critic_ratio),
            "teacher": {k: config.teacher[k] for k in ("dim", "ffn_dim", "num_layers", "num_heads")},
            "generator": {k: config.model[k] for k in ("dim", "ffn_dim", "num_layers", "num_heads")},
            "video": {"num_frames": config.video.num_frames, "chunk_frames": config.video.chunk_frames,
                      "height": config.video.height, "width": config.video.width},
            "compute": dict(config.compute), "init_s": init_s, "steps": {},
            "command": ("dsa-jax " + shlex.join(args._argv)) if getattr(args, "_argv", None) is not None
            else shlex.join(sys.argv), "environment": xla_environment()}
  peak = peak_flops(dev)
  kinds = ["ode"] if stage == "ode" else [args.only] if args.only else ["gen", "critic"]
  result["stage"] = stage
  for kind in kinds:
    t0 = time.time()
    with mesh_lib.activation_context(bundle.mesh, bundle.rules):
      compiled = bundle.fns[kind].lower(state, teacher, batch, uncond).compile()
    run = lambda st: compiled(st, teacher, batch, uncond)
    state, m = run(state)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    times, flops = [], []
    for _ in range(int(args.steps)):
      t0 = time.time()
      state, m = run(state)
      m = jax.device_get(m)
      times.append(time.time() - t0)
      flops.append(b * step_model_flops(config, int(m["exit_step"]) if "exit_step" in m else None, kind))
    step_s = float(np.mean(times))
    model_tflop = float(np.mean(flops)) / 1e12
    entry = {"compile_and_first_step_s": compile_s, "step_s": step_s, "step_s_min": float(np.min(times)),
             "step_s_all": [float(t) for t in times], "model_tflop_per_step": model_tflop,
             "achieved_tflops_per_device": model_tflop / step_s / n_dev,
             "mfu": (model_tflop * 1e12 / step_s / n_dev / peak) if peak else None,
             "last_metrics": {k: float(v) for k, v in m.items()}, "compiled_memory": memory_analysis(compiled)}
    if getattr(args, "profile", None):
      from dsa_jax.eval.profiling import profile_one

      def one_step():
        nonlocal state
        state, m = run(state)
        jax.block_until_ready(m)

      entry["profile"] = profile_one(one_step, os.path.join(args.profile, kind), what=f"one '{kind}' step")
    result["steps"][kind] = entry
  per_device = device_memory()
  if per_device:  # the first device under the old names; every local device under per_device_memory
    result["peak_memory_gb"] = per_device[0].get("peak_bytes_in_use", 0) / 1e9
    result["memory_limit_gb"] = per_device[0].get("bytes_limit", 0) / 1e9
    result["per_device_memory"] = per_device
    result["max_peak_memory_gb"] = max(d.get("peak_bytes_in_use", 0) for d in per_device) / 1e9
  if stage == "ode":
    e = result["steps"]["ode"]
    result["mean_iteration_s"], result["mean_mfu"] = e["step_s"], e["mfu"]
    result["videos_per_s"] = b / e["step_s"]
  if "gen" in result["steps"] and "critic" in result["steps"]:
    r = max(1, int(config.dmd.critic_ratio))
    g, c = result["steps"]["gen"], result["steps"]["critic"]
    it_s = (g["step_s"] + (r - 1) * c["step_s"]) / r
    flop = (g["model_tflop_per_step"] + (r - 1) * c["model_tflop_per_step"]) / r
    result["mean_iteration_s"] = it_s
    result["mean_mfu"] = (flop * 1e12 / it_s / n_dev / peak) if peak else None
    result["videos_per_s"] = b / it_s
  result["peak_bf16_flops_per_device"] = peak
  for kind, e in result["steps"].items():
    mem = e["compiled_memory"]
    print(f"bench train {kind}: global batch {b} ({accum} micro-batch{'es' if accum > 1 else ''}), "
          f"{e['step_s']:.3f} s/step" + (f", compiled peak {mem['peak_gb']:.3f} GB/device "
                                         f"(temporaries {mem['temp_gb']:.3f} GB)" if mem else ""), flush=True)
  if args.json:
    from dsa_jax.atomic import write_text
    write_text(args.json, json.dumps(result, indent=2))
  return result
