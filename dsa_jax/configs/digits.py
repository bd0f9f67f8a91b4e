"""Moving handwritten digits, pixel space: the demo recipe and the default model that `make sample` uses.

32x32 grayscale frames, 16 frames, 2-frame chunks, a 4M-parameter DiT on 4x4 patches (64 tokens per frame), a fixed
bag-of-words text encoder over the digits grammar. Three stages, each a `dsa-jax train` run that resumes from the
previous stage's exported model (arg = stage):

  dsa-jax train --config digits:teacher --workdir runs/digits/teacher
  dsa-jax train --config digits:ode --workdir runs/digits/ode --config.train.teacher_from=runs/digits/teacher/model
  dsa-jax train --config digits:dsa --workdir runs/digits/dsa \\
      --config.train.teacher_from=runs/digits/teacher/model --config.train.init_from=runs/digits/ode/model
  dsa-jax sample --config digits --ckpt runs/digits/dsa/model --out out/digits --prompt "digit 3 moves slowly"
  dsa-jax train --config digits:head --workdir runs/digits/head  # a new confidence head for the shipped generator

Add `--config.runlocal=True` to any stage for the toy-size CPU variant (a few minutes for the whole chain).
Stage 'dsa' with `--config.conf.target=consistency` trains the alternative confidence target.
"""

import os

from dsa_jax.config_defaults import base_config, wan_model

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "assets")
DEFAULT_MODEL = os.path.join(_ASSETS, "digits_model")


def _model():
  return wan_model(192, 768, 6, 4, text_dim=64, text_len=24, channels=1, patch_size=(1, 4, 4), freq_dim=128)


def get_config(arg=None):
  stage = arg or "dsa"
  if stage not in ("teacher", "ode", "dsa", "head"):
    raise ValueError(f"configs/digits.py: arg must be teacher, ode, dsa or head, got {stage!r}")
  c = base_config()
  c.name = "digits"
  c.model, c.teacher, c.critic = _model(), _model(), _model()
  # Pixel space: the "latents" are frames in [-1, 1]; the VAE is the identity (stride 1).
  c.video.update(height=32, width=32, num_frames=16, chunk_frames=2, vae_stride=(1, 1, 1), latent_channels=1, fps=8)
  c.vae.kind = "identity"
  c.text.update(kind="bow", path="digits")
  c.diffusion.shift = 3.0
  # The model samples on a 3-step ladder, (1000, 500, 250): skipping t = 750 and t = 125 of the 5-step ladder the
  # generator was first trained on is what the student did best (fixed 3 steps FD 69.0 against 86.5 on the first three
  # of the 5-step ladder); its last three training stages then ran on the 3-step ladder itself (fixed 3 steps 69.0 ->
  # 57.6 -> 48.9; docs/claim.md). A step budget of 2.5 average steps per frame, turned into tau by the shipped model's
  # calibration table (512 prompts, made on this ladder); threshold is the fallback for a model without a table. Every
  # frame takes at least 2 steps above a budget of 2: one step is this student's weakest output (FD 255). The shipped
  # model's own head is a 'gain' head (what one more step is worth to a frame), trained on this ladder: better than
  # fixed steps beyond 2 paired SE at every budget from 1.25 to 2.75 steps held out, calibrated (ECE 0.020); the 'dmd'
  # head it was trained with is dsa_jax/assets/digits_heads/dmd (docs/claim.md).
  # The first chunk (2 of 16 frames) always takes the full 3 steps: every later chunk attends to it, the re-rolled
  # video oracle spends most of its extra steps there, and with it DSA's FD at 2.13 steps (58.1) beats plain DSA's at
  # 2.10 (71.1) on the same 512 held-out prompts. Budgets below 2 use the model's 1-2 steps table (first chunk at 2).
  c.sampling.update(ladder=(1000, 500, 250), threshold=0.46, min_steps=2, max_steps=3, mean_steps=2.5,
                    first_chunk_min_steps=3, checkpoint=DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else "")
  c.train.ladder = (1000, 750, 500, 250, 125)
  c.conf.update(hidden=128, embed_dim=32)
  c.compute.update(dtype="bfloat16", remat="none")
  c.data.prompts.update(kind="digits", split="train")
  c.data.videos = "digits:train"
  c.train.update(stage=stage, batch_size=32, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0, log_every=50,
                 ckpt_every=1000, keep=2, ema_start=0, ema_decay=0.999, async_ckpt=True,
                 eval_every={"teacher": 2000, "ode": 500}.get(stage, 300), eval_num=128)
  if stage == "teacher":
    # A high constant-ish rate is what makes the teacher follow prompts: at 3e-4 (constant, or cosine over 10k steps)
    # prompt agreement was still <= 0.10 after 8-10k steps, at 6e-4 it was 0.29 at 8k and 0.63 at ~16k with a
    # cosine tail (docs/teacher_curves). An EMA of the teacher (exported) smooths the last steps. The shipped model's
    # teacher was trained as 8k constant steps, then continued with a cosine schedule for 9k more.
    c.train.update(steps=18000, batch_size=64, lr=6e-4, warmup_steps=1000, lr_decay="cosine", teacher_ema_decay=0.999,
                   eval_teacher_steps=32, eval_num=256)
  elif stage == "ode":
    c.train.update(steps=2000, batch_size=32, lr=1e-4, warmup_steps=200, lr_decay="cosine", ode_steps=32)
  elif stage == "head":
    # A confidence head for an existing generator (default: the shipped model's), trained alone: no teacher.
    c.train.update(steps=3000, batch_size=64, conf_lr=1e-3, init_from=c.sampling.checkpoint)
    c.conf.target = "gain"  # the shipped model's kind of head ('dmd' needs the teacher and critic this stage lacks)
  else:
    # The shipped model: 1.8k steps from the ODE stage, then 3k more at a constant rate (in-training FD flat over
    # the last 1.5k), then 3.3k more with a cosine-decaying rate (`--config.train.lr_decay=cosine`), which is what
    # moved it: fixed 2 steps FD 198 -> 179, DSA at 2.5 steps 159 -> 129 on 512 held-out prompts (docs/claim.md;
    # stage 'polish' of launch/digits_gpu.sh); then 2.4k more with the rate decaying from 1e-5 ('polish2'): fixed 4
    # steps 101 -> 99.6, DSA at 3 steps 121 -> 117; then 2.5k more at a lower DMD guidance, 1.5 instead of 3
    # ('polish3'): fixed 3 steps 124 -> 108, DSA at 3 steps 117 -> 95 (guidance 2: fixed 3 steps 105, fixed 4 92
    # against 1.5's 87; short probes at 1 and 0.5 went further, docs/claim.md); then 3.3k more at guidance 0.5
    # ('polish4'). The last three stages ran on the sampling ladder with exits at 2 or 3 steps only
    # (`--config.train.ladder='(1000,500,250)' --config.train.min_exit_steps=2`, the sampler's floor): 1.6k steps at
    # lr 4e-5 ('ladder3'; fixed 3 steps FD 69.0 -> 58.7; exits at 1 to 3 steps instead: 82.0, worse) and 1.2k at
    # 8e-5 ('ladder3b'; 57.6), then 3.6k at 4e-5 and DMD guidance 0.5 against a second teacher ('ladder3c'; 48.9).
    # Each continuation is `--config.train.init_from=` the previous model (its EMA generator
    # and head, a fresh critic from the teacher).
    c.train.update(steps=4000, lr=2e-5, critic_lr=1e-4, conf_lr=1e-3, b1=0.0, ema_decay=0.99)
    c.dmd.update(guidance=3.0, critic_ratio=5)
  return c


def runlocal(c):
  """Toy size for CPU: a 2-layer model on 8 frames of 16x16, a few dozen steps per stage."""
  small = lambda: wan_model(64, 128, 2, 4, text_dim=64, text_len=24, channels=1, patch_size=(1, 4, 4), freq_dim=32)
  c.model, c.teacher, c.critic = small(), small(), small()
  c.video.update(height=16, width=16, num_frames=8)
  c.conf.update(hidden=32, embed_dim=16)
  c.compute.dtype = "float32"
  c.train.update(eval_every=0)  # the shipped evaluator reads 32px clips
  c.train.update(steps=min(c.train.steps, 30), batch_size=4, warmup_steps=min(c.train.warmup_steps, 5), log_every=5, ckpt_every=15, ode_steps=8,
                 async_ckpt=False)
  c.sampling.checkpoint = ""
  return c


def get_sweep(arg=None):
  """Points of `dsa-jax sweep KIND --config configs/digits.py[:stage]` when no --sweep is given: thresholds around the
  default for sampling / evaluating the DSA model, learning rates for training a stage."""
  stage = arg or "dsa"
  if stage == "dsa":
    return {"sampling.threshold": [0.4, 0.5, 0.6, 0.7, 0.8, float("inf")]}
  base = get_config(stage).train.lr
  return {"train.lr": [round(base * f, 12) for f in (1 / 3, 1, 3)]}
