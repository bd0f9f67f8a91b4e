"""Wan2.1 DiT weights: diffusers / original-Wan (Self Forcing, CausVid) state dicts <-> our Flax `WanDiT` params.

One table (`param_table`) names every tensor three ways: its diffusers key (`WanTransformer3DModel`), its original
Wan key (`wan/modules/model.py`, which Self Forcing and CausVid keep), and its path in our params, plus how the
array is laid out on each side. Converting, checking and exporting all read that table, so the three layouts cannot
drift apart. Layout facts (read in the public Wan2.1 / Self Forcing code):
  * torch Linear weights are (out, in), our kernels (in, out); q/k/v kernels are (dim, heads, head_dim), the output
    projection (heads, head_dim, dim), and the q/k RMSNorm (over the full dim) scale is (heads, head_dim);
  * the patch Conv3d weight (dim, C, pt, ph, pw) becomes (pt, ph, pw, C, dim) (our patches flatten (ph, pw, C));
  * our LayerNorm with affine before cross-attention is `norm_cross`: diffusers calls it `norm2`, the original
    Wan code `norm3` (diffusers swapped the names; their norms without affine hold no weights);
  * per-layer params are stacked on a leading axis under `blocks` when `scan_layers`, else live in `blocks_{i}`.
The head count is not visible in the shapes (the q/k norm spans the whole dim), so it comes from a config.json, the
user's config, or the Wan convention head_dim = 128 (reported as an assumption).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from dsa_jax.convert import common
from dsa_jax.convert.common import ConversionError
from dsa_jax.models.dit import DiTConfig

__all__ = [
    "ParamEntry", "param_table", "detect_layout", "config_from_diffusers_json", "config_from_wan_json",
    "infer_config_from_state_dict", "check_config_matches", "dit_params_from_state_dict", "dit_state_dict",
    "diffusers_config", "is_dit_config", "is_diffusers_export", "check_export_dir", "export_diffusers", "load_dit",
    "stack_layers", "unstack_layers", "ARCH_FIELDS",
]

# DiTConfig fields that define the architecture (the rest are compute settings).
ARCH_FIELDS = ("dim", "ffn_dim", "num_layers", "num_heads", "text_dim", "text_len", "in_channels", "out_channels",
               "patch_size", "freq_dim", "eps", "rope_theta", "rope_max_frames", "cross_attn_norm")
WAN_HEAD_DIM = 128  # every released Wan2.1 / 2.2 DiT uses 128-wide heads
DEFAULT_TEXT_LEN = 512


@dataclasses.dataclass(frozen=True)
class ParamEntry:
  """One tensor: diffusers key, original Wan key ('{i}' = layer), our path, layout kind, torch-side shape."""
  diffusers: str
  wan: str
  path: tuple
  kind: str
  torch_shape: tuple
  per_layer: bool


def param_table(cfg: DiTConfig) -> list[ParamEntry]:
  """Every tensor of a Wan2.1 T2V DiT of config `cfg`."""
  d, f = cfg.dim, cfg.ffn_dim
  pt, ph, pw = cfg.patch_size
  out: list[ParamEntry] = []

  def top(dk, wk, path, kind, shape):
    out.append(ParamEntry(dk, wk, path, kind, tuple(shape), False))

  def layer(dk, wk, path, kind, shape):
    out.append(ParamEntry("blocks.{i}." + dk, "blocks.{i}." + wk, path, kind, tuple(shape), True))

  def linear(dk, wk, name, n_out, n_in, top_level=True):
    add = top if top_level else layer
    add(dk + ".weight", wk + ".weight", name + ("kernel",), "linear", (n_out, n_in))
    add(dk + ".bias", wk + ".bias", name + ("bias",), "id", (n_out,))

  top("patch_embedding.weight", "patch_embedding.weight", ("patch_embedding",), "conv",
      (d, cfg.in_channels, pt, ph, pw))
  top("patch_embedding.bias", "patch_embedding.bias", ("patch_bias",), "id", (d,))
  linear("condition_embedder.time_embedder.linear_1", "time_embedding.0", ("time_embedding_1",), d, cfg.freq_dim)
  linear("condition_embedder.time_embedder.linear_2", "time_embedding.2", ("time_embedding_2",), d, d)
  linear("condition_embedder.time_proj", "time_projection.1", ("time_projection",), 6 * d, d)
  linear("condition_embedder.text_embedder.linear_1", "text_embedding.0", ("text_embedding_1",), d, cfg.text_dim)
  linear("condition_embedder.text_embedder.linear_2", "text_embedding.2", ("text_embedding_2",), d, d)
  for dattn, wattn, ours in (("attn1", "self_attn", "self_attn"), ("attn2", "cross_attn", "cross_attn")):
    for dp, wp in (("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
      layer(f"{dattn}.{dp}.weight", f"{wattn}.{wp}.weight", (ours, wp, "kernel"), "qkv_w", (d, d))
      layer(f"{dattn}.{dp}.bias", f"{wattn}.{wp}.bias", (ours, wp, "bias"), "heads", (d,))
    layer(f"{dattn}.to_out.0.weight", f"{wattn}.o.weight", (ours, "o", "kernel"), "o_w", (d, d))
    layer(f"{dattn}.to_out.0.bias", f"{wattn}.o.bias", (ours, "o", "bias"), "id", (d,))
    for n in ("norm_q", "norm_k"):
      layer(f"{dattn}.{n}.weight", f"{wattn}.{n}.weight", (ours, n, "scale"), "heads", (d,))
  if cfg.cross_attn_norm:
    layer("norm2.weight", "norm3.weight", ("norm_cross", "scale"), "id", (d,))
    layer("norm2.bias", "norm3.bias", ("norm_cross", "bias"), "id", (d,))
  linear("ffn.net.0.proj", "ffn.0", ("ffn_in",), f, d, top_level=False)
  linear("ffn.net.2", "ffn.2", ("ffn_out",), d, f, top_level=False)
  layer("scale_shift_table", "modulation", ("modulation",), "id", (1, 6, d))
  linear("proj_out", "head.head", ("head",), pt * ph * pw * cfg.out_channels, d)
  top("scale_shift_table", "head.modulation", ("head_modulation",), "id", (1, 2, d))
  return out


def _to_ours(kind: str, a: np.ndarray, cfg: DiTConfig) -> np.ndarray:
  h, hd = cfg.num_heads, cfg.head_dim
  if kind == "id":
    return a
  if kind == "linear":
    return a.T
  if kind == "qkv_w":
    return a.T.reshape(a.shape[1], h, hd)
  if kind == "o_w":
    return a.T.reshape(h, hd, a.shape[0])
  if kind == "heads":
    return a.reshape(h, hd)
  if kind == "conv":
    return a.transpose(2, 3, 4, 1, 0)
  raise AssertionError(kind)


def _to_torch(kind: str, a: np.ndarray, cfg: DiTConfig) -> np.ndarray:
  if kind == "id":
    return a
  if kind == "linear":
    return a.T
  if kind == "qkv_w":
    return a.reshape(a.shape[0], -1).T
  if kind == "o_w":
    return a.reshape(-1, a.shape[-1]).T
  if kind == "heads":
    return a.reshape(-1)
  if kind == "conv":
    return a.transpose(4, 3, 0, 1, 2)
  raise AssertionError(kind)


def _our_shape(e: ParamEntry, cfg: DiTConfig) -> tuple:
  return _to_ours(e.kind, np.empty(e.torch_shape, np.uint8), cfg).shape


def _expand(e: ParamEntry, layout: str, cfg: DiTConfig) -> list[tuple[int | None, str]]:
  key = e.diffusers if layout == "diffusers" else e.wan
  if not e.per_layer:
    return [(None, key)]
  return [(i, key.replace("{i}", str(i))) for i in range(cfg.num_layers)]


def expected_shapes(cfg: DiTConfig, layout: str = "diffusers") -> dict[str, tuple]:
  """Key -> torch shape of the whole state dict in `layout` ('diffusers' or 'wan')."""
  return {k: e.torch_shape for e in param_table(cfg) for _, k in _expand(e, layout, cfg)}


# ----------------------------------------------------------------------------------------------- layouts + configs


_UNSUPPORTED = {
    "add_k_proj": "image-to-video cross-attention (Wan I2V)", "image_embedder": "image-to-video (Wan I2V)",
    "img_emb": "image-to-video (Wan I2V)", "k_img": "image-to-video (Wan I2V)", "vace": "VACE",
    "motion_encoder": "Wan-Animate", "face_adapter": "Wan-Animate",
}


def _unsupported_hint(keys) -> str:
  found = sorted({name for k in keys for frag, name in _UNSUPPORTED.items() if frag in k})
  if found:
    return f"this checkpoint holds parts of {', '.join(found)}, which dsa_jax's text-to-video WanDiT does not have"
  return ""


def detect_layout(sd: Mapping[str, Any], source: str = "checkpoint") -> str:
  """'diffusers' or 'wan' from the key names; anything else is an error that says what the file looks like."""
  keys = list(sd)
  if any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys):
    return "diffusers"
  if any(k.startswith(("time_projection.", "head.head.", "text_embedding.")) or ".self_attn." in k for k in keys):
    return "wan"
  hint = ""
  if any(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in keys):
    hint = " It looks like a VAE: use `dsa-jax convert vae`."
  elif any(k.startswith(("shared.", "token_embedding.")) or "SelfAttention" in k for k in keys):
    hint = " It looks like a text encoder: use `dsa-jax convert umt5`."
  raise ConversionError(f"{source}: not a Wan DiT state dict in the diffusers or the original Wan layout "
                        f"(first keys: {keys[:6]}).{hint}")


def _make_config(**kw) -> DiTConfig:
  kw["patch_size"] = tuple(int(p) for p in kw["patch_size"])
  if kw["patch_size"][0] != 1:
    raise ConversionError(f"patch_size {kw['patch_size']}: dsa_jax's WanDiT patchifies single frames "
                          "(temporal patch 1, as every Wan2.1 model)")
  if kw["dim"] % kw["num_heads"]:
    raise ConversionError(f"dim {kw['dim']} does not divide into {kw['num_heads']} heads")
  return DiTConfig(**kw)


def config_from_diffusers_json(d: Mapping[str, Any], text_len: int | None = None, source: str = "config.json",
                               **overrides) -> DiTConfig:
  """DiTConfig from a diffusers `WanTransformer3DModel` config.json (diffusers has no text length: 512 unless given)."""
  cls = d.get("_class_name", "WanTransformer3DModel")
  if cls != "WanTransformer3DModel":
    hint = " (use `dsa-jax convert vae`)" if "Autoencoder" in str(cls) else ""
    raise ConversionError(f"{source}: is a {cls} config, expected WanTransformer3DModel{hint}")
  for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
    if d.get(k) is not None:
      raise ConversionError(f"{source}: {k}={d[k]} is an image-to-video model; dsa_jax converts text-to-video DiTs")
  try:
    heads, hd = int(d.get("num_attention_heads", 40)), int(d.get("attention_head_dim", 128))
    kw = dict(dim=heads * hd, ffn_dim=int(d.get("ffn_dim", 13824)), num_layers=int(d.get("num_layers", 40)),
              num_heads=heads, text_dim=int(d.get("text_dim", 4096)), text_len=int(text_len or DEFAULT_TEXT_LEN),
              in_channels=int(d.get("in_channels", 16)),
              out_channels=int(d.get("out_channels") or d.get("in_channels", 16)),
              patch_size=tuple(d.get("patch_size", (1, 2, 2))), freq_dim=int(d.get("freq_dim", 256)),
              eps=float(d.get("eps", 1e-6)), rope_max_frames=int(d.get("rope_max_seq_len", 1024)),
              cross_attn_norm=bool(d.get("cross_attn_norm", True)))
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{source}: unexpected value in the diffusers config ({e})") from e
  kw.update(overrides)
  return _make_config(**kw)


def config_from_wan_json(d: Mapping[str, Any], source: str = "config.json", **overrides) -> DiTConfig:
  """DiTConfig from the original Wan2.1 `config.json` (keys dim, num_heads, in_dim, out_dim, text_len, ...)."""
  if d.get("model_type", "t2v") not in ("t2v", None):
    raise ConversionError(f"{source}: model_type {d['model_type']!r}; dsa_jax converts text-to-video (t2v) DiTs")
  try:
    kw = dict(dim=int(d["dim"]), ffn_dim=int(d["ffn_dim"]), num_layers=int(d["num_layers"]),
              num_heads=int(d["num_heads"]), text_dim=int(d.get("text_dim", 4096)),
              text_len=int(d.get("text_len", DEFAULT_TEXT_LEN)), in_channels=int(d.get("in_dim", 16)),
              out_channels=int(d.get("out_dim", 16)), patch_size=tuple(d.get("patch_size", (1, 2, 2))),
              freq_dim=int(d.get("freq_dim", 256)), eps=float(d.get("eps", 1e-6)),
              cross_attn_norm=bool(d.get("cross_attn_norm", True)))
  except KeyError as e:
    raise ConversionError(f"{source}: the Wan config lacks {e.args[0]!r}") from e
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{source}: unexpected value in the Wan config ({e})") from e
  kw.update(overrides)
  return _make_config(**kw)


def _is_wan_json(d: Mapping[str, Any]) -> bool:
  return "dim" in d and "num_heads" in d


def _is_diffusers_json(d: Mapping[str, Any]) -> bool:
  return "_class_name" in d or "attention_head_dim" in d or "num_attention_heads" in d


def is_dit_config(d: Mapping[str, Any]) -> bool:
  """A Wan DiT config.json: the original Wan one (dim, num_heads) or diffusers' WanTransformer3DModel."""
  return _is_wan_json(d) or (_is_diffusers_json(d) and d.get("_class_name", "WanTransformer3DModel")
                             == "WanTransformer3DModel")


def infer_config_from_state_dict(sd: Mapping[str, Any], layout: str, num_heads: int | None = None,
                                 text_len: int | None = None, source: str = "checkpoint",
                                 **overrides) -> tuple[DiTConfig, list[str]]:
  """DiTConfig from tensor shapes (for files without a config.json); returns (config, assumptions made)."""
  e = {x.path: x for x in param_table(DiTConfig(dim=8, ffn_dim=8, num_layers=1, num_heads=1, text_dim=8, text_len=1,
                                                in_channels=1, out_channels=1))}
  key = (lambda x: x.diffusers) if layout == "diffusers" else (lambda x: x.wan)

  def shape(path, layer=None):
    k = key(e[path]).replace("{i}", str(layer if layer is not None else 0))
    if k not in sd:
      raise ConversionError(f"{source}: cannot infer the architecture, {k!r} is missing")
    return tuple(sd[k].shape)

  notes = []
  dim, in_ch, pt, ph, pw = shape(("patch_embedding",))
  ffn_dim = shape(("ffn_in", "kernel"))[0]
  text_dim = shape(("text_embedding_1", "kernel"))[1]
  freq_dim = shape(("time_embedding_1", "kernel"))[1]
  out_ch = shape(("head", "kernel"))[0] // (pt * ph * pw)
  prefix = "blocks."
  layers = sorted({int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)
                   and k[len(prefix):].split(".", 1)[0].isdigit()})
  if not layers:
    raise ConversionError(f"{source}: no transformer blocks ('blocks.N.*' keys) found")
  num_layers = layers[-1] + 1
  norm_key = key(e[("norm_cross", "scale")]).replace("{i}", "0")
  cross_norm = norm_key in sd
  if num_heads is None:
    if dim % WAN_HEAD_DIM:
      raise ConversionError(f"{source}: the head count is not stored in the weights and dim {dim} is not a multiple "
                            f"of Wan's head size {WAN_HEAD_DIM}; pass --num-heads or --config")
    num_heads = dim // WAN_HEAD_DIM
    notes.append(f"num_heads={num_heads} assumed (head_dim {WAN_HEAD_DIM}, as in every released Wan2.1 model); "
                 "pass --num-heads or --config if this model differs")
  if text_len is None:
    notes.append(f"text_len={DEFAULT_TEXT_LEN} assumed (Wan's umT5 context length)")
  kw = dict(dim=dim, ffn_dim=ffn_dim, num_layers=num_layers, num_heads=int(num_heads), text_dim=text_dim,
            text_len=int(text_len or DEFAULT_TEXT_LEN), in_channels=in_ch, out_channels=out_ch,
            patch_size=(pt, ph, pw), freq_dim=freq_dim, cross_attn_norm=cross_norm)
  kw.update(overrides)
  return _make_config(**kw), notes


def check_config_matches(found: DiTConfig, expected: DiTConfig, source: str = "checkpoint",
                         fields=ARCH_FIELDS) -> None:
  """Raises ConversionError listing every architecture field where the weights and the user's config disagree."""
  diff = []
  for k in fields:
    a, b = getattr(found, k), getattr(expected, k)
    if (tuple(a) if isinstance(a, (list, tuple)) else a) != (tuple(b) if isinstance(b, (list, tuple)) else b):
      diff.append(f"{k}: weights {a!r} vs config {b!r}")
  if diff:
    raise ConversionError(f"{source}: the weights do not match the given config: " + "; ".join(diff))


# ----------------------------------------------------------------------------------------------- conversion


def _set(tree: dict, path: tuple, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple, where: str):
  cur = tree
  for i, p in enumerate(path):
    if not isinstance(cur, Mapping) or p not in cur:
      raise ConversionError(f"{where}: parameter {'/'.join(map(str, path[:i + 1]))} is missing")
    cur = cur[p]
  return cur


def dit_params_from_state_dict(sd: Mapping[str, Any], cfg: DiTConfig, layout: str = "auto", *,
                               dtype="float32", scan_layers: bool | None = None, source: str = "checkpoint",
                               log: Callable[[str], None] | None = None) -> dict:
  """A diffusers or original-Wan state dict (numpy-convertible values) -> {'params': tree} for `WanDiT(cfg)`.

  Every key is checked first (names and shapes, in the source's own naming); any difference is one error.
  """
  if layout == "auto":
    layout = detect_layout(sd, source)
  if layout not in ("diffusers", "wan"):
    raise ConversionError(f"layout must be 'auto', 'diffusers' or 'wan', got {layout!r}")
  scan = cfg.scan_layers if scan_layers is None else scan_layers
  common.check_keys(sd, expected_shapes(cfg, layout), source, what=f"Wan DiT ({layout} layout, dim {cfg.dim}, "
                    f"{cfg.num_layers} layers)", hint=_unsupported_hint(sd))
  dt = common.np_dtype(dtype)
  tree: dict = {}
  table = param_table(cfg)
  for e in table:
    if e.per_layer and scan:
      _set(tree, ("blocks",) + e.path, np.empty((cfg.num_layers,) + _our_shape(e, cfg), dt))
  step = max(1, cfg.num_layers // 5)
  for e in [x for x in table if not x.per_layer]:
    _set(tree, e.path, np.ascontiguousarray(_to_ours(e.kind, np.asarray(sd[e.diffusers if layout == "diffusers"
                                                                           else e.wan]), cfg).astype(dt)))
  for i in range(cfg.num_layers):
    for e in table:
      if not e.per_layer:
        continue
      k = (e.diffusers if layout == "diffusers" else e.wan).replace("{i}", str(i))
      a = _to_ours(e.kind, np.asarray(sd[k]), cfg)
      if scan:
        _get(tree, ("blocks",) + e.path, source)[i] = a
      else:
        _set(tree, (f"blocks_{i}",) + e.path, np.ascontiguousarray(a.astype(dt)))
    if log and ((i + 1) % step == 0 or i + 1 == cfg.num_layers):
      log(f"  converted layer {i + 1}/{cfg.num_layers}")
  return {"params": tree}


def _layer_layout(tree: Mapping, cfg: DiTConfig, where: str) -> bool:
  if "blocks" in tree:
    return True
  if "blocks_0" in tree:
    return False
  raise ConversionError(f"{where}: params hold neither 'blocks' (scanned layers) nor 'blocks_0' (per-layer); top "
                        f"level is {sorted(tree)[:10]}")


def _check_our_tree(tree: Mapping, cfg: DiTConfig, scan: bool, where: str) -> None:
  want = {}
  for e in param_table(cfg):
    shape = _our_shape(e, cfg)
    if not e.per_layer:
      want["/".join(e.path)] = shape
    elif scan:
      want["/".join(("blocks",) + e.path)] = (cfg.num_layers,) + shape
    else:
      for i in range(cfg.num_layers):
        want["/".join((f"blocks_{i}",) + e.path)] = shape
  got = {}

  def walk(t, prefix):
    for k, v in t.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (str(k),))
      else:
        got["/".join(prefix + (str(k),))] = np.asarray(v) if not hasattr(v, "shape") else v
  walk(tree, ())
  common.check_keys(got, want, where, what=f"WanDiT params of the stored architecture (dim {cfg.dim}, "
                    f"{cfg.num_layers} layers)")


def dit_state_dict(params: Mapping, cfg: DiTConfig, layout: str = "diffusers", dtype=None,
                   where: str = "params", lazy: bool = False) -> dict[str, Any]:
  """Our params ({'params': tree} or the tree; scanned or per-layer) -> a torch-layout state dict of numpy arrays.

  `lazy`: values are `common.LazyTensor`s converted on use, so writing a 14B model never holds a second copy.
  """
  if layout not in ("diffusers", "wan"):
    raise ConversionError(f"layout must be 'diffusers' or 'wan', got {layout!r}")
  tree = params["params"] if "params" in params and isinstance(params["params"], Mapping) else params
  scan = _layer_layout(tree, cfg, where)
  _check_our_tree(tree, cfg, scan, where)
  out = {}
  for e in param_table(cfg):
    for i, key in _expand(e, layout, cfg):
      if i is None:
        src = _get(tree, e.path, where)
      else:
        src = _get(tree, ("blocks",) + e.path, where) if scan else _get(tree, (f"blocks_{i}",) + e.path, where)

      def make(src=src, i=i, kind=e.kind):
        a = np.asarray(src)
        a = a[i] if (i is not None and scan) else a
        return np.ascontiguousarray(common.cast(_to_torch(kind, a, cfg), dtype))
      if lazy:
        src_dtype = np.dtype(src.dtype) if hasattr(src, "dtype") else np.asarray(src).dtype
        out[key] = common.LazyTensor(e.torch_shape, common.np_dtype(dtype) if dtype else src_dtype, make)
      else:
        out[key] = make()
  return out


def diffusers_config(cfg: DiTConfig) -> dict:
  """config.json for diffusers' `WanTransformer3DModel.from_pretrained`."""
  from importlib import metadata
  try:  # the installed version, read without importing diffusers (seconds)
    version = metadata.version("diffusers")
  except metadata.PackageNotFoundError:
    version = "0.33.0"
  return {
      "_class_name": "WanTransformer3DModel", "_diffusers_version": version,
      "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
      "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "text_dim": cfg.text_dim,
      "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
      "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
      "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_max_frames,
      "pos_embed_seq_len": None,
  }


_EXPORT_FILE = re.compile(re.escape(common.WEIGHTS_NAME[:-len(".safetensors")]) +
                          r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|config\.json")


def is_diffusers_export(path: str) -> bool:
  """A folder holding only what `export_diffusers` writes (a WanTransformer3DModel config.json and its weights)."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    return False
  if not all(_EXPORT_FILE.fullmatch(f) for f in os.listdir(path)):
    return False
  try:
    return common.read_json(os.path.join(path, "config.json")).get("_class_name") == "WanTransformer3DModel"
  except (ConversionError, OSError, AttributeError):
    return False


def check_export_dir(out_dir: str, flag: str = "output folder"):
  """`out_dir` may receive an export: absent, empty, or an earlier export (replaced whole, so two exports never mix;
  anything else, a dsa_jax checkpoint above all, is refused rather than deleted or mixed with diffusers files)."""
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise ConversionError(f"{flag} {out_dir!r} is a file; expected a folder to write config.json and the "
                          "safetensors into (new, empty, or an earlier diffusers export)")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_diffusers_export(out_dir):
    kind = ("a dsa_jax model checkpoint" if os.path.isfile(os.path.join(out_dir, "dsa_meta.json")) else
            "a folder holding other files")
    raise ConversionError(f"{flag} {out_dir!r} exists and is {kind}, not an earlier diffusers export: not "
                          "replaced; pass a new folder")


def export_diffusers(params: Mapping, cfg: DiTConfig, out_dir: str, dtype=None,
                     max_shard_bytes: int = 10 * 10**9, where: str = "params") -> list[str]:
  """Writes `out_dir/config.json` + `diffusion_pytorch_model.safetensors` (sharded past `max_shard_bytes`).

  The folder appears complete or not at all; it may be absent, empty or an earlier export (`check_export_dir`)."""
  from dsa_jax.atomic import atomic_dir
  if cfg.rope_theta != 10000.0:
    raise ConversionError(f"rope_theta {cfg.rope_theta}: diffusers' WanTransformer3DModel fixes it at 10000")
  check_export_dir(out_dir)
  sd = dit_state_dict(params, cfg, "diffusers", dtype, where, lazy=True)
  with atomic_dir(out_dir) as tmp:
    files = common.save_safetensors_folder(tmp, sd, common.WEIGHTS_NAME, max_shard_bytes)
    common.write_json_atomic(os.path.join(tmp, "config.json"), diffusers_config(cfg))
  return files + ["config.json"]


def stack_layers(params: Mapping, num_layers: int | None = None) -> dict:
  """Per-layer params (`blocks_{i}`) -> scanned (`blocks` with a leading layer axis); other entries unchanged."""
  wrapped = "params" in params and isinstance(params["params"], Mapping)
  tree = dict(params["params"] if wrapped else params)
  n = num_layers if num_layers is not None else len([k for k in tree if str(k).startswith("blocks_")])
  layers = [tree.pop(f"blocks_{i}") for i in range(n)]
  import jax
  tree["blocks"] = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return {"params": tree} if wrapped else tree


def unstack_layers(params: Mapping) -> dict:
  """Scanned params (`blocks` with a leading layer axis) -> per-layer `blocks_{i}`."""
  import jax
  wrapped = "params" in params and isinstance(params["params"], Mapping)
  tree = dict(params["params"] if wrapped else params)
  blocks = tree.pop("blocks")
  n = jax.tree_util.tree_leaves(blocks)[0].shape[0]
  for i in range(n):
    tree[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], blocks)
  return {"params": tree} if wrapped else tree


# ----------------------------------------------------------------------------------------------- entry point


_WAN_TOP_MODULES = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head",
                    "condition_embedder", "proj_out", "scale_shift_table")


def _resolve_folder(path: str) -> str:
  """A diffusers pipeline folder (model_index.json) -> its transformer/ subfolder."""
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
    sub = os.path.join(path, "transformer")
    if not os.path.isdir(sub):
      raise FileNotFoundError(f"{path} is a diffusers pipeline without a transformer/ folder")
    return sub
  return path


def load_dit(path: str, *, layout: str = "auto", key: str | None = None, config: DiTConfig | None = None,
             num_heads: int | None = None, text_len: int | None = None, dtype="float32",
             scan_layers: bool | None = None, allow_pickle: bool = False,
             log: Callable[[str], None] | None = None) -> tuple[dict[str, dict], DiTConfig, dict]:
  """Reads a Wan DiT checkpoint and converts it; returns ({network: {'params': tree}}, DiTConfig, info).

  `path`: a diffusers folder (or the pipeline folder above it), an original Wan folder, a `.safetensors`, or a torch
  checkpoint. Network names: 'generator' for a bare state dict or the one picked with `key`; 'generator' and
  'generator_ema' for a Self Forcing / CausVid checkpoint that holds both. With `config` (the user's DiTConfig), the
  weights' architecture must match it; its text_len, dtype and scan_layers settings are used.
  """
  log = log or (lambda s: None)
  path = _resolve_folder(os.fspath(path))
  files, cfg_json = common.find_weight_files(path, accepts=is_dit_config, what="Wan DiT", log=log)
  log(f"reading {', '.join(files) if len(files) < 4 else f'{len(files)} shards in {path}'}")
  entries = common.read_weight_files(files, key=key, allow_pickle=allow_pickle)
  src = path
  result: dict[str, dict] = {}
  info: dict[str, Any] = {"path": os.path.abspath(path), "files": [os.path.basename(f) for f in files], "notes": []}
  cfg: DiTConfig | None = None
  for entry, raw in entries.items():
    sd, prefix = common.strip_wrapper_prefix(raw, keep=_WAN_TOP_MODULES)
    where = f"{src}" + (f" [{entry}]" if entry else "")
    found_layout = detect_layout(sd, where) if layout == "auto" else layout
    if cfg is None:
      if text_len is None and config is not None:
        text_len = config.text_len
      cfg_path = common.config_path(path)
      if cfg_json is not None and _is_wan_json(cfg_json):  # original Wan ("_class_name": "WanModel", dim, ...)
        cfg = config_from_wan_json(cfg_json, source=cfg_path)
        if text_len is not None:
          cfg = dataclasses.replace(cfg, text_len=int(text_len))
        fields = ARCH_FIELDS
      elif cfg_json is not None and _is_diffusers_json(cfg_json):
        cfg = config_from_diffusers_json(cfg_json, text_len, source=cfg_path)
        fields = [f for f in ARCH_FIELDS if f != "text_len"]
      else:
        heads = num_heads if num_heads is not None else (config.num_heads if config is not None else None)
        cfg, notes = infer_config_from_state_dict(sd, found_layout, heads, text_len, where)
        log("architecture read from the weights' shapes (no Wan DiT config.json)")
        info["notes"] += notes
        for note in notes:
          log(f"note: {note}")
        fields = [f for f in ARCH_FIELDS if f not in ("text_len", "eps", "rope_theta", "rope_max_frames")]
      if num_heads is not None and cfg.num_heads != num_heads:
        raise ConversionError(f"--num-heads {num_heads} contradicts the checkpoint's config ({cfg.num_heads} heads)")
      if config is not None:
        check_config_matches(cfg, config, where, fields)
        cfg = dataclasses.replace(config)
      if scan_layers is not None:
        cfg = dataclasses.replace(cfg, scan_layers=bool(scan_layers))
      cfg = _with_param_dtype(cfg, dtype)
    log(f"converting {entry or 'state dict'} ({found_layout} layout{', prefix ' + repr(prefix) if prefix else ''}, "
        f"{len(sd)} tensors)")
    params = dit_params_from_state_dict(sd, cfg, found_layout, dtype=dtype, source=where, log=log)
    name = "generator_ema" if entry == "generator_ema" and key is None else "generator"
    if name in result:
      raise ConversionError(f"{src}: two state dicts map to network {name!r}; pass --key to pick one")
    result[name] = params
    info.setdefault("entries", {})[name] = {"key": entry, "layout": found_layout, "prefix": prefix}
  return result, cfg, info


def _with_param_dtype(cfg: DiTConfig, dtype) -> DiTConfig:
  import jax.numpy as jnp
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  name = common.np_dtype(dtype).name
  if name not in table:
    raise ConversionError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
  return dataclasses.replace(cfg, param_dtype=table[name])
