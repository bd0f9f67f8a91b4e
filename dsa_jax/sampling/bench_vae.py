"""The Wan VAE decoder's convolution lowerings, timed alone at the decoder's per-chunk shapes for a config's video.

  dsa-jax bench vae-convs --config configs/wan_1_3b.py --json docs/bench/vae_convs.json
  dsa-jax bench vae-convs --config configs/tiny.py --reps 2          # CPU smoke test

Which lowering of the causal 3x3x3 convolution is fastest depends on the backend's kernels and the layer's
channels (`config.vae.conv3d`: 'native' one 3D convolution, 'fold' the time taps folded into the channels of one 2D
convolution, 'taps' per-tap 2D outputs summed). For every up block of the decoder this times one later chunk's
residual convolution (chunk_frames latent frames, the causal history of 2 frames in front), and the last block's
conv_out to the image channels, each lowering with and without the RMS norm + SiLU in front of it, and the nearest-2x-upsample + 3x3 convolution of every resampler as
written (upsample, then convolve) and in its sub-pixel form (four 2x2 convolutions of the low-resolution input,
what the decoder runs). Random bf16 inputs (the config's compute dtype), random weights; time per call over --reps calls
enqueued back to back (median of 3 rounds) after a warm-up; relative difference of each lowering to 'native' (resp. of the sub-pixel form to the plain one).
The per-video effect is what `dsa-jax bench sample --decode-only` measures; this says where it comes from.
"""

from __future__ import annotations

import numpy as np

from dsa_jax.eval.profiling import median_call_s


def add_arguments(p):
  p.add_argument("--config", required=True, help="config whose video size and VAE are benchmarked")
  p.add_argument("--reps", type=int, default=20, help="calls per timed round (default 20; per call, median of 3 rounds)")
  p.add_argument("--blocks", type=int, nargs="+", default=None, help="only these up blocks (0 = lowest resolution; "
                 "default all)")
  p.add_argument("--json", default=None, help="write the results here")


def decoder_shapes(config, vae_config) -> list[dict]:
  """One row per decoder up block: its residual conv (frames, height, width, channels) for a later chunk, and the
  resampler's input shape and output channels (None for the last block)."""
  from dsa_jax.config_lib import latent_hw
  from dsa_jax.models.vae import decoder_up_blocks
  h, w = (int(x) for x in latent_hw(config))
  frames = int(config.video.chunk_frames)
  rows = []
  for i, (out_dim, mode) in enumerate(decoder_up_blocks(vae_config)):
    row = {"block": i, "frames": frames, "height": h, "width": w, "channels": out_dim, "upsample": None}
    if mode is not None:
      up_frames = 2 * frames if mode == "upsample3d" else frames
      row["upsample"] = {"frames": up_frames, "channels_out": out_dim // 2, "mode": mode}
      frames, h, w = up_frames, 2 * h, 2 * w
    rows.append(row)
  return rows


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _time_lowerings(key, block: int, layer: str, shape, c_out: int, dtype, reps: int, log) -> list[dict]:
  """Every conv3d lowering of one causal 3x3x3 conv on a later chunk of `shape` (T, H, W, C) with its 2-frame
  history, with and without the RMS norm + SiLU in front."""
  import jax
  import jax.numpy as jnp

  from dsa_jax.models import vae as V
  t, hh, ww, c = shape
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, (1, t, hh, ww, c), dtype)
  hist = jax.random.normal(k2, (1, 2, hh, ww, c), dtype)
  kernel = jax.random.normal(k3, (3, 3, 3, c, c_out), jnp.float32) / np.sqrt(27 * c)
  scale = jnp.ones((c,), jnp.float32)
  flops = 2 * t * hh * ww * 27 * c * c_out
  rows, ref = [], None
  for impl in V.CONV3D_IMPLS:
    for norm in (False, True):
      def f(x, hist, kernel, scale, impl=impl, norm=norm):
        y = V.RMSNormSiLU(dtype=dtype).apply({"params": {"scale": scale}}, x) if norm else x
        return V._conv3d_same_time(y, kernel, (0, 0), impl, dtype, None, history=hist)
      s, out = median_call_s(jax.jit(f), (x, hist, kernel, scale), reps)
      if ref is None:
        ref = out
      rows.append({"block": block, "layer": layer, "shape": [t, hh, ww, c], "channels_out": c_out, "impl": impl,
                   "norm_silu": norm, "ms": 1e3 * s, "tflops": flops / s / 1e12,
                   "rel_diff_vs_native": None if norm else _rel(out, ref)})
      log(f"  block {block} {layer} {t}x{hh}x{ww}x{c}->{c_out} {impl:6s}{' +norm' if norm else '      '} "
          f"{1e3 * s:8.3f} ms  {rows[-1]['tflops']:7.1f} TFLOP/s")
  return rows


def run(config, reps: int = 20, blocks=None, log=print) -> dict:
  import jax
  import jax.numpy as jnp

  from dsa_jax.models import vae as V
  from dsa_jax.models.dit import _DTYPES
  from dsa_jax.sampling.decode import random_wan_vae_config
  if reps < 1:
    raise ValueError(f"--reps: must be >= 1, got {reps}")
  dtype = _DTYPES[config.compute.dtype]
  vcfg = random_wan_vae_config(config)
  shapes = decoder_shapes(config, vcfg)
  if blocks is not None and not set(blocks) <= set(range(len(shapes))):
    raise ValueError(f"--blocks: the decoder has up blocks 0..{len(shapes) - 1}, got {sorted(blocks)}")
  key = jax.random.PRNGKey(0)
  res_rows, up_rows = [], []
  for row in shapes:
    if blocks is not None and row["block"] not in blocks:
      continue
    t, hh, ww, c = row["frames"], row["height"], row["width"], row["channels"]
    key, sub = jax.random.split(key)
    res_rows += _time_lowerings(sub, row["block"], "residual", (t, hh, ww, c), c, dtype, reps, log)
    if row["block"] == len(shapes) - 1:  # the decoder's last conv: to the image channels, after norm_out + SiLU
      key, sub = jax.random.split(key)
      res_rows += _time_lowerings(sub, row["block"], "conv_out", (t, hh, ww, c), vcfg.out_channels, dtype, reps, log)
    up = row["upsample"]
    if up is None:
      continue
    k1, k2, key = jax.random.split(key, 3)
    xu = jax.random.normal(k1, (up["frames"], hh, ww, c), dtype)
    ku = jax.random.normal(k2, (3, 3, c, up["channels_out"]), jnp.float32) / np.sqrt(9 * c)

    def plain(x, k):
      return V._conv(V._upsample_nearest2x(x[None])[0], k, (1, 1), [(1, 1), (1, 1)], dtype, None)

    def subpixel(x, k):
      return V.upsample2x_conv3x3(x, k, dtype, None)
    s_plain, a = median_call_s(jax.jit(plain), (xu, ku), reps)
    s_sub, b = median_call_s(jax.jit(subpixel), (xu, ku), reps)
    up_rows.append({"block": row["block"], "input": [up["frames"], hh, ww, c], "channels_out": up["channels_out"],
                    "upsample_then_conv_ms": 1e3 * s_plain, "subpixel_ms": 1e3 * s_sub, "rel_diff": _rel(b, a)})
    log(f"  block {row['block']} {up['mode']} conv {up['frames']}x{hh}x{ww}x{c}->{up['channels_out']}: "
        f"upsample+conv {1e3 * s_plain:.3f} ms, sub-pixel {1e3 * s_sub:.3f} ms")
  return {"kind": "vae_convs", "reps": reps, "vae_dtype": str(jnp.dtype(dtype)), "residual_convs": res_rows,
          "upsample_convs": up_rows}


def format_table(res: dict) -> str:
  lines = [f"{res['device']['kind']}, {res['vae_dtype']}: one later chunk, median of {res['reps']}",
           "block  layer     shape (T,H,W,C) -> C_out      impl    +norm     ms   TFLOP/s"]
  for r in res["residual_convs"]:
    shape = f"{tuple(r['shape'])} -> {r['channels_out']}"
    lines.append(f"{r['block']:5d}  {r['layer']:8s}  {shape:28s}  {r['impl']:6s}  "
                 f"{'yes' if r['norm_silu'] else 'no':5s} {r['ms']:8.3f} {r['tflops']:8.1f}")
  for r in res["upsample_convs"]:
    lines.append(f"block {r['block']} upsample conv {tuple(r['input'])} -> {r['channels_out']}: upsample+conv "
                 f"{r['upsample_then_conv_ms']:.3f} ms, sub-pixel {r['subpixel_ms']:.3f} ms (rel. diff "
                 f"{r['rel_diff']:.1e})")
  return "\n".join(lines)


def main(args) -> int:
  from dsa_jax.sampling.bench import run_kernel_bench
  return run_kernel_bench(args, run, format_table, blocks=args.blocks)
