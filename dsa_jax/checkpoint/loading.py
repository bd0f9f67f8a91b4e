"""The one way networks are loaded: sampler, evaluation, trainer (teacher, init_from, critic_from), VAE, text encoder.

`load_networks(config, path, names)` reads the named networks from a model folder (params_io) or a training workdir
(its latest checkpoint, or the `model/` it exported), checks their architecture against the config, and returns
unboxed variables in the config's parameter dtype. A wanted network that the checkpoint lacks may be substituted,
always with one logged line saying what stood in for what:

  generator_ema -> generator   (runs without an EMA, e.g. a converted model)
  head          -> random init (runs without a trained confidence head: thresholds are then meaningless)
  generator     -> generator_ema, teacher  (init_from a sampling-only model, or a converted base model stored as
                               'teacher' with the same architecture)
  critic        -> teacher     (critic_from a teacher: the fake score starts as the real score)

The last two are asked for by the trainer only (`fallbacks=`); anything else missing is an error naming what the
checkpoint holds. A sampler's head may come from a head folder of its own (`load_sampler_params(..., head=DIR)`,
see `dsa_jax.checkpoint.heads`), checked against the loaded generator's fingerprint. The VAE and the text encoder
describe their own architecture in the checkpoint's metadata: `load_vae` and `load_text_encoder` read them (and the
digits evaluator, through `load_described`).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dsa_jax.checkpoint import heads, params_io, workdir
from dsa_jax.checkpoint.params_io import CheckpointError

RANDOM = "random"
SAMPLER_FALLBACKS = {"generator_ema": ("generator",), "head": (RANDOM,)}
INIT_FROM_FALLBACKS = {"generator": ("generator_ema", "teacher")}
CRITIC_FROM_FALLBACKS = {"critic": ("teacher",)}

Log = Callable[[str], None]


def _stderr(msg: str):
  print(msg, file=sys.stderr, flush=True)


def _check_folder(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist (--ckpt / config.sampling.checkpoint)")
  if "://" not in path and not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path!r} is not a folder (expected a dsa_jax model checkpoint or a "
                            "training workdir)")


def _same_arch(meta: dict, stored: str, config, wanted: str) -> bool:
  try:
    params_io.check_arch(meta, stored, workdir.arch_meta(config, [wanted])[wanted])
    return True
  except CheckpointError:
    return False


def plan(config, path: str, names, fallbacks: dict, step: Optional[int] = None) -> tuple[dict, dict]:
  """({wanted: stored network or RANDOM}, meta): what `load_networks` will read, without reading weights."""
  available, meta = workdir.stored_networks(path, step)
  out = {}
  for n in names:
    if n in available:
      out[n] = n
      continue
    mismatched = []
    for alt in fallbacks.get(n, ()):
      if alt == RANDOM or (alt in available and (alt not in meta.get("arch", {}) or _same_arch(meta, alt, config, n))):
        out[n] = alt
        break
      if alt in available:
        mismatched.append(alt)
    else:
      why = f" ({', '.join(map(repr, mismatched))} has another architecture than {n!r})" if mismatched else ""
      raise CheckpointError(f"checkpoint {path!r} holds no {n!r} network{why}; it has {sorted(available)}")
  return out, meta


def load_networks(config, path: str, names, *, fallbacks: Optional[dict] = None, step: Optional[int] = None,
                  log: Log = _stderr, random_key=None, fingerprints: Optional[dict] = None) -> tuple[dict, dict]:
  """{name: unboxed variables} of `names` and where each came from ({name: stored network or 'random'}).

  path '' gives every network random weights (fast fill, for smoke runs and benchmarks), logged. `fallbacks`
  (default `SAMPLER_FALLBACKS`) maps a wanted network to the substitutes tried in order, RANDOM meaning a fresh
  init; each substitution is logged. A `fingerprints` dict is filled with {name: heads.generator_fingerprint} of
  each network read from storage, taken of the weights as stored (before the cast to the config's dtype), so that
  it matches the fingerprint recorded when a head was exported.
  """
  from dsa_jax.models import factory
  names = tuple(names)
  fallbacks = SAMPLER_FALLBACKS if fallbacks is None else fallbacks
  key = jax.random.PRNGKey(int(config.seed)) if random_key is None else random_key
  if not path:
    log(f"warning: no checkpoint given: {', '.join(names)} get RANDOM weights (outputs are noise-like; only for smoke "
        "tests and benchmarks)")
    return factory.random_networks(config, names, key, exact=False), {n: RANDOM for n in names}
  path = os.fspath(path)
  _check_folder(path)
  chosen, meta = plan(config, path, names, fallbacks, step)
  stored = {}
  for n, s in chosen.items():
    if s == RANDOM:
      log(f"warning: checkpoint {path!r} has no {n!r}: it gets RANDOM weights"
          + (" (thresholds are meaningless; --threshold inf samples fixed steps)" if n == "head" else ""))
    elif s != n:
      log(f"note: checkpoint {path!r} has no {n!r}: using its {s!r} in its place")
      stored.setdefault(s, n)
    else:
      stored[s] = n
  tree = {}
  if stored:
    tree, _ = workdir.load_model_from_workdir(path, config, tuple(stored), step=step, roles=stored)
  out = {}
  randoms = [n for n, s in chosen.items() if s == RANDOM]
  if randoms:
    out.update(factory.random_networks(config, randoms, key, exact=True))
  for n, s in chosen.items():
    if s == RANDOM:
      continue
    if fingerprints is not None:
      fingerprints[n] = heads.generator_fingerprint(tree[s])
    abstract = factory.as_variables(factory.abstract_network(config, n))
    params = factory.as_variables(tree[s])
    params_io.check_tree_shapes(params, abstract, n, path)
    out[n] = jax.tree_util.tree_map(lambda a, t: jnp.asarray(a, t.dtype), params, abstract)
  return out, dict(chosen)


def cast_params_for_inference(params, dtype=jnp.bfloat16):
  """Casts the big matmul kernels of a DiT to the compute dtype once (saves memory and a cast per forward).

  Norm scales, biases, modulation tables and the time embedding stay float32 (they are tiny and precision-sensitive).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params

  def cast(path, x):
    names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
    if any(str(n).startswith("time_") for n in names):
      return x
    if names and names[-1] in ("kernel", "patch_embedding") and x.ndim >= 2:
      return x.astype(dtype)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


HEAD_FLAG = "--head"


def load_sampler_params(config, ckpt: str = "", *, use_ema: Optional[bool] = None, warn: Log = _stderr,
                        cast: bool = False, head: Optional[str] = None,
                        fp8_calibration: bool = True) -> tuple[dict, dict]:
  """{'generator', 'head'} variables for sampling and a dict saying where they came from.

  The generator is 'generator_ema' when `use_ema` (default config.sampling.use_ema) and present, else 'generator';
  a missing head is randomly initialised; both substitutions are logged through `warn`. cast=True casts the
  generator's matmul kernels to config.compute.dtype (`cast_params_for_inference`).

  `head` (default config.sampling.head; '' = the checkpoint's own) is a head folder (`dsa-jax convert export-head`):
  the head network and what describes it (`conf_target`, the `calibration` table) come from there instead of from
  `ckpt`, once its recorded generator fingerprint matches the loaded generator's (a head folder that records none
  loads with a warning).

  With calibrated fp8 layers (`compute.matmul='fp8'`, `compute.fp8_activations='calibrated'`) a model folder's
  stored fp8 calibration (`dsa-jax calibrate --fp8`) comes with the generator (its 'fp8_amax' collection) when it
  was made for this generator, dtype, video size and ladder (`fp8_calibration=False`: never); else a note says why
  and the sampler calibrates at its first call.
  """
  from dsa_jax.models.dit import _DTYPES
  use_ema = config.sampling.use_ema if use_ema is None else use_ema
  head = os.fspath(config_head(config) if head is None else head or "")
  gen = "generator_ema" if use_ema else "generator"
  head_meta = heads.check_head_folder(head, HEAD_FLAG) if head else None
  if ckpt and heads.is_head_folder(os.fspath(ckpt)):
    raise CheckpointError(f"--ckpt {ckpt!r} holds only a confidence head: pass it as --head (config.sampling.head) "
                          "and the model folder of its generator as --ckpt")
  prints = {} if head else None
  params, chosen = load_networks(config, ckpt, (gen,) if head else (gen, "head"), log=warn, fingerprints=prints)
  out = {"generator": params[gen]}
  if head:
    try:
      out["head"] = load_networks(config, head, ("head",), fallbacks={}, log=warn)[0]["head"]
    except CheckpointError as e:
      raise CheckpointError(f"{HEAD_FLAG}: {e}") from None
    fingerprint = prints.get(gen) or heads.generator_fingerprint(params[gen])  # random weights: nothing was read
    heads.check_fingerprint(head_meta, fingerprint, head, HEAD_FLAG, warn=warn)
  else:
    out["head"] = params["head"]
  if cast:
    out["generator"] = cast_params_for_inference(out["generator"], _DTYPES[config.compute.dtype])
  from dsa_jax.sampling.stop_rules import config_stop_rule
  rule = config_stop_rule(config)
  meta = {}
  if not ckpt:
    source = {"source": "random"}
  else:
    kind = "checkpoint" if workdir.is_model_dir(ckpt) else "workdir"
    source = {"source": kind, "path": ckpt, "generator": chosen[gen]}
    if kind == "checkpoint" and (not head or rule != "confidence"):
      meta = params_io.read_meta(ckpt)
    if kind == "checkpoint" and not head:  # what the model records about its head: its target, the calibration
      source.update({k: meta[k] for k in heads.HEAD_META_KEYS if k in meta})
  if head:  # the head folder's record, never the model's: a table calibrated with another head means nothing
    source.update({k: head_meta[k] for k in heads.HEAD_META_KEYS if k in head_meta})
    source.update({"head": head, "generator_fingerprint": fingerprint})
  elif chosen["head"] == RANDOM:
    source["head"] = RANDOM
  from dsa_jax.models import factory
  from dsa_jax.sampling import fp8_calibration as fp8_lib
  if fp8_calibration and ckpt and fp8_lib.wants_calibration(config):
    amax, why = (fp8_lib.stored(params_io.read_meta(ckpt), config, chosen[gen]) if source["source"] == "checkpoint"
                 else (None, "a training workdir stores none (export a model, then dsa-jax calibrate --fp8)"))
    if amax is None:
      warn(f"note: no stored fp8 calibration is used ({why}): the sampler calibrates the fp8 activation scales at "
           "its first call")
    else:
      out["generator"] = {**factory.as_variables(out["generator"]), "fp8_amax": amax}
      source["fp8_calibration"] = "stored"
  if rule != "confidence":  # the x0-change rule's budget table is the model's own, whatever head is loaded
    from dsa_jax.sampling.budget import meta_key, ranges_key
    source.pop("calibration", None)
    source.pop("calibration_ranges", None)
    source["stop_rule"] = rule
    for key, name in ((meta_key(rule), "calibration"), (ranges_key(rule), "calibration_ranges")):
      if key in meta:
        source[name] = meta[key]
  return out, source


def head_folder(source: dict) -> Optional[str]:
  """The head folder a `load_sampler_params` source's head came from; None for the checkpoint's own or a random
  head."""
  head = source.get("head")
  return head if head and head != RANDOM else None


def calibration_owner(source: dict, model: str) -> str:
  """Where the calibration table of a `load_sampler_params` source comes from, for messages: the head folder when
  the head came from one, else `model` (how the caller names the model)."""
  head = head_folder(source)
  return f"--head {head!r}" if head and source.get("stop_rule", "confidence") == "confidence" else model


def config_head(config) -> str:
  """config.sampling.head, '' where the config predates the field (a config read back from an older checkpoint)."""
  return str(config.sampling.get("head", "") or "")


# ----------------------------------------------------------------------------------------------------------------------
# Networks that describe their own architecture


def load_described(path: str, network: str, field: str) -> tuple[dict, Optional[dict], dict]:
  """(params of `network`, its stored architecture dict or None, meta) from the params_io folder that `field`
  names (a config field or a flag, for the error messages)."""
  if not path:
    raise FileNotFoundError(f"{field}: needs a checkpoint folder (dsa-jax convert writes one); got ''")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{field}: checkpoint {path!r} does not exist")
  params, meta = params_io.load_params(path, [network])
  return params[network], meta.get("arch", {}).get(network), meta


def load_vae(path: str, log: Log = _stderr):
  """(WanVAEConfig, params) of the Wan VAE at `path` (network 'vae'); no stored architecture: Wan2.1's, logged."""
  from dsa_jax.models import vae as vae_lib
  params, arch, _ = load_described(path, "vae", "config.vae.path")
  if arch is None:
    log(f"note: VAE checkpoint {path!r} records no architecture: assuming Wan2.1's VAE")
    return vae_lib.WanVAEConfig(), params
  return vae_lib.WanVAEConfig.from_dict(arch), params


def load_text_encoder(path: str):
  """(UMT5Config, params) of the umT5 encoder at `path` (network 'text_encoder')."""
  from dsa_jax.models import umt5
  params, arch, _ = load_described(path, "text_encoder", "config.text.path")
  if arch is None:
    raise CheckpointError(f"config.text.path: {path!r} records no architecture for 'text_encoder'")
  return umt5.UMT5Config(**arch), params
