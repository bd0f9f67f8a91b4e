"""One attention function, three backends: `xla` (reference, CPU), `cudnn` (GPU), `splash` (TPU Pallas kernel).

Inputs are (B, L, H, D). Masking comes in three forms the backends can exploit: `causal_block` (static int) — the
block-causal training mask, query token i sees key token j iff j // causal_block <= i // causal_block (cuDNN: one
unmasked call per block of queries over the keys it sees, since its only other way is a dense L x L bias over every
tile); `kv_lengths`
(B,) — keys at or past the length are ignored, which is how the static-shape KV cache hides slots not yet written
(cuDNN skips them); and `mask`, an explicit boolean (Lq, Lk) or (B, 1, Lq, Lk) array (xla/cudnn; splash only takes
a concrete numpy one).

Splash (TPU). The two masks of the model are splash masks: block-causal is a computable mask (evaluated per tile in
the kernel, so fully masked tiles are skipped and nothing of size L x L is stored); the KV-cache mask (queries of
the current chunk against cached keys of a traced length) is a full mask plus segment ids, keys at or past the
length in segment 1 and queries in segment 0 (splash masks are static, segment ids are the kernel's traced mask).
Lengths are padded to a multiple of the block size (padded keys are masked by the same segment ids; padded query
rows are dropped). Block sizes: the largest of 512, 256, 128 whose padding costs at most 1/16 of the length, per
axis. 512 x 512 tiles keep the MXU busy for Wan's head dim 128 in bf16 (q, k, v, o and the f32 accumulators of a
tile pair stay a few hundred KB, far below VMEM on v4/v5), and larger tiles halve the per-tile overhead against
256; but Wan's frames are 1560 tokens (480x832) and chunks 4680, which no power of two divides, so the padding rule
picks 256 for a 3-frame chunk of queries (3.9 % padding; 512 would waste 9 %) and 512 for a 21-frame cache (0.02 %).
128 is the smallest tile the TPU lane width allows. On a mesh the kernel runs per shard under `shard_map` (batch
and heads split as the activation rules say; XLA cannot partition a Pallas call). `interpret=True` runs the same kernel in Pallas interpret mode
on any platform (tests on CPU); off TPU without it, 'splash' is an error.
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)


def resolve_backend(name: str) -> str:
  """'auto' picks by platform: cudnn on GPU, splash on TPU, xla elsewhere."""
  if name != "auto":
    if name not in BACKENDS:
      raise ValueError(f"compute.attention: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name
  platform = jax.devices()[0].platform
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


def block_causal_mask(num_frames: int, tokens_per_frame: int, chunk_frames: int | None) -> np.ndarray:
  """(L, L) boolean: query token of chunk i sees key tokens of chunks <= i; None -> full attention (teacher)."""
  length = num_frames * tokens_per_frame
  if chunk_frames is None:
    return np.ones((length, length), bool)
  chunk = np.arange(length) // (tokens_per_frame * chunk_frames)
  return chunk[None, :] <= chunk[:, None]


def _combined_mask(mask, kv_lengths, batch, lq, lk, causal_block=None):
  """Boolean (B, 1, Lq, Lk) from the mask forms, or None."""
  out = None
  if causal_block is not None:
    out = (np.arange(lk)[None, :] // causal_block <= np.arange(lq)[:, None] // causal_block)[None, None]
  if mask is not None:
    m = jnp.asarray(mask, bool)
    if m.ndim == 2:
      m = m[None, None]
    out = m if out is None else jnp.logical_and(out, m)
  if kv_lengths is not None:
    valid = jnp.arange(lk)[None, :] < jnp.asarray(kv_lengths)[:, None]  # (B, Lk)
    valid = valid[:, None, None, :]
    out = valid if out is None else jnp.logical_and(out, valid)
  if out is not None:
    out = jnp.broadcast_to(out, (batch if out.shape[0] != 1 else 1, 1, lq, lk))
  return out


def _xla_attention(q, k, v, mask, kv_lengths, causal_block):
  """Reference: softmax in float32, explicit einsums (runs anywhere)."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(d).astype(np.float32)
  m = _combined_mask(mask, kv_lengths, b, lq, lk, causal_block)
  if m is not None:
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


def block_causal_by_blocks(attend, q, k, v, causal_block: int):
  """Block-causal attention as one unmasked call per block of queries: block i of `causal_block` queries against
  keys [0, (i + 1) * causal_block). What a kernel without block skipping needs: no (Lq, Lk) mask is built or read,
  and the fully masked key blocks are never computed (for n blocks, (n + 1) / 2n of the full attention's FLOPs).
  The same function as the masked form (each query row's softmax runs over the keys it may see)."""
  lq, lk = q.shape[1], k.shape[1]
  outs = []
  for start in range(0, lq, causal_block):
    stop, keys = min(start + causal_block, lq), min(start + causal_block, lk)
    outs.append(attend(q[:, start:stop], k[:, :keys], v[:, :keys]))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _cudnn_attention(q, k, v, mask, kv_lengths, causal_block):
  b, lq, _, _ = q.shape
  lk = k.shape[1]
  if causal_block is not None and mask is None and kv_lengths is None and lk > 0:
    # cuDNN takes a mask only as a dense (Lq, Lk) bias and still computes every tile: per block of queries instead.
    return block_causal_by_blocks(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"),
                                  q, k, v, causal_block)
  kw = {}
  if kv_lengths is not None:
    kw["key_value_seq_lengths"] = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (b,))
  m = None
  if mask is not None or causal_block is not None:
    m = _combined_mask(mask, None, b, lq, lk, causal_block)
  return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn", **kw)


def splash_block(length: int) -> int:
  """Tile size along one axis: the largest of SPLASH_BLOCKS whose padding is at most 1/16 of the length."""
  for block in SPLASH_BLOCKS:
    if (-length) % block <= length // 16:
      return block
  return SPLASH_BLOCKS[-1]


@functools.lru_cache(maxsize=1)
def _block_causal_mask_class():
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  class BlockCausalMask(sm._ComputableMask):  # pylint: disable=protected-access
    """Query i sees key j iff j // block <= i // block (computed per tile inside the kernel)."""

    def __init__(self, shape, block: int):
      self.block = block
      super().__init__(shape=shape, mask_function=lambda q_ids, kv_ids: kv_ids // block <= q_ids // block)

    def __eq__(self, other):
      return type(other) is type(self) and (self.shape, self.block) == (other.shape, other.block)

    def __hash__(self):
      return hash((type(self), self.shape, self.block))

  return BlockCausalMask


@functools.lru_cache(maxsize=32)
def _splash_kernel(lq: int, lk: int, heads: int, causal_block: int | None, mask_bytes: bytes | None,
                   block_q: int, block_kv: int, interpret: bool):
  """The splash kernel for padded lengths (lq, lk); built once per shape/mask (mask tiling runs in numpy)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  if mask_bytes is not None:
    base = sm.NumpyMask(np.frombuffer(mask_bytes, bool).reshape(lq, lk))
  elif causal_block is not None:
    base = _block_causal_mask_class()((lq, lk), causal_block)
  else:
    base = sm.FullMask((lq, lk))
  blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                         block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                         block_kv_dq=block_kv)
  build = lambda: sk.make_splash_mha(sm.MultiHeadMask([base] * heads), block_sizes=blocks, head_shards=1,
                                     q_seq_shards=1, interpret=interpret)
  # The kernel holds its mask tables as jax arrays; built inside a trace (flax's scan traces its body with partial
  # evaluation) they would be that trace's values, so it is built on a thread of its own (jax's trace state is
  # per thread) and cached as numpy.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    kernel = pool.submit(build).result()
  leaves, treedef = jax.tree_util.tree_flatten(kernel)
  return treedef, [np.asarray(x) for x in leaves]


def _splash_local(q, k, v, mask, kv_lengths, causal_block, interpret):
  """Splash attention on the arrays of one device (or one shard)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bk = splash_block(lq), splash_block(lk)
  lq_p, lk_p = lq + (-lq) % bq, lk + (-lk) % bk
  mask_bytes = None
  if mask is not None:
    if isinstance(mask, jax.core.Tracer) or np.ndim(mask) != 2:
      raise ValueError("attention 'splash': an explicit mask must be a concrete (Lq, Lk) array; pass causal_block "
                       "or kv_lengths for the model's masks")
    padded = np.zeros((lq_p, lk_p), bool)
    padded[:lq, :lk] = np.asarray(mask, bool)
    padded[lq:, :] = True  # padded query rows (dropped) must see a key
    mask_bytes = padded.tobytes()
  kernel = jax.tree_util.tree_unflatten(*_splash_kernel(lq_p, lk_p, h, causal_block, mask_bytes, bq, bk,
                                                        bool(interpret)))
  valid = lk if kv_lengths is None else jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), lk)
  valid = jnp.broadcast_to(valid, (b,))
  segments = sk.SegmentIds(q=jnp.zeros((b, lq_p), jnp.int32),
                           kv=(jnp.arange(lk_p)[None, :] >= valid[:, None]).astype(jnp.int32))
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # splash kernels take (H, L, D) per example
  qs = heads_first(pad(q * np.asarray(1.0 / np.sqrt(d), q.dtype), lq_p))
  ks, vs = heads_first(pad(k, lk_p)), heads_first(pad(v, lk_p))
  if lk_p == lk and kv_lengths is None:
    out = jax.vmap(kernel)(qs, ks, vs)
  else:
    out = jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=s))(qs, ks, vs, segments)
  return jnp.swapaxes(out, 1, 2)[:, :lq].astype(q.dtype)


def _splash_attention(q, k, v, mask, kv_lengths, causal_block, interpret):
  """Splash attention; on a mesh (inside `activation_context`) per shard under `shard_map`, batch over the batch
  axes and heads over the heads axis of the activation rules, since XLA cannot partition a Pallas kernel."""
  if not interpret and jax.devices()[0].platform != "tpu":
    raise RuntimeError("compute.attention='splash' is TPU only; use 'auto', 'xla' or 'cudnn' on this platform "
                       "(or compute.splash_interpret=True to run the kernel in Pallas interpret mode, for tests)")
  from dsa_jax.parallel import mesh as mesh_lib
  active = mesh_lib.active_mesh()
  if active is None:
    return _splash_local(q, k, v, mask, kv_lengths, causal_block, interpret)
  mesh, rules = active
  spec = mesh_lib.logical_to_spec(("activation_batch", None, "activation_heads", None), q.shape, mesh, rules)
  batch_spec = jax.sharding.PartitionSpec(spec[0])
  if kv_lengths is None:
    fn = lambda q, k, v: _splash_local(q, k, v, mask, None, causal_block, interpret)
    args, specs = (q, k, v), (spec, spec, spec)
  else:
    fn = lambda q, k, v, n: _splash_local(q, k, v, mask, n, causal_block, interpret)
    lengths = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (q.shape[0],))
    args, specs = (q, k, v, lengths), (spec, spec, spec, batch_spec)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)


def dot_product_attention(q, k, v, *, mask=None, kv_lengths=None, causal_block: int | None = None,
                          backend: str = "xla", interpret: bool = False):
  """softmax(q k^T / sqrt(D)) v over (B, L, H, D) inputs with the given backend (`interpret`: splash only)."""
  if backend == "xla":
    return _xla_attention(q, k, v, mask, kv_lengths, causal_block)
  if backend == "cudnn":
    return _cudnn_attention(q, k, v, mask, kv_lengths, causal_block)
  if backend == "splash":
    return _splash_attention(q, k, v, mask, kv_lengths, causal_block, interpret)
  raise ValueError(f"compute.attention: unknown backend {backend!r}; expected one of {BACKENDS}")
