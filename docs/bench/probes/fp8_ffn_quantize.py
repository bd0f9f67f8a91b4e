"""Probe (one H200 run, jax 0.11.2): what the calibrated fp8 FFN's GELU + float8 quantize kernel costs, and which
form of the quantization is cheapest. One FFN of the 1.3B DiT at a chunk's 4680 tokens (1536 -> 8960 -> 1536), its
weights quantized once, its activations with calibrated power-of-two scales (what the sampler runs), in variants of
the quantizing of the GELU output:
  current       the library's `quantize_fp8_static` (float32 multiply, clip to +-448, convert);
  bf16          multiply and clip in bfloat16, then convert bfloat16 -> float8;
  f16           through float16 (Hopper converts f16 pairs to e4m3 pairs in one instruction);
  no_clip       float32 multiply and convert without the clip (unsafe: NaN past the range; what the clip costs);
  rows_4688     the current form on 4688 tokens (a multiple of 16: no padding inside the quantizing pass);
  bf16_ffn      the FFN in bfloat16 (reference).
Each variant also alone as the elementwise part (GELU + quantize of a fixed bf16 hidden). Timing: calls enqueued
back to back (`profiling.median_call_s`).

  python docs/bench/probes/fp8_ffn_quantize.py      # OUT=dir for the JSON
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.eval.profiling import median_call_s
from dsa_jax.models import layers

ROWS, DIM, FFN = 4680, 1536, 8960
FP8 = jnp.float8_e4m3fn
REPS = int(os.environ.get("REPS", "50"))


def quantizers():
  def current(g, s):
    return layers.quantize_fp8_static(g, s)

  def bf16(g, s):
    inv = (1.0 / s).astype(jnp.bfloat16)
    return jnp.clip(g.astype(jnp.bfloat16) * inv, -layers.FP8_MAX, layers.FP8_MAX).astype(FP8)

  def f16(g, s):
    inv = (1.0 / s).astype(jnp.float16)
    return jnp.clip(g.astype(jnp.float16) * inv, -layers.FP8_MAX, layers.FP8_MAX).astype(FP8)

  def no_clip(g, s):
    return (g.astype(jnp.float32) * (1.0 / s)).astype(FP8)

  return {"current": current, "bf16": bf16, "f16": f16, "no_clip": no_clip}


def fp8_dot(q, qw, s_prod, rows):
  return (jax.lax.dot(q, qw, preferred_element_type=jnp.bfloat16) * s_prod.astype(jnp.bfloat16))[:rows]


def main():
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  w1 = 0.02 * jax.random.normal(ks[0], (DIM, FFN), jnp.float32)
  w2 = 0.02 * jax.random.normal(ks[1], (FFN, DIM), jnp.float32)
  b1, b2 = jnp.zeros((FFN,), jnp.bfloat16), jnp.zeros((DIM,), jnp.bfloat16)
  (q1, s1), (q2, s2) = layers.quantize_fp8(w1), layers.quantize_fp8(w2)
  x_full = jax.random.normal(ks[2], (ROWS + 8, DIM), jnp.bfloat16)
  # calibrated activation scales: one power of two above the amax of a forward (what calibration would record)
  scale = lambda a: jnp.exp2(jnp.ceil(jnp.log2(layers.FP8_CALIBRATION_HEADROOM * a / layers.FP8_MAX)))
  h_ref = jax.nn.gelu(x_full[:ROWS] @ w1.astype(jnp.bfloat16) + b1, approximate=True)
  sx1, sx2 = scale(jnp.abs(x_full).max().astype(jnp.float32)), scale(jnp.abs(h_ref).max().astype(jnp.float32))

  def ffn(quant, rows):
    def f(x):
      pad = -rows % layers.FP8_ROW_MULTIPLE
      xq = layers.quantize_fp8_static(jnp.pad(x, ((0, pad), (0, 0))), sx1)
      h = jax.nn.gelu(fp8_dot(xq, q1, sx1 * s1, rows) + b1, approximate=True)
      gq = quant(jnp.pad(h, ((0, pad), (0, 0))), sx2)
      return fp8_dot(gq, q2, sx2 * s2, rows) + b2
    return jax.jit(f)

  def elementwise(quant, rows):
    def f(hpre):
      pad = -rows % layers.FP8_ROW_MULTIPLE
      return quant(jnp.pad(jax.nn.gelu(hpre, approximate=True), ((0, pad), (0, 0))), sx2)
    return jax.jit(f)

  bf16_ffn = jax.jit(lambda x: jax.nn.gelu(x @ w1.astype(jnp.bfloat16) + b1, approximate=True)
                     @ w2.astype(jnp.bfloat16) + b2)
  hpre_full = (x_full @ w1.astype(jnp.bfloat16) + b1)
  rows_out = {}
  ref_ms, ref_out = median_call_s(bf16_ffn, (x_full[:ROWS],), reps=REPS)
  rows_out["bf16_ffn"] = {"ffn_ms": 1e3 * ref_ms}
  cur_out = None
  cases = [(name, q, ROWS) for name, q in quantizers().items()] + [("rows_4688", quantizers()["current"], ROWS + 8)]
  for name, quant, rows in cases:
    t, out = median_call_s(ffn(quant, rows), (x_full[:rows],), reps=REPS)
    te, eo = median_call_s(elementwise(quant, rows), (hpre_full[:rows],), reps=REPS)
    out = np.asarray(out[:ROWS], np.float32)
    r = {"ffn_ms": 1e3 * t, "gelu_quantize_ms": 1e3 * te,
         "rel_err_vs_bf16": float(np.linalg.norm(out - np.asarray(ref_out, np.float32)) /
                                  np.linalg.norm(np.asarray(ref_out, np.float32))),
         "finite": bool(np.isfinite(out).all())}
    if name == "current":
      cur_out = out
    elif rows == ROWS:
      r["rel_diff_vs_current"] = float(np.linalg.norm(out - cur_out) / np.linalg.norm(cur_out))
    rows_out[name] = r
    print(name, json.dumps(r), flush=True)
  print("bf16_ffn", json.dumps(rows_out["bf16_ffn"]))
  bytes_moved = ROWS * FFN * (2 + 1)  # read the bf16 hidden, write float8
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": ROWS, "dim": DIM, "ffn": FFN,
         "elementwise_bytes": bytes_moved, "variants": rows_out}
  out_dir = os.environ.get("OUT", os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(out_dir, "fp8_ffn_quantize.json"), "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
