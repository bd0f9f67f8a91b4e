"""The TPU attention path (splash) run on the CPU in Pallas interpret mode: its masks, the DiT forward (block-causal,
bidirectional, KV cache), the gradients of the training forwards and the whole tiny sampler equal the xla backend."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.models import factory
from dsa_jax.models.attention import dot_product_attention, splash_block
from dsa_jax.models.dit import WanDiT, init_cache
from dsa_jax.sampling import sampler as S

TOL = 2e-5


def test_block_sizes_pad_little():
  assert splash_block(32760) == 512  # a 21-frame Wan 480x832 cache: 0.02 % padding
  assert splash_block(4680) == 256   # a 3-frame chunk of queries: 512 would pad 9 %, 256 pads 3.9 %
  assert splash_block(1560) == 128
  assert splash_block(48) == 128     # tiny lengths pad to one lane-wide tile


def test_splash_masks_equal_xla():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(k1, (2, 144, 2, 16))
  k = jax.random.normal(k2, (2, 144, 2, 16))
  v = jax.random.normal(k3, (2, 144, 2, 16))
  splash = lambda **kw: dot_product_attention(q, k, v, backend="splash", interpret=True, **kw)
  xla = lambda **kw: dot_product_attention(q, k, v, backend="xla", **kw)
  # block-causal over blocks of 48 tokens: the first block must not see the second
  out = splash(causal_block=48)
  np.testing.assert_allclose(out, xla(causal_block=48), atol=TOL)
  assert np.abs(np.asarray(out[:, :48]) - np.asarray(xla()[:, :48])).max() > 1e-2
  # the KV-cache mask: 48 queries against the first 96 (sample 0) / all 144 (sample 1) cached keys, traced lengths
  qc = q[:, 96:]
  lengths = jnp.array([96, 144])
  cached = jax.jit(lambda q, n: dot_product_attention(q, k, v, kv_lengths=n, backend="splash", interpret=True))
  np.testing.assert_allclose(cached(qc, lengths), dot_product_attention(qc, k, v, kv_lengths=lengths), atol=TOL)
  with pytest.raises(RuntimeError, match="splash_interpret"):
    dot_product_attention(q, k, v, backend="splash")


@pytest.fixture(scope="module")
def models(tiny_config):
  dcfg = factory.dit_config(tiny_config, "model")
  xla = dataclasses.replace(dcfg, attention="xla")
  splash = dataclasses.replace(dcfg, attention="splash", splash_interpret=True)
  x, t, ctx = factory.dit_example_inputs(tiny_config, dcfg, batch=2, frames=tiny_config.video.num_frames)
  params = jax.jit(lambda k: WanDiT(xla).init(k, jnp.zeros(x.shape), jnp.zeros(t.shape), jnp.zeros(ctx.shape)))(
      jax.random.PRNGKey(0))
  rs = np.random.RandomState(1)
  inputs = (jnp.asarray(rs.standard_normal(x.shape), jnp.float32), jnp.asarray(rs.uniform(0, 1000, t.shape)),
            jnp.asarray(rs.standard_normal(ctx.shape), jnp.float32))
  return WanDiT(xla), WanDiT(splash), params, inputs


def test_dit_forward_splash_equals_xla(tiny_config, models):
  xla, splash, params, (x, t, ctx) = models
  c = tiny_config.video.chunk_frames
  for kw in (dict(chunk_frames=c), dict()):  # the causal student / the bidirectional teacher
    a = jax.jit(lambda p: xla.apply(p, x, t, ctx, **kw))(params)
    b = jax.jit(lambda p: splash.apply(p, x, t, ctx, **kw))(params)
    np.testing.assert_allclose(b["velocity"], a["velocity"], atol=1e-4, rtol=1e-4)
  # KV cache: the cache holds the first chunk, the second chunk attends to it and to itself
  tokens = x.shape[2] * x.shape[3] // 4
  cache = init_cache(xla.cfg, 2, x.shape[1], tokens)
  run = lambda m: jax.jit(lambda p, cache: (lambda o: (o["velocity"], o["cache"]))(
      m.apply(p, x[:, c:2 * c], t[:, c:2 * c], ctx, cache=m.apply(p, x[:, :c], t[:, :c], ctx, cache=cache,
                                                                   frame_offset=0)["cache"], frame_offset=c)))
  (va, ca), (vb, cb) = run(xla)(params, cache), run(splash)(params, cache)
  np.testing.assert_allclose(vb, va, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(cb["k"], ca["k"], atol=1e-4, rtol=1e-4)


def test_training_gradients_splash_equal_xla(tiny_config, models):
  """Gradients of the two training forwards: block-causal over the video (ODE regression, critic/teacher without
  the mask) and a cache-mode chunk forward (the rollout's exit step backpropagates through it)."""
  xla, splash, params, (x, t, ctx) = models
  c = tiny_config.video.chunk_frames
  x, t = x[:, :2 * c], t[:, :2 * c]  # two chunks are enough for a block-causal mask
  tokens = x.shape[2] * x.shape[3] // 4

  def losses(m):
    def full(p):
      return jnp.mean(jnp.square(m.apply(p, x, t, ctx, chunk_frames=c)["velocity"] - x))

    def cached(p):
      cache = jax.lax.stop_gradient(m.apply(p, x[:, :c], t[:, :c], ctx, cache=init_cache(m.cfg, 2, x.shape[1], tokens),
                                            frame_offset=0)["cache"])
      return jnp.mean(jnp.square(m.apply(p, x[:, c:2 * c], t[:, c:2 * c], ctx, cache=cache,
                                         frame_offset=c)["velocity"]))
    return jax.jit(lambda p: (jax.grad(full)(p), jax.grad(cached)(p)))(params)

  ga, gb = losses(xla), losses(splash)
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    scale = max(float(np.abs(a).max()), 1e-6)
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-4 * scale + 1e-7
  assert max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(ga)) > 1e-4  # the gradients are not all zero


def test_sampler_splash_equals_xla(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.compute.attention = "xla"
  xla = S.make_sampler(cfg)
  cfg.compute.update(attention="splash", splash_interpret=True)
  splash = S.make_sampler(cfg)
  assert splash.dcfg.attention == "splash" and splash.dcfg.splash_interpret
  params = xla.init_params(jax.random.PRNGKey(0))
  ctx = np.random.RandomState(0).standard_normal((2, 8, 32)).astype(np.float32)
  probe = xla.sample(params, ctx, xla.make_controls(2, threshold=np.inf, seed=3))
  tau = float(np.median(np.asarray(probe.conf_trace)[:, :, 0]))  # frames stop at different steps
  controls = xla.make_controls(2, threshold=tau, seed=3)
  a = jax.device_get(xla.sample(params, ctx, controls))
  b = jax.device_get(splash.sample(params, ctx, controls))
  np.testing.assert_array_equal(b.steps, a.steps)
  assert len(np.unique(a.steps)) > 1
  np.testing.assert_allclose(b.latents, a.latents, atol=1e-4, rtol=1e-4)
