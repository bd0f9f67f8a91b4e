"""Sampling speed benchmark: random weights, the config's compute dtype (bf16 for Wan), median of runs.

  dsa-jax bench sample --config configs/wan_1_3b.py --steps 4 --json out/bench_4steps.json
  dsa-jax bench sample --config configs/wan_1_3b.py --mean-steps 2.5 --json out/bench_2p5.json
  dsa-jax bench sample --config configs/tiny.py --steps 2 --runs 2 --json /tmp/bench.json   # CPU smoke test

Modes (one of):
  --steps K        every frame takes exactly K steps (threshold +inf, max_steps K): Self Forcing's sampler at K = 4;
  --threshold tau  the real dynamic rule with the (random) confidence head: step counts depend on its outputs;
  --mean-steps m   a forced, deterministic schedule with about m steps per frame on average: chunk i takes
                   s_i = round((i + 1) m) - round(i m) steps (rounding half up; e.g. m = 2.5 over 7 chunks gives
                   3,2,3,2,3,2,3), imposed through per-frame min_steps = max_steps = s_i and threshold +inf. The
                   confidence head still runs at every step, so the cost is the DSA sampler's at that average.
Default: --steps 4.

Reported (JSON and a table):
  compile_s: the whole-video program (ahead of time), the per-chunk streaming function (first chunk of a warm-up
    stream minus a warm first chunk) and the VAE chunk decoder.
  video: the one-program sampler, seconds per video and FPS in output pixel frames (Wan: 1 + 4 (F - 1), 81 for
    21 latent frames) x batch, without and with VAE decoding (chunk by chunk after sampling).
  stream: latency to the first chunk (latents; and decoded pixels with the VAE), time per chunk.
  components: separately jitted functions timed alone per chunk position (the KV length grows along the video):
    one denoising step (DiT forward + head + re-noise), the cache-fill forward, VAE decode of one chunk; totals
    weighted by the steps each chunk actually took, and the rest of the measured video time as 'other'.
  model FLOPs of the DiT forwards and the achieved TFLOP/s; peak device memory when the backend reports it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np


def add_arguments(p):
  p.add_argument("--config", required=True, help="config file (path[:arg])")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--steps", type=int, default=None, help="fixed K steps per frame (default 4)")
  mode.add_argument("--threshold", default=None, help="dynamic: confidence threshold tau (random head)")
  mode.add_argument("--mean-steps", type=float, default=None, help="forced schedule averaging about this many steps")
  p.add_argument("--no-vae", action="store_true", help="skip VAE decoding (DiT only)")
  p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance g (cond + g (cond - uncond); "
                 "0 = off); != 0 doubles the batch (uncond branch)")
  p.add_argument("--no-stream", action="store_true", help="skip the streaming measurements")
  p.add_argument("--no-components", action="store_true", help="skip the per-component split")
  p.add_argument("--json", nargs="?", const="bench_sample.json", default=None,
                 help="write the results to this JSON file (default name bench_sample.json)")


def forced_schedule(mean_steps: float, num_chunks: int, num_steps: int) -> np.ndarray:
  """Per-chunk step counts averaging about `mean_steps`: s_i = round((i+1) m) - round(i m), clipped to the ladder."""
  if not 1.0 <= mean_steps <= num_steps:
    raise ValueError(f"--mean-steps: must lie in [1, {num_steps}] (the ladder has {num_steps} steps), got {mean_steps}")
  r = lambda x: int(np.floor(x + 0.5))
  s = np.asarray([r((i + 1) * mean_steps) - r(i * mean_steps) for i in range(num_chunks)])
  return np.clip(s, 1, num_steps)


def _median(xs):
  return float(statistics.median(xs)) if xs else None


def _sync(x):
  import jax
  return jax.block_until_ready(x)


def _peak_memory():
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # not every backend implements it
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def run_bench(config, *, steps=None, threshold=None, mean_steps=None, vae=True, runs=3, batch=1, guidance=0.0,
              do_stream=True, do_components=True, log=print) -> dict:
  import jax
  import jax.numpy as jnp

  from dsa_jax.config_lib import pixel_frames
  from dsa_jax.checkpoint.loading import cast_params_for_inference
  from dsa_jax.diffusion import guidance as guidance_lib
  from dsa_jax.models import factory
  from dsa_jax.models.dit import _DTYPES
  from dsa_jax.sampling import sampler as sampler_lib
  from dsa_jax.sampling import stream as stream_lib
  from dsa_jax.sampling.decode import PixelDecoder

  if runs < 1:
    raise ValueError(f"--runs: must be >= 1, got {runs}")
  if batch < 1:
    raise ValueError(f"--batch-size: must be >= 1, got {batch}")
  sampler = sampler_lib.make_sampler(config)
  n_chunks, c, L, F = sampler.num_chunks, sampler.chunk_frames, sampler.num_steps, sampler.num_frames
  dtype = _DTYPES[config.compute.dtype]

  # Controls by mode.
  if mean_steps is not None:
    sched = forced_schedule(mean_steps, n_chunks, L)
    per_frame = np.repeat(sched, c)[None, :]
    mode = {"kind": "mean_steps", "target": mean_steps, "chunk_schedule": sched.tolist()}
    ctl_kw = dict(threshold=np.inf, min_steps=per_frame, max_steps=per_frame)
  elif threshold is not None:
    mode = {"kind": "threshold", "threshold": threshold}
    ctl_kw = dict(threshold=threshold)
  else:
    k = 4 if steps is None else steps
    if not 1 <= k <= L:
      raise ValueError(f"--steps: must lie in [1, {L}] (sampling.ladder has {L} steps), got {k}")
    mode = {"kind": "steps", "steps": k}
    ctl_kw = dict(threshold=np.inf, min_steps=1, max_steps=k)
  use_cfg = guidance_lib.is_on(guidance)
  controls = sampler.make_controls(batch, guidance=guidance, seed=0, **ctl_kw)

  # Random weights (jitted init: fast even at 1.3B), kernels cast to the compute dtype once.
  t0 = time.perf_counter()
  dcfg = sampler.dcfg
  params = factory.random_networks(config, ("generator", "head"), jax.random.PRNGKey(0), exact=False)
  params["generator"] = cast_params_for_inference(params["generator"], dtype)
  _sync(params)
  init_s = time.perf_counter() - t0
  rs = np.random.RandomState(0)
  context = rs.standard_normal((batch, dcfg.text_len, dcfg.text_dim)).astype(np.float32)
  uncond = rs.standard_normal((batch, dcfg.text_len, dcfg.text_dim)).astype(np.float32) if use_cfg else None

  decoder = None
  if vae:
    if config.vae.kind == "wan" and config.vae.path:
      decoder = PixelDecoder(config)
    elif config.vae.kind == "identity":
      decoder = PixelDecoder(config)  # no decoding cost: latents are pixels
    else:
      decoder = PixelDecoder.random(config)
  n_pix = pixel_frames(config) if config.vae.kind != "identity" else F
  dev = jax.devices()[0]
  res = {
      "config": config.name, "device": {"platform": dev.platform, "kind": dev.device_kind,
                                        "count": jax.device_count()},
      "dtype": config.compute.dtype, "attention": dcfg.attention, "batch": batch, "guidance": guidance,
      "cfg": use_cfg, "mode": mode, "runs": runs, "video": {
          "height": config.video.height, "width": config.video.width, "latent_frames": F, "pixel_frames": n_pix,
          "chunks": n_chunks, "chunk_frames": c, "tokens_per_frame": sampler.tokens_per_frame},
      "ladder_steps": L, "vae": None if decoder is None else decoder.kind, "init_s": init_s,
      "params": {"generator": factory.param_count(params["generator"]), "head": factory.param_count(params["head"])},
  }
  log(f"bench sample: {config.name} on {dev.device_kind}, {config.compute.dtype}, attention {dcfg.attention}, "
      f"batch {batch}, mode {mode}")

  # 1) The one-program sampler.
  compile_s = sampler.compile(params, context, controls, uncond_context=uncond)
  log(f"  compiled the whole-video program in {compile_s:.1f} s")
  out = jax.device_get(sampler.sample(params, context, controls, uncond_context=uncond))  # warm-up
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    _sync(sampler.sample(params, context, controls, uncond_context=uncond))
    times.append(time.perf_counter() - t0)
  iters = np.asarray(out.chunk_iters)
  steps_arr = np.asarray(out.steps)
  res["compile_s"] = {"program": compile_s}
  res["steps"] = {"mean_per_frame": float(steps_arr.mean()), "forwards_per_chunk": iters.tolist(),
                  "mean_forwards_per_chunk": float(iters.mean())}
  video_s = _median(times)
  res["video_s"] = {"median": video_s, "all": times}
  res["fps"] = {"dit": batch * n_pix / video_s}

  # DiT model FLOPs: per chunk, (iters + 1 fill) forwards over c*T queries against (i+1)*c*T keys.
  tpf = sampler.tokens_per_frame
  per_chunk = [factory.dit_forward_flops(dcfg, c * tpf, (i + 1) * c * tpf, c) * batch * (2 if use_cfg else 1)
               for i in range(n_chunks)]
  flops = float(sum((int(iters[i]) + 1) * per_chunk[i] for i in range(n_chunks)))
  res["flops"] = {"dit_total": flops, "dit_tflops_per_s": flops / video_s / 1e12}

  # 2) VAE chunk decoding after sampling.
  if decoder is not None:
    lat = jnp.asarray(out.latents)
    chunks = [lat[:, i * c:(i + 1) * c] for i in range(n_chunks)]

    def decode_all():
      state = decoder.init_state(batch)
      pix = []
      for i, z in enumerate(chunks):
        p, state = decoder.decode_chunk(z, state, first=(i == 0))
        pix.append(p)
      return pix

    t0 = time.perf_counter()
    _sync(decode_all())
    res["compile_s"]["vae"] = time.perf_counter() - t0
    vtimes, ttimes = [], []
    for _ in range(runs):
      t0 = time.perf_counter()
      _sync(decode_all())
      vtimes.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      o = sampler.sample(params, context, controls, uncond_context=uncond)
      chunks = [o.latents[:, i * c:(i + 1) * c] for i in range(n_chunks)]
      _sync(decode_all())
      ttimes.append(time.perf_counter() - t0)
    res["vae_s"] = {"median": _median(vtimes), "all": vtimes}
    res["video_with_vae_s"] = {"median": _median(ttimes), "all": ttimes}
    res["fps"]["dit_vae"] = batch * n_pix / _median(ttimes)
  log(f"  video: {video_s:.3f} s (DiT) -> {res['fps']['dit']:.2f} FPS"
      + (f"; with VAE {res['video_with_vae_s']['median']:.3f} s -> {res['fps']['dit_vae']:.2f} FPS"
         if decoder is not None else ""))

  # 3) Streaming: latency to the first chunk, time per chunk.
  if do_stream:
    def one_stream(dec):
      t0 = time.perf_counter()
      chunks = list(stream_lib.stream(sampler, params, context, controls, uncond_context=uncond, decoder=dec))
      return [ch.elapsed for ch in chunks], [ch.seconds for ch in chunks], time.perf_counter() - t0

    warm_elapsed, _, _ = one_stream(None)
    variants = {"latents": None}
    if decoder is not None:
      variants["pixels"] = decoder
    st = {}
    for name, dec in variants.items():
      firsts, per_chunk_t, totals = [], [], []
      for _ in range(runs):
        el, sec, tot = one_stream(dec)
        firsts.append(el[0])
        per_chunk_t.append(sec)
        totals.append(tot)
      st[name] = {"first_chunk_s": _median(firsts), "per_chunk_s": np.median(np.asarray(per_chunk_t), 0).tolist(),
                  "total_s": _median(totals), "fps": batch * n_pix / _median(totals)}
    res["compile_s"]["chunk_fn_approx"] = warm_elapsed[0] - st["latents"]["first_chunk_s"]
    res["stream"] = st
    log(f"  stream: first chunk {st['latents']['first_chunk_s']:.3f} s"
        + (f" ({st['pixels']['first_chunk_s']:.3f} s to pixels)" if "pixels" in st else "")
        + f", per chunk {', '.join(f'{x:.3f}' for x in st['latents']['per_chunk_s'])} s")

  # 4) Per-component split.
  if do_components:
    res["components"] = _components(sampler, params, context, uncond, controls, iters, use_cfg, decoder, runs,
                                    video_s, res.get("video_with_vae_s", {}).get("median"))
    comp = res["components"]["totals_s"]
    log("  components: " + ", ".join(f"{k} {v:.3f} s" for k, v in comp.items() if v is not None))
  res["peak_memory"] = _peak_memory()
  return res


def _components(sampler, params, context, uncond, controls, iters, use_cfg, decoder, runs, video_s, video_vae_s):
  """Times one denoising step and one cache fill at every chunk position, and one VAE chunk decode."""
  import jax
  import jax.numpy as jnp

  from dsa_jax.diffusion import flow

  b = context.shape[0]
  c, n_chunks = sampler.chunk_frames, sampler.num_chunks
  tn = sampler.num_train_timesteps
  ctx = jnp.asarray(context)
  uctx = None if uncond is None else jnp.asarray(uncond)

  def step(params, x, cache, i, k, rng):
    sigma = jnp.asarray(sampler.sigmas)[k]
    t = jnp.full((b, c), tn * sigma, jnp.float32)
    v, feats, cache = sampler.forward(params["generator"], x, t, ctx, uctx, controls.guidance, cache, i * c, use_cfg)
    x0 = flow.x0_from_velocity(x, v, sigma)
    conf = sampler.confidence(params["head"], feats, jnp.full((b, c), k, jnp.int32), t)
    x = flow.renoise(x0, jax.random.normal(rng, x.shape), jnp.asarray(sampler.sigmas)[jnp.minimum(k + 1, sampler.num_steps - 1)])
    return x, conf, cache

  def fill(params, x0, cache, i):
    t = jnp.full((b, c), sampler.context_noise, jnp.float32)
    _, _, cache = sampler.forward(params["generator"], x0, t, ctx, uctx, controls.guidance, cache, i * c, use_cfg)
    return cache

  step_j = jax.jit(step, donate_argnums=(2,))
  fill_j = jax.jit(fill, donate_argnums=(2,))
  cache = sampler.new_cache(b, use_cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), (b,) + sampler.chunk_shape)
  rng = jax.random.PRNGKey(2)
  t0 = time.perf_counter()
  x1, _, cache = _sync(step_j(params, x, cache, 0, 0, rng))
  cache = _sync(fill_j(params, x, cache, 0))
  compile_s = time.perf_counter() - t0
  step_t, fill_t = [], []
  for i in range(n_chunks):
    ts, tf = [], []
    for _ in range(runs):
      t0 = time.perf_counter()
      x1, _, cache = _sync(step_j(params, x, cache, i, 0, rng))
      ts.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      cache = _sync(fill_j(params, x, cache, i))
      tf.append(time.perf_counter() - t0)
    step_t.append(_median(ts))
    fill_t.append(_median(tf))
  out = {"compile_s": compile_s, "denoise_step_s": step_t, "cache_fill_s": fill_t}
  dit_steps = float(sum(int(iters[i]) * step_t[i] for i in range(n_chunks)))
  fill_total = float(sum(fill_t))
  totals = {"dit_steps": dit_steps, "cache_fill": fill_total}
  if decoder is not None and decoder.kind == "wan":
    lat = jnp.zeros((b,) + sampler.chunk_shape, jnp.float32)
    p0, state = _sync(decoder.decode_chunk(lat, None, first=True))
    f_t, r_t = [], []
    for _ in range(runs):
      t0 = time.perf_counter()
      p0, s0 = _sync(decoder.decode_chunk(lat, None, first=True))
      f_t.append(time.perf_counter() - t0)
      _sync(decoder.decode_chunk(lat, state, first=False))  # compile / warm
      t0 = time.perf_counter()
      _, state = _sync(decoder.decode_chunk(lat, state, first=False))
      r_t.append(time.perf_counter() - t0)
    out["vae_first_chunk_s"], out["vae_chunk_s"] = _median(f_t), _median(r_t)
    totals["vae"] = out["vae_first_chunk_s"] + (n_chunks - 1) * out["vae_chunk_s"]
  totals["sum"] = float(sum(v for v in totals.values()))
  ref = video_vae_s if "vae" in totals and video_vae_s else video_s
  totals["other"] = float(ref - totals["sum"]) if ref else None
  out["totals_s"] = totals
  return out


def format_table(res: dict) -> str:
  rows = [("config", res["config"]), ("device", f"{res['device']['kind']} ({res['device']['platform']})"),
          ("dtype / attention", f"{res['dtype']} / {res['attention']}"), ("mode", json.dumps(res["mode"])),
          ("batch", res["batch"]),
          ("video", f"{res['video']['latent_frames']} latent -> {res['video']['pixel_frames']} pixel frames, "
                    f"{res['video']['chunks']} chunks, {res['video']['height']}x{res['video']['width']}"),
          ("steps/frame (mean)", f"{res['steps']['mean_per_frame']:.2f}; forwards/chunk "
                                 f"{res['steps']['forwards_per_chunk']}"),
          ("compile program (s)", f"{res['compile_s']['program']:.1f}")]
  if "chunk_fn_approx" in res["compile_s"]:
    rows.append(("compile chunk fn (s, approx)", f"{res['compile_s']['chunk_fn_approx']:.1f}"))
  rows.append(("video DiT (s, median)", f"{res['video_s']['median']:.4f}"))
  rows.append(("FPS DiT", f"{res['fps']['dit']:.2f}"))
  if "dit_vae" in res["fps"]:
    rows.append(("video DiT+VAE (s)", f"{res['video_with_vae_s']['median']:.4f}"))
    rows.append(("FPS DiT+VAE", f"{res['fps']['dit_vae']:.2f}"))
  rows.append(("DiT TFLOP/s (model)", f"{res['flops']['dit_tflops_per_s']:.1f}"))
  if "stream" in res:
    s = res["stream"]["latents"]
    rows.append(("first chunk latency (s)", f"{s['first_chunk_s']:.4f}"))
    if "pixels" in res["stream"]:
      rows.append(("first chunk to pixels (s)", f"{res['stream']['pixels']['first_chunk_s']:.4f}"))
      rows.append(("FPS stream DiT+VAE", f"{res['stream']['pixels']['fps']:.2f}"))
    rows.append(("time per chunk (s)", ", ".join(f"{x:.4f}" for x in s["per_chunk_s"])))
  if "components" in res:
    comp = res["components"]
    rows.append(("1 denoise step (s) by chunk", ", ".join(f"{x:.4f}" for x in comp["denoise_step_s"])))
    rows.append(("cache fill (s) by chunk", ", ".join(f"{x:.4f}" for x in comp["cache_fill_s"])))
    if "vae_chunk_s" in comp:
      rows.append(("VAE chunk (s) first / later", f"{comp['vae_first_chunk_s']:.4f} / {comp['vae_chunk_s']:.4f}"))
    rows.append(("split (s)", ", ".join(f"{k} {v:.4f}" for k, v in comp["totals_s"].items() if v is not None)))
  pm = res.get("peak_memory")
  if pm and "peak_bytes_in_use" in pm:
    rows.append(("peak device memory (GiB)", f"{pm['peak_bytes_in_use'] / 2**30:.2f}"))
  w = max(len(str(k)) for k, _ in rows)
  return "\n".join(f"{str(k).ljust(w)}  {v}" for k, v in rows)


def main(args) -> int:
  from dsa_jax.config_lib import get_config
  config = get_config(args.config, args.overrides)
  threshold = None
  if args.threshold is not None:
    from dsa_jax.sampling.sampler import parse_threshold
    threshold = parse_threshold(args.threshold)
  res = run_bench(config, steps=args.steps, threshold=threshold, mean_steps=args.mean_steps, vae=not args.no_vae,
                  runs=args.runs, batch=args.batch_size, guidance=args.guidance, do_stream=not args.no_stream,
                  do_components=not args.no_components, log=lambda m: print(m, file=sys.stderr, flush=True))
  res["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
  print(format_table(res), flush=True)
  if args.json:
    from dsa_jax.sampling.outputs import write_json
    write_json(args.json, res)
    print(f"wrote {args.json}", flush=True)
  return 0
