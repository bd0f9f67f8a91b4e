"""The Wan VAE decoder's speed-minded forms give the plain forms' results: the 3D conv lowerings, fused norm + SiLU,
nearest upsampling, the sub-pixel form of upsample + 3x3 conv, and chunk-by-chunk decoding to the host with a donated cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.models import vae as V
from dsa_jax.models.layers import RMSNorm
from dsa_jax.sampling import decode

Z = dict(z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
CFG = V.WanVAEConfig(base_dim=8, num_res_blocks=1, **Z)  # the tiny recipe's strides (4, 8, 8)
SMALL = V.WanVAEConfig(base_dim=4, dim_mult=(1, 2), num_res_blocks=1, temperal_downsample=(True,), **Z)


def _params(cfg):
  p = decode.random_vae_params(cfg, seed=0)
  # non-trivial norm scales and biases, so that a wrong tap or channel order shows up
  rs = np.random.RandomState(1)
  return jax.tree_util.tree_map(lambda a: a + 0.1 * rs.standard_normal(a.shape).astype(np.float32)
                                if a.ndim == 1 else a, p)


@pytest.fixture(scope="module")
def params():
  return _params(CFG)


def test_conv3d_lowerings_agree():
  """native / fold / taps on a cache-less first chunk and a later chunk with the causal cache (decode chunk_size=1)."""
  params = _params(SMALL)
  z = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 3, 4, SMALL.z_dim))
  ys = {impl: np.asarray(V.decode(params, z, SMALL, chunk_size=1, conv3d=impl)) for impl in V.CONV3D_IMPLS}
  ref = ys["native"]
  assert ref.shape == (1, 3, 6, 8, 3) and ref.std() > 0.05
  for impl, y in ys.items():
    assert np.abs(y - ref).max() <= 1e-5, impl
  with pytest.raises(V.VAEConfigError, match="conv3d"):
    V.decode(params, z, CFG, conv3d="winograd")


def test_fused_norm_silu_and_upsample_are_exact():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 5, 6)) * 3
  scale = {"params": {"scale": jnp.linspace(0.5, 1.5, 6)}}
  fused = V.RMSNormSiLU().apply(scale, x)
  plain = jax.nn.silu(RMSNorm(1e-12, axes=("conv_out",)).apply(scale, x))
  np.testing.assert_array_equal(np.asarray(fused), np.asarray(plain))
  assert V.RMSNormSiLU(dtype=jnp.bfloat16).apply(scale, x).dtype == jnp.bfloat16
  # only the per-pixel statistic passes the barrier (so the scale and SiLU can fuse into the conv's gather)
  barriers = [e for e in jax.make_jaxpr(lambda v: V.RMSNormSiLU().apply(scale, v))(x).jaxpr.eqns
              if e.primitive.name == "optimization_barrier"]
  assert [v.aval.shape for e in barriers for v in e.outvars] == [x.shape[:-1] + (1,)]
  np.testing.assert_array_equal(np.asarray(V._upsample_nearest2x(x)),
                                np.asarray(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)))


@pytest.mark.parametrize("shape", [(2, 5, 7, 6, 10), (1, 1, 1, 3, 4)])
def test_subpixel_upsample_conv_is_the_conv_of_the_upsampled_input(shape):
  """Four 2x2 phase convs of the low-res input == 3x3 'same' conv of the nearest-upsampled input (borders included,
  odd and 1-pixel sizes), in fp32 to rounding and in bf16 to bf16's precision."""
  n, h, w, c, co = shape
  kx, kw = jax.random.split(jax.random.PRNGKey(len(shape) + h))
  x = jax.random.normal(kx, (n, h, w, c))
  k = jax.random.normal(kw, (3, 3, c, co)) / np.sqrt(9 * c)
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  ref = np.asarray(jax.lax.conv_general_dilated(up, k, (1, 1), [(1, 1), (1, 1)],
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision=jax.lax.Precision.HIGHEST))
  got = np.asarray(V.upsample2x_conv3x3(x, k, jnp.float32, jax.lax.Precision.HIGHEST))
  assert got.shape == (n, 2 * h, 2 * w, co) and ref.std() > 0.3
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
  low = np.asarray(V.upsample2x_conv3x3(x, k, jnp.bfloat16, None).astype(jnp.float32))
  assert np.linalg.norm(low - ref) / np.linalg.norm(ref) < 1e-2
  mod = V.Conv2dFrames(co, upsample=True)
  variables = {"params": {"kernel": k, "bias": jnp.arange(co, dtype=jnp.float32)}}
  frames = mod.apply(variables, x[:, None])
  np.testing.assert_allclose(np.asarray(frames[:, 0]), ref + np.arange(co), atol=5e-5, rtol=1e-4)
  with pytest.raises(V.VAEConfigError, match="upsample=True"):
    V.Conv2dFrames(co, upsample=True, strides=(2, 2)).apply(variables, x[:, None])


def test_pixel_decoder_hands_chunks_to_the_host(tiny_config, params):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.vae.kind = "wan"
  dec = decode.PixelDecoder(cfg, vae_config=CFG, vae_params=params)
  lat = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 8, 12, 4))  # 3 chunks of 2
  chunks = list(dec.decode_chunks_to_host(lat))
  assert [type(c) for c in chunks] == [np.ndarray] * 3 and [c.shape[1] for c in chunks] == [5, 8, 8]
  whole = dec.decode_video(lat)  # a second stream: the donated cache of the first is not reused
  assert isinstance(whole, np.ndarray) and whole.shape == (1, 21, 64, 96, 3) and whole.std() > 0.05
  np.testing.assert_array_equal(whole, np.concatenate(chunks, 1))
  # frames converted on the device are the host conversion of the float pixels, byte for byte
  from dsa_jax.sampling.outputs import to_uint8
  frames = dec.decode_video(lat, uint8=True)
  assert frames.dtype == np.uint8 and frames.shape == whole.shape and frames.std() > 5
  np.testing.assert_array_equal(frames[0], to_uint8(whole[0]))
  np.testing.assert_array_equal(to_uint8(frames[0]), frames[0])  # uint8 frames pass through
  cfg.vae.conv3d = "bogus"
  with pytest.raises(ValueError, match="config.vae.conv3d"):
    decode.PixelDecoder(cfg, vae_config=CFG, vae_params=params)


def test_bench_vae_convs_times_every_lowering_at_the_decoder_shapes(tiny_config):
  """`dsa-jax bench vae-convs`: the decoder's per-block shapes, every lowering with and without the norm, the
  sub-pixel resamplers; in fp32 on the CPU the lowerings agree to rounding."""
  from dsa_jax.sampling import bench_vae
  cfg = tiny_config.copy_and_resolve_references()
  cfg.vae.kind = "wan"
  shapes = bench_vae.decoder_shapes(cfg, decode.random_wan_vae_config(cfg))
  assert [r["upsample"] is None for r in shapes] == [False] * (len(shapes) - 1) + [True]
  assert [r["height"] for r in shapes[1:]] == [2 * r["height"] for r in shapes[:-1]]
  res = bench_vae.run(cfg, reps=1, blocks=[len(shapes) - 2], log=lambda m: None)
  assert len(res["residual_convs"]) == len(V.CONV3D_IMPLS) * 2 and len(res["upsample_convs"]) == 1
  assert all(r["ms"] > 0 and r["block"] == len(shapes) - 2 for r in res["residual_convs"])
  assert max(r["rel_diff_vs_native"] for r in res["residual_convs"] if not r["norm_silu"]) < 1e-5
  assert res["upsample_convs"][0]["rel_diff"] < 1e-5
  assert {r["layer"] for r in res["residual_convs"]} == {"residual"}
  small = cfg.copy_and_resolve_references()
  small.video.update(height=32, width=32)
  last = bench_vae.run(small, reps=1, blocks=[len(shapes) - 1], log=lambda m: None)
  out = [r for r in last["residual_convs"] if r["layer"] == "conv_out"]
  assert len(out) == len(V.CONV3D_IMPLS) * 2 and not last["upsample_convs"]
  assert all(r["channels_out"] == 3 for r in out) and max(r["rel_diff_vs_native"] or 0 for r in out) < 1e-5
  assert "conv_out" in bench_vae.format_table({**last, "device": {"kind": "cpu"}})
  with pytest.raises(ValueError, match="--reps"):
    bench_vae.run(cfg, reps=0)
  with pytest.raises(ValueError, match="--blocks"):
    bench_vae.run(cfg, reps=1, blocks=[len(shapes)])


def test_fold_runs_the_last_conv_as_taps():
  """Under conv3d='fold' every 3x3x3 conv folds its time taps into its input channels except the decoder's conv_out
  (3 output channels), which makes kT 3-channel outputs: no conv in the decode reads kT x its input channels for 3
  outputs, one writes kT x 3; the pixels equal the 'native' decode."""
  params = _params(SMALL)
  z = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 3, 4, SMALL.z_dim))
  jaxpr = jax.make_jaxpr(lambda p: V.decode(p, z, SMALL, chunk_size=1, conv3d="fold"))(params)

  def conv_shapes(jx):
    out = []
    for e in jx.eqns:
      if e.primitive.name == "conv_general_dilated":
        out.append(tuple(e.invars[1].aval.shape))  # the kernel, HWIO for the 2D convs
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        out += conv_shapes(sub)
    return out

  kernels = [k for k in conv_shapes(jaxpr.jaxpr) if len(k) == 4 and k[:2] == (3, 3)]
  assert any(k[3] == 3 * 3 for k in kernels), kernels                       # conv_out as taps: 3 taps x 3 channels
  assert not any(k[3] == 3 and k[2] % 3 == 0 and k[2] > 3 for k in kernels), kernels  # no folded conv to 3 channels
  assert any(k[2] == 3 * k[3] for k in kernels if k[3] > 3), kernels       # the other convs fold
  ref = np.asarray(V.decode(params, z, SMALL, chunk_size=1, conv3d="native"))
  np.testing.assert_allclose(np.asarray(V.decode(params, z, SMALL, chunk_size=1, conv3d="fold")), ref, atol=1e-5)


def test_decode_flops_counts_every_chunk_once(tiny_config):
  """The chunk-by-chunk count equals the count of the one-pass decode of the same video (up to the chunks' own
  edge work) and XLA's own count of it (which skips padded taps), grows by the same amount per added chunk, and
  doubles with the batch."""
  from dsa_jax.eval.profiling import matmul_flops
  dec = decode.PixelDecoder.random(tiny_config)
  frames, c = tiny_config.video.num_frames, tiny_config.video.chunk_frames
  flops = dec.decode_flops(1, frames)
  z = jax.ShapeDtypeStruct((1, frames) + dec.latent_hw + (dec.latent_channels,), jnp.float32)
  assert flops > 0 and abs(flops / matmul_flops(lambda zz: dec.vae.decode(dec.vae_params, zz), z) - 1) < 0.02
  xla = dec._decode_video.lower(dec.vae_params, z).cost_analysis()
  xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"]
  assert 1.0 <= flops / xla < 1.05
  two, three, four = (dec.decode_flops(1, n * c) for n in (2, 3, 4))
  assert three - two == four - three > 0
  assert dec.decode_flops(2, frames) == 2 * flops
  assert decode.PixelDecoder(tiny_config, kind="none").decode_flops(1, frames) is None
