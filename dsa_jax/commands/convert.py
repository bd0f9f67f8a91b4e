"""Converts PyTorch weights into dsa_jax model checkpoints (and DiT checkpoints back to diffusers).

  # Wan2.1-T2V-1.3B from diffusers (the pipeline folder or its transformer/ subfolder)
  dsa-jax convert dit --src Wan2.1-T2V-1.3B-Diffusers/transformer --out ckpt/wan_1_3b --config configs/wan_1_3b.py
  # a Self Forcing checkpoint (holds 'generator' and 'generator_ema', keys prefixed 'model.')
  dsa-jax convert dit --src checkpoints/self_forcing_dmd.pt --out ckpt/self_forcing --config configs/wan_1_3b.py
  dsa-jax convert vae --src Wan2.1-T2V-1.3B-Diffusers/vae --out ckpt/wan_vae
  dsa-jax convert umt5 --src Wan2.1-T2V-1.3B-Diffusers/text_encoder --out ckpt/umt5 \\
      --tokenizer Wan2.1-T2V-1.3B-Diffusers/tokenizer/spiece.model
  # Wan's original umT5 .pth (the DiT's config.json beside it is ignored: the shapes give the config)
  dsa-jax convert umt5 --src Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth --out ckpt/umt5
  dsa-jax convert export-diffusers --src ckpt/self_forcing --network generator_ema --out export/transformer
  # the confidence head of a model alone (a few hundred kB), for `dsa-jax sample --ckpt MODEL --head heads/remaining`
  dsa-jax convert export-head --src runs/digits/head/model --out heads/remaining
  # the other way: a model whose own head is that head (its table too), for commands without --head
  dsa-jax convert attach-head --ckpt runs/digits/dsa/model --head heads/remaining --out models/digits_remaining

A checkpoint is a folder written by `dsa_jax.checkpoint.params_io.save_params`; its `dsa_meta.json` records each
network's architecture, so `sample`, `train` and `eval` refuse a checkpoint that does not match their config.
A head folder (export-head) holds only the 'head' network, its conf_target and calibration table, and the
fingerprint of the generator it was trained with (`dsa_jax.checkpoint.heads`): sampling refuses it with another one.
"""

from __future__ import annotations

import dataclasses
import os
import time

HELP = ("convert Wan2.1 DiT / VAE / umT5 weights to dsa_jax checkpoints, a DiT back to diffusers, or a model's "
        "confidence head into a head folder")


def add_arguments(p):
  sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")

  d = sub.add_parser("dit", help="Wan2.1 DiT (diffusers, original Wan, Self Forcing, CausVid) -> checkpoint")
  d.add_argument("--src", required=True, help="diffusers folder (or the pipeline folder), .safetensors, or .pt/.pth")
  d.add_argument("--out", required=True, help="output checkpoint folder")
  d.add_argument("--layout", choices=("auto", "diffusers", "wan"), default="auto",
                 help="key naming of the source (auto: from the key names)")
  d.add_argument("--key", default=None,
                 help="entry of a torch checkpoint to convert (e.g. generator_ema), stored as --network; default: "
                      "both 'generator' and 'generator_ema' when present, else the state dict")
  d.add_argument("--config", default=None,
                 help="dsa_jax config file; the weights must match its model (see --role); its text_len, "
                      "compute.scan_layers and compute.param_dtype are used. --config.x=y overrides apply")
  d.add_argument("--role", choices=("model", "teacher", "critic"), default="model",
                 help="which model of --config the weights are (default: model, the generator)")
  d.add_argument("--network", default="generator",
                 help="network name to store a single state dict under (e.g. teacher); default generator")
  d.add_argument("--num-heads", type=int, default=None,
                 help="attention heads, for files without config.json and without --config (default: dim / 128)")
  d.add_argument("--text-len", type=int, default=None, help="text context length (default: --config's, else 512)")
  d.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="stored parameter dtype (default: --config's compute.param_dtype, else float32)")
  d.add_argument("--no-scan", action="store_true", help="store per-layer params (blocks_i) instead of scanned")
  d.add_argument("--trust-pickle", action="store_true",
                 help="allow torch.load to unpickle Python objects (only for files you trust)")

  v = sub.add_parser("vae", help="diffusers AutoencoderKLWan -> checkpoint (network 'vae')")
  v.add_argument("--src", required=True, help="diffusers VAE folder (or the pipeline folder) or .safetensors")
  v.add_argument("--out", required=True, help="output checkpoint folder")

  u = sub.add_parser("umt5", help="transformers UMT5EncoderModel (or Wan's umT5 .pth) -> checkpoint "
                                  "(network 'text_encoder')")
  u.add_argument("--src", required=True, help="transformers folder (or the pipeline folder), .safetensors or .pth")
  u.add_argument("--out", required=True, help="output checkpoint folder")
  u.add_argument("--tokenizer", default=None,
                 help="SentencePiece model (spiece.model) to copy into the checkpoint folder (checked first)")

  e = sub.add_parser("export-diffusers", help="DiT network of a checkpoint -> diffusers folder (config.json + "
                                              "safetensors) for WanTransformer3DModel.from_pretrained")
  e.add_argument("--src", required=True, help="dsa_jax checkpoint folder")
  e.add_argument("--network", default="generator", help="network to export (generator, generator_ema, teacher, ...)")
  e.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export (replaced whole)")
  e.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: as stored")

  h = sub.add_parser("export-head", help="the confidence head of a model folder -> a head folder (head, its "
                                         "conf_target and calibration table, the generator's fingerprint) for "
                                         "sample/calibrate/eval --head")
  h.add_argument("--src", required=True, help="model folder holding the head and the generator it was trained with "
                 "(its fingerprint is taken of 'generator_ema' where present, else 'generator')")
  h.add_argument("--out", required=True, help="output head folder: new, or an earlier head folder (replaced); never "
                 "a model folder")

  a = sub.add_parser("attach-head", help="a model folder + a head folder trained for its generator -> a model folder "
                                         "whose own head (conf_target, calibration table) is that head")
  a.add_argument("--ckpt", required=True, help="model folder (its generators and other tables are kept)")
  a.add_argument("--head", required=True, help="head folder (dsa-jax convert export-head) trained for --ckpt's "
                 "generator")
  a.add_argument("--out", required=True, help="output model folder: new, or --ckpt itself (replaced atomically); "
                 "never another existing folder")


def _log(msg: str):
  print(msg, flush=True)


def _pipeline_sub(path: str, sub: str) -> str:
  """A diffusers pipeline folder (with model_index.json) -> its `sub` folder; anything else unchanged."""
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
    cand = os.path.join(path, sub)
    if not os.path.isdir(cand):
      raise FileNotFoundError(f"{path} is a diffusers pipeline folder without {sub}/")
    _log(f"using {cand}")
    return cand
  return path


def _save(out: str, networks: dict, meta: dict, files: dict | None = None):
  """Writes the checkpoint; `files` ({name: source path}) are copied into it within the same atomic folder write,
  so the metadata never names a file that is not there."""
  from dsa_jax.checkpoint.params_io import save_params
  t0 = time.time()
  _log(f"writing {out} ({', '.join(sorted(networks))})")
  save_params(out, networks, meta, files)
  _log(f"done in {time.time() - t0:.1f}s: {os.path.abspath(out)}")


def _param_summary(tree) -> str:
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves(tree)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else str(n)
  return f"{count} parameters in {len(leaves)} arrays"


def _convert_dit(args):
  from dsa_jax.convert import dit as dit_conv
  from dsa_jax.models.dit import DiTConfig

  if not os.path.exists(args.src):
    raise FileNotFoundError(f"--src {args.src!r} does not exist")
  expected = None
  full_config = None
  if args.config:
    from dsa_jax.config_lib import get_config
    full_config = get_config(args.config, args.overrides)
    expected = DiTConfig.from_config(full_config[args.role], full_config.compute)
    expected = dataclasses.replace(expected, attention="xla", remat="none")
    if args.text_len is not None and args.text_len != expected.text_len:
      raise ValueError(f"--text-len {args.text_len} contradicts {args.config}: {args.role}.text_len is "
                       f"{expected.text_len} (drop one)")
  elif args.overrides:
    raise ValueError(f"--config.* overrides {args.overrides} need --config FILE")
  dtype = args.dtype or (full_config.compute.param_dtype if full_config is not None else "float32")
  scan = False if args.no_scan else (expected.scan_layers if expected is not None else True)
  t0 = time.time()
  networks, cfg, info = dit_conv.load_dit(
      args.src, layout=args.layout, key=args.key, config=expected, num_heads=args.num_heads,
      text_len=args.text_len, dtype=dtype, scan_layers=scan, allow_pickle=args.trust_pickle, log=_log)
  if args.network != "generator":
    if len(networks) != 1:
      raise ValueError(f"--network {args.network!r} needs a single state dict; {args.src} holds "
                       f"{sorted(networks)} (pick one with --key)")
    networks = {args.network: networks.pop("generator")}
  for name, tree in networks.items():
    _log(f"{name}: {_param_summary(tree)}")
  _log(f"converted in {time.time() - t0:.1f}s: dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
       f"ffn {cfg.ffn_dim}, text {cfg.text_len}x{cfg.text_dim}, channels {cfg.in_channels}")
  arch = cfg.to_dict()
  meta = {"arch": {name: arch for name in networks},
          "source": {"command": "convert dit", "path": info["path"], "files": info["files"],
                     "entries": info.get("entries", {}), "notes": info["notes"]}}
  if full_config is not None:
    meta["config"] = full_config.to_json()
  _save(args.out, networks, meta)


def _convert_vae(args):
  from dsa_jax.convert.vae import load_diffusers_vae
  src = _pipeline_sub(args.src, "vae")
  t0 = time.time()
  _log(f"reading {src}")
  params, cfg = load_diffusers_vae(src, log=_log)
  arch = cfg.to_dict()
  _log(f"vae: {_param_summary(params)}, converted in {time.time() - t0:.1f}s")
  _save(args.out, {"vae": params}, {"arch": {"vae": arch},
                                    "source": {"command": "convert vae", "path": os.path.abspath(src)}})


def _check_sentencepiece(path: str, flag: str = "--tokenizer"):
  """Refuses anything but a SentencePiece model before converting: the checkpoint stores it as spiece.model."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag} {path!r} is not a file (expected a SentencePiece model such as spiece.model)")
  try:
    import sentencepiece as spm
  except ImportError as e:
    raise ImportError(f"{flag}: checking the SentencePiece model needs the sentencepiece package "
                      "(pip install sentencepiece)") from e
  try:
    sp = spm.SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as e:
    hint = (" (a transformers tokenizer.json can be passed to --config.text.tokenizer as is)"
            if path.endswith(".json") else "")
    raise ValueError(f"{flag} {path!r} is not a SentencePiece model (expected a file such as the pipeline's "
                     f"tokenizer/spiece.model){hint}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
        from e
  return int(sp.get_piece_size())


def _convert_umt5(args):
  from dsa_jax.convert.umt5 import load_transformers_umt5
  tok = args.tokenizer
  if os.path.isdir(args.src) and os.path.isfile(os.path.join(args.src, "model_index.json")) and tok is None:
    cand = os.path.join(args.src, "tokenizer", "spiece.model")
    tok = cand if os.path.isfile(cand) else None
  src = _pipeline_sub(args.src, "text_encoder")
  if tok is not None:
    pieces = _check_sentencepiece(tok, "--tokenizer" if args.tokenizer is not None else "the pipeline's tokenizer")
    _log(f"tokenizer {tok}: SentencePiece model with {pieces} pieces")
  t0 = time.time()
  _log(f"reading {src}")
  params, cfg = load_transformers_umt5(src, log=_log)
  arch = cfg.to_dict()
  _log(f"text_encoder: {_param_summary(params)}, converted in {time.time() - t0:.1f}s")
  meta = {"arch": {"text_encoder": arch}, "source": {"command": "convert umt5", "path": os.path.abspath(src)}}
  files = None
  if tok is not None:
    meta["tokenizer"] = "spiece.model"
    files = {"spiece.model": tok}
  _save(args.out, {"text_encoder": params}, meta, files)
  if tok is not None:
    dst = os.path.join(args.out, "spiece.model")
    _log(f"tokenizer copied to {dst} (use --config.text.tokenizer={dst})")


def _export_diffusers(args):
  from dsa_jax.checkpoint.params_io import CheckpointError, load_params, read_meta
  from dsa_jax.convert import dit as dit_conv
  from dsa_jax.models.dit import DiTConfig

  if os.path.realpath(args.out) == os.path.realpath(args.src):
    raise ValueError(f"--out {args.out!r} is --src itself: the export would mix diffusers files into the dsa_jax "
                     "checkpoint; pass a new folder")
  dit_conv.check_export_dir(args.out, "--out")
  meta = read_meta(args.src)
  arch = meta.get("arch", {}).get(args.network)
  if arch is None:
    raise CheckpointError(f"{args.src}: no architecture for network {args.network!r}; it has "
                          f"{sorted(meta.get('arch', {}))}")
  known = {f.name for f in dataclasses.fields(DiTConfig)}
  missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k not in arch]
  if missing:
    raise CheckpointError(f"{args.src}: network {args.network!r} is not a Wan DiT (its architecture lacks {missing})")
  kw = {k: v for k, v in arch.items() if k in known and k not in ("dtype", "param_dtype")}
  kw["patch_size"] = tuple(kw.get("patch_size", (1, 2, 2)))
  cfg = DiTConfig(**kw)
  _log(f"reading {args.src} [{args.network}]")
  params, _ = load_params(args.src, [args.network])
  t0 = time.time()
  files = dit_conv.export_diffusers(params[args.network], cfg, args.out, dtype=args.dtype,
                                    where=f"{args.src} [{args.network}]")
  _log(f"wrote {', '.join(files)} to {os.path.abspath(args.out)} in {time.time() - t0:.1f}s "
       "(load with diffusers.WanTransformer3DModel.from_pretrained)")


def _tables_text(meta: dict, article: str = "a") -> str:
  """'a calibration table (steps per frame 2-3)', 'calibration tables (steps per frame 2-3, 1-3)' or 'no calibration
  table', for the head commands' summaries."""
  from dsa_jax.sampling import budget
  tables = budget.source_tables(meta)
  if not tables:
    return "no calibration table"
  ranges = ", ".join(budget.range_name(budget.table_step_range(t)) for t in tables)
  many = len(tables) > 1
  lead = "" if many and article == "a" else f"{article} "
  return f"{lead}calibration table{'s' if many else ''} (steps per frame {ranges})"


def _export_head(args):
  from dsa_jax.checkpoint import heads
  _log(f"reading {args.src} [head]")
  meta = heads.export_head(args.src, args.out, log=_log)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.out) for f in files)
  table = _tables_text(meta)
  _log(f"wrote {os.path.abspath(args.out)} ({size / 1e3:.0f} kB): head with conf_target "
       f"{(meta.get('conf_target') or {}).get('kind', '?')!r}, {table}, generator fingerprint "
       f"{meta[heads.FINGERPRINT_KEY]}")


def _attach_head(args):
  from dsa_jax.checkpoint import heads
  _log(f"reading {args.ckpt} and {args.head} [head]")
  meta = heads.attach_head(args.ckpt, args.head, args.out, log=_log)
  table = _tables_text(meta, article="its")
  _log(f"wrote {os.path.abspath(args.out)}: {sorted(meta['networks'])}, head with conf_target "
       f"{(meta.get('conf_target') or {}).get('kind', '?')!r} and {table}")


def main(args):
  handlers = {"dit": _convert_dit, "vae": _convert_vae, "umt5": _convert_umt5, "export-diffusers": _export_diffusers,
              "export-head": _export_head, "attach-head": _attach_head}
  if args.what != "dit" and args.overrides:
    raise ValueError(f"convert {args.what} takes no --config.* overrides (got {args.overrides})")
  handlers[args.what](args)
  return 0
