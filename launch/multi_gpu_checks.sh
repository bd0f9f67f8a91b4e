#!/usr/bin/env bash
# The multi-GPU checks of one host, each run's log and JSON under OUT (commands in OUT/commands.txt):
#
#   launch/multi_gpu_checks.sh OUT                      # every stage on all visible GPUs
#   GPUS=2 STAGES="sampler resume" launch/multi_gpu_checks.sh OUT
#
# sampler  `dsa-jax bench sample` (CONFIG, forced 2.5 steps, random weights): one GPU and tensor parallel (batch 1:
#          FPS and latency to the first chunk), data parallel (GPUS streams, batch GPUS: total FPS), with each
#          device's loops its own (the default) and in lockstep (sampling.per_device_loops=False); tensor parallel
#          again with the VAE decode split over the GPUs by rows (vae.split_height=True)
# train    `dsa-jax bench train`: the CONFIG student + critic + head with a teacher of TEACHER_SHAPE (default the
#          14B shape: dim 5120, FFN 13824, 40 heads, 40 layers), FSDP over the GPUS, and the same step on one GPU;
#          step time, MFU, each GPU's peak memory
# resume   RESUME_CONFIG trained by GPUS processes (launch/gpu_local.sh PROCS=GPUS, one per GPU, jax.distributed)
#          for RESUME_STEPS steps three times: uninterrupted; interrupted (one process killed once the first of
#          three checkpoints is complete, the rest torn down as a scheduler would); the same command rerun. The
#          rerun must resume from a checkpoint and end with the uninterrupted run's parameters bit for bit
#          (XLA's deterministic GPU ops on for this stage); OUT/resume.json says.
# ONLY="NAME ..." runs just those benches of the stages (the names of their logs: sample_1gpu, sample_data2,
# sample_data2_lockstep, sample_tensor2, sample_tensor2_split_height, train_fsdp2, train_1gpu), e.g. to split the
# sampler stage (about 10 minutes on 2 H200s) into shorter runs. The resume stage always runs whole.
# TIMEOUT (seconds, default 900) bounds each command; RESUME_ARGS adds overrides to the resume stage's runs. On CPU
# (a dry run of the plumbing): JAX_PLATFORMS=cpu GPUS=2 CONFIG=tiny TEACHER_SHAPE="" (the config's own teacher)
# RESUME_CONFIG=configs/digits.py:teacher RESUME_ARGS=--config.runlocal=True, and for the sampler and train stages
# XLA_FLAGS=--xla_force_host_platform_device_count=2.
set -uo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,5p' "$0"; exit 2
fi
OUT=$1
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
GPUS=${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU')}
[ "$GPUS" -ge 2 ] 2>/dev/null || { echo "multi_gpu_checks: needs GPUS >= 2 (got '${GPUS}')" >&2; exit 2; }
STAGES=${STAGES:-sampler train resume}
CONFIG=${CONFIG:-wan_1_3b}
TEACHER_SHAPE=${TEACHER_SHAPE---config.teacher.dim=5120 --config.teacher.ffn_dim=13824 --config.teacher.num_heads=40 --config.teacher.num_layers=40}
RESUME_CONFIG=${RESUME_CONFIG:-digits:teacher}
RESUME_STEPS=${RESUME_STEPS:-300}
TIMEOUT=${TIMEOUT:-900}
ONLY=${ONLY:-}
for stage in $STAGES; do  # every stage named is checked before the first one runs (each takes minutes)
  case $stage in sampler|train|resume) ;;
  *) echo "multi_gpu_checks: unknown stage '$stage' (sampler, train, resume)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
status=0

run() {  # run NAME CMD...: logs to OUT/NAME.log, records the command, keeps going on failure; skipped if not in ONLY
  local name=$1; shift
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "$*" >> "$OUT/commands.txt"
  echo "== $name: $*"
  if ! timeout "$TIMEOUT" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   $name FAILED (see $OUT/$name.log)"; tail -n 5 "$OUT/$name.log"; status=1
  fi
  grep -E "FPS|first chunk|s/step|MFU|mfu" "$OUT/$name.log" | tail -n 6
}

for stage in $STAGES; do
  case $stage in
  sampler)
    S=(-m dsa_jax bench sample --config "$CONFIG" --forced-mean-steps 2.5 --runs 3 --no-components)
    run sample_1gpu env CUDA_VISIBLE_DEVICES=0 "$PY" "${S[@]}" --json "$OUT/sample_1gpu.json"
    run "sample_data$GPUS" "$PY" "${S[@]}" --no-stream --batch-size "$GPUS" --config.mesh.shape.data="$GPUS" \
      --config.mesh.shape.tensor=1 --json "$OUT/sample_data$GPUS.json"
    # the same data-parallel batch with every device stepping until the slowest frame of the batch is done
    run "sample_data${GPUS}_lockstep" "$PY" "${S[@]}" --no-stream --batch-size "$GPUS" \
      --config.mesh.shape.data="$GPUS" --config.mesh.shape.tensor=1 --config.sampling.per_device_loops=False \
      --json "$OUT/sample_data${GPUS}_lockstep.json"
    run "sample_tensor$GPUS" "$PY" "${S[@]}" --config.mesh.shape.data=1 --config.mesh.shape.tensor="$GPUS" \
      --json "$OUT/sample_tensor$GPUS.json"
    # the same with the video decoded over all GPUs, its rows split (vae.split_height), instead of on one
    run "sample_tensor${GPUS}_split_height" "$PY" "${S[@]}" --config.mesh.shape.data=1 \
      --config.mesh.shape.tensor="$GPUS" --config.vae.split_height=True \
      --json "$OUT/sample_tensor${GPUS}_split_height.json"
    ;;
  train)
    # shellcheck disable=SC2086  (TEACHER_SHAPE is a list of overrides)
    T=(env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}")
    run "train_fsdp$GPUS" "${T[@]}" "$PY" -m dsa_jax bench train --config "$CONFIG" --steps 3 $TEACHER_SHAPE \
      --config.mesh.shape.data=1 --config.mesh.shape.fsdp="$GPUS" --json "$OUT/train_fsdp$GPUS.json"
    # shellcheck disable=SC2086
    run train_1gpu "${T[@]}" CUDA_VISIBLE_DEVICES=0 "$PY" -m dsa_jax bench train --config "$CONFIG" --steps 3 \
      $TEACHER_SHAPE --json "$OUT/train_1gpu.json"
    ;;
  resume)
    ONLY=""  # its three runs belong together
    R=$OUT/resume; rm -rf "$R"; mkdir -p "$R"
    every=$(( RESUME_STEPS / 3 > 0 ? RESUME_STEPS / 3 : 1 ))
    # shellcheck disable=SC2206  (RESUME_ARGS is a list of overrides)
    args=(--config.train.steps="$RESUME_STEPS" --config.train.ckpt_every="$every" --config.train.log_every="$every"
          ${RESUME_ARGS:-})
    port=${PORT:-12399}
    launch=(env PROCS="$GPUS" PYTHON="$PY" XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
            bash "$HERE/gpu_local.sh" "$RESUME_CONFIG")
    run resume_reference env PORT=$port "${launch[@]}" "$R/reference" "${args[@]}"
    echo "PORT=$((port + 1)) ${launch[*]} $R/run ${args[*]}   # killed once checkpoint $every is complete" \
      >> "$OUT/commands.txt"
    PORT=$((port + 1)) "${launch[@]}" "$R/run" "${args[@]}" > "$OUT/resume_interrupted.log" 2>&1 &
    job=$!
    # once the first checkpoint is complete: kill one process (rank 1), then tear the job down as a scheduler would
    for _ in $(seq 1 $(( 5 * TIMEOUT ))); do
      done_steps=$("$PY" -c "import sys; from dsa_jax.checkpoint.workdir import complete_steps; \
print(max(complete_steps(sys.argv[1]), default=-1))" "$R/run/checkpoints" 2>/dev/null || echo -1)
      [ "$done_steps" -ge "$every" ] && break
      kill -0 "$job" 2>/dev/null || break
      sleep 0.2
    done
    victim=$(pgrep -f "dsa_jax train .*--workdir $R/run " | sed -n 2p)
    if [ -n "$victim" ]; then kill -9 "$victim"; else echo "   resume: the run ended before it could be killed"; fi
    sleep 5
    pkill -TERM -f "dsa_jax train .*--workdir $R/run " 2>/dev/null
    wait "$job" 2>/dev/null
    run resume_rerun env PORT=$((port + 2)) "${launch[@]}" "$R/run" "${args[@]}"
    kill_step=$every
    "$PY" - "$R" "$kill_step" "$RESUME_STEPS" "$OUT/resume.json" <<'EOF' || status=1
import glob, json, sys
import numpy as np
import jax
from dsa_jax.checkpoint.params_io import load_params
root, kill_step, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ref, _ = load_params(f"{root}/reference/model")
new, _ = load_params(f"{root}/run/model")
a, b = jax.tree_util.tree_leaves_with_path(ref), jax.tree_util.tree_leaves_with_path(new)
same_tree = [p for p, _ in a] == [p for p, _ in b]
diff = max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for (_, x), (_, y) in zip(a, b)),
           default=0.0) if same_tree else None
logs = "".join(open(f).read() for f in sorted(glob.glob(f"{root}/run/train.*.log")))
resumed = [l for l in logs.splitlines() if "resumed from" in l]
res = {"kill_after_step": kill_step, "steps": steps, "resumed_lines": resumed[:4], "same_tree": same_tree,
       "max_abs_diff": diff, "bit_identical": diff == 0.0}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res))
sys.exit(0 if res["bit_identical"] and resumed else 1)
EOF
    ;;
  esac
done
exit $status
