"""DiT speed levers: the modulation path in the compute dtype (bf16 stays close to fp32), fp8 matmuls."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.config_lib import get_config
from dsa_jax.models import factory
from dsa_jax.models.dit import DiTConfig, WanDiT
from dsa_jax.sampling import sampler as S

DIGITS = os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py")


def _digits(dtype, *extra):
  # on the digits model's 5-step training ladder (4 fixed steps below; the config samples on 3 of them)
  return get_config(DIGITS, [f"--config.compute.dtype={dtype}", "--config.compute.attention=xla",
                             "--config.video.num_frames=4", "--config.sampling.ladder=(1000,750,500,250,125)",
                             "--config.sampling.max_steps=5", *extra])


def test_bf16_sampling_stays_close_to_fp32():
  """The digits model's shape (random weights), 4 fixed steps: bf16 modulation/time embedding vs all-fp32 latents.
  Measured: relative L2 error 0.0070 here; 0.0068 over the config's 16 frames at batch 2 (0.0064 there with the
  float32 modulation path)."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    sm = S.make_sampler(_digits(dtype))
    params = sm.init_params(jax.random.PRNGKey(0))
    ctx = np.random.RandomState(0).standard_normal((1, sm.dcfg.text_len, sm.dcfg.text_dim)).astype(np.float32)
    out[dtype] = np.asarray(sm.sample(params, ctx, sm.make_controls(1, threshold=np.inf, max_steps=4, seed=1)).latents)
  a, b = out["float32"], out["bfloat16"]
  rel = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert 0 < rel < 0.02, rel


def _dot_dtypes(dcfg, config):
  """Output dtypes of the time projection's matmul (… -> 6 * dim) in the DiT's jaxpr."""
  params = jax.eval_shape(lambda: factory.init_dit(dcfg, config, jax.random.PRNGKey(0)))
  x = jnp.zeros((1, 2) + tuple(dcfg_latent(config)) + (dcfg.in_channels,))
  t = jnp.zeros((1, 2))
  ctx = jnp.zeros((1, dcfg.text_len, dcfg.text_dim))
  jaxpr = jax.make_jaxpr(lambda p: WanDiT(dcfg).apply(p, x, t, ctx))(params)
  return {str(e.outvars[0].aval.dtype) for e in jaxpr.eqns if e.primitive.name == "dot_general"
          and e.outvars[0].aval.shape[-1] == 6 * dcfg.dim}


def dcfg_latent(config):
  from dsa_jax.config_lib import latent_hw
  return latent_hw(config)


def test_modulation_dtype_follows_compute_elementwise(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.compute.dtype = "bfloat16"
  dcfg = factory.dit_config(config)
  assert dcfg.mod_dtype == jnp.bfloat16 and _dot_dtypes(dcfg, config) == {"bfloat16"}
  wan = dataclasses.replace(dcfg, elementwise="float32")
  assert wan.mod_dtype == jnp.float32 and _dot_dtypes(wan, config) == {"float32"}
  with pytest.raises(ValueError, match="compute.elementwise"):
    DiTConfig.from_config(config.model, _digits("bfloat16", "--config.compute.elementwise=fp16").compute)


def test_fp8_matmul_runs_and_stays_near_bf16():
  """compute.matmul='fp8' on the digits model's shape (random weights, bf16 compute): the x0 prediction
  x0 = x - sigma v at the first four warped ladder steps, against bf16. Measured on the CPU: relative L2 error of x0
  0.020, 0.019, 0.018, 0.015 per step; of v 0.024."""
  config = _digits("bfloat16")
  bf16 = factory.dit_config(config)
  fp8 = factory.dit_config(_digits("bfloat16", "--config.compute.matmul=fp8"))
  assert fp8.matmul == "fp8" and "matmul" not in fp8.to_dict()
  params = factory.init_dit(bf16, config, jax.random.PRNGKey(0))
  sm = S.make_sampler(config)
  sig = np.asarray(sm.sigmas[:4], np.float32)
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  x = jax.random.normal(k1, (1, 4) + tuple(dcfg_latent(config)) + (bf16.in_channels,))
  ctx = jax.random.normal(k2, (1, bf16.text_len, bf16.text_dim))
  t = jnp.asarray(sig[None] * 1000.0)  # one frame per ladder step
  v = {m: np.asarray(jax.jit(lambda p: WanDiT(d).apply(p, x, t, ctx)["velocity"])(params))
       for m, d in (("bf16", bf16), ("fp8", fp8))}
  assert np.isfinite(v["fp8"]).all()
  x0 = {m: np.asarray(x) - sig[None, :, None, None, None] * v[m] for m in v}
  per_step = [np.linalg.norm(x0["fp8"][:, i] - x0["bf16"][:, i]) / np.linalg.norm(x0["bf16"][:, i]) for i in range(4)]
  rel_v = np.linalg.norm(v["fp8"] - v["bf16"]) / np.linalg.norm(v["bf16"])
  assert 0 < max(per_step) < 0.06 and 0 < rel_v < 0.08


def test_unknown_matmul_is_a_clear_error():
  config = _digits("bfloat16", "--config.compute.matmul=int4")
  with pytest.raises(ValueError, match="compute.matmul: expected one of default, fp8, got 'int4'"):
    DiTConfig.from_config(config.model, config.compute)


def _tiny_dit_inputs(tiny_config, frames: int, **dit_overrides):
  """The tiny config's DiT (with `dit_overrides`), its random weights, latents of `frames` frames at t = 700, a
  context, and a zeroed 6-frame KV cache, batch 2."""
  from dsa_jax.config_lib import latent_hw, tokens_per_frame
  from dsa_jax.models.dit import init_cache
  dcfg = dataclasses.replace(factory.dit_config(tiny_config), **dit_overrides)
  params = factory.init_dit(dcfg, tiny_config, jax.random.PRNGKey(1))
  lh, lw = latent_hw(tiny_config)
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  x = jax.random.normal(k1, (2, frames, lh, lw, dcfg.in_channels))
  t = jnp.full((2, frames), 700.0)
  ctx = jax.random.normal(k2, (2, dcfg.text_len, dcfg.text_dim))
  return dcfg, params, x, t, ctx, init_cache(dcfg, 2, 6, tokens_per_frame(tiny_config))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_precomputed_text_kv_and_rope_are_exact(tiny_config, scan):
  """The DiT given the text keys/values (WanTextKV) and the RoPE tables (rope_for) computes exactly what it computes
  from the context itself (fp32), in cache mode (the cache updated in place); wrong shapes are clear errors."""
  from dsa_jax.config_lib import latent_hw
  from dsa_jax.models.dit import WanTextKV, rope_for
  dcfg, params, x, t, ctx, cache = _tiny_dit_inputs(tiny_config, 2, scan_layers=scan)
  lh, lw = latent_hw(tiny_config)
  m = WanDiT(dcfg)
  want = m.apply(params, x, t, ctx, cache=cache, frame_offset=2)
  kv = WanTextKV(dcfg).apply(params, ctx)
  rope = rope_for(dcfg, 2, 2, (lh // 2, lw // 2))
  got = m.apply(params, x, t, None, cache=cache, frame_offset=2, text_kv=kv, rope=rope)
  for name in ("velocity", "features"):
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
  np.testing.assert_array_equal(np.asarray(got["cache"]["k"]), np.asarray(want["cache"]["k"]))
  # With remat the cache goes through the layers as per-layer slices instead of in place: the same numbers.
  sliced = WanDiT(dataclasses.replace(dcfg, remat="full")).apply(params, x, t, ctx, cache=cache, frame_offset=2)
  for a, b in zip(jax.tree_util.tree_leaves(sliced), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(ValueError, match="text_kv: expected"):
    m.apply(params, x, t, None, text_kv={"k": kv["k"][:, :1], "v": kv["v"][:, :1]})
  with pytest.raises(ValueError, match="rope: expected"):
    m.apply(params, x, t, ctx, rope=rope_for(dcfg, 0, 1, (lh // 2, lw // 2)))


def _exp_count(jaxpr, primitive: str = "exp") -> int:
  """`primitive` equations (exp: each softmax has one) in a jaxpr and all its sub-jaxprs."""
  n = 0
  for e in jaxpr.eqns:
    n += e.primitive.name == primitive
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      n += _exp_count(sub, primitive)
  return n


def test_remat_attention_saved_same_gradient_without_rerunning_attention(tiny_config, scan=True):
  """compute.remat='attention_saved' recomputes a block around its self-attention, not the attention itself: the
  loss and the parameter gradient equal 'full' and 'none' (block-causal training forward and cache slices), and the
  backward pass has one self-attention softmax per layer fewer than under 'full' (layers scanned, as training runs
  them; the unrolled layers run the same block code)."""
  base, params, x, t, ctx, cache = _tiny_dit_inputs(tiny_config, 4, scan_layers=scan, dtype=jnp.float32)

  def loss_fn(dcfg):
    def loss(p):
      whole = WanDiT(dcfg).apply(p, x, t, ctx, chunk_frames=2)["velocity"]
      cached = WanDiT(dcfg).apply(p, x[:, :2], t[:, :2], ctx, cache=cache, frame_offset=2)
      return jnp.mean(whole ** 2) + jnp.mean(cached["velocity"] ** 2) + jnp.mean(cached["cache"]["k"] ** 2)
    return loss

  results, exps = {}, {}
  for mode in ("none", "full", "attention_saved"):
    loss = loss_fn(dataclasses.replace(base, remat=mode))
    traced = jax.jit(jax.value_and_grad(loss)).trace(params)  # traced once: counted, then compiled and run
    exps[mode] = _exp_count(traced.jaxpr.jaxpr)
    results[mode] = traced.lower().compile()(params)
  for mode in ("full", "attention_saved"):
    np.testing.assert_allclose(results[mode][0], results["none"][0], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(results[mode][1]), jax.tree_util.tree_leaves(results["none"][1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
  # two forwards (whole video, cached chunk) x layers self-attention softmaxes are not recomputed
  per_forward = 1 if scan else base.num_layers
  assert exps["full"] - exps["attention_saved"] == 2 * per_forward, exps
  assert exps["attention_saved"] > exps["none"], exps  # the cross-attention (after the kernel) is still recomputed


def test_unknown_remat_mode_is_a_clear_error(tiny_config):
  with pytest.raises(ValueError, match="compute.remat: must be one of .*attention_saved"):
    get_config(DIGITS, ["--config.compute.remat=attention"])


def test_fp8_scales_are_powers_of_two_and_rows_are_padded_inside_the_quantizing_pass():
  """Per-tensor fp8 scales are powers of two (exact in any dtype) using the top octave of float8's range; the fp8
  Dense product equals the dequantized operands' product, for row counts that are not multiples of 16 and for
  DenseGeneral's multi-axis kernels."""
  from dsa_jax.models.layers import FP8_MAX, fp8_dot_general, quantize_fp8
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(k1, (2, 13, 4, 8), jnp.float32) * 3.0
  w = jax.random.normal(k2, (4, 8, 24), jnp.float32) * 0.02
  q, s = quantize_fp8(w)
  assert q.dtype == jnp.float8_e4m3fn and float(jnp.log2(s)) == int(jnp.log2(s))
  assert FP8_MAX / 2 < float(jnp.max(jnp.abs(w)) / s) <= FP8_MAX
  qs, ss = quantize_fp8(jnp.stack([w, 10 * w]), axis=0)  # one scale per layer of stacked weights
  assert ss.shape == (2,) and float(ss[1]) > float(ss[0]) and np.array_equal(qs[0], q)
  y = fp8_dot_general(x, w, (((2, 3), (0, 1)), ((), ())))
  qx, sx = quantize_fp8(x.reshape(26, 32))
  want = (np.asarray(qx, np.float32) * float(sx)) @ (np.asarray(q, np.float32).reshape(32, 24) * float(s))
  assert y.shape == (2, 13, 24)
  np.testing.assert_allclose(np.asarray(y).reshape(26, 24), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="fp8_dot_general"):
    fp8_dot_general(x, w, (((1,), (0,)), ((), ())))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_fp8_weights_quantized_once_give_the_same_forward(tiny_config, scan):
  """`fp8_weights`: every block's ten fp8 linear layers quantized once (what the sampler passes to each forward)
  give the forward the DiT computes when it quantizes them at every call, bit for bit; the sampler's generator
  variables carry them under compute.matmul='fp8'."""
  from dsa_jax.models.dit import fp8_weights, unstack_layers
  config = get_config("tiny", ["--config.compute.dtype=bfloat16", "--config.compute.matmul=fp8"])
  dcfg = dataclasses.replace(factory.dit_config(config), scan_layers=scan)
  params = factory.init_dit(factory.dit_config(config), config, jax.random.PRNGKey(0))
  if not scan:
    params = unstack_layers(params, dcfg.num_layers)
  quantized = fp8_weights(params, dcfg.dtype)
  blocks = [quantized["blocks"]] if scan else [quantized[f"blocks_{i}"] for i in range(dcfg.num_layers)]
  for b in blocks:
    assert sorted(b) == ["cross_attn", "ffn_in", "ffn_out", "self_attn"]
    assert sorted(b["self_attn"]) == sorted(b["cross_attn"]) == ["k", "o", "q", "v"]
  if scan:
    assert quantized["blocks"]["ffn_in"]["scale"].shape == (dcfg.num_layers,)
  lh, lw = dcfg_latent(config)
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(k1, (1, 2, lh, lw, dcfg.in_channels))
  ctx = jax.random.normal(k2, (1, dcfg.text_len, dcfg.text_dim))
  t = jnp.full((1, 2), 700.0)
  run = jax.jit(lambda v: WanDiT(dcfg).apply(v, x, t, ctx)["velocity"])
  np.testing.assert_array_equal(run({**params, "fp8": quantized}), run(params))
  sampler = S.make_sampler(config)
  assert "fp8" in sampler.generator_variables(factory.init_dit(factory.dit_config(config), config,
                                                                  jax.random.PRNGKey(0)))


def test_fp8_matmul_gradients_pass_straight_through_the_quantization():
  """Training through compute.matmul='fp8' gets the gradients of the same product in the input dtype: through the
  float8 product itself they came back as unscaled float8 cotangents (relative error 1.0, i.e. mostly zero)."""
  from dsa_jax.models.layers import fp8_dot_general
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 32), jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (32, 4, 8), jnp.bfloat16) * 0.02
  dims = (((2,), (0,)), ((), ()))
  fp8 = lambda x, w: jnp.sum(fp8_dot_general(x, w, dims).astype(jnp.float32) ** 2)
  ref = lambda x, w: jnp.sum(jax.lax.dot_general(x, w, dims).astype(jnp.float32) ** 2)
  for got, want in zip(jax.grad(fp8, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = float(jnp.linalg.norm((got - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
    assert rel < 0.1


def test_fp8_calibrated_activation_scales_give_the_dynamic_forward_without_its_amax_passes(tiny_config, scan=False):
  """compute.fp8_activations='calibrated': a calibration forward records each fp8 layer's input amax (the maximum
  over calls, in the variables' layer layout); `fp8_weights` turns it into power-of-two activation scales with one
  power of two of headroom. Power-of-two scales only shift float8 exponents, so the forward is the dynamic one up to
  the values that turn subnormal in the lowest octave (far below fp8's own error against bf16), and it no longer
  reduces any activation to its amax. (Unrolled layers here; the sampler test below calibrates scanned ones.)"""
  from dsa_jax.models.dit import fp8_activation_amax, fp8_weights, unstack_layers
  from dsa_jax.models.layers import FP8_MAX
  config = get_config("tiny", ["--config.compute.dtype=bfloat16", "--config.compute.matmul=fp8"])
  dcfg = dataclasses.replace(factory.dit_config(config), scan_layers=scan)
  params = factory.init_dit(factory.dit_config(config), config, jax.random.PRNGKey(0))
  if not scan:
    params = unstack_layers(params, dcfg.num_layers)
  lh, lw = dcfg_latent(config)
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(k1, (1, 4, lh, lw, dcfg.in_channels))
  ctx = jax.random.normal(k2, (1, dcfg.text_len, dcfg.text_dim))
  t = jnp.full((1, 4), 700.0)
  out, amax = fp8_activation_amax(dcfg, params, x, t, ctx, chunk_frames=2)
  _, amax2 = fp8_activation_amax(dcfg, params, 0.5 * x, jnp.full((1, 4), 0.0), ctx, amax=amax, chunk_frames=2)
  leaves, leaves2 = jax.tree_util.tree_leaves(amax), jax.tree_util.tree_leaves(amax2)
  assert len(leaves) == 10 * (1 if scan else dcfg.num_layers)  # q k v o twice, ffn_in, ffn_out
  assert all(bool(jnp.all(b >= a)) for a, b in zip(leaves, leaves2)) and any(
      bool(jnp.any(b > a)) for a, b in zip(leaves, leaves2))  # a running maximum over the calls
  if scan:
    assert amax["blocks"]["ffn_in"].shape == (dcfg.num_layers,)
  cal = fp8_weights({**params, "fp8_amax": amax}, dcfg.dtype)
  plain = fp8_weights(params, dcfg.dtype)
  block = cal["blocks"] if scan else cal["blocks_0"]
  got_amax = amax["blocks"] if scan else amax["blocks_0"]
  xs, a = np.asarray(block["ffn_out"]["x_scale"]), np.asarray(got_amax["ffn_out"])
  assert np.all(np.log2(xs) == np.round(np.log2(xs))) and np.all(2 * a / xs <= FP8_MAX) and np.all(4 * a / xs > FP8_MAX)
  fwd = lambda v: WanDiT(dcfg).apply(v, x, t, ctx, chunk_frames=2)["velocity"]
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
  y_cal, y_dyn = fwd({**params, "fp8": cal}), fwd({**params, "fp8": plain})
  y_bf16 = WanDiT(dataclasses.replace(dcfg, matmul="default")).apply(params, x, t, ctx, chunk_frames=2)["velocity"]
  assert rel(y_cal, y_dyn) < 0.25 * rel(y_dyn, y_bf16)
  np.testing.assert_allclose(np.asarray(out["velocity"]), np.asarray(fwd({**params, "fp8": plain})), atol=0.05)
  jaxprs = {k: jax.make_jaxpr(fwd)({**params, "fp8": v}).jaxpr for k, v in (("plain", plain), ("cal", cal))}
  maxes = {k: _exp_count(j, "reduce_max") for k, j in jaxprs.items()}
  assert maxes["cal"] <= _exp_count(jaxprs["cal"])  # only softmaxes (an exp each; the time embedding has one more)
  assert maxes["plain"] - maxes["cal"] >= 10 * (1 if scan else dcfg.num_layers)


def test_fp8_static_quantization_saturates_instead_of_overflowing():
  """Values past a calibrated scale's range saturate at the largest float8 (a float8 cast alone gives NaN)."""
  from dsa_jax.models.layers import FP8_MAX, quantize_fp8_static
  q = quantize_fp8_static(jnp.array([1e6, -1e6, 3.0, 0.0], jnp.bfloat16), 0.5)
  np.testing.assert_array_equal(np.asarray(q, np.float32), [FP8_MAX, -FP8_MAX, 6.0, 0.0])
  assert bool(jnp.isnan(jnp.array([1e6], jnp.float32).astype(jnp.float8_e4m3fn))[0])


def test_fp8_calibrated_needs_fp8_matmul():
  with pytest.raises(ValueError, match="compute.fp8_activations='calibrated'.*compute.matmul='fp8'"):
    factory.dit_config(get_config("tiny", ["--config.compute.fp8_activations=calibrated"]))
  with pytest.raises(ValueError, match="compute.fp8_activations: expected one of dynamic, calibrated"):
    factory.dit_config(get_config("tiny", ["--config.compute.matmul=fp8", "--config.compute.fp8_activations=static"]))


def test_sampler_calibrates_fp8_activations_once_per_weights():
  """A 'calibrated' fp8 sampler calibrates on its first call for given generator weights (later calls reuse it, and
  weights that carry a calibration are used as they are) and samples what the dynamic fp8 sampler samples, up to
  the lowest octave's subnormals."""
  over = ["--config.compute.dtype=bfloat16", "--config.compute.matmul=fp8"]
  dyn = S.make_sampler(get_config("tiny", over))
  cal = S.make_sampler(get_config("tiny", over + ["--config.compute.fp8_activations=calibrated"]))
  params = dyn.init_params(jax.random.PRNGKey(0))
  ctx = jax.random.normal(jax.random.PRNGKey(2), (1, dyn.dcfg.text_len, dyn.dcfg.text_dim))
  controls = dyn.make_controls(1, threshold=float("inf"))
  want = np.asarray(dyn.sample(params, ctx, controls).latents)
  got = np.asarray(cal.sample(params, ctx, controls).latents)
  first = cal._fp8_calibration
  assert dyn.fp8_calibration_s is None and cal.fp8_calibration_s > 0 and first is not None
  assert first[1]["blocks"]["ffn_in"].shape == (cal.dcfg.num_layers,)  # the scanned layout of the weights
  assert np.linalg.norm(got - want) < 0.02 * np.linalg.norm(want)
  np.testing.assert_array_equal(np.asarray(cal.sample(params, ctx, controls).latents), got)
  assert cal._fp8_calibration is first  # not calibrated again
  # the whole-video program quantizes its activations with the calibrated scales: no amax reductions left (before,
  # each forward rebuilt the fp8 weights without them)
  maxes = {}
  for name, sm in (("dynamic", dyn), ("calibrated", cal)):
    args, _ = sm.prepare(params, ctx, controls)
    maxes[name] = _exp_count(jax.make_jaxpr(functools.partial(sm._program, use_cfg=False))(*args).jaxpr, "reduce_max")
  assert maxes["dynamic"] - maxes["calibrated"] >= 2 * 8, maxes  # cache and step forwards, 8 layers or more each
  carried = cal.with_fp8_calibration(cal._check_inputs(params, ctx, controls, None)[0], ctx)
  assert set(carried["generator"]) == {"params", "fp8_amax"}
  other = cal.with_fp8_calibration(carried, ctx * 0)
  assert other["generator"]["fp8_amax"] is carried["generator"]["fp8_amax"]


def test_fp8_calibration_stored_in_the_model_is_used_where_it_holds(tmp_path, repo_root, capsys):
  """`dsa-jax calibrate --fp8` stores the calibration in the model's metadata; loading the model for calibrated fp8
  sampling attaches it (the sampler then does not calibrate), but not for another dtype or video size (a note says
  why, and the sampler calibrates itself)."""
  import json as json_lib

  from dsa_jax import cli
  from dsa_jax.checkpoint import loading
  from dsa_jax.training import checkpointing
  tiny = os.path.join(repo_root, "configs", "tiny.py")
  fp8 = ["--config.compute.dtype=bfloat16", "--config.compute.matmul=fp8",
         "--config.compute.fp8_activations=calibrated"]
  cfg = get_config(tiny, fp8)
  params = S.make_sampler(cfg).init_params(jax.random.PRNGKey(0))
  model = tmp_path / "model"
  checkpointing.export_networks(params, cfg, str(model))
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red ball\na blue cube\n")
  assert cli.main(["calibrate", "--config", tiny, "--ckpt", str(model), "--fp8", "--prompts", str(prompts),
                   "--num", "2", "--config.compute.dtype=bfloat16"]) == 0
  entry = json_lib.loads((model / "dsa_meta.json").read_text())["fp8_activation_amax"]
  assert entry["dtype"] == "bfloat16" and entry["generator"] in ("generator", "generator_ema")
  assert len(entry["amax"]["blocks"]["ffn_in"]) == cfg.model.num_layers
  assert all(a > 0 for a in entry["amax"]["blocks"]["self_attn"]["q"])

  loaded, source = loading.load_sampler_params(cfg, str(model), cast=True)
  assert source.get("fp8_calibration") == "stored"
  np.testing.assert_array_equal(loaded["generator"]["fp8_amax"]["blocks"]["ffn_out"],
                                np.asarray(entry["amax"]["blocks"]["ffn_out"], np.float32))
  sm = S.make_sampler(cfg)
  ctx = np.zeros((1, cfg.model.text_len, cfg.model.text_dim), np.float32)
  checked = sm._check_inputs(loaded, ctx, sm.make_controls(1), None)[0]
  assert sm.with_fp8_calibration(checked, ctx)["generator"]["fp8_amax"] is checked["generator"]["fp8_amax"]
  assert sm.fp8_calibration_s is None  # nothing calibrated
  capsys.readouterr()
  for other in (["--config.compute.dtype=float32"], ["--config.video.num_frames=4"]):
    loaded, source = loading.load_sampler_params(get_config(tiny, fp8 + other), str(model), cast=True)
    assert "fp8_amax" not in loaded["generator"] and "fp8_calibration" not in source
    assert "no stored fp8 calibration is used (it was made for another" in capsys.readouterr().err
