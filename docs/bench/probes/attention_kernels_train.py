"""Probe (one H200, jax 0.11.2): is there a faster attention kernel than cuDNN's for the training step? The critic
and the teacher attend over a whole 832x480, 81-frame video (32760 tokens, 12 heads of 128, no mask); cuDNN's flash
attention takes about 60 % of the DSA step there. Compared at 32768 tokens (jax's Mosaic GPU kernel needs multiples
of its blocks): cuDNN in bf16, and jax's Mosaic GPU (FA3-style) Pallas kernel in fp16 and bf16, forward and
forward + backward, timed as calls enqueued back to back.

  python docs/bench/probes/attention_kernels_train.py      # OUT=dir for the JSON
"""
import functools, json, os, time, traceback
import numpy as np
import jax, jax.numpy as jnp
from dsa_jax.eval.profiling import median_call_s

B, L, H, D = 1, 32768, 12, 128
FWD = 4.0 * B * L * L * H * D


def timed(fn, args, reps=10):
  """Seconds per call, calls enqueued back to back."""
  return median_call_s(fn, args, reps)[0]


def fwd_bwd(att):
  def loss(q, k, v, g):
    return jnp.sum(att(q, k, v).astype(jnp.float32) * g)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def rows_for(name, att, dtype):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(kk, (B, L, H, D), dtype) for kk in ks[:3])
  g = jax.random.normal(ks[3], (B, L, H, D), jnp.float32)
  r = {"kernel": name, "dtype": np.dtype(dtype).name, "tokens": L}
  try:
    f = jax.jit(att)
    r["fwd_ms"] = 1e3 * timed(f, (q, k, v))
    r["fwd_tflops"] = FWD / r["fwd_ms"] / 1e9
    ref = jax.nn.dot_product_attention(q[:, :4096], k[:, :4096], v[:, :4096], implementation="cudnn")
    got = att(q[:, :4096], k[:, :4096], v[:, :4096])
    r["max_abs_diff_vs_cudnn_4096"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
  except Exception as e:
    r["fwd_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    traceback.print_exc()
  try:
    fb = fwd_bwd(att)
    r["fwd_bwd_ms"] = 1e3 * timed(fb, (q, k, v, g), reps=5)
    r["fwd_bwd_tflops"] = 3.5 * FWD / r["fwd_bwd_ms"] / 1e9
  except Exception as e:
    r["fwd_bwd_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    traceback.print_exc()
  print(json.dumps(r), flush=True)
  return r


rows = [rows_for("cudnn", functools.partial(jax.nn.dot_product_attention, implementation="cudnn"), jnp.bfloat16)]
try:
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
  for bq, bkv, wgs in ((64, 128, 1), (64, 128, 2), (64, 64, 2)):
    cfg = mgpu.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2, compute_wgs_bwd=wgs,
                            block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    att = functools.partial(mgpu.attention, config=cfg)
    for dt in (jnp.float16, jnp.bfloat16):
      r = rows_for(f"mosaic_gpu bq{bq} bkv{bkv} wgs_bwd{wgs}", att, dt)
      rows.append(r)
except Exception as e:
  rows.append({"kernel": "mosaic_gpu", "error": f"{type(e).__name__}: {str(e)[:400]}"})
  traceback.print_exc()
out = os.environ.get("OUT", "/tmp")
json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": [B, L, H, D], "rows": rows},
          open(os.path.join(out, "attention_kernels_train.json"), "w"), indent=1)
