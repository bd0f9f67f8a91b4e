"""Probe (one H200 run, jax 0.11.2): does XLA run fp8 (e4m3) convolutions of the VAE decoder's folded shapes
through cuDNN's fp8 graph convolution, and are they faster than bf16? Each variant: whether the compiled HLO has the
fp8 graph conv ("graph"), median ms of 15 calls, TFLOP/s. Result: rewritten, but slower than bf16
(docs/bench/probes/vae_fp8_convs.json).

  python docs/bench/probes/vae_fp8_convs.py      # OUT=dir for the JSON
"""
import json, time, os
import numpy as np
import jax, jax.numpy as jnp
F8 = jnp.float8_e4m3fn
dn = ("NHWC", "HWIO", "NHWC")
def conv(x, w, pet=None):
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dn, preferred_element_type=pet)
variants = {
  "f8_direct_f32out": lambda x, w, s: conv(x, w, jnp.float32),
  "f8_direct_bf16out": lambda x, w, s: conv(x, w, jnp.bfloat16),
  "wide_f32": lambda x, w, s: conv(x.astype(jnp.float32), w.astype(jnp.float32)),
  "wide_f32_scaled": lambda x, w, s: conv(x.astype(jnp.float32) * s, w.astype(jnp.float32) * s),
  "wide_f32_scaled_bf16cast": lambda x, w, s: conv(x.astype(jnp.float32) * s,
                                                   w.astype(jnp.float32) * s).astype(jnp.bfloat16),
  "wide_bf16": lambda x, w, s: conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
  "wide_bf16_scaled": lambda x, w, s: conv(x.astype(jnp.bfloat16) * s.astype(jnp.bfloat16),
                                           w.astype(jnp.bfloat16) * s.astype(jnp.bfloat16)),
}
res = {}
for shape in [(12, 240, 416, 576, 192), (12, 480, 832, 288, 96)]:
  n, h, w_, ci, co = shape
  x = jax.random.normal(jax.random.PRNGKey(0), (n, h, w_, ci)).astype(F8)
  w = (jax.random.normal(jax.random.PRNGKey(1), (3, 3, ci, co)) * 4).astype(F8)
  s = jnp.float32(0.5)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  for name, f in list(variants.items()) + [("bf16_baseline", None)]:
    try:
      if f is None:
        fn = jax.jit(lambda a, b: conv(a, b)); args = (xb, wb)
      else:
        fn = jax.jit(f); args = (x, w, s)
      txt = fn.lower(*args).compile().as_text()
      graph = "convForwardGraph" in txt
      jax.block_until_ready(fn(*args)); ts = []
      for _ in range(15):
        t = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t)
      ms = 1e3 * float(np.median(ts))
      flops = 2 * n * h * w_ * 9 * ci * co
      r = {"graph": graph, "ms": ms, "tflops": flops / ms / 1e9}
    except Exception as e:
      r = {"error": str(e)[:300]}
    res[f"{shape}/{name}"] = r
    print(shape, name, r, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "fp8probe.json"), "w"), indent=1)
