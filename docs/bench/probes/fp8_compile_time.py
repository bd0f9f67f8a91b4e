"""Probe (one H200 run, jax 0.11.2): why the fp8 sampler programs compile about 3x slower than bf16's (whole video 96
s against 35 s), and whether an XLA flag changes it. One forward of the 1.3B DiT over a chunk (3 latent frames at
832x480, 4680 tokens), its 30 layers unrolled as in the sampler, compiled and timed in bf16 and with fp8 linear layers
(weights quantized beforehand, as the sampler does). Run once per XLA_FLAGS setting; prints one JSON line.

  XLA_FLAGS=... python docs/bench/probes/fp8_compile_time.py bf16|fp8
"""
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from dsa_jax.config_lib import get_config
from dsa_jax.eval.profiling import median_call_s
from dsa_jax.models import factory
from dsa_jax.models.dit import WanDiT, fp8_weights, unstack_layers


def main(mode: str):
  over = ["--config.compute.matmul=fp8"] if mode == "fp8" else []
  config = get_config("wan_1_3b", over)
  dcfg = dataclasses.replace(factory.dit_config(config), scan_layers=False)
  x, t, ctx = factory.dit_example_inputs(config, dcfg)
  params = factory.random_networks(config, ("generator",), jax.random.PRNGKey(0), exact=False)["generator"]
  variables = factory.as_variables(params)
  variables = unstack_layers(variables, dcfg.num_layers)
  variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, variables)
  if mode == "fp8":
    variables = {**variables, "fp8": fp8_weights(variables, jnp.bfloat16)}
  args = (jnp.zeros(x.shape, jnp.bfloat16), jnp.full(t.shape, 500.0), jnp.zeros(ctx.shape, jnp.bfloat16))
  fwd = jax.jit(lambda v, a, b, c: WanDiT(dcfg).apply(v, a, b, c)["velocity"])
  t0 = time.perf_counter()
  lowered = fwd.lower(variables, *args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  run_s, _ = median_call_s(compiled, (variables,) + args, reps=10)
  print(json.dumps({"mode": mode, "xla_flags": os.environ.get("XLA_FLAGS", ""), "trace_lower_s": t1 - t0,
                    "compile_s": t2 - t1, "forward_ms": 1e3 * run_s, "device": jax.devices()[0].device_kind}),
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
