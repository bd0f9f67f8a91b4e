"""Sampling speed benchmark: random weights (or --ckpt), the config's compute dtype (bf16 for Wan), median of runs.

  dsa-jax bench sample --config configs/wan_1_3b.py --steps 4 --json docs/bench/wan_4steps.json
  dsa-jax bench sample --config configs/wan_1_3b.py --forced-mean-steps 2.5 --json docs/bench/wan_2p5.json
  dsa-jax bench sample --config configs/wan_1_3b.py --decode-only --json docs/bench/wan_vae.json
  dsa-jax bench sample --config configs/wan_1_3b.py --steps 4 --profile /tmp/prof   # + an XLA trace, top kernels
  dsa-jax bench sample --config configs/tiny.py --steps 2 --runs 2 --json /tmp/bench.json   # CPU smoke test

Step modes (one of):
  --steps K        every frame takes exactly K steps (threshold +inf, max_steps K): Self Forcing's sampler at K = 4;
  --threshold tau  the real dynamic rule with the confidence head (random unless --ckpt): counts follow its outputs;
  --forced-mean-steps m (also spelled --mean-steps)
                   a forced, deterministic per-frame schedule whose mean is m steps per frame: round(F m) steps over
                   the F frames, every frame taking floor or ceil of the mean, imposed through per-frame
                   min_steps = max_steps and threshold +inf. The chunk's denoising loop runs until its last frame is
                   done, so frames of a chunk take the same count wherever the total allows (the extra step goes to
                   whole chunks, spread evenly along the video; at most one chunk is mixed). When F m is not a whole
                   number the nearest achievable mean is used and reported ('achieved'). The confidence head still
                   runs at every step, so the cost is the DSA sampler's at that average;
  --budget-mean-steps m
                   the sampler's step budget, as `dsa-jax sample --mean-steps m`: tau from the calibration table of
                   the model given by --ckpt (dsa-jax calibrate), then the dynamic rule with that model's head.
Default: --steps 4.

Reported (JSON and a table):
  meta: device kind, jax version, config (name, file, overrides, the main sizes), dtype, step mode and the exact
    command line, so that tables can be regenerated from the JSON files.
  compile_s: the whole-video program (ahead of time), the per-chunk streaming function (first chunk of a warm-up
    stream minus a warm first chunk) and the VAE chunk decoder.
  video: the one-program sampler, seconds per video and FPS in output pixel frames (Wan: 1 + 4 (F - 1), 81 for
    21 latent frames) x batch, without and with VAE decoding (chunk by chunk after sampling, each chunk's pixels
    copied to the host as the outputs' decode path does); decode_s_per_chunk: each chunk's decode alone.
  stream: latency to the first chunk (latents; and decoded pixels with the VAE), time per chunk.
  components: separately jitted functions timed alone per chunk position (the KV length grows along the video):
    one denoising step (DiT forward + head + re-noise), the cache-fill forward, VAE decode of one chunk; totals
    weighted by the steps each chunk actually took, and the rest of the measured video time as 'other'.
  memory: per compiled program (the whole-video sampler, the streaming per-chunk program, the VAE's first and later
    chunk decoders), XLA's own accounting from `compiled.memory_analysis()`: argument, output, aliased (donated),
    temp and generated-code bytes and their total (argument + output - aliased + temp + code), the device memory
    that program needs alone; an estimate for sampling + decoding (the DiT's weights stay while the VAE decodes);
    and the device's `memory_stats()` peak over the whole bench process where the backend has it.
  model FLOPs of the DiT forwards and the achieved TFLOP/s; the VAE decoder's FLOPs per video (XLA's count of its
    chunk programs as written) and the TFLOP/s of its summed chunk decode times.
  --decode-only: just the VAE (random latents): decode time per chunk, FLOPs and the decoders' memory.
  --profile DIR: a jax.profiler trace of one timed video (sampling + decoding; decoding alone with --decode-only) in
    DIR, and the top kernels by time
    read from its Perfetto JSON (open the trace with TensorBoard's profile plugin, or the .json.gz in ui.perfetto.dev).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time

import numpy as np

from dsa_jax.atomic import check_file_target
from dsa_jax.eval.profiling import device_memory, profile_one, xla_environment


def add_arguments(p):
  p.add_argument("--config", required=True, help="config file (path[:arg])")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--steps", type=int, default=None, help="fixed K steps per frame (default 4)")
  mode.add_argument("--threshold", default=None, help="dynamic: confidence threshold tau (random head unless --ckpt)")
  mode.add_argument("--forced-mean-steps", "--mean-steps", dest="forced_mean_steps", type=float, default=None,
                    help="forced per-frame schedule whose mean is this many steps per frame (--mean-steps is the "
                         "same here; the sampler's calibrated budget is --budget-mean-steps)")
  mode.add_argument("--budget-mean-steps", type=float, default=None,
                    help="step budget: tau from the --ckpt model's calibration table, like `dsa-jax sample "
                         "--mean-steps`")
  p.add_argument("--ckpt", default="", help="model folder or workdir to load instead of random weights")
  p.add_argument("--no-vae", action="store_true", help="skip VAE decoding (DiT only)")
  p.add_argument("--decode-only", action="store_true", help="time only the VAE decoder, chunk by chunk, on random "
                 "latents (the sampling options --steps, --threshold, --ckpt, --guidance ... are then an error)")
  p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
  p.add_argument("--batch-size", type=int, default=1, help="videos per batch, at least 1 (default 1)")
  p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance g (cond + g (cond - uncond); "
                 "0 = off); != 0 doubles the batch (uncond branch)")
  p.add_argument("--no-stream", action="store_true", help="skip the streaming measurements")
  p.add_argument("--no-components", action="store_true", help="skip the per-component split")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="write a jax.profiler trace of one timed video to DIR and print the top kernels by time")
  p.add_argument("--json", nargs="?", const="bench_sample.json", default=None,
                 help="write the results to this JSON file (default name bench_sample.json); checked before the "
                 "benchmark runs")


def forced_schedule(mean_steps: float, num_frames: int, chunk_frames: int, num_steps: int) -> np.ndarray:
  """(num_frames,) per-frame step counts with mean round(F m) / F, each floor or ceil of it; frames of a chunk
  share a count except in at most one chunk, and chunks with the extra step are spread evenly (see the module doc)."""
  m = float(mean_steps)
  if not np.isfinite(m) or not 1.0 <= m <= num_steps:
    raise ValueError(f"--forced-mean-steps: must lie in [1, {num_steps}] (the ladder has {num_steps} steps), "
                     f"got {mean_steps}")
  if num_frames < 1 or chunk_frames < 1 or num_frames % chunk_frames:
    raise ValueError(f"forced schedule: {num_frames} frames are not whole chunks of {chunk_frames}")
  r = lambda x: int(np.floor(x + 0.5 + 1e-9))
  total = r(num_frames * m)
  base, extra = divmod(total, num_frames)
  n = num_frames // chunk_frames
  full, part = divmod(extra, chunk_frames)
  s = np.full((n, chunk_frames), base, np.int64)
  marks = np.asarray([r((k + 1) * full / n) - r(k * full / n) for k in range(n)], bool)
  s[marks] += 1
  if part:  # the one mixed chunk: the middle one of those left at the base count
    rest = np.flatnonzero(~marks)
    s[rest[len(rest) // 2], :part] += 1
  return s.reshape(num_frames)


def program_memory(compiled) -> dict | None:
  """XLA's memory accounting of one compiled program (bytes): what it needs on the device on its own."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(ma, (list, tuple)):
    ma = ma[0] if ma else None
  if ma is None:
    return None
  f = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
       for k in ("argument", "output", "alias", "temp", "generated_code")}
  f["total"] = f["argument"] + f["output"] - f["alias"] + f["temp"] + f["generated_code"]
  return f


def _median(xs):
  return float(statistics.median(xs)) if xs else None


def _sync(x):
  import jax
  return jax.block_until_ready(x)


def _peak_memory():
  """The first device's allocator counters (the name and keys older JSON files use); `device_memory()` has all."""
  devices = device_memory()
  if not devices:
    return None
  return {k: v for k, v in devices[0].items() if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def _bench_meta(config, config_arg=None, overrides=None, argv=None) -> dict:
  """What the JSON needs to regenerate a table: device, jax, config, dtype and the command line (`argv`: the
  arguments after `dsa-jax`; default the process's own command line)."""
  import jax
  dev = jax.devices()[0]
  return {
      "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
      "jax_version": jax.__version__,
      "config": {"name": config.name, "file": config_arg, "overrides": list(overrides or []),
                 "model": {k: config.model[k] for k in ("dim", "ffn_dim", "num_layers", "num_heads")},
                 "video": {k: config.video[k] for k in ("height", "width", "num_frames", "chunk_frames")},
                 "ladder": list(config.sampling.ladder),
                 "vae": {"kind": config.vae.kind, "conv3d": config.vae.get("conv3d", "native")},
                 "attention": config.compute.attention},
      "dtype": config.compute.dtype,
      "matmul": config.compute.get("matmul", "default"),
      "fp8_activations": config.compute.get("fp8_activations", "dynamic"),
      "command": "dsa-jax " + shlex.join(argv) if argv is not None else shlex.join(sys.argv),
      "environment": xla_environment(),
  }


def run_kernel_bench(args, run, format_table, **run_kwargs) -> int:
  """`main` of a bench that times pieces of the model alone (`dsa-jax bench vae-convs`, `attention`): the config,
  `run(config, reps=, log=, **run_kwargs)`, the meta a table needs, the printed table and the JSON."""
  from dsa_jax.config_lib import get_config
  if args.json:
    check_file_target(args.json, "--json")
  config = get_config(args.config, args.overrides)
  res = run(config, reps=args.reps, log=lambda m: print(m, file=sys.stderr, flush=True), **run_kwargs)
  res.update(_bench_meta(config, args.config, args.overrides, getattr(args, "_argv", None)))
  print(format_table(res), flush=True)
  if args.json:
    from dsa_jax.sampling.outputs import write_json
    write_json(args.json, res)
    print(f"wrote {args.json}", flush=True)
  return 0


def _make_decoder(config, vae: bool):
  from dsa_jax.sampling.decode import PixelDecoder
  if not vae:
    return None
  if config.vae.kind == "wan" and config.vae.path:
    return PixelDecoder(config)
  if config.vae.kind == "identity":
    return PixelDecoder(config)  # no decoding cost: latents are pixels
  return PixelDecoder.random(config)


def _vae_dtype(decoder):
  """The Wan VAE's compute dtype (its convolutions run in it), None without one."""
  return None if decoder is None or decoder.vae is None else np.dtype(decoder.vae.dtype).name


def _pipeline_peak(programs: dict, params) -> dict:
  """The DiT's weights stay on the device while the VAE decodes: sampling a video and decoding it needs about
  max(sampler program, weights + the larger decode program)."""
  import jax
  weights = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))
  sampler = (programs.get("sampler") or {}).get("total")
  vae = max([m["total"] for k, m in programs.items() if k.startswith("vae") and m] or [0])
  if sampler is None:
    return {"weights_bytes": weights}
  return {"weights_bytes": weights, "sample_and_decode_bytes": max(sampler, weights + vae)}


def decoder_memory(decoder, batch: int, num_frames: int) -> dict:
  """memory_analysis of the VAE's first-chunk and later-chunk decode programs ({} without a Wan VAE)."""
  import jax
  if decoder is None or decoder.kind != "wan":
    return {}
  (a0, b0), *rest = decoder.chunk_bounds(num_frames)
  shape = lambda f: jax.ShapeDtypeStruct((batch, f) + decoder.latent_hw + (decoder.latent_channels,), np.float32)
  fn = decoder._decode_chunk_uint8  # the program the benchmark's decoding runs (frames to the host as uint8)
  out = {"vae_first_chunk": program_memory(fn.lower(decoder.vae_params, shape(b0 - a0), None, first=True).compile())}
  if rest:
    _, state = jax.eval_shape(lambda p, z: decoder.vae.decode_chunk(p, z, None, first=True), decoder.vae_params,
                              shape(b0 - a0))
    a, b = rest[0]
    out["vae_chunk"] = program_memory(fn.lower(decoder.vae_params, shape(b - a), state, first=False).compile())
  return out


def time_decode_chunks(decoder, latents, runs: int) -> dict:
  """Each chunk's decode alone (synchronised, median over runs) and its copy to the host."""
  import jax
  bounds = decoder.chunk_bounds(latents.shape[1])
  dec, host = [[] for _ in bounds], [[] for _ in bounds]
  for r in range(runs + 1):  # run 0 compiles
    state = decoder.init_state(latents.shape[0])
    for i, (a, b) in enumerate(bounds):
      t0 = time.perf_counter()
      pixels, state = jax.block_until_ready(decoder.decode_chunk(latents[:, a:b], state, first=(i == 0),
                                                                 uint8=True))
      t1 = time.perf_counter()
      np.asarray(pixels)
      t2 = time.perf_counter()
      if r:
        dec[i].append(t1 - t0)
        host[i].append(t2 - t1)
  return {"decode_s_per_chunk": [_median(x) for x in dec], "to_host_s_per_chunk": [_median(x) for x in host],
          "decode_s": float(sum(_median(x) for x in dec))}


def _add_vae_flops(vae_res: dict, decoder, batch: int, num_frames: int, decode_s: float):
  """The decoder's FLOPs per video (`PixelDecoder.decode_flops`) and the rate its decode time gives."""
  flops = decoder.decode_flops(batch, num_frames)
  if flops:
    vae_res["flops_per_video"] = flops / batch
    vae_res["tflops_per_s"] = flops / decode_s / 1e12


def run_decode_bench(config, *, runs=3, batch=1, profile_dir=None, log=print) -> dict:
  """--decode-only: the VAE decoder alone on random latents of the config's video."""
  import jax
  from dsa_jax.config_lib import latent_hw, pixel_frames
  if runs < 1:
    raise ValueError(f"--runs: must be >= 1, got {runs}")
  if batch < 1:
    raise ValueError(f"--batch-size: must be >= 1, got {batch}")
  decoder = _make_decoder(config, True)
  f = config.video.num_frames
  lat = jax.random.normal(jax.random.PRNGKey(0), (batch, f) + tuple(latent_hw(config))
                          + (config.video.latent_channels,))
  n_pix = pixel_frames(config) if decoder.kind == "wan" else f
  res = {**_bench_meta(config), "mode": {"kind": "decode_only"}, "steps_mode": None, "batch": batch,
         "runs": runs,
         "video": {"height": config.video.height, "width": config.video.width, "latent_frames": f,
                   "pixel_frames": n_pix, "chunks": len(decoder.chunk_bounds(f)),
                   "chunk_frames": config.video.chunk_frames}}
  t0 = time.perf_counter()
  jax.block_until_ready(decoder.decode_chunk(lat[:, :config.video.chunk_frames], decoder.init_state(batch),
                                             first=True, uint8=True))
  res["compile_s"] = {"vae_first_chunk": time.perf_counter() - t0}
  res["vae"] = {"kind": decoder.kind, "dtype": _vae_dtype(decoder), **time_decode_chunks(decoder, lat, runs)}
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    decoder.decode_video(lat, uint8=True)
    times.append(time.perf_counter() - t0)
  res["vae"]["video_to_host_s"] = {"median": _median(times), "all": times}
  res["fps"] = {"vae": batch * n_pix / _median(times)}
  _add_vae_flops(res["vae"], decoder, batch, f, res["vae"]["decode_s"])
  res["memory"] = {"programs": decoder_memory(decoder, batch, f), "device": _peak_memory(),
                   "per_device": device_memory()}
  if profile_dir:
    res["profile"] = profile_one(lambda: decoder.decode_video(lat, uint8=True), profile_dir, log=log)
  log(f"  VAE decode: {res['vae']['decode_s']:.3f} s per video (chunks "
      f"{', '.join(f'{x:.3f}' for x in res['vae']['decode_s_per_chunk'])} s); with the copies to the host "
      f"{_median(times):.3f} s -> {res['fps']['vae']:.1f} FPS"
      + (f"; {res['vae']['flops_per_video'] / 1e12:.1f} TFLOP per video, {res['vae']['tflops_per_s']:.0f} TFLOP/s"
         if "flops_per_video" in res["vae"] else ""))
  return res


def run_bench(config, *, steps=None, threshold=None, mean_steps=None, budget_mean_steps=None, ckpt="", vae=True,
              runs=3, batch=1, guidance=0.0, do_stream=True, do_components=True, profile_dir=None,
              log=print) -> dict:
  """All measurements of one step mode (see the module docstring). `mean_steps` is the forced schedule."""
  import jax
  import jax.numpy as jnp

  from dsa_jax.checkpoint.loading import cast_params_for_inference, load_sampler_params
  from dsa_jax.config_lib import pixel_frames
  from dsa_jax.diffusion import guidance as guidance_lib
  from dsa_jax.models import factory
  from dsa_jax.models.dit import _DTYPES
  from dsa_jax.parallel import mesh as mesh_lib
  from dsa_jax.sampling import sampler as sampler_lib
  from dsa_jax.sampling import stream as stream_lib

  if runs < 1:
    raise ValueError(f"--runs: must be >= 1, got {runs}")
  if batch < 1:
    raise ValueError(f"--batch-size: must be >= 1, got {batch}")
  if budget_mean_steps is not None and not ckpt:
    raise ValueError("--budget-mean-steps: needs --ckpt MODEL (a model folder with a calibration table); the "
                     "forced schedule is --forced-mean-steps")
  sampler = sampler_lib.make_sampler(config)
  n_chunks, c, L, F = sampler.num_chunks, sampler.chunk_frames, sampler.num_steps, sampler.num_frames
  dtype = _DTYPES[config.compute.dtype]

  # Weights: random (jitted init: fast even at 1.3B; kernels cast to the compute dtype once) or --ckpt.
  t0 = time.perf_counter()
  if ckpt:
    params, source = load_sampler_params(config, ckpt, warn=log, cast=True)
  else:
    params = factory.random_networks(config, ("generator", "head"), jax.random.PRNGKey(0), exact=False)
    params["generator"] = cast_params_for_inference(params["generator"], dtype)
    source = {"source": "random"}
  _sync(params)
  init_s = time.perf_counter() - t0

  # Controls by step mode.
  if mean_steps is not None:
    sched = forced_schedule(mean_steps, F, c, L)
    achieved = float(sched.mean())
    mode = {"kind": "forced_mean_steps", "target": float(mean_steps), "achieved": achieved,
            "exact": bool(abs(achieved - mean_steps) < 1e-9), "frame_schedule": sched.tolist()}
    if not mode["exact"]:
      log(f"  note: {F} frames cannot average exactly {mean_steps:g} steps ({F * mean_steps:g} steps); the forced "
          f"schedule averages {achieved:.4f} ({int(sched.sum())} steps)")
    ctl_kw = dict(threshold=np.inf, min_steps=sched[None, :], max_steps=sched[None, :])
  elif budget_mean_steps is not None:
    from dsa_jax.sampling import budget
    ctl_kw = budget.controls_for_budget(source, budget_mean_steps, config, source_name=repr(ckpt))
    mode = {"kind": "budget_mean_steps", "target": float(budget_mean_steps), "threshold": ctl_kw["threshold"],
            "min_steps": ctl_kw["min_steps"], "max_steps": ctl_kw["max_steps"]}
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

  dcfg = sampler.dcfg
  rs = np.random.RandomState(0)
  context = rs.standard_normal((batch, dcfg.text_len, dcfg.text_dim)).astype(np.float32)
  uncond = rs.standard_normal((batch, dcfg.text_len, dcfg.text_dim)).astype(np.float32) if use_cfg else None

  decoder = _make_decoder(config, vae)
  n_pix = pixel_frames(config) if config.vae.kind != "identity" else F
  res = {
      "config": config.name, "dtype": config.compute.dtype, "attention": dcfg.attention, "batch": batch,
      "guidance": guidance, "cfg": use_cfg, "mode": mode, "steps_mode": mode["kind"], "runs": runs,
      "weights": source.get("path", "random"), "video": {
          "height": config.video.height, "width": config.video.width, "latent_frames": F, "pixel_frames": n_pix,
          "chunks": n_chunks, "chunk_frames": c, "tokens_per_frame": sampler.tokens_per_frame},
      "ladder_steps": L, "vae": None if decoder is None else decoder.kind, "vae_dtype": _vae_dtype(decoder),
      "init_s": init_s,
      "mesh": None if sampler.mesh is None else mesh_lib.mesh_sizes(sampler.mesh),
      "per_device_loops": sampler.runs_per_device(batch, use_cfg),
      "params": {"generator": factory.param_count(factory.as_variables(params["generator"])["params"]),
                 "head": factory.param_count(params["head"])},  # (not a stored fp8 calibration's numbers)
  }
  res.update(_bench_meta(config))
  dev = jax.devices()[0]
  log(f"bench sample: {config.name} on {dev.device_kind}, {config.compute.dtype}, attention {dcfg.attention}, "
      f"batch {batch}, mode {json.dumps({k: v for k, v in mode.items() if k != 'frame_schedule'})}")

  # 1) The one-program sampler.
  compile_s = sampler.compile(params, context, controls, uncond_context=uncond)
  if sampler.fp8_calibration_s is not None:
    log(f"  calibrated the fp8 activation scales in {sampler.fp8_calibration_s:.1f} s (compilation included)")
  log(f"  compiled the whole-video program in {compile_s:.1f} s")
  programs = {"sampler": program_memory(list(sampler._compiled.values())[-1])}
  warm = sampler.sample(params, context, controls, uncond_context=uncond)  # warm-up
  out = jax.device_get(warm)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    _sync(sampler.sample(params, context, controls, uncond_context=uncond))
    times.append(time.perf_counter() - t0)
  iters = np.asarray(out.chunk_iters)
  steps_arr = np.asarray(out.steps)
  res["compile_s"] = {"program": compile_s}
  if sampler.fp8_calibration_s is not None:
    res["compile_s"]["fp8_calibration"] = sampler.fp8_calibration_s
  if source.get("fp8_calibration"):
    res["fp8_calibration"] = source["fp8_calibration"]  # 'stored': the model's own (dsa-jax calibrate --fp8)
  res["steps"] = {"mean_per_frame": float(steps_arr.mean()), "per_frame": steps_arr[0].tolist(),
                  "forwards_per_chunk": iters.tolist(), "mean_forwards_per_chunk": float(iters.mean())}
  video_s = _median(times)
  res["video_s"] = {"median": video_s, "all": times}
  res["fps"] = {"dit": batch * n_pix / video_s}

  # DiT model FLOPs: per chunk, (iters + 1 fill) forwards over c*T queries against (i+1)*c*T keys.
  tpf = sampler.tokens_per_frame
  per_chunk = [factory.dit_forward_flops(dcfg, c * tpf, (i + 1) * c * tpf, c) * batch * (2 if use_cfg else 1)
               for i in range(n_chunks)]
  flops = float(sum((int(iters[i]) + 1) * per_chunk[i] for i in range(n_chunks)))
  res["flops"] = {"dit_total": flops, "dit_tflops_per_s": flops / video_s / 1e12}

  def one_video():
    """Sampling, then chunk-by-chunk decoding with every chunk's pixels copied to the host."""
    o = sampler.sample(params, context, controls, uncond_context=uncond)
    if decoder is None:
      return _sync(o)
    return list(decoder.decode_chunks_to_host(o.latents, uint8=True))

  # 2) VAE chunk decoding after sampling (pixels handed to the host chunk by chunk).
  if decoder is not None:
    # the latents as the sampler hands them over (on a mesh: sharded), so that the decoder compiled here is the one
    # the timed videos below use
    lat = warm.latents
    t0 = time.perf_counter()
    list(decoder.decode_chunks_to_host(lat, uint8=True))
    res["compile_s"]["vae"] = time.perf_counter() - t0
    programs.update(decoder_memory(decoder, batch, F))
    vtimes, ttimes = [], []
    for _ in range(runs):
      t0 = time.perf_counter()
      list(decoder.decode_chunks_to_host(lat, uint8=True))
      vtimes.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      one_video()
      ttimes.append(time.perf_counter() - t0)
    res["vae_s"] = {"median": _median(vtimes), "all": vtimes, **time_decode_chunks(decoder, lat, runs)}
    _add_vae_flops(res["vae_s"], decoder, batch, F, res["vae_s"]["decode_s"])
    res["video_with_vae_s"] = {"median": _median(ttimes), "all": ttimes}
    res["fps"]["dit_vae"] = batch * n_pix / _median(ttimes)
  log(f"  video: {video_s:.3f} s (DiT) -> {res['fps']['dit']:.2f} FPS"
      + (f"; with VAE {res['video_with_vae_s']['median']:.3f} s -> {res['fps']['dit_vae']:.2f} FPS"
         if decoder is not None else ""))

  # 3) Streaming: latency to the first chunk, time per chunk.
  if do_stream:
    def one_stream(dec):
      t0 = time.perf_counter()
      chunks = list(stream_lib.stream(sampler, params, context, controls, uncond_context=uncond, decoder=dec,
                                      uint8=True))
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
    if sampler.mesh is None:  # the per-chunk program streams run (already compiled: lowering it again is free)
      args, cfg_on = sampler.prepare(params, context, controls, uncond_context=uncond)
      p_, ctx_, unc_, ctl_, rng_, cache_, cond_ = args
      programs["stream_chunk"] = program_memory(sampler._chunk_step_jit.lower(
          p_, ctx_, unc_, ctl_, rng_, cache_, np.int32(0), cond_, use_cfg=cfg_on, fill=False).compile())
      del args, cache_
    log(f"  stream: first chunk {st['latents']['first_chunk_s']:.3f} s"
        + (f" ({st['pixels']['first_chunk_s']:.3f} s to pixels)" if "pixels" in st else "")
        + f", per chunk {', '.join(f'{x:.3f}' for x in st['latents']['per_chunk_s'])} s")

  # 4) Per-component split.
  if do_components:
    res["components"] = _components(sampler, params, context, uncond, controls, iters, use_cfg, decoder, runs,
                                    video_s, res.get("video_with_vae_s", {}).get("median"))
    comp = res["components"]["totals_s"]
    log("  components: " + ", ".join(f"{k} {v:.3f} s" for k, v in comp.items() if v is not None))

  # 5) Memory per program and the process peak.
  res["memory"] = {"programs": programs, "device": _peak_memory(), "per_device": device_memory(),
                   **_pipeline_peak(programs, params)}
  res["peak_memory"] = res["memory"]["device"]  # the name older JSON files use
  log("  memory: " + "; ".join(f"{k} {v['total'] / 2**30:.3f} GiB" for k, v in programs.items() if v))

  # 6) A profile of one timed video.
  if profile_dir:
    res["profile"] = profile_one(one_video, profile_dir, log=log)
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
  # The generator in the layout of the sampler's DiT once, as its programs do (not per timed forward).
  params = jax.jit(lambda p: {**p, "generator": sampler.generator_variables(p["generator"])})(params)

  # As in the sampler's program: the text keys/values once per video, the chunk's placement (RoPE tables) once per
  # chunk; timed apart from the forwards that use them.
  kv_j = jax.jit(lambda params: sampler.text_kv(params["generator"], ctx, uctx, use_cfg))
  text_kv = _sync(kv_j(params)) if sampler.precompute_text else None

  def step(params, text_kv, x, cache, i, k, rng):
    sigma = jnp.asarray(sampler.sigmas)[k]
    t = jnp.full((b, c), tn * sigma, jnp.float32)
    v, feats, cache = sampler.forward(params["generator"], x, t, ctx, uctx, controls.guidance, cache, i * c, use_cfg,
                                      sampler.placement(i), text_kv)
    x0 = flow.x0_from_velocity(x, v, sigma)
    conf = sampler.confidence(params["head"], feats, jnp.full((b, c), k, jnp.int32), t)
    nxt = jnp.asarray(sampler.sigmas)[jnp.minimum(k + 1, sampler.num_steps - 1)]
    x = flow.renoise(x0, jax.random.normal(rng, x.shape), nxt)
    return x, conf, cache

  def fill(params, text_kv, x0, cache, i):
    t = jnp.full((b, c), sampler.context_noise, jnp.float32)
    _, _, cache = sampler.forward(params["generator"], x0, t, ctx, uctx, controls.guidance, cache, i * c, use_cfg,
                                  sampler.placement(i), text_kv)
    return cache

  step_j = jax.jit(step, donate_argnums=(3,))
  fill_j = jax.jit(fill, donate_argnums=(3,))
  cache = sampler.new_cache(b, use_cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), (b,) + sampler.chunk_shape)
  rng = jax.random.PRNGKey(2)
  t0 = time.perf_counter()
  x1, _, cache = _sync(step_j(params, text_kv, x, cache, 0, 0, rng))
  cache = _sync(fill_j(params, text_kv, x, cache, 0))
  compile_s = time.perf_counter() - t0
  step_t, fill_t = [], []
  for i in range(n_chunks):
    ts, tf = [], []
    for _ in range(runs):
      t0 = time.perf_counter()
      x1, _, cache = _sync(step_j(params, text_kv, x, cache, i, 0, rng))
      ts.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      cache = _sync(fill_j(params, text_kv, x, cache, i))
      tf.append(time.perf_counter() - t0)
    step_t.append(_median(ts))
    fill_t.append(_median(tf))
  out = {"compile_s": compile_s, "denoise_step_s": step_t, "cache_fill_s": fill_t}
  dit_steps = float(sum(int(iters[i]) * step_t[i] for i in range(n_chunks)))
  fill_total = float(sum(fill_t[:-1]))  # the last chunk fills no cache (nothing attends to it)
  totals = {"dit_steps": dit_steps, "cache_fill": fill_total}
  if text_kv is not None:
    kv_t = []
    for _ in range(runs):
      t0 = time.perf_counter()
      _sync(kv_j(params))
      kv_t.append(time.perf_counter() - t0)
    out["text_kv_s"] = totals["text_kv"] = _median(kv_t)
  if decoder is not None and decoder.kind == "wan":
    lat = jnp.zeros((b,) + sampler.chunk_shape, jnp.float32)
    _, state = _sync(decoder.decode_chunk(lat, None, first=True))
    _, state = _sync(decoder.decode_chunk(lat, state, first=False))  # compile / warm (the cache is donated)
    f_t, r_t = [], []
    for _ in range(runs):
      t0 = time.perf_counter()
      _sync(decoder.decode_chunk(lat, None, first=True))
      f_t.append(time.perf_counter() - t0)
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


def _gib(x):
  return f"{x / 2**30:.3f}"


def _memory_rows(res: dict) -> list:
  rows = []
  mem = res.get("memory") or {}
  for name, m in (mem.get("programs") or {}).items():
    if m:
      rows.append((f"memory {name} (GiB)", f"total {_gib(m['total'])} = argument {_gib(m['argument'])} + output "
                   f"{_gib(m['output'])} - aliased {_gib(m['alias'])} + temp {_gib(m['temp'])} + code "
                   f"{_gib(m['generated_code'])}"))
  if mem.get("sample_and_decode_bytes"):
    rows.append(("memory sampling + decoding (GiB)", f"{_gib(mem['sample_and_decode_bytes'])} (DiT weights "
                 f"{_gib(mem['weights_bytes'])} stay while the VAE decodes)"))
  dev = mem.get("device")
  if dev and "peak_bytes_in_use" in dev:
    rows.append(("peak device memory, process (GiB)", _gib(dev["peak_bytes_in_use"])))
  return rows


def _meta_rows(res: dict) -> list:
  return [("config", res["config"]["name"]), ("device", f"{res['device']['kind']} ({res['device']['platform']}), "
                                                        f"jax {res['jax_version']}")]


def format_table(res: dict) -> str:
  if res["mode"]["kind"] == "decode_only":
    return format_decode_table(res)
  mode = {k: v for k, v in res["mode"].items() if k != "frame_schedule"}
  rows = _meta_rows(res) + [
      ("dtype / attention", f"{res['dtype']} / {res['attention']}"), ("mode", json.dumps(mode)),
      ("batch", res["batch"]),
      ("video", f"{res['video']['latent_frames']} latent -> {res['video']['pixel_frames']} pixel frames, "
                f"{res['video']['chunks']} chunks, {res['video']['height']}x{res['video']['width']}"),
      ("steps/frame (mean)", f"{res['steps']['mean_per_frame']:.4f}; forwards/chunk "
                             f"{res['steps']['forwards_per_chunk']}"),
      ("compile program (s)", f"{res['compile_s']['program']:.1f}")]
  if "chunk_fn_approx" in res["compile_s"]:
    rows.append(("compile chunk fn (s, approx)", f"{res['compile_s']['chunk_fn_approx']:.1f}"))
  rows.append(("video DiT (s, median)", f"{res['video_s']['median']:.4f}"))
  rows.append(("FPS DiT", f"{res['fps']['dit']:.2f}"))
  if "dit_vae" in res["fps"]:
    rows.append(("video DiT+VAE (s)", f"{res['video_with_vae_s']['median']:.4f}"))
    rows.append(("FPS DiT+VAE", f"{res['fps']['dit_vae']:.2f}"))
    rows.append(("VAE decode per chunk (s)", ", ".join(f"{x:.4f}" for x in res["vae_s"]["decode_s_per_chunk"])
                 + f"; sum {res['vae_s']['decode_s']:.4f}"))
  rows.append(("DiT TFLOP/s (model)", f"{res['flops']['dit_tflops_per_s']:.1f}"))
  if "tflops_per_s" in res.get("vae_s", {}):
    rows.append(("VAE TFLOP per video / TFLOP/s", f"{res['vae_s']['flops_per_video'] / 1e12:.2f} / "
                 f"{res['vae_s']['tflops_per_s']:.1f}"))
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
  rows += _memory_rows(res)
  if res.get("profile"):
    rows.append(("profile", res["profile"]["dir"]))
  return _table(rows)


def format_decode_table(res: dict) -> str:
  v = res["vae"]
  rows = _meta_rows(res) + [
      ("dtype / vae", f"{res['dtype']} / {v['kind']}"), ("batch", res["batch"]),
      ("video", f"{res['video']['latent_frames']} latent -> {res['video']['pixel_frames']} pixel frames, "
                f"{res['video']['chunks']} chunks, {res['video']['height']}x{res['video']['width']}"),
      ("VAE decode per chunk (s)", ", ".join(f"{x:.4f}" for x in v["decode_s_per_chunk"])),
      ("VAE copy to host per chunk (s)", ", ".join(f"{x:.4f}" for x in v["to_host_s_per_chunk"])),
      ("VAE decode, sum of chunks (s)", f"{v['decode_s']:.4f}"),
      *([("VAE TFLOP per video / TFLOP/s", f"{v['flops_per_video'] / 1e12:.2f} / {v['tflops_per_s']:.1f}")]
        if "tflops_per_s" in v else []),
      ("VAE video to host (s)", f"{v['video_to_host_s']['median']:.4f}"),
      ("FPS VAE", f"{res['fps']['vae']:.2f}")]
  rows += _memory_rows(res)
  if res.get("profile"):
    rows.append(("profile", res["profile"]["dir"]))
  return _table(rows)


def _table(rows) -> str:
  w = max(len(str(k)) for k, _ in rows)
  return "\n".join(f"{str(k).ljust(w)}  {v}" for k, v in rows)


TABLE_COLUMNS = ("file", "device", "config", "dtype", "steps", "steps/frame", "FPS DiT", "FPS DiT+VAE",
                 "first chunk, pixels (s)", "VAE decode (s/video)", "sampler memory (GiB)",
                 "sampling + decoding (GiB)", "jax")


def table_row(res: dict, name: str = "") -> dict:
  """One README table row from a bench JSON (missing measurements are '-')."""
  f = lambda x, fmt: "-" if x is None else format(x, fmt)
  mode = res.get("mode", {})
  kind = mode.get("kind")
  steps = {"steps": lambda: f"fixed {mode.get('steps')}",
           "forced_mean_steps": lambda: f"forced mean {mode['target']:g}",
           "budget_mean_steps": lambda: f"budget {mode['target']:g}", "threshold": lambda: f"tau {mode['threshold']}",
           "decode_only": lambda: "VAE only"}.get(kind, lambda: str(kind))()
  mem = res.get("memory") or {}
  sampler_mem = ((mem.get("programs") or {}).get("sampler") or {}).get("total")
  vae = res.get("vae_s") or res.get("vae") or {}
  first = ((res.get("stream") or {}).get("pixels") or {}).get("first_chunk_s")
  cfg = res.get("config")
  dtype = res.get("dtype", "-")
  # fp8 linear layers (older files say it only in their command line)
  if res.get("matmul", "fp8" if "compute.matmul=fp8" in res.get("command", "") else None) == "fp8":
    dtype += f" + fp8 ({res.get('fp8_activations', 'dynamic')})"
  return {"file": name, "device": (res.get("device") or {}).get("kind", "-"),
          "config": cfg.get("name") if isinstance(cfg, dict) else cfg, "dtype": dtype, "steps": steps,
          "steps/frame": f((res.get("steps") or {}).get("mean_per_frame"), ".3f"),
          "FPS DiT": f((res.get("fps") or {}).get("dit"), ".1f"),
          "FPS DiT+VAE": f((res.get("fps") or {}).get("dit_vae"), ".1f"),
          "first chunk, pixels (s)": f(first, ".3f"),
          "VAE decode (s/video)": f(vae.get("decode_s") if isinstance(vae, dict) else None, ".3f"),
          "sampler memory (GiB)": f(None if sampler_mem is None else sampler_mem / 2**30, ".2f"),
          "sampling + decoding (GiB)": f(None if not mem.get("sample_and_decode_bytes") else
                                         mem["sample_and_decode_bytes"] / 2**30, ".2f"),
          "jax": res.get("jax_version", "-")}


def markdown_table(paths) -> str:
  """README's benchmark table from bench JSON files, with the command that made each row under it (prefixed by the
  XLA environment variables it ran with). Other JSON files
  among them (training benches, evaluations: a folder's `*.json`) are listed as left out; none of `dsa-jax bench
  sample`'s, or a file that cannot be read, is an error."""
  rows, commands, skipped = [], [], []
  for path in paths:
    try:
      with open(path) as fh:
        res = json.load(fh)
    except (OSError, ValueError) as e:
      raise ValueError(f"bench table: {path}: not a readable bench JSON file ({e})") from None
    if not isinstance(res, dict) or "mode" not in res:
      skipped.append(os.path.basename(path))
      continue
    rows.append(table_row(res, os.path.basename(path)))
    env = "".join(f"{k}={shlex.quote(str(v))} " for k, v in sorted((res.get("environment") or {}).items()))
    commands.append(f"- `{os.path.basename(path)}`: `{env}{res.get('command', '?')}`")
  if not rows:
    raise ValueError(f"bench table: none of {', '.join(map(str, paths))} is a `dsa-jax bench sample` JSON file "
                     "(no 'mode')")
  lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "| " + " | ".join("---" for _ in TABLE_COLUMNS) + " |"]
  lines += ["| " + " | ".join(str(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
  if skipped:
    commands.append(f"\nLeft out (not `dsa-jax bench sample` JSON files): {', '.join(skipped)}")
  return "\n".join(lines + [""] + commands)


# what only the sampling bench reads: given with --decode-only they would be dropped without a word
SAMPLING_ONLY = ("steps", "threshold", "forced_mean_steps", "budget_mean_steps", "ckpt", "guidance", "no_stream",
                 "no_components")


def check_decode_only_options(args):
  """Raises naming every sampling-only option given (differing from its default) together with --decode-only."""
  from dsa_jax.cli import options_given
  given = ["--" + d.replace("_", "-") for d in options_given(args, add_arguments, SAMPLING_ONLY)]
  if given:
    raise ValueError(f"--decode-only times the VAE decoder alone on random latents and does not use "
                     f"{', '.join(given)}: drop them, or bench sampling without --decode-only")
  if args.no_vae:
    raise ValueError("--decode-only and --no-vae: the decode-only bench needs the VAE")


def main(args) -> int:
  from dsa_jax.config_lib import get_config
  # the arguments first: a run can take long, and its results must not be lost to a bad option at its end
  check_file_target(args.json, "--json")
  if args.runs < 1:
    raise ValueError(f"--runs: must be >= 1, got {args.runs}")
  if args.batch_size < 1:
    raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
  if args.decode_only:
    check_decode_only_options(args)
  config = get_config(args.config, args.overrides)
  log = lambda m: print(m, file=sys.stderr, flush=True)
  meta = _bench_meta(config, args.config, args.overrides, getattr(args, "_argv", None))
  if args.decode_only:
    res = run_decode_bench(config, runs=args.runs, batch=args.batch_size, profile_dir=args.profile, log=log)
  else:
    threshold = None
    if args.threshold is not None:
      from dsa_jax.sampling.sampler import parse_threshold
      threshold = parse_threshold(args.threshold)
    res = run_bench(config, steps=args.steps, threshold=threshold, mean_steps=args.forced_mean_steps,
                    budget_mean_steps=args.budget_mean_steps, ckpt=args.ckpt, vae=not args.no_vae, runs=args.runs,
                    batch=args.batch_size, guidance=args.guidance, do_stream=not args.no_stream,
                    do_components=not args.no_components, profile_dir=args.profile, log=log)
  res.update(meta)
  res["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
  print(format_table(res), flush=True)
  if args.json:
    from dsa_jax.sampling.outputs import write_json
    write_json(args.json, res)
    print(f"wrote {args.json}", flush=True)
  return 0
