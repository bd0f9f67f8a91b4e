"""The one place where every config field and its default lives; `configs/*.py` start from here."""

from __future__ import annotations

import ml_collections

# Logical axis name -> mesh axes. Parameters and activations carry logical names; this table (a config field, so
# sweeps can change it) decides where they go. FSDP shards the model dim of every weight; tensor parallelism shards
# heads and the FFN hidden dim. Activations have names of their own (activation_*): the batch over data x fsdp,
# heads and the FFN hidden dim over tensor, the residual stream's model dim replicated (FSDP gathers weights, not
# activations).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("length", None),
    ("kv_length", None),
    ("frames", None),
    ("text_embed", None),
    ("text_length", None),
    ("patch", None),
    ("mod", None),
    ("freq", None),
    ("conf_hidden", None),
    ("conf_steps", None),
    ("vocab", "tensor"),
)


def wan_model(dim: int, ffn_dim: int, num_layers: int, num_heads: int, *, text_dim: int = 4096, text_len: int = 512,
              channels: int = 16, patch_size=(1, 2, 2), freq_dim: int = 256) -> ml_collections.ConfigDict:
  """A Wan2.1 DiT config (generator, teacher or critic)."""
  return ml_collections.ConfigDict(dict(
      dim=dim, ffn_dim=ffn_dim, num_layers=num_layers, num_heads=num_heads,
      text_dim=text_dim, text_len=text_len, in_channels=channels, out_channels=channels,
      patch_size=tuple(patch_size), freq_dim=freq_dim, eps=1e-6, rope_theta=10000.0, rope_max_frames=1024,
      cross_attn_norm=True,
  ))


def base_config() -> ml_collections.ConfigDict:
  """Every field with the Wan2.1-1.3B / Self Forcing defaults; small configs override the sizes."""
  c = ml_collections.ConfigDict()
  c.name = "dsa"
  c.seed = 0
  c.model = wan_model(1536, 8960, 30, 12)
  # Self Forcing: the real score is Wan2.1-14B, the fake score (critic) a 1.3B initialised like the student.
  c.teacher = wan_model(5120, 13824, 40, 40)
  c.critic = wan_model(1536, 8960, 30, 12)

  c.video = ml_collections.ConfigDict(dict(
      height=480, width=832, num_frames=21, chunk_frames=3, vae_stride=(4, 8, 8), latent_channels=16, fps=16,
  ))
  # Pixel decoding: kind 'none' (latents only), 'wan' (the Wan VAE, checkpoint at `path`) or 'identity' (the latents
  # are pixels already, as in the pixel-space digits recipe). conv3d: how the Wan decoder's 3x3x3 convs are lowered
  # ('native', 'fold' or 'taps'; same result, speed depends on the backend: `dsa-jax bench sample --decode-only`).
  # 'fold' is the default: on one H200 it decoded 81 frames of 832x480 in 0.75 s against 0.91 s for 'native'.
  # split_height: on a mesh where a video is not split over the batch (tensor parallelism, one video), decode it with
  # its rows split over every device of the mesh (XLA exchanges the convolutions' edge rows) instead of gathering it
  # onto one device; needs the latent height to divide by the number of devices. Off by default: not yet measured
  # against the one-device decode on GPUs (`launch/multi_gpu_checks.sh` runs both).
  c.vae = ml_collections.ConfigDict(dict(kind="none", path="", chunked=True, conv3d="fold", split_height=False))
  # Text: 'umt5' (checkpoint + SentencePiece model at path/tokenizer), 'bow' (fixed bag-of-words encoder saved at
  # path) or 'random' (deterministic random embeddings per prompt, for benchmarks).
  c.text = ml_collections.ConfigDict(dict(kind="random", path="", tokenizer="", negative_prompt=""))

  c.diffusion = ml_collections.ConfigDict(dict(shift=5.0, num_train_timesteps=1000, train_t_sampler="uniform"))

  c.sampling = ml_collections.ConfigDict(dict(
      ladder=(1000, 750, 500, 250, 125),  # before warping; our reading: Self Forcing's 4 steps plus a 5th
      threshold=0.5, min_steps=1, max_steps=5,
      # The fewest steps of the first chunk's frames (0: min_steps, like every chunk; capped at a frame's max_steps).
      # Every later chunk attends to the first through the KV cache, so its errors spread over the whole video: the
      # re-rolled video oracle spends most of its extra steps there, and the digits model samples better per step
      # with its first chunk at full steps. Calibration tables record it; a budget needs a table made with the same.
      first_chunk_min_steps=0,
      # guidance g: classifier-free guidance cond + g (cond - uncond), 0 = off (the convention of dmd.guidance).
      context_noise=0.0, guidance=0.0, batch_size=1, checkpoint="", use_ema=True,
      # What a finished frame feeds its unfinished chunk neighbours (our reading): 'clean' = its final x0 at
      # t = context_noise, like a context frame; 'noisy' = its last noisy input.
      frozen_frames="clean",
      # 'confidence' (DSA: the head) or 'x0_delta' (the training-free baseline: x0 changed less than threshold).
      stop_rule="confidence",
      # Long videos: attend to the last window_frames latent frames (the chunk being made included) plus the first
      # sink_frames (attention sinks) in a ring-buffer KV cache of sink + window frames; 0 = the whole video.
      # Both are multiples of video.chunk_frames.
      window_frames=0, sink_frames=0,
      # A step budget instead of `threshold`: average denoising steps per frame, turned into tau by the calibration
      # table stored with the model (`dsa-jax calibrate`); 0 = use `threshold`.
      mean_steps=0.0,
      # At threshold +-inf the confidence head decides nothing: 'every' still runs it at every step (full confidence
      # traces, e.g. for plots and head reports), 'last' only at steps where a frame finishes (its reported
      # confidence; conf_trace nan at the other steps), saving the head's work in fixed-step sampling.
      fixed_step_head="every",
      # The sampler's DiT with its layers unrolled and one KV-cache buffer per layer: no copy of a layer's cache at
      # every forward (faster on GPU, a longer compile); False scans the layers over one stacked cache.
      unroll_layers=False,
      # Over a mesh whose devices all lie on the data axis (weights replicated), each device runs the chunk and step
      # loops of its own videos (one `shard_map` body) instead of all devices stepping together until the slowest
      # frame of the whole batch is done: the same videos, no cross-device sync per loop iteration. (fp8 layers with
      # dynamic activation scales then scale by each device's own videos: each video as when sampled alone.) Without
      # effect with CFG, on one device, or on meshes with fsdp or tensor parallelism.
      per_device_loops=True,
      # A confidence head from a head folder of its own (`dsa-jax convert export-head`) instead of the checkpoint's:
      # its conf_target and calibration table come with it; it must have been trained for this generator (checked by
      # the generator fingerprint it records). '' = the checkpoint's head.
      head="",
  ))

  c.conf = ml_collections.ConfigDict(dict(
      hidden=256, embed_dim=64, detach_trunk=True, target="dmd", target_ema=0.99, consistency_scale=0.0,
      loss_weight=1.0,
  ))

  c.compute = ml_collections.ConfigDict(dict(
      dtype="bfloat16", param_dtype="float32", attention="auto", scan_layers=True,
      # What the DiT's blocks keep for the backward pass: 'full' (their inputs only: least memory), 'attention_saved'
      # (also the self-attention kernel's inputs, output and statistics: the kernel is not rerun), 'dots',
      # 'dots_no_batch' (also matmul outputs), 'none' (everything).
      remat="full",
      splash_interpret=False,  # attention='splash' in Pallas interpret mode: the TPU kernel on any platform (tests)
      # DiT norm outputs, modulation, gates and time embedding: 'compute' (in compute.dtype) or 'float32' (as Wan).
      elementwise="compute",
      # The DiT blocks' linear layers: 'default' (compute.dtype) or 'fp8' (float8_e4m3fn operands with per-tensor
      # scales from the weight's and the activation's amax, float32 accumulation; fp8 GEMMs on Hopper).
      matmul="default",
      # With matmul='fp8', the activations' scales: 'dynamic' (each call measures the activation's amax: two extra
      # passes over it per layer) or 'calibrated' (fixed per layer from the amax over a few calibration forwards the
      # sampler runs once for its weights, with one power of two of headroom; values beyond it saturate).
      fp8_activations="dynamic",
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
      rules=DEFAULT_RULES,
  ))

  c.dmd = ml_collections.ConfigDict(dict(
      guidance=3.0, critic_ratio=5, t_min=20.0, t_max=980.0, same_step_across_chunks=True,
  ))

  c.train = ml_collections.ConfigDict(dict(
      stage="dsa",  # 'teacher' | 'ode' | 'dsa'
      steps=600, batch_size=64, lr=2e-6, critic_lr=4e-7, conf_lr=1e-4, b1=0.0, b2=0.999, weight_decay=0.01,
      grad_clip=10.0, ema_decay=0.99, ema_start=200, log_every=10, ckpt_every=100, keep=3, async_ckpt=True,
      init_from="", teacher_from="", ode_steps=48, ode_pairs="",
      # Batches whose loss or gradient is NaN/inf that may be skipped (the update undone) before the run stops;
      # 0 stops at the first. Above 0 the trainer keeps a second copy of the training state in device memory.
      nonfinite_skip=0,
  ))
  t = c.train
  # micro-batches accumulated per update inside the jitted step (few devices: global batch_size with K times less
  # activation memory); batch_size stays the global batch per update and must divide by K (and data x fsdp x K)
  t.grad_accum = 1
  t.max_time_s = 0.0  # wall-clock budget in seconds: stop (with a checkpoint) once exceeded; 0 = no limit
  t.cfg_dropout = 0.1  # teacher stage: fraction of prompts replaced by the empty prompt (classifier-free guidance)
  t.warmup_steps = 0  # linear learning-rate warmup over this many steps; 0 = none
  # AdamW with b1 = 0: 'auto' stores no first moment (it equals the gradient; one fp32 copy of the generator and of
  # the critic less); 'keep' stores it, as optimiser states saved before did (resuming such a run picks it by itself)
  t.adam_first_moment = "auto"
  t.continue_head = True  # head and dsa stages: start from init_from's head when it has one of the same conf.target
  t.lr_decay = "constant"  # learning rate after warmup: 'constant' or 'cosine' (to 5% of the rate at train.steps)
  t.teacher_ema_decay = 0.0  # teacher stage: EMA of the teacher's weights with this decay, exported instead of the raw weights; 0 = none
  t.ode_guidance = -1.0  # classifier-free guidance of the ODE-pair teacher solves; negative = dmd.guidance
  t.exit_steps = 0  # DSA rollout: exit step drawn among the first exit_steps ladder steps; 0 = sampling.max_steps
  # (len(train.ladder) when that is set)
  t.min_exit_steps = 1  # DSA / head rollouts: exits drawn from [min_exit_steps, exit_steps] steps. A sampler with a step
  # floor (sampling.min_steps) never outputs a frame after fewer steps, so training its generator there is wasted
  # The timestep ladder of training rollouts (ode / dsa / head stages); () = sampling.ladder. A model trained on one
  # ladder may sample best on a sub-ladder of it (the digits model: trained on 5 steps, sampled on 3 of them).
  t.ladder = ()
  t.rollout_remat = "auto"  # jax.checkpoint around each rollout chunk's exit forward: 'auto', 'chunk' or 'none'
  t.critic_from = ""  # dsa stage: workdir or checkpoint whose model initialises the critic ('' = teacher or generator)
  t.compilation_cache = ""  # folder for JAX's persistent compilation cache ('' = off)
  t.eval_every = 0  # pixel-space configs: score the model on held-out prompts every N steps (FD, agreement); 0 = off
  t.eval_num = 64  # held-out prompts per in-training evaluation
  t.eval_evaluator = ""  # evaluator checkpoint for it ('' = the shipped one)
  t.eval_teacher_steps = 16  # teacher stage: Euler steps of the teacher sampler that is scored
  t.tensorboard = True  # also write TensorBoard event files next to metrics.jsonl

  c.data = ml_collections.ConfigDict(dict(
      prompts=ml_collections.ConfigDict(dict(kind="text", path="", column="prompt", name="", split="train")),
      videos="", shuffle=True, num_workers=0,
      num_videos=100_000,  # size of the generated moving-digits set when data.videos is 'digits[:split]'
  ))
  c.runlocal = False
  return c
