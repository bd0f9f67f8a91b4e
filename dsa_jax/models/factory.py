"""Building the networks of a config: generator, confidence head, teacher, critic; abstract shapes; random weights;
FLOP counts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.config_lib import latent_hw, tokens_per_frame
from dsa_jax.models.confidence import ConfidenceConfig, ConfidenceHead
from dsa_jax.models.dit import DiTConfig, WanDiT


def dit_config(config, role: str = "model") -> DiTConfig:
  """DiTConfig of `config.model` (generator), `config.teacher` or `config.critic`."""
  return DiTConfig.from_config(config[role], config.compute)


def dit_example_inputs(config, dcfg: DiTConfig, batch: int = 1, frames: int | None = None):
  """Shape-only inputs (x, t, context) for init / eval_shape: one chunk by default."""
  frames = frames or config.video.chunk_frames
  lh, lw = latent_hw(config)
  x = jax.ShapeDtypeStruct((batch, frames, lh, lw, dcfg.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch, frames), jnp.float32)
  ctx = jax.ShapeDtypeStruct((batch, dcfg.text_len, dcfg.text_dim), jnp.float32)
  return x, t, ctx


def init_dit(dcfg: DiTConfig, config, key):
  """Boxed (logically partitioned) params of a DiT; init on one chunk so the cost does not grow with the video."""
  x, t, ctx = dit_example_inputs(config, dcfg)
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  return WanDiT(dcfg).init(key, zeros(x), zeros(t), zeros(ctx))


def init_head(config, key):
  hcfg = ConfidenceConfig.from_config(config)
  f = config.video.chunk_frames
  feats = jnp.zeros((1, f, 1, config.model.dim), jnp.float32)
  return ConfidenceHead(hcfg).init(key, feats, jnp.zeros((1, f), jnp.int32), jnp.zeros((1, f), jnp.float32))


def abstract_dit_params(dcfg: DiTConfig, config):
  """Boxed ShapeDtypeStruct tree: parameter counts and shardings without allocating (1.3B / 14B on a laptop)."""
  return jax.eval_shape(lambda k: init_dit(dcfg, config, k), jax.random.PRNGKey(0))


def abstract_head_params(config):
  return jax.eval_shape(lambda k: init_head(config, k), jax.random.PRNGKey(0))


NETWORK_ROLES = {"generator": "model", "generator_ema": "model", "critic": "critic", "teacher": "teacher",
                 "teacher_ema": "teacher"}


def network_role(name: str) -> str:
  """The config section that shapes DiT network `name` ('generator' -> 'model', 'critic', 'teacher')."""
  if name not in NETWORK_ROLES:
    raise ValueError(f"network: expected 'head' or one of {sorted(NETWORK_ROLES)}, got {name!r}")
  return NETWORK_ROLES[name]


def init_network(config, name: str, key):
  """Boxed params of network `name` ('generator', 'generator_ema', 'critic', 'teacher' or 'head') of `config`."""
  if name == "head":
    return init_head(config, key)
  return init_dit(dit_config(config, network_role(name)), config, key)


_ABSTRACT_NETWORKS: dict = {}  # (name, the config as JSON) -> the tree; a few entries per process


def abstract_network(config, name: str):
  """Boxed ShapeDtypeStruct tree of network `name` (no allocation). Remembered per config and name: loading a model
  asks for the same shapes more than once (restoring and checking in `workdir`, checking and casting in `loading`),
  and each trace of the init costs 0.28 s for the 1.3B generator on a CPU."""
  key = (name, config.to_json_best_effort(sort_keys=True))
  if key not in _ABSTRACT_NETWORKS:
    if len(_ABSTRACT_NETWORKS) >= 32:
      _ABSTRACT_NETWORKS.clear()
    _ABSTRACT_NETWORKS[key] = jax.eval_shape(lambda k: init_network(config, name, k), jax.random.PRNGKey(0))
  return _ABSTRACT_NETWORKS[key]


def random_networks(config, names, key, exact: bool = True) -> dict:
  """Random unboxed variables {name: tree} of `names`.

  exact=True: the modules' own initialisers, in one jitted init (compiling it traces the whole model: ~5-10 s on a
  CPU). exact=False: the same tree filled by one small jitted program (seconds even at 1.3B): matrices and tables
  ~ N(0, 0.02^2), biases 0, norm scales 1 -- for smoke runs and speed benchmarks, where weights only need to be finite.
  """
  names = tuple(names)

  def init(key):
    keys = jax.random.split(key, len(names))
    return {n: nn.unbox(init_network(config, n, k)) for n, k in zip(names, keys)}

  if exact:
    return jax.jit(init)(key)
  shapes = jax.eval_shape(init, key)
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(shapes))
  treedef = jax.tree_util.tree_structure(shapes)
  kinds = []
  for path, s in zip(paths, leaves):
    name = jax.tree_util.keystr(path)
    kinds.append("one" if name.endswith("scale']") else
                 "zero" if name.endswith("bias']") or len(s.shape) < 2 else "normal")
  total = sum(int(np.prod(s.shape)) for s, k in zip(leaves, kinds) if k == "normal")

  @jax.jit
  def fill(key):
    flat = 0.02 * jax.random.normal(key, (max(total, 1),), jnp.float32)  # one random op: a fast compile
    out, pos = [], 0
    for s, kind in zip(leaves, kinds):
      if kind == "one":
        out.append(jnp.ones(s.shape, s.dtype))
      elif kind == "zero":
        out.append(jnp.zeros(s.shape, s.dtype))
      else:
        n = int(np.prod(s.shape))
        out.append(flat[pos:pos + n].reshape(s.shape).astype(s.dtype))
        pos += n
    return jax.tree_util.tree_unflatten(treedef, out)

  return fill(key)


def as_variables(params):
  """A DiT/head variables dict ({'params': ...}, possibly with a calibration's 'fp8_amax') from either that dict or
  the bare params tree (unboxed)."""
  params = nn.unbox(params)
  if isinstance(params, dict) and "params" in params and set(params) <= {"params", "fp8_amax"}:
    return params
  return {"params": params}


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(tree))))


def dit_forward_flops(dcfg: DiTConfig, query_tokens: int, key_tokens: int, frames: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one forward over `query_tokens` attending to `key_tokens`.

  Counts projections, attention scores and values, cross-attention (text keys/values computed once per forward),
  FFN, patch embedding, time projection and the output head. Elementwise work is excluded (it is not FLOP-bound).
  """
  d, ff, L, tl = dcfg.dim, dcfg.ffn_dim, dcfg.num_layers, dcfg.text_len
  q = query_tokens
  patch = dcfg.patch_size[0] * dcfg.patch_size[1] * dcfg.patch_size[2]
  per_layer = (
      2 * q * d * d * 4            # self-attention q, k, v, o
      + 2 * 2 * q * key_tokens * d  # scores + weighted values
      + 2 * q * d * d * 2          # cross-attention q, o
      + 2 * tl * d * d * 2         # cross-attention k, v over the text
      + 2 * 2 * q * tl * d         # cross-attention scores + values
      + 2 * q * d * ff * 2         # FFN
  )
  other = (2 * q * patch * dcfg.in_channels * d + 2 * q * d * patch * dcfg.out_channels
           + 2 * tl * (dcfg.text_dim * d + d * d) + 2 * frames * (dcfg.freq_dim * d + d * d + d * 6 * d))
  return float(L * per_layer + other)


def chunk_flops(config, dcfg: DiTConfig) -> dict:
  """FLOPs of one chunk forward: first chunk, last chunk (longest context) and the mean over a video's chunks."""
  tpf = tokens_per_frame(config)
  cf, nf = config.video.chunk_frames, config.video.num_frames
  n = nf // cf
  per = [dit_forward_flops(dcfg, cf * tpf, (i + 1) * cf * tpf, cf) for i in range(n)]
  return {"first_chunk": per[0], "last_chunk": per[-1], "mean_chunk": sum(per) / n}
