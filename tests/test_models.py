"""The causal Wan DiT and the confidence head: shapes, causality, KV-cache equivalence, per-frame timesteps, sizes."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.config_lib import get_config, latent_hw, tokens_per_frame
from dsa_jax.models import factory
from dsa_jax.models.attention import block_causal_mask, dot_product_attention, resolve_backend
from dsa_jax.models.confidence import ConfidenceConfig, ConfidenceHead
from dsa_jax.models.dit import WanDiT, init_cache


def _inputs(config, batch=2, seed=0):
  lh, lw = latent_hw(config)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  f = config.video.num_frames
  x = jax.random.normal(k1, (batch, f, lh, lw, config.model.in_channels))
  t = jax.random.uniform(k2, (batch, f), minval=0.0, maxval=1000.0)
  ctx = jax.random.normal(k3, (batch, config.model.text_len, config.model.text_dim))
  return x, t, ctx


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "loop"])
def model(request, tiny_config):
  dcfg = dataclasses.replace(factory.dit_config(tiny_config), scan_layers=request.param)
  params = nn.unbox(factory.init_dit(dcfg, tiny_config, jax.random.PRNGKey(1)))
  m = WanDiT(dcfg)
  fwd = jax.jit(lambda p, x, t, c: m.apply(p, x, t, c, chunk_frames=tiny_config.video.chunk_frames))
  return dcfg, params, m, fwd


def test_shapes_and_dtypes(tiny_config, model):
  dcfg, params, m, fwd = model
  x, t, ctx = _inputs(tiny_config)
  out = fwd(params, x, t, ctx)
  assert out["velocity"].shape == x.shape and out["velocity"].dtype == jnp.float32
  assert out["features"].shape == (2, x.shape[1], tokens_per_frame(tiny_config), dcfg.dim)
  assert np.all(np.isfinite(out["velocity"]))
  assert float(jnp.std(out["velocity"])) > 1e-3  # not a degenerate (e.g. zero-initialised) output


def test_bf16_compute_keeps_fp32_params(tiny_config):
  config = get_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"),
                      ["--config.compute.dtype=bfloat16"])
  dcfg = factory.dit_config(config)
  params = nn.unbox(factory.init_dit(dcfg, config, jax.random.PRNGKey(0)))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  x, t, ctx = _inputs(config, batch=1)
  out = WanDiT(dcfg).apply(params, x, t, ctx, chunk_frames=2)
  assert out["velocity"].dtype == jnp.float32 and out["features"].dtype == jnp.bfloat16
  ref = WanDiT(dataclasses.replace(dcfg, dtype=jnp.float32)).apply(params, x, t, ctx, chunk_frames=2)["velocity"]
  rel = float(jnp.linalg.norm(out["velocity"] - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 5e-2


def test_causality(tiny_config, model):
  """Changing frames (and timesteps) of a later chunk leaves every output of earlier chunks unchanged."""
  _, params, _, fwd = model
  x, t, ctx = _inputs(tiny_config)
  c = tiny_config.video.chunk_frames
  base = fwd(params, x, t, ctx)
  x2 = x.at[:, 2 * c:].set(jax.random.normal(jax.random.PRNGKey(9), x[:, 2 * c:].shape))
  t2 = t.at[:, 2 * c:].set(3.0)
  out = fwd(params, x2, t2, ctx)
  np.testing.assert_allclose(out["velocity"][:, :2 * c], base["velocity"][:, :2 * c], atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(out["velocity"][:, 2 * c:] - base["velocity"][:, 2 * c:]))) > 1e-2
  # Within a chunk attention is bidirectional: changing the chunk's second frame changes its first.
  x3 = x.at[:, 1].add(1.0)
  out3 = fwd(params, x3, t, ctx)
  assert float(jnp.max(jnp.abs(out3["velocity"][:, 0] - base["velocity"][:, 0]))) > 1e-4


def test_teacher_is_bidirectional(tiny_config, model):
  _, params, m, _ = model
  x, t, ctx = _inputs(tiny_config)
  full = jax.jit(lambda p, x: m.apply(p, x, t, ctx)["velocity"])
  a = full(params, x)
  b = full(params, x.at[:, -1].add(1.0))
  assert float(jnp.max(jnp.abs(a[:, 0] - b[:, 0]))) > 1e-4


def test_kv_cache_equals_block_causal_forward(tiny_config, model):
  dcfg, params, m, fwd = model
  x, t, ctx = _inputs(tiny_config)
  c, f = tiny_config.video.chunk_frames, tiny_config.video.num_frames
  ref = fwd(params, x, t, ctx)
  step = jax.jit(lambda p, xc, tc, cache, off: m.apply(p, xc, tc, ctx, cache=cache, frame_offset=off))
  cache = init_cache(dcfg, 2, f, tokens_per_frame(tiny_config))
  outs, feats = [], []
  for i in range(f // c):
    o = step(params, x[:, i * c:(i + 1) * c], t[:, i * c:(i + 1) * c], cache, i * c)
    cache = o["cache"]
    outs.append(o["velocity"])
    feats.append(o["features"])
  scale = float(jnp.max(jnp.abs(ref["velocity"])))
  np.testing.assert_allclose(jnp.concatenate(outs, 1), ref["velocity"], atol=1e-5 * scale)
  np.testing.assert_allclose(jnp.concatenate(feats, 1), ref["features"], atol=1e-4)
  # The cache now holds every frame's keys: a step over chunk 0 again does not read later slots.
  o = step(params, x[:, :c], t[:, :c], cache, 0)
  np.testing.assert_allclose(o["velocity"], ref["velocity"][:, :c], atol=1e-5 * scale)


def test_per_frame_timesteps(tiny_config, model):
  _, params, _, fwd = model
  x, t, ctx = _inputs(tiny_config)
  base = fwd(params, x, t, ctx)["velocity"]
  # One frame's timestep changes that frame's output ...
  out = fwd(params, x, t.at[:, 5].set(t[:, 5] * 0.1 + 1.0), ctx)["velocity"]
  assert float(jnp.max(jnp.abs(out[:, 5] - base[:, 5]))) > 1e-2
  # ... and frames of earlier chunks not at all.
  np.testing.assert_allclose(out[:, :4], base[:, :4], atol=1e-5)
  # A per-frame vector of equal entries equals the per-sample timestep broadcast (Wan's scalar t).
  same = jnp.broadcast_to(t[:, :1], t.shape)
  a = fwd(params, x, same, ctx)["velocity"]
  b = fwd(params, x, jnp.full_like(t, 1.0) * t[:, :1], ctx)["velocity"]
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_shape_errors(tiny_config, model):
  _, params, m, _ = model
  x, t, ctx = _inputs(tiny_config)
  with pytest.raises(ValueError, match="per frame"):
    m.apply(params, x, t[:, 0], ctx)
  with pytest.raises(ValueError, match="do not divide into chunks"):
    m.apply(params, x[:, :5], t[:, :5], ctx, chunk_frames=2)


def test_confidence_head(tiny_config):
  hcfg = ConfidenceConfig.from_config(tiny_config)
  head = ConfidenceHead(hcfg)
  feats = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 24, tiny_config.model.dim))
  p = head.init(jax.random.PRNGKey(1), feats, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
  logits = head.apply(p, feats, jnp.array([[0, 1, 2]] * 2), jnp.full((2, 3), 500.0))
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  # detach_trunk: no gradient reaches the features.
  g = jax.grad(lambda f: head.apply(p, f, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))).sum())(feats)
  assert float(jnp.max(jnp.abs(g))) == 0.0
  attached = ConfidenceHead(dataclasses.replace(hcfg, detach_trunk=False))
  g = jax.grad(lambda f: attached.apply(p, f, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))).sum())(feats)
  assert float(jnp.max(jnp.abs(g))) > 0.0
  # The step index is an input: different steps give different logits.
  a = head.apply(p, feats, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
  b = head.apply(p, feats, jnp.full((2, 3), 3), jnp.zeros((2, 3)))
  assert float(jnp.max(jnp.abs(a - b))) > 0


def test_wan_1_3b_sizes(repo_root):
  """Counted with eval_shape: nothing of 1.3B is allocated."""
  config = get_config(os.path.join(repo_root, "configs", "wan_1_3b.py"))
  gen = factory.param_count(factory.abstract_dit_params(factory.dit_config(config), config))
  head = factory.param_count(factory.abstract_head_params(config))
  assert 1.2e9 <= gen <= 1.45e9
  assert head / gen < 0.01
  teacher = factory.param_count(factory.abstract_dit_params(factory.dit_config(config, "teacher"), config))
  assert 13e9 < teacher < 15e9
  assert tokens_per_frame(config) == 1560


def test_logical_axis_names(tiny_config):
  boxed = factory.init_dit(factory.dit_config(tiny_config), tiny_config, jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(boxed)["params"]
  assert tuple(specs["blocks"]["self_attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert tuple(specs["blocks"]["ffn_in"]["kernel"]) == ("layers", "embed", "mlp")
  rules = tuple(tiny_config.mesh.rules)
  mesh_spec = nn.logical_to_mesh_axes(specs["blocks"]["ffn_in"]["kernel"], rules)
  assert tuple(mesh_spec) == (None, "fsdp", "tensor")


def test_flop_count_matches_xla(tiny_config):
  config = get_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"),
                      ["--config.model.dim=256", "--config.model.ffn_dim=1024"])
  dcfg = dataclasses.replace(factory.dit_config(config), scan_layers=False)
  x, t, c = factory.dit_example_inputs(config, dcfg, batch=1, frames=6)
  m = WanDiT(dcfg)
  p = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), jnp.zeros(t.shape), jnp.zeros(c.shape)))
  cost = jax.jit(lambda p, x, t, c: m.apply(p, x, t, c)["velocity"]).lower(p, x, t, c).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  tokens = 6 * tokens_per_frame(config)
  ours = factory.dit_forward_flops(dcfg, tokens, tokens, 6)
  assert abs(cost["flops"] - ours) / ours < 0.05


def test_attention_backends():
  assert resolve_backend("auto") == "xla"
  with pytest.raises(ValueError, match="compute.attention"):
    resolve_backend("flash")
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(k1, (2, 6, 2, 8))
  k = jax.random.normal(k2, (2, 10, 2, 8))
  v = jax.random.normal(k3, (2, 10, 2, 8))
  out = dot_product_attention(q, k, v, kv_lengths=jnp.array([4, 10]))
  ref0 = jax.nn.dot_product_attention(q[:1], k[:1, :4], v[:1, :4])
  np.testing.assert_allclose(out[:1], ref0, atol=1e-5)
  np.testing.assert_allclose(out[1:], jax.nn.dot_product_attention(q[1:], k[1:], v[1:]), atol=1e-5)
  mask = block_causal_mask(3, 2, 1)
  assert mask.shape == (6, 6) and mask[0, 2] == 0 and mask[2, 1] == 1 and mask[3, 2] == 1
  with pytest.raises(RuntimeError, match="TPU only"):
    dot_product_attention(q, k, v, backend="splash")


@pytest.mark.parametrize("lq, block", [(12, 4), (10, 4)])
def test_block_causal_by_blocks_equals_the_masked_attention_and_its_gradient(lq, block):
  """The per-block form (one unmasked call per block of queries) is the block-causal mask's function: same values and
  the same gradients for q, k and v, also when the last block is short."""
  from dsa_jax.models.attention import block_causal_by_blocks
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
  q, k, v = (jax.random.normal(key, (2, lq, 2, 8)) for key in (k1, k2, k3))
  g = jax.random.normal(k4, (2, lq, 2, 8))
  plain = lambda a, b, c: dot_product_attention(a, b, c)
  masked = lambda a, b, c: dot_product_attention(a, b, c, causal_block=block)
  blocks = lambda a, b, c: block_causal_by_blocks(plain, a, b, c, block)
  np.testing.assert_allclose(blocks(q, k, v), masked(q, k, v), atol=1e-5)
  loss = lambda f: (lambda a, b, c: jnp.sum(f(a, b, c) * g))
  for got, want in zip(jax.grad(loss(blocks), (0, 1, 2))(q, k, v), jax.grad(loss(masked), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cudnn_block_causal_runs_one_unmasked_call_per_block(monkeypatch):
  """cuDNN takes a mask only as a dense (L, L) bias over every tile; the block-causal training mask goes instead as one
  call per block of queries over exactly the keys it sees, without a mask (the calls are recorded here and run by
  the XLA reference, cuDNN being GPU-only)."""
  from dsa_jax.models import attention as A
  calls = []
  reference = jax.nn.dot_product_attention

  def recorder(q, k, v, mask=None, implementation=None, **kw):
    calls.append((q.shape[1], k.shape[1], mask is None, implementation, sorted(kw)))
    return reference(q, k, v, mask=mask, **kw)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
  q, k, v = (jax.random.normal(key, (1, 12, 2, 8)) for key in (k1, k2, k3))
  out = A.dot_product_attention(q, k, v, causal_block=4, backend="cudnn")
  assert calls == [(4, 4, True, "cudnn", []), (4, 8, True, "cudnn", []), (4, 12, True, "cudnn", [])]
  np.testing.assert_allclose(out, A.dot_product_attention(q, k, v, causal_block=4), atol=1e-5)
  calls.clear()  # the cache's kv_lengths keep the one padded call
  A.dot_product_attention(q, k, v, kv_lengths=jnp.array([8]), backend="cudnn")
  assert calls == [(12, 12, True, "cudnn", ["key_value_seq_lengths"])]


def test_bench_attention_times_every_form_at_the_config_shapes(tiny_config):
  """`dsa-jax bench attention`: the block-causal form as the model runs it and with the dense mask (same values),
  full attention, and the sampler's cache attention at the first, middle and last chunk, with the FLOPs the mask
  lets through."""
  from dsa_jax.eval import bench_attention
  res = bench_attention.run(tiny_config, reps=1, log=lambda m: None)
  rows = {(r["form"], r["variant"]): r for r in res["rows"]}
  tpf = tokens_per_frame(tiny_config)
  length, block = tiny_config.video.num_frames * tpf, tiny_config.video.chunk_frames * tpf
  assert set(rows) == {("block_causal", "model"), ("block_causal", "dense mask"), ("full", ""),
                       ("cache", "chunk 0"), ("cache", "chunk 1"), ("cache", "chunk 2")}
  assert rows[("block_causal", "dense mask")]["max_abs_diff_vs_model"] < 1e-5
  assert [rows[("cache", f"chunk {i}")]["kv"] for i in range(3)] == [block, 2 * block, length]
  full, causal = rows[("full", "")], rows[("block_causal", "model")]
  ratio = (causal["forward_tflops"] * causal["forward_ms"]) / (full["forward_tflops"] * full["forward_ms"])
  assert ratio == pytest.approx(2 / 3)  # 3 chunks: 1 + 2 + 3 of 9 blocks
  assert all(r["forward_ms"] > 0 for r in res["rows"]) and "forward_backward_ms" in full
  assert "dense mask" in bench_attention.format_table({**res, "device": {"kind": "cpu"}})
  with pytest.raises(ValueError, match="--reps"):
    bench_attention.run(tiny_config, reps=0)
