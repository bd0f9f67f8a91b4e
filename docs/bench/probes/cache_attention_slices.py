"""Probe (one H200 run, jax 0.11.2): does the sampler's static-shape KV cache cost cuDNN attention time? For each
chunk of an 832x480, 81-frame video: the chunk's queries against the whole padded cache with key lengths (what the
sampler runs), against exactly the keys it sees (sliced outside the program), the same with key lengths, and the
cache cut to those keys inside a program by `lax.switch` over the chunk index. Timing: calls enqueued back to back,
one wait at the end (per-call waits would add the host's 0.2-0.8 ms: the `padded_kvlen_synced_ms` column). Result:
no cost (docs/bench/probes/cache_attention_slices.json).

  python docs/bench/probes/cache_attention_slices.py      # OUT=dir for the JSON
"""
import json, os, time, functools
import numpy as np
import jax, jax.numpy as jnp
T, C, H, D, N = 1560, 3, 12, 128, 7
block, length = C * T, N * C * T
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(ks[0], (1, block, H, D), jnp.bfloat16)
k = jax.random.normal(ks[1], (1, length, H, D), jnp.bfloat16)
v = jax.random.normal(ks[2], (1, length, H, D), jnp.bfloat16)
att = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
def per_call(fn, args, reps=30, rounds=3):
  jax.block_until_ready(fn(*args))
  res = []
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    res.append((time.perf_counter() - t) / reps)
  return float(np.median(res))
def sync_call(fn, args, reps=15):
  jax.block_until_ready(fn(*args)); ts = []
  for _ in range(reps):
    t = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t)
  return float(np.median(ts))
padded = jax.jit(lambda a, b, c, n: att(a, b, c, key_value_seq_lengths=n))
exact = jax.jit(lambda a, b, c: att(a, b, c))
exact_len = jax.jit(lambda a, b, c, n: att(a, b, c, key_value_seq_lengths=n))
def branch(n):
  return lambda a, b, c: att(a, b[:, :n], c[:, :n])
switched = jax.jit(lambda a, b, c, i: jax.lax.switch(i, [branch((j + 1) * block) for j in range(N)], a, b, c))
def branch_len(n):
  return lambda a, b, c, m: att(a, b[:, :n], c[:, :n], key_value_seq_lengths=m)
switched_len = jax.jit(lambda a, b, c, i, m: jax.lax.switch(i, [branch_len((j + 1) * block) for j in range(N)], a, b, c, m))
rows = []
ref = None
for i in range(N):
  keys = (i + 1) * block
  n = jnp.array([keys], jnp.int32)
  kk, vv = k[:, :keys], v[:, :keys]
  r = {"chunk": i, "keys": keys,
       "padded_kvlen_ms": 1e3 * per_call(padded, (q, k, v, n)),
       "padded_kvlen_synced_ms": 1e3 * sync_call(padded, (q, k, v, n)),
       "exact_ms": 1e3 * per_call(exact, (q, kk, vv)),
       "exact_kvlen_ms": 1e3 * per_call(exact_len, (q, kk, vv, n)),
       "switch_ms": 1e3 * per_call(switched, (q, k, v, jnp.int32(i))),
       "switch_kvlen_ms": 1e3 * per_call(switched_len, (q, k, v, jnp.int32(i), n))}
  a = np.asarray(padded(q, k, v, n), np.float32); b = np.asarray(switched(q, k, v, jnp.int32(i)), np.float32)
  r["max_abs_diff"] = float(np.abs(a - b).max())
  fl = 4.0 * block * keys * D * H
  r["padded_tflops"] = fl / r["padded_kvlen_ms"] / 1e9
  r["exact_tflops"] = fl / r["exact_ms"] / 1e9
  rows.append(r); print(json.dumps(r), flush=True)
tot = {kk: sum(r[kk] for r in rows) for kk in rows[0] if kk.endswith("_ms")}
print("sum over 7 chunks (ms):", json.dumps(tot))
out = os.environ.get("OUT", "/tmp")
json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows, "sum_ms": tot},
          open(os.path.join(out, "cache_attention_slices.json"), "w"), indent=1)
