"""Probe (one H200, jax 0.11.2): can the VAE decode of one chunk run on a second GPU stream while the DiT denoises
the next chunk, inside one XLA program, and does it save time? XLA's stream annotation (`compute_on('gpu_stream:1')`
around a jitted call) needs `--xla_gpu_experimental_stream_annotation=true`, which this probe sets.

Measured (calls enqueued back to back): a synthetic pair (two matmul chains) as a check of the mechanism; then the
1.3B sampler's per-chunk step (chunk 3 of 7 at forced 3 steps, cache fill included; random weights) and the Wan VAE's
decode of one 3-latent-frame chunk (random weights, uint8 out): each alone, both in one program, and both in one
program with the decode on stream 1.

  python docs/bench/probes/vae_stream_overlap.py      # OUT=dir for the JSON
"""
import json, os, sys, time, traceback
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_experimental_stream_annotation=true"
                           " --xla_gpu_enable_triton_gemm=false").strip()
import numpy as np
import jax, jax.numpy as jnp
from dsa_jax.eval.profiling import median_call_s
from jax.experimental import compute_on as compute_on_lib


def on_stream1(f):
  """f as a call on GPU stream 1: jax >= 0.11 spells compute_on as a function transform, older jax as a context."""
  import inspect
  if "out_memory_spaces" in inspect.signature(compute_on_lib.compute_on).parameters:
    return compute_on_lib.compute_on(f, compute_type="gpu_stream:1", out_memory_spaces=jax.memory.Space.Device)
  return compute_on_lib.compute_on("gpu_stream:1")(jax.jit(f))

OUT = os.environ.get("OUT", "/tmp")
res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "xla_flags": os.environ["XLA_FLAGS"]}


def timed(fn, args, reps=10):
  """Milliseconds per call, calls enqueued back to back."""
  return 1e3 * median_call_s(fn, args, reps)[0]


def save():
  json.dump(res, open(os.path.join(OUT, "vae_stream_overlap.json"), "w"), indent=1)
  print(json.dumps(res), flush=True)


# 1) The mechanism: two independent matmul chains.
def chain(x, w):
  for _ in range(8):
    x = jnp.tanh(x @ w)
  return x

N = int(os.environ.get("PROBE_N", 8192))
try:
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  a, wa = (jax.random.normal(k, (N, N), jnp.bfloat16) for k in ks[:2])
  b, wb = (jax.random.normal(k, (N, N), jnp.bfloat16) for k in ks[2:])
  one = jax.jit(chain)
  on1 = on_stream1(chain)
  both = jax.jit(lambda a, wa, b, wb: (chain(a, wa), chain(b, wb)))
  both_streams = jax.jit(lambda a, wa, b, wb: (chain(a, wa), on1(b, wb)))
  txt = both_streams.lower(a, wa, b, wb).compile().as_text()
  res["synthetic"] = {"one_ms": timed(one, (a, wa)), "both_ms": timed(both, (a, wa, b, wb)),
                      "both_streams_ms": timed(both_streams, (a, wa, b, wb)),
                      "annotated": "_xla_stream_annotation" in txt, "call_start": "call-start" in txt}
except Exception as e:
  res["synthetic"] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
  traceback.print_exc()
save()

# 2) The sampler's chunk step and the VAE's chunk decode.
from dsa_jax import config_lib
from dsa_jax.checkpoint.loading import cast_params_for_inference
from dsa_jax.models import factory
from dsa_jax.models.dit import _DTYPES
from dsa_jax.sampling import sampler as sampler_lib
from dsa_jax.sampling.decode import PixelDecoder, pixels_to_uint8

config = config_lib.get_config(os.environ.get("PROBE_CONFIG", "wan_1_3b"))
sampler = sampler_lib.make_sampler(config)
params = factory.random_networks(config, ("generator", "head"), jax.random.PRNGKey(0), exact=False)
params["generator"] = cast_params_for_inference(params["generator"], _DTYPES[config.compute.dtype])
dcfg = sampler.dcfg
context = np.random.RandomState(0).standard_normal((1, dcfg.text_len, dcfg.text_dim)).astype(np.float32)
controls = sampler.make_controls(1, threshold=np.inf, min_steps=3, max_steps=3, seed=0)
args, use_cfg = sampler.prepare(params, context, controls)
p, ctx, unc, ctl, rng, cache, cond = args
chunk = np.int32(min(3, sampler.num_chunks - 1))

dec = PixelDecoder.random(config)
vae, vparams = dec.vae, dec.vae_params
z = jnp.asarray(np.random.RandomState(1).standard_normal((1, 3) + dec.latent_hw + (dec.latent_channels,)), jnp.float32)
_, vcache = jax.jit(lambda vp, z: vae.decode_chunk(vp, z, None, first=True))(vparams, z)


def dit(p, ctx, ctl, rng, cache):
  return sampler._chunk_step(p, ctx, None, ctl, rng, cache, chunk, None, use_cfg=False, fill=True)


def vae_chunk(vp, z, vc):
  px, vc = vae.decode_chunk(vp, z, vc, first=False)
  return pixels_to_uint8(px), vc


vae_on1 = on_stream1(vae_chunk)
progs = {
    "dit_ms": jax.jit(dit),
    "vae_ms": jax.jit(vae_chunk),
    "both_ms": jax.jit(lambda p, ctx, ctl, rng, cache, vp, z, vc: (dit(p, ctx, ctl, rng, cache), vae_chunk(vp, z, vc))),
    "both_streams_ms": jax.jit(lambda p, ctx, ctl, rng, cache, vp, z, vc: (dit(p, ctx, ctl, rng, cache),
                                                                       vae_on1(vp, z, vc))),
}
real = {}
for name, fn in progs.items():
  a = {"dit_ms": (p, ctx, ctl, rng, cache), "vae_ms": (vparams, z, vcache)}.get(
      name, (p, ctx, ctl, rng, cache, vparams, z, vcache))
  try:
    t0 = time.perf_counter()
    txt = fn.lower(*a).compile().as_text()
    real[name.replace("_ms", "_compile_s")] = time.perf_counter() - t0
    if name == "both_streams_ms":
      real["annotated"] = "_xla_stream_annotation" in txt
    real[name] = timed(fn, a, reps=5)
  except Exception as e:
    real[name.replace("_ms", "_error")] = f"{type(e).__name__}: {str(e)[:600]}"
    traceback.print_exc()
  res["chunk"] = real
  save()
if "both_streams_ms" in real:
  o1 = progs["both_ms"](p, ctx, ctl, rng, cache, vparams, z, vcache)
  o2 = progs["both_streams_ms"](p, ctx, ctl, rng, cache, vparams, z, vcache)
  real["same_pixels"] = bool(np.array_equal(np.asarray(o1[1][0]), np.asarray(o2[1][0])))
  real["same_latents"] = bool(np.array_equal(np.asarray(o1[0][0].latents), np.asarray(o2[0][0].latents)))
  save()
