"""The Wan2.1 diffusion transformer with per-frame timesteps, a block-causal mask and a static-shape KV cache.

Layer details follow Wan2.1's reference code: patchify (1, 2, 2); 3D RoPE; per block self-attention with
q/k RMSNorm over the full dim, text cross-attention (LayerNorm with affine, ungated), GELU(tanh) FFN and 6-vector
AdaLN modulation (time projection + a learned per-block table); output head with 2 modulation vectors. Every frame
carries its own timestep, so modulation is per frame. Norm statistics run in float32; the norms' outputs, the
modulation (shift/scale/gates) and the time embedding run in the compute dtype (`compute.elementwise='compute'`, as
Self Forcing's bf16 sampler does: half the memory traffic of this elementwise work) or in float32 as in Wan
(`compute.elementwise='float32'`). A float32 model computes the same either way.

Three ways to call it (`WanDiT.__call__`):
  * full sequence, `chunk_frames=None`: bidirectional (the teacher / critic);
  * full sequence, `chunk_frames=c`: block-causal (training the causal student, ODE regression);
  * one chunk with `cache=` and `frame_offset=`: the chunk's keys/values are written into the cache at the offset and
    its queries attend to everything up to the chunk's end (the sampler and the rollout). A ring-buffer cache (long
    videos) also passes `cache_slot=` (where the chunk goes), `kv_frames=` (how many cache frames are filled) and,
    with attention sinks, `sink_frames=` / `sink_shift=` (the first cache frames are moved `sink_shift` frames later
    in time for this call only, so they sit right before the window; see `Sampler`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsa_jax.models import rope as rope_lib
from dsa_jax.models.attention import dot_product_attention, resolve_backend
from dsa_jax.models.layers import DTYPES as _DTYPES  # noqa: F401 - callers still import the table from here
from dsa_jax.models.layers import (FP8_ACTIVATIONS, FP8_CALIBRATION_HEADROOM, RMSNorm, dtype_name, fp8_dot_general,
                                   fp8_scale, matmul_fn, quantize_fp8, to_dtype)
from dsa_jax.parallel.mesh import constrain_activation


ELEMENTWISE = ("compute", "float32")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Static (hashable) model description; built from `config.model` + `config.compute`."""
  dim: int
  ffn_dim: int
  num_layers: int
  num_heads: int
  text_dim: int
  text_len: int
  in_channels: int
  out_channels: int
  patch_size: tuple = (1, 2, 2)
  freq_dim: int = 256
  eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_max_frames: int = 1024
  cross_attn_norm: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"
  splash_interpret: bool = False  # run the splash kernel in Pallas interpret mode (tests off TPU)
  scan_layers: bool = True
  remat: str = "none"
  elementwise: str = "compute"  # dtype of modulation, gates and time embedding: 'compute' (= dtype) or 'float32'
  matmul: str = "default"  # the blocks' linear layers: 'default' (in dtype) or 'fp8' (float8 with per-tensor scales)
  fp8_activations: str = "dynamic"  # fp8 activation scales: 'dynamic' (amax per call) or 'calibrated' (fixed)

  @property
  def mod_dtype(self):
    """The dtype of the per-frame modulation path (norm outputs, shift/scale/gate, time embedding)."""
    return jnp.float32 if self.elementwise == "float32" else self.dtype

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @classmethod
  def from_config(cls, model_cfg, compute_cfg=None, **overrides) -> "DiTConfig":
    kw = dict(
        dim=model_cfg.dim, ffn_dim=model_cfg.ffn_dim, num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
        text_dim=model_cfg.text_dim, text_len=model_cfg.text_len, in_channels=model_cfg.in_channels,
        out_channels=model_cfg.out_channels, patch_size=tuple(model_cfg.patch_size), freq_dim=model_cfg.freq_dim,
        eps=model_cfg.eps, rope_theta=model_cfg.rope_theta, rope_max_frames=model_cfg.rope_max_frames,
        cross_attn_norm=model_cfg.cross_attn_norm)
    if compute_cfg is not None:
      dtype = to_dtype(compute_cfg.dtype, "compute.dtype")
      backend = resolve_backend(compute_cfg.attention)
      if backend == "cudnn" and dtype == jnp.float32:
        backend = "xla"  # cuDNN flash attention needs 16-bit inputs
      elementwise = compute_cfg.get("elementwise", "compute")
      if elementwise not in ELEMENTWISE:
        raise ValueError(f"compute.elementwise: expected one of {', '.join(ELEMENTWISE)}, got {elementwise!r}")
      matmul = compute_cfg.get("matmul", "default")
      matmul_fn(matmul)  # checks the name
      fp8_activations = compute_cfg.get("fp8_activations", "dynamic")
      if fp8_activations not in FP8_ACTIVATIONS:
        raise ValueError(f"compute.fp8_activations: expected one of {', '.join(FP8_ACTIVATIONS)}, got "
                         f"{fp8_activations!r}")
      if fp8_activations == "calibrated" and matmul != "fp8":
        raise ValueError(f"compute.fp8_activations='calibrated' calibrates fp8 linear layers: it needs "
                         f"compute.matmul='fp8', got {matmul!r}")
      kw.update(dtype=dtype, param_dtype=to_dtype(compute_cfg.param_dtype, "compute.param_dtype"), attention=backend,
                splash_interpret=bool(compute_cfg.get("splash_interpret", False)),
                scan_layers=compute_cfg.scan_layers, remat=compute_cfg.remat, elementwise=elementwise, matmul=matmul,
                fp8_activations=fp8_activations)
    kw.update(overrides)
    return cls(**kw)

  def to_dict(self) -> dict:
    """The architecture for checkpoint metadata (without the elementwise/matmul precision, which any checkpoint
    runs with)."""
    d = dataclasses.asdict(self)
    del d["elementwise"], d["matmul"], d["fp8_activations"]
    d["dtype"], d["param_dtype"] = dtype_name(self.dtype), dtype_name(self.param_dtype)
    d["patch_size"] = list(self.patch_size)
    return d


def _dense_init():
  return nn.initializers.xavier_uniform()


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def sinusoidal_embedding(t, dim: int):
  """Wan's timestep embedding on raw t in [0, 1000]: cos first, then sin (float32)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class LayerNorm32(nn.Module):
  """LayerNorm with float32 statistics and optional affine (Wan's norm1/norm2 have none; the cross-attention norm
  has one); the output is cast to `dtype` (fused with the normalisation, so what follows reads half the bytes)."""
  eps: float = 1e-6
  affine: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      y = y * self.param("scale", _partitioned(nn.initializers.ones, ("embed",)), (dim,), jnp.float32)
      y = y + self.param("bias", _partitioned(nn.initializers.zeros, ("embed",)), (dim,), jnp.float32)
    return y.astype(self.dtype)


FP8_LAYERS = {"self_attn": ("q", "k", "v", "o"), "cross_attn": ("q", "k", "v", "o"), None: ("ffn_in", "ffn_out")}
# Layers that take the same input share one calibrated activation scale, so that input is quantized once for all.
FP8_SHARED_INPUT = {"self_attn": ("q", "k", "v"), "cross_attn": ("k", "v")}


def _layer_dot(module, name: str):
  """The `dot_general` of `module`'s linear layer `name` under `compute.matmul` (called in `setup`): None (lax's) by
  default; for 'fp8' the float8 one, with the layer's kernel as quantized beforehand when the variables carry it
  (collection 'fp8', from `fp8_weights`), else quantized at the call, and with the activation's calibrated scale
  when that collection has one. With the collection 'fp8_amax' mutable (a calibration forward), the layer records
  the largest activation magnitude it has seen there (the maximum with what the collection held before)."""
  dot = matmul_fn(module.cfg.matmul)
  if dot is fp8_dot_general and module.has_variable("fp8", name):
    w = module.get_variable("fp8", name)
    dot = functools.partial(dot, quantized_rhs=(w["kernel"], w["scale"]), x_scale=w.get("x_scale"))
  if dot is not None and module.is_mutable_collection("fp8_amax"):
    inner = dot

    def recording(lhs, rhs, *args, **kw):
      amax = jnp.max(jnp.abs(lhs)).astype(jnp.float32)
      if module.has_variable("fp8_amax", name):
        amax = jnp.maximum(amax, module.get_variable("fp8_amax", name))
      module.put_variable("fp8_amax", name, amax)
      return inner(lhs, rhs, *args, **kw)
    dot = recording
  return dot


def fp8_weights(variables, dtype) -> dict:
  """The 'fp8' variable collection of DiT variables (scanned or unrolled): every block's fp8 linear layer's kernel
  quantized once from its value in the compute `dtype` (float8 values and a power-of-two scale, one per layer).
  Passed with the variables (`{**variables, 'fp8': fp8_weights(variables, dtype)}`), it spares every forward of a
  `compute.matmul='fp8'` DiT the pass over its weights that quantizing them again would take; the same result bit
  for bit. Variables with a calibration (collection 'fp8_amax', from a calibration forward) also give each layer
  its activation's scale (`x_scale`: the power of two above FP8_CALIBRATION_HEADROOM x the calibrated amax; one
  for the layers of FP8_SHARED_INPUT, which read the same input)."""
  params = nn.unbox(variables["params"] if "params" in variables else variables)
  amaxes = variables.get("fp8_amax", {}) if "params" in variables else {}
  out = {}
  for block, p in params.items():
    if not block.startswith("blocks"):
      continue
    stacked = block == "blocks"
    layers = {}
    for parent, names in FP8_LAYERS.items():
      src = p if parent is None else p.get(parent, {})
      dst = layers if parent is None else layers.setdefault(parent, {})
      amax = amaxes.get(block, {})
      amax = amax if parent is None else amax.get(parent, {})
      x_scale = lambda a: fp8_scale(FP8_CALIBRATION_HEADROOM * jnp.asarray(a, jnp.float32))
      shared = [n for n in FP8_SHARED_INPUT.get(parent, ()) if n in amax]
      x_scales = {n: x_scale(amax[n]) for n in names if n in amax and n not in shared}
      if shared:  # one array for the group: inside a program the same value, so XLA quantizes their input once
        one = x_scale(functools.reduce(jnp.maximum, [jnp.asarray(amax[n], jnp.float32) for n in shared]))
        x_scales.update({n: one for n in shared})
      for name in names:
        if name in src:
          q, s = quantize_fp8(jnp.asarray(src[name]["kernel"]).astype(dtype), axis=0 if stacked else None)
          dst[name] = {"kernel": q, "scale": s}
          if name in x_scales:
            dst[name]["x_scale"] = x_scales[name]
    out[block] = layers
  return out


def fp8_activation_amax(dcfg: "DiTConfig", variables, x, t, context, amax=None, **call_kw):
  """One calibration forward of a `compute.matmul='fp8'` DiT: (its output, the largest activation magnitude seen at
  each fp8 linear layer's input, the maximum with `amax` from earlier calls). The amax tree has the layer layout of
  `variables` (scanned 'blocks' with a leading layer axis, or 'blocks_{i}'); put under the variables' collection
  'fp8_amax', `fp8_weights` turns it into the layers' activation scales. The forward runs with the layers unrolled
  (a layer records into a collection of its own) and without remat; `call_kw` go to the DiT's call."""
  params = variables["params"] if "params" in variables else variables
  stacked = "blocks" in params
  run_cfg = dataclasses.replace(dcfg, scan_layers=False, remat="none", matmul="fp8")
  v = {"params": unstack_layers({"params": params}, dcfg.num_layers)["params"]}
  if amax is not None:
    v["fp8_amax"] = unstack_layers(amax, dcfg.num_layers) if stacked else amax
  out, col = WanDiT(run_cfg).apply(v, x, t, context, mutable=["fp8_amax"], **call_kw)
  new = col["fp8_amax"]
  if stacked:
    layers = [new[f"blocks_{i}"] for i in range(dcfg.num_layers)]
    new = {**{k: a for k, a in new.items() if not k.startswith("blocks_")},
           "blocks": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)}
  return out, new


class Attention(nn.Module):
  """Multi-head attention with q/k RMSNorm; self-attention takes RoPE, masks and the KV cache.

  Cross-attention can take its keys/values precomputed (`kv=`, from `kv`): the text context is constant over a
  video, so the sampler computes them once instead of at every forward.
  """
  cfg: DiTConfig
  cross: bool = False
  causal_block: int | None = None  # block-causal self-attention over blocks of this many tokens

  def setup(self):
    c = self.cfg
    proj = lambda name: nn.DenseGeneral((c.num_heads, c.head_dim), axis=-1, dtype=c.dtype, param_dtype=c.param_dtype,
                                        kernel_init=_partitioned(_dense_init(), ("embed", "heads", "kv")),
                                        bias_init=_partitioned(nn.initializers.zeros, ("heads", "kv")),
                                        dot_general=_layer_dot(self, name))
    self.q, self.k, self.v = proj("q"), proj("k"), proj("v")
    self.norm_q = RMSNorm(c.eps, axes=("heads", "kv"))
    self.norm_k = RMSNorm(c.eps, axes=("heads", "kv"))
    self.o = nn.DenseGeneral(c.dim, axis=(-2, -1), dtype=c.dtype, param_dtype=c.param_dtype,
                             kernel_init=_partitioned(_dense_init(), ("heads", "kv", "embed")),
                             bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
                             dot_general=_layer_dot(self, "o"))

  def kv(self, source):
    """Keys (normed) and values of `source` (B, L, D) -> two (B, L, H, head_dim) arrays in the compute dtype."""
    return self.norm_k(self.k(source)), self.v(source)

  def __call__(self, x, context=None, rope=None, cache=None, cache_pos=None, kv=None, layer=None):
    """`cache`: this layer's (k, v) cache slices, or with `layer` the whole (layers, ...) cache, written in place at
    that layer (only the chunk's keys/values move)."""
    q, k, v = self.project(x, context=context, rope=rope, kv=kv)
    out, new_cache = self.attend(q, k, v, cache=cache, cache_pos=cache_pos, layer=layer)
    return self.o(out), new_cache

  def project(self, x, context=None, rope=None, kv=None):
    """Queries (normed, with RoPE for self-attention), keys and values of `x` (or of `context`, or `kv` given)."""
    q = self.norm_q(self.q(x))
    k, v = self.kv(context if self.cross else x) if kv is None else kv
    if not self.cross:
      cos, sin = rope
      q = rope_lib.apply_rope(q, cos, sin)
      k = rope_lib.apply_rope(k, cos, sin)
    return q, k, v

  def attend(self, q, k, v, cache=None, cache_pos=None, layer=None):
    """The attention of projected q, k, v (B, L, H, head_dim) -> (output before the `o` projection, new cache)."""
    c = self.cfg
    new_cache = None
    kv_lengths = None
    if not self.cross and cache is not None:
      ck, cv = cache
      cache_offset, kv_length, sink = cache_pos
      if layer is None:
        start = (0, cache_offset, 0, 0)
        k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
        v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
        new_cache = (k, v)
      else:
        start = (layer, 0, cache_offset, 0, 0)
        new_cache = (jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start),
                     jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start))
        k, v = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in new_cache)
      if kv_length is None:
        kv_length = cache_offset + q.shape[1]
      kv_lengths = jnp.full((q.shape[0],), kv_length, jnp.int32)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
      if sink is not None:  # attention sinks, re-positioned for this call (the cache keeps them as written)
        n = sink[0].shape[0]
        k = jnp.concatenate([rope_lib.apply_rope(k[:, :n], *sink), k[:, n:]], axis=1)
    causal_block = self.causal_block if not self.cross and cache is None else None
    q = constrain_activation(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    out = dot_product_attention(q, k, v, kv_lengths=kv_lengths, causal_block=causal_block, backend=c.attention,
                                interpret=c.splash_interpret)
    return out, new_cache


def _per_frame(x, num_frames):
  """(B, F*T, D) -> (B, F, T, D) so per-frame modulation broadcasts over a frame's tokens."""
  return x.reshape(x.shape[0], num_frames, -1, x.shape[-1])


class WanBlock(nn.Module):
  """One transformer block; scanned over layers with the KV cache as the scanned input/output.

  With `remat='attention_saved'` the block is rematerialised in two parts, the self-attention kernel between them
  left out: the part before it (norm, modulation, q/k/v projections, RoPE) and the part after it (output
  projection, cross-attention, FFN) are recomputed in the backward pass, the attention's inputs, output and softmax
  statistics are kept. A fused attention kernel (cuDNN's, a `custom_vjp`) cannot name its residuals for a remat
  policy, so under block-level remat it runs twice per backward; this trades their memory for that rerun."""
  cfg: DiTConfig
  causal_block: int | None = None

  def setup(self):
    c = self.cfg
    md = c.mod_dtype
    self.modulation = self.param("modulation", _partitioned(nn.initializers.normal(1.0 / math.sqrt(c.dim)),
                                                            (None, "mod", "embed")), (1, 6, c.dim), jnp.float32)
    self.norm1 = LayerNorm32(c.eps, dtype=md)
    self.self_attn = Attention(c, causal_block=self.causal_block)
    self.norm_cross = LayerNorm32(c.eps, affine=True, dtype=md) if c.cross_attn_norm else None
    self.cross_attn = Attention(c, cross=True)
    self.norm2 = LayerNorm32(c.eps, dtype=md)
    self.ffn_in = nn.Dense(c.ffn_dim, dtype=c.dtype, param_dtype=c.param_dtype,
                           kernel_init=_partitioned(_dense_init(), ("embed", "mlp")),
                           bias_init=_partitioned(nn.initializers.zeros, ("mlp",)),
                           dot_general=_layer_dot(self, "ffn_in"))
    self.ffn_out = nn.Dense(c.dim, dtype=c.dtype, param_dtype=c.param_dtype,
                            kernel_init=_partitioned(_dense_init(), ("mlp", "embed")),
                            bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
                            dot_general=_layer_dot(self, "ffn_out"))

  def _modulation(self, e0):
    """The six per-frame (B, F, 1, D) shift/scale/gate vectors: shift, scale, gate of the self-attention, then of
    the FFN."""
    mod = self.modulation[None].astype(self.cfg.mod_dtype) + e0  # (B, F, 6, D) in the modulation dtype
    return [mod[:, :, i, None, :] for i in range(6)]

  def _modulate(self, h, shift, scale):
    b, l, _ = h.shape
    return (_per_frame(h, shift.shape[1]) * (1.0 + scale) + shift).reshape(b, l, -1).astype(self.cfg.dtype)

  def _gated(self, y, gate):
    b, l, _ = y.shape
    return (_per_frame(y.astype(self.cfg.mod_dtype), gate.shape[1]) * gate).reshape(b, l, -1)

  def _before_attention(self, x, e0, rope):
    """x -> the self-attention's q, k, v."""
    shift_msa, scale_msa = self._modulation(e0)[:2]
    h = self._modulate(self.norm1(x), shift_msa, scale_msa)
    return self.self_attn.project(h, rope=rope)

  def _after_attention(self, x, out, e0, context, text_kv):
    """x and the self-attention's output (before its projection) -> the block's output."""
    c = self.cfg
    _, _, gate_msa, c_shift, c_scale, c_gate = self._modulation(e0)
    x = x + self._gated(self.self_attn.o(out), gate_msa).astype(x.dtype)
    h = self.norm_cross(x) if c.cross_attn_norm else x
    y, _ = self.cross_attn(h.astype(c.dtype), context=context, kv=text_kv)
    x = x + y.astype(x.dtype)
    h = self.ffn_in(self._modulate(self.norm2(x), c_shift, c_scale))
    h = constrain_activation(nn.gelu(h, approximate=True), ("activation_batch", "activation_length", "activation_mlp"))
    x = x + self._gated(self.ffn_out(h), c_gate).astype(x.dtype)
    return constrain_activation(x, ("activation_batch", "activation_length", "activation_embed"))

  def __call__(self, carry, e0, context, rope, cache_pos, per_layer):
    """carry (x, whole KV cache or None); per_layer (this layer's cache slices or None, its precomputed text
    cross-attention (k, v) or None (then `context` is used), its index or None) -> (carry, new cache slices or None).

    Two cache layouts: the slices in and out per layer (what remat needs: it saves a block's inputs, and a whole
    cache per layer would not fit), or, with the layer index, the whole cache in the carry, updated in place (no
    second copy of the cache, only the chunk's keys/values written)."""
    x, whole = carry
    cache, text_kv, layer = per_layer
    if whole is not None:
      cache = whole
    before, after = WanBlock._before_attention, WanBlock._after_attention
    if self.cfg.remat == "attention_saved":
      before = nn.remat(before, prevent_cse=not self.cfg.scan_layers)
      after = nn.remat(after, prevent_cse=not self.cfg.scan_layers)
    q, k, v = before(self, x, e0, rope)
    out, new_cache = self.self_attn.attend(q, k, v, cache=cache, cache_pos=cache_pos, layer=layer)
    x = after(self, x, out, e0, context, text_kv)
    if whole is not None:
      return (x, new_cache), None
    return (x, None), new_cache


_REMAT_POLICIES = {
    "full": None,  # save nothing
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _text_embedding(c: DiTConfig, context):
  """The text context (B, L, text_dim) -> (B, L, dim): Wan's two-layer text embedding (called inside a compact
  method, whose module owns the weights)."""
  ctx = nn.Dense(c.dim, dtype=c.dtype, param_dtype=c.param_dtype,
                 kernel_init=_partitioned(_dense_init(), ("text_embed", "embed")),
                 bias_init=_partitioned(nn.initializers.zeros, ("embed",)), name="text_embedding_1")(
                     context.astype(c.dtype))
  ctx = nn.Dense(c.dim, dtype=c.dtype, param_dtype=c.param_dtype,
                 kernel_init=_partitioned(_dense_init(), ("embed", "embed_out")),
                 bias_init=_partitioned(nn.initializers.zeros, ("embed",)), name="text_embedding_2")(
                     nn.gelu(ctx, approximate=True))
  return constrain_activation(ctx, ("activation_batch", "activation_length", "activation_embed"))


def _check_text_kv(c: DiTConfig, text_kv, batch: int):
  want = (c.num_layers, batch, c.text_len, c.num_heads, c.head_dim)
  if not isinstance(text_kv, dict) or set(text_kv) != {"k", "v"} or any(
      tuple(text_kv[n].shape) != want for n in ("k", "v")):
    got = {n: tuple(getattr(a, "shape", ())) for n, a in text_kv.items()} if isinstance(text_kv, dict) else text_kv
    raise ValueError(f"text_kv: expected {{'k', 'v'}} of shape (layers, B, text_len, heads, head_dim) = {want}, got "
                     f"{got}")


class _BlockTextKV(nn.Module):
  """One block's cross-attention keys/values; named like `WanBlock` ('cross_attn') so it reads the block's weights."""
  cfg: DiTConfig

  @nn.compact
  def __call__(self, carry, ctx):
    k, v = Attention(self.cfg, cross=True, name="cross_attn").kv(ctx)
    names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    return carry, (constrain_activation(k, names), constrain_activation(v, names))


class WanTextKV(nn.Module):
  """The text cross-attention keys/values of every layer, {'k', 'v'}: (layers, B, text_len, heads, head_dim) in the
  compute dtype, from the generator's own variables (`WanTextKV(cfg).apply(dit_variables, context)`).

  They depend only on the prompt, so a sampler computes them once per prompt and passes them to every forward
  (`WanDiT(..., text_kv=)`); the result equals the DiT computing them itself.
  """
  cfg: DiTConfig

  @nn.compact
  def __call__(self, context):
    c = self.cfg
    ctx = _text_embedding(c, context)
    if c.scan_layers:
      stack = nn.scan(_BlockTextKV, variable_axes={"params": 0, "fp8": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,), length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      _, (k, v) = stack(c, name="blocks")(None, ctx)
    else:
      kvs = [_BlockTextKV(c, name=f"blocks_{i}")(None, ctx)[1] for i in range(c.num_layers)]
      k, v = jnp.stack([a for a, _ in kvs]), jnp.stack([b for _, b in kvs])
    return {"k": k, "v": v}


class WanDiT(nn.Module):
  """Wan2.1 DiT. Returns dict(velocity (B,F,H,W,C) float32, features (B,F,T,D), cache)."""
  cfg: DiTConfig

  def _block_cls(self):
    c = self.cfg
    block = WanBlock
    if c.remat not in ("none", "attention_saved"):  # 'attention_saved': WanBlock remats its two parts itself
      block = nn.remat(block, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    return block

  @nn.compact
  def __call__(self, x, t, context, *, chunk_frames: int | None = None, cache=None, frame_offset=0, cache_slot=None,
               kv_frames=None, sink_frames: int = 0, sink_shift=0, text_kv=None, rope=None):
    """`text_kv`: the text cross-attention keys/values of every layer from `WanTextKV` (then `context` is unused and
    may be None); without it they are computed from `context` here (training, parity tests). `rope`: these frames'
    RoPE (cos, sin) from `rope_for` (at frame_offset), for callers that run many forwards at one position."""
    c = self.cfg
    b, f, hh, ww, ch = x.shape
    pt, ph, pw = c.patch_size
    if ch != c.in_channels:
      raise ValueError(f"latents have {ch} channels, model.in_channels is {c.in_channels}")
    if hh % ph or ww % pw:
      raise ValueError(f"latent size {hh}x{ww} does not divide by model.patch_size {c.patch_size}")
    if t.shape != (b, f):
      raise ValueError(f"timesteps must be per frame with shape {(b, f)}, got {t.shape}")
    gh, gw = hh // ph, ww // pw
    tokens = gh * gw

    # Patch embedding: a (1, ph, pw) convolution with stride = kernel, i.e. a matmul on flattened patches.
    patches = x.reshape(b, f, gh, ph, gw, pw, ch).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f * tokens, ph * pw * ch)
    kernel = self.param("patch_embedding", _partitioned(nn.initializers.lecun_normal(), (None, None, None, None, "embed")),
                        (pt, ph, pw, ch, c.dim), c.param_dtype)
    bias = self.param("patch_bias", _partitioned(nn.initializers.zeros, ("embed",)), (c.dim,), c.param_dtype)
    h = jnp.dot(patches.astype(c.dtype), kernel.reshape(-1, c.dim).astype(c.dtype)) + bias.astype(c.dtype)
    h = constrain_activation(h, ("activation_batch", "activation_length", "activation_embed"))

    # Per-frame time embedding and its 6-vector projection, in the modulation dtype (the sinusoid in float32).
    emb = sinusoidal_embedding(t, c.freq_dim)
    md = c.mod_dtype
    dense_mod = lambda n, names, name: nn.Dense(n, dtype=md, param_dtype=c.param_dtype,
                                             kernel_init=_partitioned(nn.initializers.normal(0.02), names),
                                             bias_init=_partitioned(nn.initializers.zeros, names[1:]), name=name)
    e = dense_mod(c.dim, ("freq", "embed"), "time_embedding_1")(emb)
    e = dense_mod(c.dim, ("embed", "embed_out"), "time_embedding_2")(nn.silu(e))  # (B, F, D)
    e = constrain_activation(e, ("activation_batch", None, "activation_embed"))
    e0 = dense_mod(6 * c.dim, ("embed", "mod"), "time_projection")(nn.silu(e)).reshape(b, f, 6, c.dim)
    e0 = constrain_activation(e0, ("activation_batch", None, None, "activation_embed"))

    if text_kv is None:
      ctx = _text_embedding(c, context)
    else:
      ctx = None
      _check_text_kv(c, text_kv, b)
      text_kv = (text_kv["k"], text_kv["v"])

    tables = rope_lib.rope_tables(c.head_dim, c.rope_max_frames, gh, gw, c.rope_theta)
    if rope is None:
      rope = rope_lib.rope_for_grid(tables, frame_offset, f, gh, gw)
    elif tuple(rope[0].shape) != (f * tokens, c.head_dim // 2):
      raise ValueError(f"rope: expected (cos, sin) of shape {(f * tokens, c.head_dim // 2)} (rope_for), got "
                       f"{tuple(rope[0].shape)}")
    causal_block = None
    cache_pos = None
    if cache is None:
      if chunk_frames is not None:
        if f % chunk_frames:
          raise ValueError(f"{f} frames do not divide into chunks of {chunk_frames}")
        causal_block = tokens * chunk_frames
    else:
      slot = frame_offset if cache_slot is None else cache_slot
      cache_offset = jnp.asarray(slot, jnp.int32) * tokens
      kv_length = None if kv_frames is None else jnp.asarray(kv_frames, jnp.int32) * tokens
      sink = rope_lib.temporal_shift(tables, sink_shift, sink_frames * tokens) if sink_frames else None
      cache_pos = (cache_offset, kv_length, sink)
      cache = (cache["k"], cache["v"])

    block_cls = self._block_cls()
    per_layer = cache is not None and isinstance(cache[0], (list, tuple))
    if per_layer and (c.scan_layers or len(cache[0]) != c.num_layers):
      raise ValueError(f"a per-layer KV cache (lists of {len(cache[0])} arrays) needs the unrolled DiT "
                       f"(scan_layers=False) with as many layers ({c.num_layers})")
    in_place = cache is not None and c.remat == "none" and not per_layer  # the whole cache in the carry (WanBlock)
    whole, sliced = (cache, None) if in_place else (None, cache)
    layers = jnp.arange(c.num_layers, dtype=jnp.int32) if in_place else None
    if c.scan_layers:
      stack = nn.scan(block_cls, variable_axes={"params": 0, "fp8": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                      length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      (h, whole), sliced = stack(c, causal_block, name="blocks")((h, whole), e0, ctx, rope, cache_pos,
                                                                 (sliced, text_kv, layers))
    else:  # unrolled; with a per-layer cache each layer attends over its own buffer in place (no slice copied out)
      outs = []
      for i in range(c.num_layers):
        pick = lambda a: None if a is None else jax.tree_util.tree_map(lambda z: z[i], a)
        layer_cache = None if sliced is None else (sliced[0][i], sliced[1][i])
        (h, whole), lc = block_cls(c, causal_block, name=f"blocks_{i}")(
            (h, whole), e0, ctx, rope, cache_pos, (layer_cache, pick(text_kv), None if layers is None else i))
        outs.append(lc)
      if sliced is not None:
        gather = list if per_layer else jnp.stack
        sliced = (gather([o[0] for o in outs]), gather([o[1] for o in outs]))
    new_cache = whole if in_place else sliced

    features = _per_frame(h, f)  # final hidden states, for the confidence head

    table = self.param("head_modulation", _partitioned(nn.initializers.normal(1.0 / math.sqrt(c.dim)),
                                                       (None, "mod", "embed")), (1, 2, c.dim), jnp.float32)
    mod = table[None].astype(md) + e[:, :, None, :]
    shift, scale = mod[:, :, 0, None, :], mod[:, :, 1, None, :]
    out = (_per_frame(LayerNorm32(c.eps, dtype=md, name="norm_out")(h), f) * (1.0 + scale) + shift).reshape(
        b, f * tokens, -1)
    out = nn.Dense(pt * ph * pw * c.out_channels, dtype=c.dtype, param_dtype=c.param_dtype,
                   kernel_init=_partitioned(_dense_init(), ("embed", None)),
                   bias_init=_partitioned(nn.initializers.zeros, (None,)), name="head")(out.astype(c.dtype))
    out = out.astype(jnp.float32).reshape(b, f, gh, gw, ph, pw, c.out_channels)
    velocity = out.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f, hh, ww, c.out_channels)
    if new_cache is not None:
      new_cache = {"k": new_cache[0], "v": new_cache[1]}
    return {"velocity": velocity, "features": features, "cache": new_cache}


def rope_for(cfg: DiTConfig, frame_offset, num_frames: int, grid_hw) -> tuple:
  """RoPE (cos, sin) of frames [frame_offset, frame_offset + num_frames) on a token grid of `grid_hw` (the latent
  size over the patch size), as `WanDiT(..., rope=)` takes it."""
  gh, gw = grid_hw
  tables = rope_lib.rope_tables(cfg.head_dim, cfg.rope_max_frames, gh, gw, cfg.rope_theta)
  return rope_lib.rope_for_grid(tables, frame_offset, num_frames, gh, gw)


def init_cache(cfg: DiTConfig, batch: int, num_frames: int, tokens_per_frame: int, dtype=None,
               per_layer: bool = False):
  """Zeroed static-shape KV cache for a whole video: {'k','v'}: (layers, B, F*T, H, D), or with `per_layer` lists of
  one (B, F*T, H, D) buffer per layer (for the unrolled DiT, `scan_layers=False`: a layer's attention then reads its
  buffer in place, where the stacked cache needs that layer's slice copied out at every forward)."""
  shape = (batch, num_frames * tokens_per_frame, cfg.num_heads, cfg.head_dim)
  dtype = dtype or cfg.dtype
  if per_layer:
    return {n: [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)] for n in ("k", "v")}
  return {"k": jnp.zeros((cfg.num_layers,) + shape, dtype), "v": jnp.zeros((cfg.num_layers,) + shape, dtype)}


def cache_logical_axes(per_layer: bool = False):
  """Logical axes of a cache leaf ({'k','v'}); a per-layer buffer has no 'layers' axis."""
  names = ("layers", "batch", "kv_length", "heads", "kv")[1 if per_layer else 0:]
  return {"k": names, "v": names}


def unstack_layers(variables, num_layers: int):
  """Scanned DiT variables ('blocks' with a leading layer axis, in every collection: params, a calibration's
  'fp8_amax') -> the unrolled DiT's ('blocks_0', ...); variables already unrolled are returned as they are."""

  def unstack(p):
    if "blocks" not in p:
      return p
    out = {k: v for k, v in p.items() if k != "blocks"}
    for i in range(num_layers):
      out[f"blocks_{i}"] = jax.tree_util.tree_map(lambda a: a[i], p["blocks"])
    return out

  if "params" not in variables:
    return unstack(variables)
  return {name: unstack(col) if hasattr(col, "items") else col for name, col in variables.items()}
