"""The sampler sharded over 8 simulated CPU devices, and the model's activation constraints in the compiled
programs. In a subprocess, so that `XLA_FLAGS=--xla_force_host_platform_device_count=8` is set before jax starts.

The worker (this file run as a script) samples a batch of 8 on one device and over the meshes data=8,
data=2 x tensor=4 and fsdp=8 (same controls: a threshold at which frames stop at different steps), streams on one
mesh, and compiles the sampler and a training forward/backward with default and with changed activation rules; the
tests check what it reports.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from simulated_devices import eight_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"data8": {"data": 8, "fsdp": 1, "tensor": 1}, "data2_tensor4": {"data": 2, "fsdp": 1, "tensor": 4},
          "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1}}
# Per-device shapes in the compiled programs (batch 8 over data=2 -> 4; a chunk of 2 frames is 48 tokens, the video
# 96; dim 192, FFN 512, 4 heads over tensor=4).
FFN_LOCAL, FFN_FULL = "f32[4,48,128]", r"f32\[\d+,48,512\]"
SEQUENCE_SHARDED = {"sample": "f32[4,12,192]", "train": "f32[4,24,192]"}  # the residual, tokens over tensor=4


def _worker(out_path: str):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dsa_jax.config_lib import get_config
  from dsa_jax.models import factory
  from dsa_jax.models.dit import WanDiT
  from dsa_jax.parallel import mesh as mesh_lib
  from dsa_jax.sampling import sampler as S
  from dsa_jax.sampling import stream as ST
  from dsa_jax.sampling.decode import PixelDecoder

  assert len(jax.devices()) == 8, jax.devices()
  spec_json = lambda spec: [a if a is None or isinstance(a, str) else list(a) for a in spec]
  cfg = get_config(os.path.join(ROOT, "configs", "tiny.py"), ["--config.video.num_frames=4"])
  ctx = np.random.RandomState(0).standard_normal((8, 8, 32)).astype(np.float32)
  report = {}

  one = S.make_sampler(cfg, mesh=mesh_lib.make_mesh(cfg, devices=jax.devices()[:1],
                                                    shape={"data": 1, "fsdp": 1, "tensor": 1}))
  params = one.init_params(jax.random.PRNGKey(0))
  probe = one.sample(params, ctx, one.make_controls(8, threshold=np.inf, seed=3))
  tau = float(np.median(np.asarray(probe.conf_trace)[:, :, 0]))
  controls = lambda s, t: s.make_controls(8, threshold=t, seed=3)
  ref = jax.device_get(one.sample(params, ctx, controls(one, tau)))
  report["ref_steps"] = ref.steps.tolist()
  report["ref_chunk_iters"] = ref.chunk_iters.tolist()

  for name, shape in MESHES.items():
    sm = S.make_sampler(cfg, mesh=mesh_lib.make_mesh(cfg, shape=shape))
    r = report[name] = {}
    r["per_device"] = sm.runs_per_device(8, use_cfg=False)
    if name == "data8":  # loops per device: no collective decides when a loop ends
      sm.compile(params, ctx, controls(sm, tau))
      hlo = next(iter(sm._compiled.values())).as_text()
      in_loop = r'(all-reduce|all-gather|collective-permute)\(.*op_name="[^"]*/while/'
      r["loop_collectives"] = len(re.findall(in_loop, hlo))
      r["all_reduces"] = len(re.findall(r"all-reduce\(", hlo))
    if name == "data2_tensor4":
      sm.compile(params, ctx, controls(sm, tau))
      hlo = next(iter(sm._compiled.values())).as_text()
      r["all_gathers"] = len(re.findall(r"all-gather\(", hlo))
      r["ffn_local"] = hlo.count(FFN_LOCAL)
      r["ffn_full"] = len(re.findall(FFN_FULL, hlo))
      r["sequence_sharded"] = hlo.count(SEQUENCE_SHARDED["sample"])
    out = sm.sample(params, ctx, controls(sm, tau))
    r["latents_spec"] = spec_json(out.latents.sharding.spec)
    r["max_diff"] = float(np.abs(np.asarray(out.latents) - ref.latents).max())
    r["steps_equal"] = bool((np.asarray(out.steps) == ref.steps).all())
    r["chunk_iters"] = np.asarray(out.chunk_iters).tolist()
    cache = sm.new_cache(8)
    r["cache_spec"] = spec_json(cache["k"].sharding.spec)
    r["ffn_in_spec"] = spec_json(sm.param_shardings["generator"]["params"]["blocks"]["ffn_in"]["kernel"].spec)
    traces, programs = sm.trace_counts["program"], len(sm._mesh_jits) + len(sm._compiled)
    for t in (tau + 0.2, np.inf):
      jax.block_until_ready(sm.sample(params, ctx, controls(sm, t)))
    r["retraced"] = sm.trace_counts["program"] - traces
    r["new_programs"] = len(sm._mesh_jits) + len(sm._compiled) - programs
    if name == "data2_tensor4":
      # Decoding the sampler's latents: split over the batch, each device decodes its own videos; replicated (as
      # under tensor parallelism), gathered onto one device and decoded by the single-device program (not compiled
      # again). The same pixels as from host latents either way.
      decoder = PixelDecoder.random(cfg)
      host = np.concatenate(list(decoder.decode_chunks_to_host(np.asarray(out.latents), uint8=True)), axis=1)
      compiled = decoder._decode_chunk_uint8._cache_size()
      replicated = jax.device_put(out.latents, jax.sharding.NamedSharding(sm.mesh, jax.sharding.PartitionSpec()))
      rep = np.concatenate(list(decoder.decode_chunks_to_host(replicated, uint8=True)), axis=1)
      r["decode_replicated_new_programs"] = decoder._decode_chunk_uint8._cache_size() - compiled
      px, _ = decoder.decode_chunk(out.latents[:, :2], None, first=True, uint8=True)
      r["decode_sharded_spec"] = spec_json(px.sharding.spec)
      by_batch = np.concatenate(list(decoder.decode_chunks_to_host(out.latents, uint8=True)), axis=1)
      r["decode_equal"] = bool(np.array_equal(rep, host) and np.array_equal(by_batch, host))
      # vae.split_height: one video's rows split over all 8 devices (latent height 8: one row each) instead of
      # gathered onto one.
      cfg_rows = cfg.copy_and_resolve_references()
      cfg_rows.vae.split_height = True
      by_rows_decoder = PixelDecoder.random(cfg_rows)
      by_rows = np.concatenate(list(by_rows_decoder.decode_chunks_to_host(replicated, uint8=True)), axis=1)
      r["decode_rows_max_diff"] = int(np.abs(by_rows.astype(int) - host.astype(int)).max())
      px, _ = by_rows_decoder.decode_chunk(replicated[:, :2], None, first=True, uint8=True)
      r["decode_rows_spec"] = spec_json(px.sharding.spec)
      streamed = ST.collect(ST.stream(sm, params, ctx, controls(sm, tau)))
      r["stream_max_diff"] = float(np.abs(streamed["latents"] - ref.latents).max())
      r["stream_steps_equal"] = bool((streamed["steps"] == ref.steps).all())

  # The TPU attention kernel (Pallas interpret mode) per shard on the mesh gives the same video.
  cfg_splash = cfg.copy_and_resolve_references()
  cfg_splash.compute.update(attention="splash", splash_interpret=True)
  sm = S.make_sampler(cfg_splash, mesh=mesh_lib.make_mesh(cfg, shape=MESHES["data2_tensor4"]))
  out = jax.device_get(sm.sample(params, ctx, controls(sm, tau)))
  report["splash_max_diff"] = float(np.abs(out.latents - ref.latents).max())
  report["splash_steps_equal"] = bool((out.steps == ref.steps).all())

  # The unrolled DiT over one cache buffer per layer, on the same mesh: each buffer sharded like the stacked cache.
  cfg_unrolled = cfg.copy_and_resolve_references()
  cfg_unrolled.sampling.unroll_layers = True
  sm = S.make_sampler(cfg_unrolled, mesh=mesh_lib.make_mesh(cfg, shape=MESHES["data2_tensor4"]))
  out = jax.device_get(sm.sample(params, ctx, controls(sm, tau)))
  report["unrolled"] = {"max_diff": float(np.abs(out.latents - ref.latents).max()),
                        "steps_equal": bool((out.steps == ref.steps).all()),
                        "cache_specs": [spec_json(a.sharding.spec) for a in sm.new_cache(8)["v"]]}

  # fp8 layers with calibrated activation scales on the same mesh: a calibration carried with the weights is placed
  # (replicated) with them. (Calibrating and sampling there was checked by hand; it costs a compile too many here.)
  cfg_fp8 = cfg.copy_and_resolve_references()
  cfg_fp8.compute.update(matmul="fp8", fp8_activations="calibrated")
  sm = S.make_sampler(cfg_fp8, mesh=mesh_lib.make_mesh(cfg, shape=MESHES["data2_tensor4"]))
  layers = cfg.model.num_layers
  amax = {"blocks": {"self_attn": {n: np.ones(layers, np.float32) for n in "qkvo"},
                     "cross_attn": {n: np.ones(layers, np.float32) for n in "qkvo"},
                     "ffn_in": np.ones(layers, np.float32), "ffn_out": np.ones(layers, np.float32)}}
  carried = {**params, "generator": {**params["generator"], "fp8_amax": amax}}
  args, _ = sm.prepare(carried, ctx, controls(sm, np.inf))
  report["fp8_calibration_placed"] = [spec_json(a.sharding.spec) for a in
                                      jax.tree_util.tree_leaves(args[0]["generator"]["fp8_amax"])]

  # Changed rules: activations' tokens over 'tensor' (sequence parallelism). Only effective constraints can make
  # the compiled programs hold the residual stream that way.
  rules = tuple((n, "tensor" if n == "activation_length" else a) for n, a in mesh_lib.rules_from_config(cfg))
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.mesh.rules = rules
  mesh = mesh_lib.make_mesh(cfg, shape=MESHES["data2_tensor4"])
  sm = S.make_sampler(cfg2, mesh=mesh)
  sm.compile(params, ctx, controls(sm, tau))
  report["changed_rules_sample"] = next(iter(sm._compiled.values())).as_text().count(SEQUENCE_SHARDED["sample"])

  # A training forward/backward (block-causal over the video, as ODE regression) on the same mesh.
  dcfg = factory.dit_config(cfg, "model")
  model = WanDiT(dcfg)
  x = np.random.RandomState(1).standard_normal((8, 4, 8, 12, 4)).astype(np.float32)
  t = np.full((8, 4), 500.0, np.float32)

  def train_hlo(rules, constraints):
    p_sh = mesh_lib.param_shardings(factory.abstract_dit_params(dcfg, cfg), mesh, rules)
    b_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    loss = lambda p, x, t, c: jnp.mean(jnp.square(model.apply(p, x, t, c, chunk_frames=2)["velocity"] - x))
    fn = jax.jit(jax.grad(loss), in_shardings=(p_sh, b_sh, b_sh, b_sh), out_shardings=p_sh)
    with mesh_lib.activation_context(mesh, rules, model_constraints=constraints):
      return fn.lower(params["generator"], x, t, ctx).compile().as_text()

  hlo = train_hlo(rules, True)
  report["changed_rules_train"] = hlo.count(SEQUENCE_SHARDED["train"])
  report["changed_rules_train_off"] = train_hlo(rules, False).count(SEQUENCE_SHARDED["train"])
  with open(out_path, "w") as f:
    json.dump(report, f)
  print(json.dumps(report))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("sampler_multidevice") / "report.json"
  env = eight_device_env()
  res = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_sample_equals_single_device(report, name):
  r = report[name]
  assert len({s for row in report["ref_steps"] for s in row}) > 1  # frames stop at different steps
  assert r["steps_equal"], name
  assert r["max_diff"] < 1e-4, (name, r["max_diff"])
  assert r["retraced"] == 0 and r["new_programs"] == 0  # thresholds are traced: no recompilation
  assert r["chunk_iters"] == report["ref_chunk_iters"]  # per device or not: the most iterations any frame needed


def test_data_parallel_sampler_runs_its_loops_per_device(report):
  """Only on a data-only mesh: each device's loops read its own frames (the one all-reduce left is the per-chunk
  iteration counts' maximum, after the loops); fsdp and tensor parallelism keep the devices stepping together."""
  assert report["data8"]["per_device"] and not report["fsdp8"]["per_device"]
  assert not report["data2_tensor4"]["per_device"]
  assert report["data8"]["loop_collectives"] == 0 and report["data8"]["all_reduces"] == 1, report["data8"]


def test_placements(report):
  assert report["data8"]["latents_spec"][0] == "data"
  assert report["fsdp8"]["latents_spec"][0] == "fsdp"
  assert report["data2_tensor4"]["latents_spec"][0] == "data"
  # KV cache (layers, batch, tokens, heads, head_dim): batch over data x fsdp, heads over tensor
  assert report["data8"]["cache_spec"] == [None, "data", None, None, None]
  assert report["fsdp8"]["cache_spec"] == [None, "fsdp", None, None, None]
  assert report["data2_tensor4"]["cache_spec"] == [None, "data", None, "tensor", None]
  # weights by the training rules: FSDP over the model dim, tensor parallelism over the FFN hidden dim
  assert report["fsdp8"]["ffn_in_spec"] == [None, "fsdp", None]
  assert report["data2_tensor4"]["ffn_in_spec"] == [None, None, "tensor"]


def test_unrolled_layers_on_a_mesh(report):
  r = report["unrolled"]
  assert r["steps_equal"] and r["max_diff"] < 1e-4, r["max_diff"]
  assert r["cache_specs"] and all(s == ["data", None, "tensor", None] for s in r["cache_specs"]), r["cache_specs"]


def test_streaming_on_a_mesh(report):
  r = report["data2_tensor4"]
  assert r["stream_steps_equal"] and r["stream_max_diff"] < 1e-4


def test_decoding_sharded_latents(report):
  r = report["data2_tensor4"]
  assert r["decode_equal"] and r["decode_replicated_new_programs"] == 0, r
  assert r["decode_sharded_spec"][0] == "data", r  # each device decoded its own videos
  # split over its rows, one video's pixels are those of the one-device decode (up to one level of rounding)
  rows = r["decode_rows_spec"][2]
  assert {"data", "tensor"} <= set([rows] if isinstance(rows, str) else rows), r["decode_rows_spec"]
  assert r["decode_rows_max_diff"] <= 1, r["decode_rows_max_diff"]


def test_fp8_calibration_placed_on_a_mesh(report):
  placed = report["fp8_calibration_placed"]
  assert len(placed) == 10 and all(all(a is None for a in spec) for spec in placed), placed  # replicated


def test_splash_kernel_per_shard(report):
  assert report["splash_steps_equal"] and report["splash_max_diff"] < 1e-4, report["splash_max_diff"]


def test_activation_shardings_in_compiled_programs(report):
  r = report["data2_tensor4"]
  # tensor parallelism: the FFN hidden layer stays split over 'tensor', never gathered whole; no all-gathers at all
  assert r["ffn_local"] > 0 and r["ffn_full"] == 0 and r["all_gathers"] == 0, r
  assert r["sequence_sharded"] == 0  # default rules: the residual stream is not split over its tokens
  # Rules that split it: the sampler and the training backward hold it split (the constraints take effect) ...
  assert report["changed_rules_sample"] > 0
  assert report["changed_rules_train"] > 0
  # ... which sharding propagation alone does not do
  assert report["changed_rules_train_off"] == 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1])
