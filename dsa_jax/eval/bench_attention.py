"""The DiT's self-attention timed alone at a config's shapes, in each form the model calls it.

  dsa-jax bench attention --config configs/wan_1_3b.py --json docs/bench/attention_wan_1_3b.json
  dsa-jax bench attention --config configs/tiny.py --reps 2          # CPU smoke test

Forms: 'block_causal' (the causal student over the whole video: ODE regression, the reference sampler) as the model
runs it, and as one call with the explicit (L, L) mask (on cuDNN a dense bias read over every tile, every tile
computed: what the model ran before it went per block of queries); 'full' (teacher and critic over the whole video);
'cache' (the sampler: one chunk of queries against the static KV cache, the keys past the chunk hidden by
kv_lengths) at the first, middle and last chunk. Forward, and forward + backward for the training forms. Random
inputs in the config's dtype, batch 1, the model's heads and head dim, the config's attention backend ('auto':
cuDNN on GPU). TFLOP/s count the FLOPs the mask lets through (4 Lq Lk D H forward, 2.5 times that backward); times
are per call, over --reps calls enqueued back to back (median of 3 such rounds) after a warm-up.
"""

from __future__ import annotations

import numpy as np

from dsa_jax.eval.profiling import median_call_s


def add_arguments(p):
  p.add_argument("--config", required=True, help="config whose video size and model are benchmarked")
  p.add_argument("--reps", type=int, default=10, help="calls per timed round (default 10; per call, median of 3 rounds)")
  p.add_argument("--json", default=None, help="write the results here")


def run(config, reps: int = 10, log=print) -> dict:
  import jax
  import jax.numpy as jnp

  from dsa_jax.config_lib import tokens_per_frame
  from dsa_jax.models import attention as A
  from dsa_jax.models.dit import _DTYPES
  if reps < 1:
    raise ValueError(f"--reps: must be >= 1, got {reps}")
  backend = A.resolve_backend(config.compute.attention)
  dtype = _DTYPES[config.compute.dtype]
  heads = int(config.model.num_heads)
  head_dim = int(config.model.dim) // heads
  tpf, frames, chunk = tokens_per_frame(config), int(config.video.num_frames), int(config.video.chunk_frames)
  length, block = frames * tpf, chunk * tpf
  chunks = -(-frames // chunk)
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, g = (jax.random.normal(key, (1, length, heads, head_dim), dtype) for key in (k1, k2, k3, k4))
  attend = lambda a, b, c, **kw: A.dot_product_attention(a, b, c, backend=backend, **kw)
  flop = lambda lq, lk: 4.0 * lq * lk * head_dim * heads
  causal_flops = sum(flop(min(block, length - s), min(s + block, length)) for s in range(0, length, block))

  forms = [("block_causal", "model", lambda a, b, c, m: attend(a, b, c, causal_block=block), causal_flops)]
  if backend != "splash":  # splash takes only a concrete mask, and skips masked tiles itself
    forms.append(("block_causal", "dense mask", lambda a, b, c, m: attend(a, b, c, mask=m), causal_flops))
  forms.append(("full", "", lambda a, b, c, m: attend(a, b, c), flop(length, length)))
  mask = jnp.asarray(A.block_causal_mask(frames, tpf, chunk)) if backend != "splash" else None

  rows, outs = [], {}
  for name, variant, fn, flops in forms:
    fwd = jax.jit(fn)
    s, out = median_call_s(fwd, (q, k, v, mask), reps)
    loss = lambda a, b, c, m, fn=fn: jnp.sum(fn(a, b, c, m).astype(jnp.float32) * g.astype(jnp.float32))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    s_bwd, _ = median_call_s(bwd, (q, k, v, mask), reps)
    rows.append({"form": name, "variant": variant, "q": length, "kv": length, "forward_ms": 1e3 * s,
                 "forward_tflops": flops / s / 1e12, "forward_backward_ms": 1e3 * s_bwd,
                 "forward_backward_tflops": 3.5 * flops / s_bwd / 1e12})
    outs[(name, variant)] = (out, rows[-1])
    log(f"  {name:12s} {variant:9s} {length}x{length}: forward {1e3 * s:8.3f} ms {rows[-1]['forward_tflops']:7.1f} "
        f"TFLOP/s, +backward {1e3 * s_bwd:8.3f} ms {rows[-1]['forward_backward_tflops']:7.1f} TFLOP/s")
  if ("block_causal", "dense mask") in outs:
    (model, _), (dense, dense_row) = outs[("block_causal", "model")], outs[("block_causal", "dense mask")]
    dense_row["max_abs_diff_vs_model"] = float(np.max(np.abs(np.asarray(model, np.float32) -
                                                            np.asarray(dense, np.float32))))

  cache_fn = jax.jit(lambda a, b, c, n: attend(a, b, c, kv_lengths=n))
  for i in sorted({0, chunks // 2, chunks - 1}):
    keys = min((i + 1) * block, length)
    s, _ = median_call_s(cache_fn, (q[:, :block], k, v, jnp.array([keys], jnp.int32)), reps)
    rows.append({"form": "cache", "variant": f"chunk {i}", "q": block, "kv": keys, "forward_ms": 1e3 * s,
                 "forward_tflops": flop(block, keys) / s / 1e12})
    log(f"  cache        chunk {i:<3d} {block}x{keys}: forward {1e3 * s:8.3f} ms {rows[-1]['forward_tflops']:7.1f} "
        "TFLOP/s")
  return {"kind": "attention", "backend": backend, "dtype": str(jnp.dtype(dtype)), "reps": reps, "heads": heads,
          "head_dim": head_dim, "tokens_per_frame": tpf, "rows": rows}


def format_table(res: dict) -> str:
  lines = [f"{res['device']['kind']}, {res['backend']}, {res['dtype']}, {res['heads']} heads x {res['head_dim']}: "
           f"per call, {res['reps']} calls back to back, median of 3 rounds",
           "form          variant     q x kv            forward ms  TFLOP/s   fwd+bwd ms  TFLOP/s"]
  for r in res["rows"]:
    both = (f"{r['forward_backward_ms']:10.3f} {r['forward_backward_tflops']:8.1f}"
            if "forward_backward_ms" in r else "")
    shape = f"{r['q']} x {r['kv']}"
    lines.append(f"{r['form']:12s}  {r['variant']:10s}  {shape:16s}  {r['forward_ms']:10.3f} "
                 f"{r['forward_tflops']:8.1f}   {both}")
  return "\n".join(lines)


def main(args) -> int:
  from dsa_jax.sampling.bench import run_kernel_bench
  return run_kernel_bench(args, run, format_table)
