"""The DSA sampler: autoregressive chunks, per-frame dynamic stopping, a KV cache, one compiled program.

Per chunk, a `lax.while_loop` walks the warped ladder sigma_0 > sigma_1 > ...: the generator predicts
the velocity of the chunk (cache mode, per-frame t = 1000 sigma_k), x0 = x - sigma v, and the confidence head
predicts per frame c_k = sigmoid(logit). A frame is done once (steps >= min_steps and c_k >= tau) or
steps == max_steps (the rules are the functions of `stop_rules`); its output is its last x0. Unfinished frames are
re-noised to the next sigma with fresh noise (Self Forcing's consistency step). The loop ends when every frame of
the chunk, in every batch sample, is done. Then one cache-fill forward at t = context_noise on the clean chunk
overwrites the chunk's K/V slot (not after the last chunk: nothing attends to it). Chunks run in a `lax.fori_loop`
(the last one peeled off it), so a whole video is one jitted program; the KV
cache is donated and carried in the loop state (and, inside the DiT, updated in place: only a chunk's keys/values
are written). With `sampling.unroll_layers` the DiT's layers are unrolled over one cache buffer per layer, which each
attention reads where it lies (a layer scan must copy its layer's slice of the stacked cache out at every forward);
scanned generator variables are then split per layer once per program call. The text cross-attention keys/values depend only on the prompt: they are computed once per video
(every prompt of a schedule; per chunk in `chunk_step`) and passed to every forward, as are a chunk's RoPE tables.

Thresholds, min/max steps (per frame), guidance and seeds are traced (`SamplingControls`): changing them never
recompiles. Only the use of classifier-free guidance (an extra batch half with its own KV cache) is static.

Frames of a chunk attend to each other, so a finished frame still feeds the forward of its unfinished neighbours.
What it feeds is `sampling.frozen_frames` (our reading): 'clean' (default) feeds its final x0 at t = context_noise,
like a context frame; 'noisy' keeps feeding the input and t of the step at which it stopped.

Noise is drawn per sample from fold_in(fold_in(fold_in(rng, seed_b), chunk), slot) with slot 0 for the chunk's
initial noise, k + 1 for the re-noising after step k and L + 1 for the context noise, so a sample's video depends
only on its own seed (not on its batch neighbours), and the reference samplers (`reference.py`) reproduce it exactly.

A Sampler holds only what its config fixes and its compiled programs: every call allocates its own KV cache, so
sampling and streaming never write state into the object. Loading weights is `dsa_jax.checkpoint.loading`'s job.

Long videos. `make_sampler(config, num_frames=N)` samples N latent frames (any multiple of the chunk size). With
`sampling.window_frames = W` the KV cache is a ring buffer of S + W frames (S = `sampling.sink_frames`): the first
S frames stay (attention sinks), later chunks take the ring slot of the oldest window chunk, so a chunk attends to
the sinks and the last W frames (itself included). The cache, and so memory and time per chunk, is the same for
every N; N changes only the loop's trip count and the size of the outputs. W = 0 (the default) caches the whole
video, as before.

Positions. Keys are cached after RoPE at their absolute frame positions (the RoPE table grows to N rows; it is built
in float64, so large positions cost no precision). RoPE scores depend only on position differences, so a query sees
its window at distances 0 .. W-1 exactly as it would with window-relative positions: nothing is re-rotated and no
distance exceeds the window. Sinks would drift ever further into the past, so for each call they are rotated (not
in the cache, only for that attention) to sit right before the window, as in StreamingLLM's rolling positions:
sink j appears at position (window start - S + j). Until the ring wraps (N <= S + W) nothing moves and the video
equals the whole-video sampler's exactly.

Continuation. `init_latents` (P given frames, P <= S + W and P < N) are written as finished frames: chunks they
fill take no denoising step (their cache-fill forward at context_noise writes them into the cache as it would a
sampled chunk); in the chunk they fill partly the given frames start out done (steps 0), feeding the others as
finished frames do, and the remaining frames are sampled. Given frames report steps 0 and confidence 1.

Prompt schedule. With a context of K prompts (B, K, text_len, text_dim) and `prompt_index` (B, num_chunks), chunk i
uses prompt prompt_index[:, i] (index values are traced: a new schedule of the same K never recompiles).

Over a mesh (`config.mesh`, more than one device): parameters are sharded by the training rules (FSDP over the
model dim, tensor parallelism over heads and the FFN), the KV cache over batch (data x fsdp) and heads (tensor),
context, controls and outputs over batch; each program is still one `jax.jit`, with in/out shardings per batch
size and the cache donated, traced with the model's activation constraints on. One device: plain jit, as before.
On a mesh of the data axis alone, the whole-video program runs its loops per device (`sampling.per_device_loops`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.config_lib import latent_hw, tokens_per_frame
from dsa_jax.diffusion import flow
from dsa_jax.diffusion.guidance import guided_velocity
from dsa_jax.models import factory
from dsa_jax.models.confidence import ConfidenceConfig, ConfidenceHead
from dsa_jax.models.dit import (DiTConfig, WanDiT, WanTextKV, cache_logical_axes, fp8_activation_amax, fp8_weights,
                                 init_cache, rope_for, unstack_layers)
from dsa_jax.models.factory import as_variables
from dsa_jax.parallel import mesh as mesh_lib
from dsa_jax.sampling import stop_rules
from dsa_jax.sampling.stop_rules import STOP_RULES

FROZEN_MODES = ("clean", "noisy")
FIXED_STEP_HEAD = ("every", "last")


# ----------------------------------------------------------------------------------------------------------------------
# State and controls


@flax.struct.dataclass
class SamplingControls:
  """Traced knobs of one sampling call (batch B, F latent frames). Changing values never recompiles.

  threshold (B,) float32: confidence tau per sample (+inf: always max_steps; -inf: always min_steps; with
    `sampling.fixed_step_head = 'last'` the head then runs only at steps where a frame finishes, so conf_trace is
    nan at the others).
  min_steps, max_steps (B, F) int32: per sample and frame (a fixed per-frame pattern forces a step schedule).
  guidance (B,) float32: classifier-free guidance g, cond + g (cond - uncond), 0 = off (used only when the sampler
    is called with an unconditional context; see `dsa_jax.diffusion.guidance`).
  seed (B,) uint32: per-sample noise seed.
  """
  threshold: jax.Array
  min_steps: jax.Array
  max_steps: jax.Array
  guidance: jax.Array
  seed: jax.Array


@flax.struct.dataclass
class Conditioning:
  """Optional per-call inputs beyond the prompt (None: not used). Shapes are static per sampler, so the number of
  given frames and the schedule are traced.

  init_latents (B, cache_frames, h, w, C) float32: the given first frames, zero-padded; init_frames (B,) int32: how
  many are given. prompt_index (B, num_chunks) int32: the prompt of each chunk (the context is (B, K, L, D)).
  """
  init_latents: Optional[jax.Array] = None
  init_frames: Optional[jax.Array] = None
  prompt_index: Optional[jax.Array] = None


@flax.struct.dataclass
class SamplerState:
  """Loop state of one chunk's denoising `while_loop`."""
  k: jax.Array          # () int32: the step about to run
  x: jax.Array          # (B, c, H, W, C) float32: current noisy latents of unfinished frames
  x0: jax.Array         # (B, c, H, W, C) float32: last x0 prediction per frame (the output of finished frames)
  steps: jax.Array      # (B, c) int32: steps taken per frame
  done: jax.Array       # (B, c) bool
  conf: jax.Array       # (B, c) float32: confidence at the last step taken
  trace: jax.Array      # (B, c, L) float32: confidence at every step (nan where not taken)
  keys: jax.Array       # (B, 2) uint32: per-sample keys of this chunk
  cache: Any            # {'k', 'v'}: (layers, B', N*T, heads, head_dim), B' = 2B with CFG


@flax.struct.dataclass
class SampleOutput:
  """latents (B, F, H, W, C) float32; steps (B, F) int32; confidences (B, F) at each frame's last step;
  conf_trace (B, F, L) per step (nan where not taken); chunk_iters (num_chunks,) while-loop iterations per chunk
  (= DiT denoising forwards per chunk, the cost driver)."""
  latents: jax.Array
  steps: jax.Array
  confidences: jax.Array
  conf_trace: jax.Array
  chunk_iters: jax.Array


@flax.struct.dataclass
class ChunkOutput:
  latents: jax.Array      # (B, c, H, W, C)
  steps: jax.Array        # (B, c)
  confidences: jax.Array  # (B, c)
  conf_trace: jax.Array   # (B, c, L)
  iters: jax.Array        # () int32


# ----------------------------------------------------------------------------------------------------------------------
# Noise (shared with the reference samplers so they reproduce the same video)


def sample_keys(rng, seeds):
  """(B,) seeds -> (B, 2) per-sample keys."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  return jax.vmap(lambda s: jax.random.fold_in(rng, s))(seeds)


def chunk_keys(keys, chunk_index):
  return jax.vmap(lambda k: jax.random.fold_in(k, chunk_index))(keys)


def slot_noise(ckeys, slot, shape):
  """Per-sample N(0, 1) of `shape` for noise slot `slot` (0 initial, k+1 after step k, L+1 context)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, slot), shape, jnp.float32))(ckeys)


def parse_threshold(text, field: str = "--threshold") -> float:
  """'0.7' / 'inf' / '-inf' -> float; anything else (nan included) is a ValueError naming `field`."""
  try:
    value = float(text)
  except (TypeError, ValueError):
    raise ValueError(f"{field}: expected a number (inf and -inf allowed), got {text!r}") from None
  if np.isnan(value):
    raise ValueError(f"{field}: expected a number (inf and -inf allowed), got {text!r}")
  return value


def _per_sample(value, batch: int, name: str, dtype) -> np.ndarray:
  """A scalar or one value per sample -> (batch,); anything else is an error naming `name` (a per-frame threshold,
  say, would otherwise fail deep inside numpy's broadcasting)."""
  arr = np.asarray(value, dtype)
  if arr.shape not in ((), (batch,)):
    raise ValueError(f"sampling {name}: expected a scalar or one value per sample, shape ({batch},), got shape "
                     f"{arr.shape}")
  return np.broadcast_to(arr, (batch,))


def _readable(x) -> bool:
  """Whether this process can read all of `x` (not a tracer, not an array spread over other hosts' devices)."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_controls(controls, batch: int, num_frames: int):
  """Raises naming the field unless `controls` are full-shape controls for `batch` samples of `num_frames` frames
  with a threshold that is a number: controls edited with `.replace()` skip make_controls' checks."""
  want = {"threshold": ((batch,), "f"), "min_steps": ((batch, num_frames), "iu"),
          "max_steps": ((batch, num_frames), "iu"), "guidance": ((batch,), "f"), "seed": ((batch,), "iu")}
  for name, (shape, kinds) in want.items():
    value = getattr(controls, name, None)
    if not hasattr(value, "shape") or tuple(value.shape) != shape or np.dtype(value.dtype).kind not in kinds:
      got = f"{np.dtype(value.dtype)} {tuple(value.shape)}" if hasattr(value, "shape") else repr(value)
      raise ValueError(f"controls.{name}: expected shape {shape} ({'float' if kinds == 'f' else 'integer'}) for batch "
                       f"{batch} and {num_frames} frames, got {got} (make them with sampler.make_controls)")
  if _readable(controls.threshold) and bool(jnp.isnan(controls.threshold).any()):
    raise ValueError("controls.threshold: expected numbers (inf allowed), got nan")


def _per_frame_ints(value, batch: int, frames: int, num_steps: int, name: str) -> np.ndarray:
  """Scalar, (B,) per sample, (1, F) / (B, F) per frame -> (B, F) int32 in [1, num_steps]."""
  a = np.asarray(value)
  if a.dtype.kind not in "iu":
    if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
      raise ValueError(f"sampling {name}: expected integers, got {value!r}")
  a = a.astype(np.int64)
  if a.ndim == 1:
    if a.shape[0] != batch:
      raise ValueError(f"sampling {name}: a 1-d value is per sample and needs {batch} entries, got {a.shape[0]}")
    a = a[:, None]
  elif a.ndim == 2:
    if a.shape[1] != frames or a.shape[0] not in (1, batch):
      raise ValueError(f"sampling {name}: a 2-d value is per frame, shape (1 or {batch}, {frames}); got {a.shape}")
  elif a.ndim != 0:
    raise ValueError(f"sampling {name}: expected a scalar, (B,) or (B, F) value, got shape {a.shape}")
  if np.any(a < 1) or np.any(a > num_steps):
    raise ValueError(f"sampling {name}: must lie in [1, {num_steps}] (the ladder has {num_steps} steps), got "
                     f"{np.unique(a).tolist()}")
  return np.broadcast_to(a, (batch, frames)).astype(np.int32)


def first_chunk_floor(min_steps: np.ndarray, max_steps: np.ndarray, chunk_frames: int, floor: int) -> np.ndarray:
  """(B, F) floors with the first chunk's frames raised to `floor` (0: unchanged), never above their ceilings: a
  fixed count (min = max) or a forced allocation stays as it is."""
  if not floor:
    return min_steps
  out = np.array(min_steps, copy=True)
  c = int(chunk_frames)
  out[:, :c] = np.minimum(np.maximum(out[:, :c], int(floor)), max_steps[:, :c])
  return out


def _signature(args, use_cfg):
  """Hashable shapes/dtypes of program arguments: which ahead-of-time executable fits them."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  return (use_cfg, treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves))


def _same_arrays(known, leaves) -> bool:
  """Whether `leaves` are the very arrays of `known` (what the sampler keeps per set of weights: their placement on
  the mesh, their fp8 calibration), by identity: comparing values would cost a pass over the weights."""
  return len(known) == len(leaves) and all(a is b for a, b in zip(known, leaves))


def _bcast(mask, x):
  """(B, c) -> broadcastable against (B, c, H, W, C)."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


# ----------------------------------------------------------------------------------------------------------------------
# The sampler


class Sampler:
  """Compiled DSA sampler for one config. Build with `make_sampler(config)`.

  sample(params, context, controls, rng=None, uncond_context=None) -> SampleOutput
    params: {'generator': DiT variables, 'head': head variables}; context (B, text_len, text_dim).
    With `uncond_context` (B or 1, text_len, text_dim) the program uses classifier-free guidance (a separate
    compilation); v = v_cond + g (v_cond - v_uncond) with g = controls.guidance (`guided_velocity`).
  chunk_step: the jitted per-chunk function (chunk index traced) that `stream.stream` drives.
  trace_counts: how often each program was traced (tests assert that controls do not recompile).
  Immutable apart from two memos: `compile()`'s ahead-of-time executables and the trace counts.
  precompute_text: compute the text cross-attention keys/values once per prompt (per video in `sample`, per chunk
  in `chunk_step`) and carry them through the loops; False computes them at every forward (the same numbers; for
  tests). Set it before the first call.
  """

  precompute_text = True

  def __init__(self, config, dit_cfg: Optional[DiTConfig] = None, num_frames: Optional[int] = None,
               mesh=None):
    self.config = config
    v = config.video
    self.chunk_frames = c = v.chunk_frames
    self.num_frames = v.num_frames if num_frames is None else num_frames
    if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, (int, np.integer)) or \
        self.num_frames < c or self.num_frames % c:
      raise ValueError(f"num_frames: expected a positive multiple of video.chunk_frames = {c} latent frames, got "
                       f"{self.num_frames!r}")
    self.num_frames = int(self.num_frames)
    self.num_chunks = self.num_frames // c
    self.window_frames, self.sink_frames = _window(config.sampling, c)
    self.cache_frames = min(self.sink_frames + self.window_frames, self.num_frames) if self.window_frames else \
        self.num_frames
    self.dcfg = dit_cfg or DiTConfig.from_config(config.model, config.compute)
    # Nothing is differentiated here: no remat, and so the KV cache is updated in place (see `WanBlock`).
    self.dcfg = dataclasses.replace(self.dcfg, remat="none")
    self.param_dcfg = self.dcfg  # the layout of the generator variables the caller passes (scanned or not)
    unroll = config.sampling.get("unroll_layers", False)
    if not isinstance(unroll, bool):
      raise ValueError(f"config.sampling.unroll_layers: expected True or False, got {unroll!r}")
    # Unrolled layers with one cache buffer per layer: each attention reads its layer's buffer in place (a scanned
    # DiT copies its layer's slice of the stacked cache out at every forward); the scanned variables are split per
    # layer once per program call.
    self.unroll_layers = unroll
    if unroll:
      self.dcfg = dataclasses.replace(self.dcfg, scan_layers=False)
    if self.num_frames > self.dcfg.rope_max_frames:  # positions are absolute: the table covers the whole video
      self.dcfg = dataclasses.replace(self.dcfg, rope_max_frames=self.num_frames)
    self.hcfg = ConfidenceConfig.from_config(config)
    self.dit = WanDiT(self.dcfg)
    self.text_encoder = WanTextKV(self.dcfg)
    self.head = ConfidenceHead(self.hcfg)
    self.latent_hw = latent_hw(config)
    self.channels = self.dcfg.in_channels
    self.tokens_per_frame = tokens_per_frame(config)
    self.sigmas = flow.warp_ladder(config.sampling.ladder, config.diffusion.shift,
                                   config.diffusion.num_train_timesteps)
    self.num_steps = len(self.sigmas)
    self.num_train_timesteps = float(config.diffusion.num_train_timesteps)
    self.context_noise = float(config.sampling.context_noise)
    self.stop_rule = stop_rules.config_stop_rule(config)
    if self.stop_rule not in STOP_RULES:
      raise ValueError(f"config.sampling.stop_rule: expected one of {STOP_RULES}, got {self.stop_rule!r}")
    self.fixed_step_head = config.sampling.get("fixed_step_head", "every")
    if self.fixed_step_head not in FIXED_STEP_HEAD:
      raise ValueError(f"config.sampling.fixed_step_head: expected one of {FIXED_STEP_HEAD}, got "
                       f"{self.fixed_step_head!r}")
    self.frozen_mode = config.sampling.get("frozen_frames", "clean")
    if self.frozen_mode not in FROZEN_MODES:
      raise ValueError(f"config.sampling.frozen_frames: expected one of {FROZEN_MODES}, got {self.frozen_mode!r}")
    if self.num_steps > self.hcfg.max_steps:
      raise ValueError(f"config.sampling.ladder has {self.num_steps} steps; the confidence head embeds at most "
                       f"{self.hcfg.max_steps}")
    self.trace_counts = collections.Counter()
    self._compiled = {}
    self.program = jax.jit(self._program, static_argnames=("use_cfg",), donate_argnums=(5,))
    self._chunk_step_jit = jax.jit(self._chunk_step, static_argnames=("use_cfg", "fill"), donate_argnums=(5,))
    self._fill_step_jit = jax.jit(self._fill_step, static_argnames=("use_cfg",), donate_argnums=(5,))
    self.mesh = mesh_lib.make_mesh(config) if mesh is None else mesh
    if self.mesh.size == 1:
      self.mesh = None  # one device: no shardings at all
    self.rules = mesh_lib.rules_from_config(config)
    self._mesh_jits = {}
    self.per_device_loops = config.sampling.get("per_device_loops", True)
    if not isinstance(self.per_device_loops, bool):
      raise ValueError(f"config.sampling.per_device_loops: expected True or False, got {self.per_device_loops!r}")
    self._placed_params = None
    self._fp8_calibration = None  # (generator leaves, amax tree) of the last calibration
    self._fp8_record = None  # the jitted calibration forward
    self.fp8_calibration_s = None  # seconds the last calibration took (compilation included)

  # -- placement over a mesh ---------------------------------------------------------------------------------------

  def _batch_spec(self, x, b):
    """Batch-sharded leading dim for arrays of batch b (or 2b: the CFG cache), replicated otherwise."""
    shape = np.shape(x)
    if not shape or shape[0] not in (b, 2 * b):
      return mesh_lib.replicated(self.mesh)
    names = ("batch",) + (None,) * (len(shape) - 1)
    return jax.sharding.NamedSharding(self.mesh, mesh_lib.logical_to_spec(names, shape, self.mesh, self.rules))

  @functools.cached_property
  def param_shardings(self):
    """{'generator', 'head'} shardings of the variables by their logical axes (from abstract shapes)."""
    boxed = {"generator": factory.abstract_dit_params(self.param_dcfg, self.config),
             "head": factory.abstract_head_params(self.config)}
    return mesh_lib.param_shardings(boxed, self.mesh, self.rules)

  def cache_shardings(self, cache):
    """KV cache over batch and heads (its logical axes, stacked or per layer); other cache leaves replicated."""
    names = cache_logical_axes(self.unroll_layers)

    def one(path, x):
      keys = [getattr(p, "key", None) for p in path]
      key = keys[0] if self.unroll_layers and len(keys) == 2 else (keys[-1] if keys else None)
      if key in names and len(names[key]) == np.ndim(x):
        return jax.sharding.NamedSharding(self.mesh, mesh_lib.logical_to_spec(names[key], np.shape(x), self.mesh,
                                                                              self.rules))
      return mesh_lib.replicated(self.mesh)
    return jax.tree_util.tree_map_with_path(one, cache)

  def _arg_shardings(self, args):
    """(params, context, uncond, controls, rng, cache, ...): params by rules, cache by its axes, rng replicated, the
    rest by their batch dim."""
    b = np.shape(args[1])[0]
    batch = lambda tree: jax.tree_util.tree_map(lambda x: self._batch_spec(x, b), tree)
    params = self.param_shardings
    extra = {k: v for k, v in args[0]["generator"].items() if k != "params"}  # an fp8 calibration: replicated
    if extra:
      replicated = jax.tree_util.tree_map(lambda _: mesh_lib.replicated(self.mesh), extra)
      params = {**params, "generator": {**params["generator"], **replicated}}
    out = [params, batch(args[1]), batch(args[2]), batch(args[3]), mesh_lib.replicated(self.mesh),
           self.cache_shardings(args[5])]
    return tuple(out + [batch(a) for a in args[6:]])

  def _out_shardings(self, out_shape, b):
    """(outputs, cache): outputs by their batch dim (per-chunk iteration counts replicated), cache by its axes."""
    def one(path, x):
      if "iters" in jax.tree_util.keystr(path):
        return mesh_lib.replicated(self.mesh)
      return self._batch_spec(x, b)
    outputs, cache = out_shape
    return jax.tree_util.tree_map_with_path(one, outputs), self.cache_shardings(cache)

  def _sharded(self, kind: str, args, use_cfg: bool, **static):
    """The program (kind 'program' / 'chunk_step' / 'fill_step') jitted with in/out shardings for these arguments'
    shapes (`static`: the kind's other static arguments)."""
    key = (kind, _signature(args, use_cfg), tuple(sorted(static.items())))
    if key not in self._mesh_jits:
      impl = {"program": self._program, "chunk_step": self._chunk_step, "fill_step": self._fill_step}[kind]
      fn = functools.partial(impl, use_cfg=use_cfg, **static)
      ins, batch = self._arg_shardings(args), np.shape(args[1])[0]
      if kind == "program" and self.runs_per_device(batch, use_cfg):
        fn, outs = self._per_device_program(fn, ins)
      else:
        with mesh_lib.activation_context(self.mesh, self.rules):
          out_shape = jax.eval_shape(fn, *args)  # jit reuses this trace
        outs = self.cache_shardings(out_shape) if kind == "fill_step" else self._out_shardings(out_shape, batch)
      self._mesh_jits[key] = jax.jit(fn, in_shardings=ins, out_shardings=outs, donate_argnums=(5,))
    return self._mesh_jits[key]

  def runs_per_device(self, batch: int, use_cfg: bool) -> bool:
    """Whether the whole-video program for this batch runs its loops per device (`sampling.per_device_loops`): on a
    mesh of the data axis alone (replicated weights: no collective inside a forward), a batch that divides over it,
    and no CFG (its cache stacks the conditional and unconditional halves on the batch dimension, which a split of
    that dimension would tear apart)."""
    if self.mesh is None or not self.per_device_loops or use_cfg:
      return False
    n = mesh_lib.mesh_sizes(self.mesh).get("data", 1)
    return n == self.mesh.size and batch % n == 0

  def _per_device_program(self, fn, ins):
    """(program, its out shardings): `fn` (the whole-video program) as one `shard_map` body per device over its
    slice of the batch (`ins`: the arguments' shardings). The loops' conditions then read only the device's own
    frames, so a device whose videos finish a chunk early goes on to the next while another still steps. The
    per-chunk iteration counts come back as their maximum over the devices: what the program stepping all devices
    together reports. Outputs are split over the batch like the context, the cache as it came in. Everything in the
    body sees only the device's videos: fp8 layers with dynamic activation scales take them from those videos (each
    video as when sampled alone, where the lockstep program scales by the whole batch)."""
    P = jax.sharding.PartitionSpec
    in_specs = jax.tree_util.tree_map(lambda sh: sh.spec, ins)
    batch = P(in_specs[1][0])
    per_batch = lambda x: SampleOutput(latents=x, steps=x, confidences=x, conf_trace=x, chunk_iters=x)
    out_specs = (per_batch(batch), in_specs[5])
    outs = (per_batch(jax.sharding.NamedSharding(self.mesh, batch)).replace(
        chunk_iters=mesh_lib.replicated(self.mesh)), ins[5])

    def body(*a):
      with mesh_lib.without_activation_constraints():
        out, cache = fn(*a)
      return out.replace(chunk_iters=out.chunk_iters[None]), cache

    mapped = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def program(*a):
      out, cache = mapped(*a)
      return out.replace(chunk_iters=jnp.max(out.chunk_iters, axis=0)), cache
    return program, outs

  def place(self, args):
    """Program arguments on the mesh with their shardings (the parameters of the last call are reused as placed)."""
    if self.mesh is None:
      return args
    shardings = self._arg_shardings(args)
    leaves = jax.tree_util.tree_leaves(args[0])
    last = self._placed_params
    if last is not None and _same_arrays(last[0], leaves):
      placed = last[1]
    else:
      placed = jax.device_put(args[0], shardings[0])
      self._placed_params = (leaves, placed)
    return (placed,) + tuple(jax.device_put(a, s) for a, s in zip(args[1:], shardings[1:]))

  def chunk_step(self, params, context, uncond_context, controls, rng, cache, chunk_index, *rest, use_cfg=False,
                 fill: bool = True):
    """The jitted per-chunk function (chunk index traced, cache donated) that `stream.stream` drives. With
    `fill=False` it stops after the denoising loop: the chunk's cache fill is then `fill_step`, which a stream runs
    after handing the chunk out (and not at all after the last chunk)."""
    args = (params, context, uncond_context, controls, rng, cache, chunk_index) + rest
    if self.mesh is None:
      return self._chunk_step_jit(*args, use_cfg=use_cfg, fill=fill)
    with mesh_lib.activation_context(self.mesh, self.rules):
      return self._sharded("chunk_step", args, use_cfg, fill=fill)(*args)

  def fill_step(self, params, context, uncond_context, controls, rng, cache, chunk_index, latents, cond=None, *,
                use_cfg=False):
    """The jitted cache fill of chunk `chunk_index` from its finished `latents` (what `chunk_step(fill=False)`
    returned) -> the cache (donated). Together the two equal one `chunk_step`."""
    args = (params, context, uncond_context, controls, rng, cache, chunk_index, latents, cond)
    if self.mesh is None:
      return self._fill_step_jit(*args, use_cfg=use_cfg)
    with mesh_lib.activation_context(self.mesh, self.rules):
      return self._sharded("fill_step", args, use_cfg)(*args)

  # -- shapes and inputs ------------------------------------------------------------------------------------------

  @property
  def chunk_shape(self):
    return (self.chunk_frames,) + tuple(self.latent_hw) + (self.channels,)

  @property
  def latent_shape(self):
    return (self.num_frames,) + tuple(self.latent_hw) + (self.channels,)

  def init_params(self, key=None):
    """Random generator + head variables (unboxed)."""
    key = jax.random.PRNGKey(self.config.seed) if key is None else key
    return factory.random_networks(self.config, ("generator", "head"), key)

  def make_controls(self, batch: int, threshold=None, min_steps=None, max_steps=None, guidance=None, seed=None
                    ) -> SamplingControls:
    """Full-shape controls from scalars, per-sample (B,) or per-frame (B, F) values; defaults from config.sampling.

    seed: a scalar s gives samples s, s+1, ...; a (B,) array is taken as is.
    """
    s = self.config.sampling
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
      raise ValueError(f"batch: expected a whole number of samples >= 1, got {batch!r}")
    b, f, n = batch, self.num_frames, self.num_steps
    threshold = s.threshold if threshold is None else threshold
    min_steps = s.min_steps if min_steps is None else min_steps
    max_steps = s.max_steps if max_steps is None else max_steps
    guidance = s.guidance if guidance is None else guidance
    seed = self.config.seed if seed is None else seed
    th = _per_sample(threshold, b, "threshold", np.float32)
    if np.isnan(th).any():
      raise ValueError("sampling threshold: expected a number (inf allowed), got nan")
    mn = _per_frame_ints(min_steps, b, f, n, "min_steps")
    mx = _per_frame_ints(max_steps, b, f, n, "max_steps")
    if np.any(mn > mx):
      raise ValueError(f"sampling min_steps must not exceed max_steps (got min {mn.min()}..{mn.max()}, "
                       f"max {mx.min()}..{mx.max()})")
    mn = first_chunk_floor(mn, mx, self.chunk_frames, stop_rules.config_first_chunk_floor(self.config))
    g = _per_sample(guidance, b, "guidance", np.float32)
    if not np.isfinite(g).all():
      raise ValueError(f"sampling guidance: expected a finite number, got {guidance!r}")
    sd = np.asarray(seed)
    _per_sample(sd, b, "seed", sd.dtype)
    if sd.dtype.kind not in "iu" or sd.min() < 0 or sd.max() + (b - 1 if sd.ndim == 0 else 0) >= 2**32:
      raise ValueError(f"sampling seed: expected integers in [0, 2**32) (one per sample), got {seed!r}")
    sd = (sd + np.arange(b)) if sd.ndim == 0 else np.broadcast_to(sd, (b,))
    return SamplingControls(threshold=jnp.asarray(th, jnp.float32), min_steps=jnp.asarray(mn, jnp.int32),
                            max_steps=jnp.asarray(mx, jnp.int32), guidance=jnp.asarray(g, jnp.float32),
                            seed=jnp.asarray(sd.astype(np.uint32)))

  def new_cache(self, batch: int, use_cfg: bool = False):
    """A zeroed KV cache of `cache_frames` frames: the whole video, or sinks + window (doubled batch with CFG); made
    in place on the mesh."""
    make = functools.partial(init_cache, self.dcfg, batch * (2 if use_cfg else 1), self.cache_frames,
                             self.tokens_per_frame, per_layer=self.unroll_layers)
    if self.mesh is None:
      return make()
    return jax.jit(make, out_shardings=self.cache_shardings(jax.eval_shape(make)))()

  def conditioning(self, batch: int, init_latents=None, prompt_index=None, num_prompts: Optional[int] = None
                   ) -> Optional[Conditioning]:
    """Checked, padded `Conditioning` (None when neither is given).

    init_latents: (P, h, w, C) or (B, P, h, w, C) given first frames, 1 <= P <= cache_frames and P < num_frames.
    prompt_index: (num_chunks,) or (B, num_chunks) ints in [0, num_prompts).
    """
    if init_latents is None and prompt_index is None:
      return None
    init, count, index = None, None, None
    if init_latents is not None:
      init = np.asarray(init_latents, np.float32)
      if init.ndim == 4:
        init = init[None]
      shape = tuple(self.latent_hw) + (self.channels,)
      if init.ndim != 5 or init.shape[2:] != shape or init.shape[0] not in (1, batch):
        raise ValueError(f"init_latents: expected (P, {', '.join(map(str, shape))}) or (B, P, ...) with B = {batch}, "
                         f"got {init.shape}")
      p = init.shape[1]
      if p < 1:
        raise ValueError("init_latents: zero frames given")
      if p > self.cache_frames:
        raise ValueError(f"init_latents: {p} given frames exceed the attention window of {self.cache_frames} frames "
                         f"(sampling.sink_frames + sampling.window_frames); give at most {self.cache_frames}")
      if p >= self.num_frames:
        raise ValueError(f"init_latents: {p} given frames leave nothing to sample in a video of {self.num_frames}")
      if not np.isfinite(init).all():
        raise ValueError("init_latents: contains NaN or inf")
      pad = np.zeros((batch, self.cache_frames) + shape, np.float32)
      pad[:, :p] = init
      init, count = jnp.asarray(pad), jnp.full((batch,), p, jnp.int32)
    if prompt_index is not None:
      idx = np.asarray(prompt_index)
      if idx.dtype.kind not in "iu" or idx.shape[-1:] != (self.num_chunks,) or idx.ndim not in (1, 2) or \
          (idx.ndim == 2 and idx.shape[0] not in (1, batch)):
        raise ValueError(f"prompt_index: expected integers of shape ({self.num_chunks},) or (B, {self.num_chunks}) "
                         f"(one prompt per chunk), got {idx.dtype} {idx.shape}")
      if num_prompts is not None and (idx.min() < 0 or idx.max() >= num_prompts):
        raise ValueError(f"prompt_index: values must lie in [0, {num_prompts}) (the context holds {num_prompts} "
                         f"prompts), got {np.unique(idx).tolist()}")
      index = jnp.asarray(np.broadcast_to(idx, (batch, self.num_chunks)).astype(np.int32))
    return Conditioning(init_latents=init, init_frames=count, prompt_index=index)

  def _check_inputs(self, params, context, controls, uncond_context, scheduled: bool = False):
    context = jnp.asarray(context, jnp.float32)
    want = (self.dcfg.text_len, self.dcfg.text_dim)
    if scheduled:
      if context.ndim != 4 or context.shape[2:] != want:
        raise ValueError(f"context: with a prompt schedule expected (B, prompts, text_len, text_dim) = "
                         f"(B, K, {want[0]}, {want[1]}), got {context.shape}")
    elif context.ndim != 3 or context.shape[1:] != want:
      raise ValueError(f"context: expected (B, text_len, text_dim) = (B, {want[0]}, {want[1]}), got {context.shape}")
    b = context.shape[0]
    check_controls(controls, b, self.num_frames)
    if _readable(context) and not bool(jnp.isfinite(context).all()):
      raise ValueError("context: contains NaN or inf (the video would be all NaN)")
    if uncond_context is not None:
      uncond_context = jnp.asarray(uncond_context, jnp.float32)
      if uncond_context.ndim != 3 or uncond_context.shape[1:] != want:
        raise ValueError(f"uncond_context: expected (B or 1, {want[0]}, {want[1]}), got {uncond_context.shape}")
      if uncond_context.shape[0] not in (1, b):
        raise ValueError(f"uncond_context: expected a batch of 1 or {b} (the context's), got {uncond_context.shape[0]}")
      if _readable(uncond_context) and not bool(jnp.isfinite(uncond_context).all()):
        raise ValueError("uncond_context: contains NaN or inf")
      uncond_context = jnp.broadcast_to(uncond_context, (b,) + want)  # one per sample, also under a schedule
    if not isinstance(params, dict) or "generator" not in params or "head" not in params:
      raise ValueError("params: expected {'generator': ..., 'head': ...}")
    params = {"generator": as_variables(params["generator"]), "head": as_variables(params["head"])}
    return params, context, uncond_context

  # -- the network calls ------------------------------------------------------------------------------------------

  def placement(self, chunk_index) -> dict:
    """The DiT's cache arguments for chunk `chunk_index` (traced): its RoPE frame offset and tables (computed here,
    once per chunk, not at every forward) and, with a window, its ring slot, the filled cache frames and the sinks'
    shift (see the module docstring)."""
    c = self.chunk_frames
    f0 = jnp.asarray(chunk_index, jnp.int32) * c
    ph, pw = self.dcfg.patch_size[1:]
    rope = rope_for(self.dcfg, f0, c, (self.latent_hw[0] // ph, self.latent_hw[1] // pw))
    if not self.window_frames:
      return {"frame_offset": f0, "rope": rope}
    s, n = self.sink_frames, self.cache_frames
    ring = max(n - s, c)
    place = {"frame_offset": f0, "rope": rope, "cache_slot": jnp.where(f0 < s, f0, s + (f0 - s) % ring),
             "kv_frames": jnp.minimum(f0 + c, n)}
    if s:
      place.update(sink_frames=s, sink_shift=jnp.maximum(f0 + c - n, 0))
    return place

  def generator_variables(self, gen_params):
    """The generator variables in the layout of this sampler's DiT: split per layer when it is unrolled, and with
    `compute.matmul='fp8'` their linear layers' kernels quantized (inside a program: once per call, before its
    loops, instead of at every forward)."""
    gen = unstack_layers(gen_params, self.dcfg.num_layers) if self.unroll_layers else gen_params
    if self.dcfg.matmul == "fp8" and "params" in gen and "fp8" not in gen:  # (not again: `forward` calls it too)
      gen = {**{k: v for k, v in gen.items() if k != "fp8_amax"}, "fp8": fp8_weights(gen, self.dcfg.dtype)}
    return gen

  def with_fp8_calibration(self, params, context, uncond_context=None, rng=None):
    """`params` with the generator's fp8 activation calibration (collection 'fp8_amax') under
    `compute.fp8_activations='calibrated'` (unchanged otherwise, or when they carry one): calibrated once per
    generator weights (kept for later calls with the same arrays) on this call's prompts; see `fp8_calibration`."""
    gen = params["generator"]
    if self.dcfg.matmul != "fp8" or self.dcfg.fp8_activations != "calibrated" or "fp8_amax" in gen:
      return params
    leaves = jax.tree_util.tree_leaves(gen)
    known = self._fp8_calibration
    if known is None or not _same_arrays(known[0], leaves):
      t0 = time.perf_counter()
      amax = jax.block_until_ready(self.fp8_calibration(gen, context, uncond_context, rng))
      self.fp8_calibration_s = time.perf_counter() - t0
      known = self._fp8_calibration = (leaves, amax)
    return {**params, "generator": {**gen, "fp8_amax": known[1]}}

  def fp8_calibration(self, gen_params, context, uncond_context=None, rng=None, amax=None):
    """The largest activation magnitude at each fp8 linear layer's input (the 'fp8_amax' collection, in the layout
    of `gen_params`) over the forwards of one denoising pass: the whole video (the first cache's worth of frames
    with a window) block-causally at every ladder step, from noise, each step's input renoised from the last
    step's x0 as the sampler does, then the clean result at the context noise (the cache fill's input). With CFG
    the unconditional half runs too. The same network function as the sampler's cached forwards (every chunk at
    once), so the activations are those sampling meets up to the noise drawn; `fp8_weights` leaves one power of
    two of headroom above them (values beyond saturate). `amax`: an earlier pass's result to continue from (the
    maximum over both, e.g. over batches of prompts)."""
    c, tn = self.chunk_frames, self.num_train_timesteps
    frames = c * max(1, self.cache_frames // c)
    ctx = jnp.asarray(context, jnp.float32)
    ctx = ctx[:, 0] if ctx.ndim == 4 else ctx  # a prompt schedule: its first prompt
    b = ctx.shape[0]
    if uncond_context is not None:
      ctx = jnp.concatenate([ctx, jnp.broadcast_to(jnp.asarray(uncond_context, jnp.float32), ctx.shape)], 0)
    n = ctx.shape[0]
    gen = as_variables(gen_params)
    gen = {"params": gen["params"]}
    if self._fp8_record is None:  # one jitted calibration forward per sampler: later calls reuse its compilation
      self._fp8_record = jax.jit(functools.partial(fp8_activation_amax, self.dcfg, chunk_frames=c))
    record = self._fp8_record
    keys = jax.random.split(jax.random.PRNGKey(0) if rng is None else rng, self.num_steps + 1)
    shape = (b, frames) + tuple(self.latent_hw) + (self.channels,)
    noise = lambda i: jax.random.normal(keys[i], shape, jnp.float32)
    double = lambda x: jnp.concatenate([x] * (n // b), 0)
    full_t = lambda value: jnp.full((n, frames), value, jnp.float32)
    if amax is None:
      _, like = jax.eval_shape(record, gen, double(jnp.zeros(shape)), full_t(0.0), ctx)
      amax = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), like)
    x = noise(0)
    with mesh_lib.activation_context(self.mesh, self.rules):
      for k, sigma in enumerate(self.sigmas):
        out, amax = record(gen, double(x), full_t(tn * sigma), ctx, amax)
        x0 = flow.x0_from_velocity(x, out["velocity"][:b], sigma)
        if k + 1 < self.num_steps:
          x = flow.renoise(x0, noise(k + 1), self.sigmas[k + 1])
      clean = x0 if self.context_noise <= 0 else flow.add_noise(x0, noise(self.num_steps), self.context_noise / tn)
      _, amax = record(gen, double(clean), full_t(self.context_noise), ctx, amax)
    return amax

  def _with_generator_layout(self, params):
    return {**params, "generator": self.generator_variables(params["generator"])}

  def text_kv(self, gen_params, context, uncond_context, use_cfg: bool):
    """The text cross-attention keys/values of the forward's batch (cond then uncond with CFG) from contexts
    (B, text_len, text_dim); for a prompt schedule's (B, K, text_len, text_dim) those of every prompt, stacked in
    front (`chunk_text_kv` picks a chunk's). Each is computed on a batch shaped like the forward's, so the numbers
    are those the forward would compute itself."""
    gen_params = self.generator_variables(gen_params)
    encode = lambda ctx: self.text_encoder.apply(
        gen_params, jnp.concatenate([ctx, uncond_context], 0) if use_cfg else ctx)
    if context.ndim == 3:
      return encode(context)
    kvs = [encode(context[:, i]) for i in range(context.shape[1])]
    return {"prompts": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *kvs)}

  def chunk_text_kv(self, text_kv, cond: Optional[Conditioning], chunk_index):
    """A chunk's keys/values from `text_kv`: under a prompt schedule, each sample's prompt of this chunk."""
    if "prompts" not in text_kv:
      return text_kv
    pick = jax.lax.dynamic_index_in_dim(cond.prompt_index, chunk_index, axis=1, keepdims=False)  # (B,)

    def one(a):  # (K, layers, B', ...): row r of the batch takes prompt pick[r mod B]
      rows = jnp.tile(pick, a.shape[2] // pick.shape[0])
      return jnp.take_along_axis(a, rows.reshape((1, 1, -1) + (1,) * (a.ndim - 3)), axis=0)[0]
    return jax.tree_util.tree_map(one, text_kv["prompts"])

  def forward(self, gen_params, x, t, context, uncond_context, guidance, cache, frame_offset, use_cfg: bool,
              place: Optional[dict] = None, text_kv=None):
    """One cache-mode DiT forward on a chunk -> (velocity (B,c,H,W,C) f32, features (B,c,T,D), new cache).
    `place` (from `placement`) overrides `frame_offset` for a windowed cache; `text_kv` (from `text_kv`, for this
    batch) replaces the contexts."""
    place = {"frame_offset": frame_offset} if place is None else place
    gen_params = self.generator_variables(gen_params)
    if use_cfg:
      x2 = jnp.concatenate([x, x], 0)
      t2 = jnp.concatenate([t, t], 0)
      ctx2 = None if text_kv is not None else jnp.concatenate([context, uncond_context], 0)
      out = self.dit.apply(gen_params, x2, t2, ctx2, cache=cache, text_kv=text_kv, **place)
      b = x.shape[0]
      return guided_velocity(out["velocity"][:b], out["velocity"][b:], guidance), out["features"][:b], out["cache"]
    out = self.dit.apply(gen_params, x, t, None if text_kv is not None else context, cache=cache, text_kv=text_kv,
                         **place)
    return out["velocity"], out["features"], out["cache"]

  def confidence(self, head_params, features, step, t):
    return jax.nn.sigmoid(self.head.apply(head_params, features, step, t).astype(jnp.float32))

  def _confidence_step(self, head_params, features, k, t, active, steps, min_s, max_s, tau):
    """(confidence, ready) of one step under the confidence rule with `sampling.fixed_step_head = 'last'`. At
    tau = +-inf the head decides nothing (a frame stops at max_steps, or min_steps), so it runs only at steps where
    some frame of the batch finishes (for the confidence reported at its last step) or some sample has a finite
    tau; at the other steps the confidence is nan (`conf_trace`). A traced branch: fixed-step and adaptive sampling
    share one compiled program."""
    b, c = steps.shape
    fixed = jnp.isinf(tau)  # (B, 1)
    stops_anyway = stop_rules.frame_done(active, steps, min_s, max_s, tau < 0)
    need = jnp.any(active & (~fixed | stops_anyway))
    score = jax.lax.cond(need, lambda: self.confidence(head_params, features, jnp.full((b, c), k, jnp.int32), t),
                         lambda: jnp.full((b, c), jnp.nan, jnp.float32))
    return score, jnp.where(fixed, tau < 0, stop_rules.confidence_ready(score, tau, steps))

  def context_input(self, x0, ckeys):
    """A finished (clean) chunk as the network sees it as context: noised at context_noise (static: 0 -> x0)."""
    if self.context_noise <= 0.0:
      return x0
    eps = slot_noise(ckeys, self.num_steps + 1, x0.shape[1:])
    return flow.add_noise(x0, eps, self.context_noise / self.num_train_timesteps)

  # -- one chunk ----------------------------------------------------------------------------------------------------

  def denoise_chunk(self, params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg: bool,
                    cond: Optional[Conditioning] = None, text_kv=None):
    """The while-loop over denoising steps of chunk `chunk_index` (traced) -> (SamplerState after the loop);
    `text_kv`: the chunk's text keys/values (None: every forward computes them from the contexts)."""
    c, L = self.chunk_frames, self.num_steps
    b = context.shape[0]
    offset = jnp.asarray(chunk_index, jnp.int32) * c
    place = self.placement(chunk_index)
    sig = jnp.asarray(np.append(self.sigmas, np.float32(0.0)))  # (L + 1,): the last entry is never used as a target
    max_s = jnp.clip(jax.lax.dynamic_slice_in_dim(controls.max_steps, offset, c, axis=1), 1, L)
    min_s = jnp.clip(jax.lax.dynamic_slice_in_dim(controls.min_steps, offset, c, axis=1), 1, max_s)
    tau = controls.threshold[:, None]
    ckeys = chunk_keys(keys, chunk_index)
    tn = self.num_train_timesteps
    gen, hp = params["generator"], params.get("head")
    given = None  # (B, c) bool: frames given as continuation input
    if cond is not None and cond.init_frames is not None:
      given = (offset + jnp.arange(c))[None, :] < cond.init_frames[:, None]

    def body(s: SamplerState) -> SamplerState:
      active = ~s.done
      a5 = _bcast(active, s.x)
      sigma_k = sig[s.k]
      if self.frozen_mode == "clean":
        frozen_x = self.context_input(s.x0, ckeys)
        frozen_t = jnp.full((b, c), self.context_noise, jnp.float32)
      else:
        frozen_x = s.x
        frozen_t = tn * sig[jnp.maximum(s.steps - 1, 0)]
        if given is not None:  # given frames took no step: they feed their clean input, like context frames
          frozen_x = jnp.where(_bcast(given, s.x), self.context_input(s.x0, ckeys), frozen_x)
          frozen_t = jnp.where(given, self.context_noise, frozen_t)
      x_in = jnp.where(a5, s.x, frozen_x)
      t_in = jnp.where(active, tn * sigma_k, frozen_t)
      v, feats, cache = self.forward(gen, x_in, t_in, context, uncond_context, controls.guidance, s.cache, offset,
                                     use_cfg, place, text_kv)
      x0_new = flow.x0_from_velocity(s.x, v, sigma_k)
      steps = jnp.where(active, s.k + 1, s.steps)
      if self.stop_rule == "x0_delta":  # the change is recorded where the confidence would be
        score = jnp.where(s.k > 0, stop_rules.x0_delta(s.x0, x0_new), jnp.nan)
        ready = stop_rules.READY[self.stop_rule](score, tau, steps)
      elif self.fixed_step_head == "last":
        score, ready = self._confidence_step(hp, feats, s.k, t_in, active, steps, min_s, max_s, tau)
      else:
        score = self.confidence(hp, feats, jnp.full((b, c), s.k, jnp.int32), t_in)
        ready = stop_rules.confidence_ready(score, tau, steps)
      stop = stop_rules.frame_done(active, steps, min_s, max_s, ready)
      conf_new = score
      x0 = jnp.where(a5, x0_new, s.x0)
      conf = jnp.where(active, conf_new, s.conf)
      trace = jax.lax.dynamic_update_slice_in_dim(
          s.trace, jnp.where(active, conf_new, jnp.nan)[:, :, None], s.k, axis=2)
      eps = slot_noise(ckeys, s.k + 1, s.x.shape[1:])
      x_next = flow.renoise(x0_new, eps, sig[s.k + 1])
      x = jnp.where(_bcast(active & ~stop, s.x), x_next, s.x)
      return SamplerState(k=s.k + 1, x=x, x0=x0, steps=steps, done=s.done | stop, conf=conf, trace=trace,
                          keys=s.keys, cache=cache)

    def cond_fn(s: SamplerState):
      return (s.k < L) & ~jnp.all(s.done)

    shape = (b,) + self.chunk_shape
    x0, done, conf = jnp.zeros(shape, jnp.float32), jnp.zeros((b, c), bool), jnp.zeros((b, c), jnp.float32)
    if given is not None:
      init = jax.lax.dynamic_slice_in_dim(cond.init_latents, offset, c, axis=1)
      x0, done, conf = jnp.where(_bcast(given, x0), init, x0), given, jnp.where(given, 1.0, conf)
    state = SamplerState(
        k=jnp.zeros((), jnp.int32), x=slot_noise(ckeys, 0, self.chunk_shape), x0=x0,
        steps=jnp.zeros((b, c), jnp.int32), done=done, conf=conf,
        trace=jnp.full((b, c, L), jnp.nan, jnp.float32), keys=ckeys, cache=cache)
    return jax.lax.while_loop(cond_fn, body, state)

  def fill_cache(self, params, context, uncond_context, controls, x0, ckeys, cache, chunk_index, use_cfg: bool,
                 text_kv=None):
    """The cache-fill forward: the clean chunk at t = context_noise overwrites the chunk's K/V slot."""
    b, c = x0.shape[:2]
    offset = jnp.asarray(chunk_index, jnp.int32) * self.chunk_frames
    t = jnp.full((b, c), self.context_noise, jnp.float32)
    _, _, cache = self.forward(params["generator"], self.context_input(x0, ckeys), t, context, uncond_context,
                               controls.guidance, cache, offset, use_cfg, self.placement(chunk_index), text_kv)
    return cache

  def _chunk_context(self, params, context, uncond_context, cond, chunk_index, use_cfg: bool, text_kv=None):
    """(context, text_kv) of chunk `chunk_index`: its prompt of a schedule, and the text keys/values: the video's
    `text_kv` (from `text_kv`) picked for the chunk, or computed here once for the chunk; with `precompute_text`
    off, None (every forward computes them: the plain path)."""
    if cond is not None and cond.prompt_index is not None:  # this chunk's prompt of the schedule
      pick = jax.lax.dynamic_index_in_dim(cond.prompt_index, chunk_index, axis=1, keepdims=False)
      context = jnp.take_along_axis(context, pick[:, None, None, None], axis=1)[:, 0]
    if text_kv is not None:
      text_kv = self.chunk_text_kv(text_kv, cond, chunk_index)
    elif self.precompute_text:
      text_kv = self.text_kv(params["generator"], context, uncond_context, use_cfg)
    return context, text_kv

  def run_chunk(self, params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg: bool,
                cond: Optional[Conditioning] = None, text_kv=None, fill: bool = True):
    """One chunk: denoising loop + cache fill (`fill=False`: the loop only; the last chunk of a video needs no fill,
    nothing attends to it)."""
    context, text_kv = self._chunk_context(params, context, uncond_context, cond, chunk_index, use_cfg, text_kv)
    s = self.denoise_chunk(params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg, cond, text_kv)
    cache = s.cache
    if fill:
      cache = self.fill_cache(params, context, uncond_context, controls, s.x0, s.keys, cache, chunk_index, use_cfg,
                              text_kv)
    return ChunkOutput(latents=s.x0, steps=s.steps, confidences=s.conf, conf_trace=s.trace, iters=s.k), cache

  def _chunk_step(self, params, context, uncond_context, controls, rng, cache, chunk_index, cond=None,
                  use_cfg: bool = False, fill: bool = True):
    self.trace_counts["chunk_step"] += 1
    params = self._with_generator_layout(params)
    keys = sample_keys(rng, controls.seed)
    return self.run_chunk(params, context, uncond_context, controls, keys, cache, chunk_index, use_cfg, cond,
                          fill=fill)

  def _fill_step(self, params, context, uncond_context, controls, rng, cache, chunk_index, latents, cond=None,
                 use_cfg: bool = False):
    self.trace_counts["fill_step"] += 1
    params = self._with_generator_layout(params)
    ckeys = chunk_keys(sample_keys(rng, controls.seed), chunk_index)
    context, text_kv = self._chunk_context(params, context, uncond_context, cond, chunk_index, use_cfg)
    return self.fill_cache(params, context, uncond_context, controls, latents, ckeys, cache, chunk_index, use_cfg,
                           text_kv)

  # -- the whole video ---------------------------------------------------------------------------------------------

  def _program(self, params, context, uncond_context, controls, rng, cache, cond=None, use_cfg: bool = False):
    self.trace_counts["program"] += 1
    params = self._with_generator_layout(params)
    b = context.shape[0]
    c, L = self.chunk_frames, self.num_steps
    keys = sample_keys(rng, controls.seed)
    # The text keys/values of every prompt, once per video (not per chunk or step).
    text_kv = self.text_kv(params["generator"], context, uncond_context, use_cfg) if self.precompute_text else None

    def body(i, carry, fill=True):
      cache, lat, steps, conf, trace, iters = carry
      out, cache = self.run_chunk(params, context, uncond_context, controls, keys, cache, i, use_cfg, cond, text_kv,
                                  fill=fill)
      put = lambda a, u: jax.lax.dynamic_update_slice_in_dim(a, u, i * c, axis=1)
      return (cache, put(lat, out.latents), put(steps, out.steps), put(conf, out.confidences),
              put(trace, out.conf_trace), iters.at[i].set(out.iters))

    init = (cache, jnp.zeros((b,) + self.latent_shape, jnp.float32), jnp.zeros((b, self.num_frames), jnp.int32),
            jnp.zeros((b, self.num_frames), jnp.float32), jnp.full((b, self.num_frames, L), jnp.nan, jnp.float32),
            jnp.zeros((self.num_chunks,), jnp.int32))
    # Every chunk but the last fills the cache for the chunks after it; the last one is peeled off the loop and
    # skips its fill (one forward per video less; the cache this program returns lacks that chunk's keys/values).
    carry = jax.lax.fori_loop(0, self.num_chunks - 1, body, init)
    last = jnp.asarray(self.num_chunks - 1, jnp.int32)
    cache, lat, steps, conf, trace, iters = body(last, carry, fill=False)
    return SampleOutput(latents=lat, steps=steps, confidences=conf, conf_trace=trace, chunk_iters=iters), cache

  def prepare(self, params, context, controls, rng=None, uncond_context=None, init_latents=None, prompt_index=None):
    """Validated program arguments: (args tuple, use_cfg), with a fresh KV cache (donated by the call) and the
    `Conditioning` (None without init frames or a prompt schedule) last."""
    scheduled = prompt_index is not None
    params, context, uncond_context = self._check_inputs(params, context, controls, uncond_context, scheduled)
    use_cfg = uncond_context is not None
    rng = jax.random.PRNGKey(0) if rng is None else rng
    b = context.shape[0]
    cond = self.conditioning(b, init_latents, prompt_index, context.shape[1] if scheduled else None)
    params = self.with_fp8_calibration(params, context, uncond_context, rng)
    cache = self.new_cache(b, use_cfg)
    return self.place((params, context, uncond_context, controls, rng, cache, cond)), use_cfg

  def _whole_video(self, args, use_cfg):
    """The whole-video jitted program for these arguments (sharded over the mesh, if any)."""
    if self.mesh is None:
      return functools.partial(self.program, use_cfg=use_cfg)
    return self._sharded("program", args, use_cfg)

  def lower(self, args, use_cfg: bool):
    """The whole-video program lowered for these (possibly abstract) arguments."""
    with mesh_lib.activation_context(self.mesh, self.rules):
      if self.mesh is None:
        return self.program.lower(*args, use_cfg=use_cfg)
      return self._sharded("program", args, use_cfg).lower(*args)

  def sample(self, params, context, controls: SamplingControls, rng=None, uncond_context=None, *, init_latents=None,
             prompt_index=None) -> SampleOutput:
    """Samples a whole video batch in one compiled program (asynchronous: arrays are ready when read).

    init_latents: given first frames to continue from; prompt_index: the prompt of each chunk, with a context of
    several prompts (B, K, text_len, text_dim). See the module docstring.
    """
    args, use_cfg = self.prepare(params, context, controls, rng, uncond_context, init_latents, prompt_index)
    compiled = self._compiled.get(_signature(args, use_cfg))
    with mesh_lib.activation_context(self.mesh, self.rules):
      out, _ = (compiled if compiled is not None else self._whole_video(args, use_cfg))(*args)
    return out

  def compile(self, params, context, controls, rng=None, uncond_context=None, *, init_latents=None,
              prompt_index=None) -> float:
    """Compiles the whole-video program ahead of time for this batch size / CFG use (later `sample` calls of that
    shape use it); returns the compile time in seconds (tracing + lowering + XLA compilation)."""
    args, use_cfg = self.prepare(params, context, controls, rng, uncond_context, init_latents, prompt_index)
    t0 = time.perf_counter()
    compiled = self.lower(args, use_cfg).compile()
    dt = time.perf_counter() - t0
    self._compiled[_signature(args, use_cfg)] = compiled
    return dt


def _window(s, chunk: int) -> tuple[int, int]:
  """(window_frames, sink_frames) of config.sampling, checked: multiples of the chunk size, sinks only with a
  window."""
  out = []
  for name in ("window_frames", "sink_frames"):
    v = s.get(name, 0)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or v % chunk:
      raise ValueError(f"config.sampling.{name}: expected a multiple of video.chunk_frames = {chunk} (0 = off), "
                       f"got {v!r}")
    out.append(int(v))
  if out[1] and not out[0]:
    raise ValueError("config.sampling.sink_frames: sinks need a window (set sampling.window_frames)")
  return out[0], out[1]


def make_sampler(config, dit_cfg: Optional[DiTConfig] = None, num_frames: Optional[int] = None, mesh=None) -> Sampler:
  """The compiled DSA sampler of `config` (model, video size, ladder, context noise, frozen-frame mode, window) for
  videos of `num_frames` latent frames (default video.num_frames) over `mesh` (default: `config.mesh` over all
  devices)."""
  return Sampler(config, dit_cfg, num_frames, mesh)
