"""`dsa-jax bench sample`: the forced mean-steps schedule, per-program memory, the JSON's metadata, the profile."""

import json
import time

import numpy as np
import pytest

from dsa_jax.eval import profiling
from dsa_jax.sampling import bench


@pytest.mark.parametrize("m,frames,chunk,steps", [(2.5, 6, 2, 4), (2.5, 20, 4, 4), (1.25, 12, 3, 5), (4.0, 21, 3, 4),
                                                  (1.0, 6, 2, 4), (10 / 3, 6, 2, 4)])
def test_forced_schedule_mean_is_exact(m, frames, chunk, steps):
  s = bench.forced_schedule(m, frames, chunk, steps)
  assert s.shape == (frames,) and s.mean() == pytest.approx(m, abs=1e-12)
  assert set(np.unique(s)) <= {int(np.floor(m)), int(np.ceil(m))}
  per_chunk = s.reshape(-1, chunk)
  assert sum(len(set(row)) > 1 for row in per_chunk.tolist()) <= 1  # at most one chunk mixes counts


def test_forced_schedule_spreads_and_rounds():
  s = bench.forced_schedule(2.5, 12, 2, 4)  # 3 chunks of 3 steps spread over 6: every other chunk
  assert s.reshape(6, 2)[:, 0].tolist() == [3, 2, 3, 2, 3, 2]
  s = bench.forced_schedule(2.5, 21, 3, 4)  # 52.5 steps cannot be: the nearest total, 53
  assert s.sum() == 53 and abs(s.mean() - 2.5) <= 0.5 / 21
  with pytest.raises(ValueError, match="--forced-mean-steps"):
    bench.forced_schedule(5, 6, 2, 4)


def test_forced_schedule_achieved_by_the_sampler(tiny_config):
  """The tiny sampler takes exactly the forced per-frame counts: the average is m for several m."""
  import jax
  from dsa_jax.sampling.sampler import make_sampler
  sampler = make_sampler(tiny_config)
  params = sampler.init_params(jax.random.PRNGKey(0))
  ctx = np.random.RandomState(0).standard_normal((1, sampler.dcfg.text_len, sampler.dcfg.text_dim)).astype(np.float32)
  f, c, L = sampler.num_frames, sampler.chunk_frames, sampler.num_steps
  for m in (1.5, 2.5, 10 / 3, 4.0):
    sched = bench.forced_schedule(m, f, c, L)
    controls = sampler.make_controls(1, threshold=np.inf, min_steps=sched[None], max_steps=sched[None])
    out = sampler.sample(params, ctx, controls)
    steps = np.asarray(out.steps)[0]
    assert steps.tolist() == sched.tolist() and steps.mean() == pytest.approx(m, abs=1e-12)
    assert np.asarray(out.chunk_iters).tolist() == sched.reshape(-1, c).max(1).tolist()
  assert sampler.trace_counts["program"] == 1  # schedules are traced controls


def test_bench_json_has_memory_meta_decode_and_profile(tmp_path, repo_root, capsys, monkeypatch):
  from dsa_jax import cli
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.157")  # recorded: a memory cap changes what is measured
  path, prof = tmp_path / "b.json", tmp_path / "prof"
  rc = cli.main(["bench", "sample", "--config", f"{repo_root}/configs/tiny.py", "--forced-mean-steps", "2.5",
                 "--runs", "1", "--no-stream", "--no-components", "--profile", str(prof), "--json", str(path)])
  assert rc == 0
  res = json.loads(path.read_text())
  assert res["mode"]["kind"] == res["steps_mode"] == "forced_mean_steps" and res["mode"]["exact"]
  assert res["steps"]["mean_per_frame"] == 2.5
  for key in ("kind", "platform"):
    assert res["device"][key]
  assert res["jax_version"] and res["dtype"] == res["vae_dtype"] == "float32" and res["config"]["name"] == "tiny"
  assert res["config"]["file"].endswith("tiny.py") and "--forced-mean-steps 2.5" in res["command"]
  assert res["environment"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.157"
  assert res["mesh"] is None and res["per_device_loops"] is False  # one device: no mesh, one program
  progs = res["memory"]["programs"]
  assert set(progs) == {"sampler", "vae_first_chunk", "vae_chunk"}
  for m in progs.values():
    assert set(m) == {"argument", "output", "alias", "temp", "generated_code", "total"}
    assert m["argument"] > 0 and m["output"] > 0 and m["total"] > 0 and min(m.values()) >= 0
  assert progs["vae_chunk"]["alias"] > 0  # the causal cache is donated
  assert len(res["vae_s"]["decode_s_per_chunk"]) == 3 and min(res["vae_s"]["decode_s_per_chunk"]) > 0
  assert res["profile"]["top_kernels"] and res["profile"]["dir"].startswith(str(prof))
  out = capsys.readouterr().out
  assert "memory sampler (GiB)" in out and "VAE decode per chunk" in out and "VAE TFLOP per video" in out
  assert res["vae_s"]["flops_per_video"] > 0 and res["vae_s"]["tflops_per_s"] > 0


def test_budget_mean_steps_needs_a_model(tiny_config):
  with pytest.raises(ValueError, match="--budget-mean-steps: needs --ckpt"):
    bench.run_bench(tiny_config, budget_mean_steps=2.0, vae=False, runs=1, do_stream=False, do_components=False,
                    log=lambda m: None)


def test_mean_steps_is_the_forced_schedule_and_modes_exclude_each_other(capsys):
  from dsa_jax import cli
  parser = cli.build_parser()
  args = parser.parse_args(["bench", "sample", "--config", "c.py", "--mean-steps", "2.5"])
  assert args.forced_mean_steps == 2.5 and args.budget_mean_steps is None
  with pytest.raises(SystemExit):
    parser.parse_args(["bench", "sample", "--config", "c.py", "--forced-mean-steps", "2", "--budget-mean-steps", "2"])
  assert "not allowed with argument" in capsys.readouterr().err


def test_top_kernels_reads_device_stream_lines(tmp_path):
  import gzip
  ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}}]
  ev += [{"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion", "dur": 30.0}] * 3
  ev += [{"ph": "X", "pid": 1, "tid": 7, "name": "loop_fusion", "dur": 10.0},
         {"ph": "X", "pid": 1, "tid": 9, "name": "dot.1", "dur": 500.0},  # a derived line: not a kernel
         {"ph": "X", "pid": 2, "tid": 1, "name": "host_thing", "dur": 900.0}]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": ev}, f)
  rows, on_device = profiling.top_kernels(str(path))
  assert on_device and [r["name"] for r in rows] == ["gemm_fusion", "loop_fusion"]
  assert rows[0]["count"] == 3 and rows[0]["total_ms"] == pytest.approx(0.09) and rows[0]["share"] == pytest.approx(0.9)


def test_decode_only_and_table(tmp_path, repo_root, capsys):
  from dsa_jax import cli
  path = tmp_path / "vae.json"
  assert cli.main(["bench", "sample", "--config", f"{repo_root}/configs/tiny.py", "--decode-only", "--runs", "1",
                   "--profile", str(tmp_path / "prof"), "--json", str(path)]) == 0
  res = json.loads(path.read_text())
  assert res["mode"]["kind"] == "decode_only" and res["vae"]["kind"] == "wan" and res["vae"]["dtype"] == "float32"
  assert len(res["vae"]["decode_s_per_chunk"]) == 3 and min(res["vae"]["decode_s_per_chunk"]) > 0
  assert set(res["memory"]["programs"]) == {"vae_first_chunk", "vae_chunk"}
  vae = res["vae"]
  assert vae["flops_per_video"] > 0 and vae["tflops_per_s"] == pytest.approx(
      vae["flops_per_video"] / vae["decode_s"] / 1e12)
  kernels = res["profile"]["top_kernels"]
  assert kernels and all(k["total_ms"] > 0 for k in kernels)
  # the decoder's program and its convolutions (as fusions where XLA fuses them, e.g. the 'fold' lowering on CPU)
  assert any(w in k["name"] for k in kernels for w in ("conv", "fusion", "decode"))
  capsys.readouterr()
  assert cli.main(["bench", "table", str(path)]) == 0
  out = capsys.readouterr().out
  assert "| vae.json | cpu | tiny | float32 | VAE only |" in out and "--decode-only" in out
  capped = tmp_path / "capped.json"  # the run's XLA environment prefixes its command
  capped.write_text(json.dumps({**res, "environment": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.157"}}))
  assert cli.main(["bench", "table", str(capped)]) == 0
  assert "- `capped.json`: `XLA_PYTHON_CLIENT_MEM_FRACTION=0.157 dsa-jax bench sample" in capsys.readouterr().out
  assert res["matmul"] == "default" and res["fp8_activations"] == "dynamic"
  fp8, older = tmp_path / "fp8.json", tmp_path / "older.json"  # fp8 layers named in the dtype column
  fp8.write_text(json.dumps({**res, "matmul": "fp8", "fp8_activations": "calibrated"}))
  older.write_text(json.dumps({**{k: v for k, v in res.items() if k not in ("matmul", "fp8_activations")},
                               "command": res["command"] + " --config.compute.matmul=fp8"}))
  assert cli.main(["bench", "table", str(fp8), str(older)]) == 0
  out = capsys.readouterr().out
  assert "| fp8.json | cpu | tiny | float32 + fp8 (calibrated) |" in out
  assert "| older.json | cpu | tiny | float32 + fp8 (dynamic) |" in out
  assert cli.main(["bench", "table", str(tmp_path / "missing.json")]) == 2
  assert "bench table:" in capsys.readouterr().err
  other = tmp_path / "train.json"  # e.g. a training bench beside it (a folder's *.json): left out, named
  other.write_text(json.dumps({"steps": {}}))
  assert cli.main(["bench", "table", str(path), str(other)]) == 0
  out = capsys.readouterr().out
  assert "| vae.json |" in out and "Left out (not `dsa-jax bench sample` JSON files): train.json" in out
  assert cli.main(["bench", "table", str(other)]) == 2
  assert "none of" in capsys.readouterr().err


def test_budget_mean_steps_uses_the_models_calibration(repo_root):
  """--budget-mean-steps m: tau from the shipped digits model's table, as `dsa-jax sample --mean-steps m` picks it."""
  import os
  from dsa_jax.config_lib import get_config
  from dsa_jax.sampling.budget import threshold_for
  from dsa_jax.checkpoint import params_io
  config = get_config(os.path.join(repo_root, "configs", "digits.py"), ["--config.compute.dtype=float32"])
  ckpt = config.sampling.checkpoint
  res = bench.run_bench(config, budget_mean_steps=2.5, ckpt=ckpt, vae=False, runs=1, do_stream=False,
                        do_components=False, log=lambda m: None)
  table = params_io.read_meta(ckpt)["calibration"]
  tau = threshold_for(table, 2.5)
  assert res["mode"] == {"kind": "budget_mean_steps", "target": 2.5, "threshold": tau, "min_steps": table["min_steps"],
                         "max_steps": table["max_steps"]} and 0 < tau < 1
  assert res["weights"] == ckpt and 1 <= res["steps"]["mean_per_frame"] <= config.sampling.max_steps


def test_bench_train_times_a_step_and_profiles_it(tmp_path, repo_root, monkeypatch):
  """`dsa-jax bench train` on the tiny config: a timed critic step, XLA's compiled memory, and with --profile a trace of
  one step whose top kernels land in the JSON."""
  from dsa_jax import cli
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # recorded with the run
  out, prof = tmp_path / "train.json", tmp_path / "prof"
  assert cli.main(["bench", "train", "--config", f"{repo_root}/configs/tiny.py", "--steps", "1", "--only", "critic",
                   "--profile", str(prof), "--json", str(out)]) == 0
  res = json.loads(out.read_text())
  step = res["steps"]["critic"]
  assert list(res["steps"]) == ["critic"] and step["step_s"] > 0 and step["model_tflop_per_step"] > 0
  assert res["command"].startswith("dsa-jax bench train --config ") and res["command"].endswith(str(out))
  assert res["environment"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert step["compiled_memory"] is None or step["compiled_memory"]["peak_gb"] > 0
  assert step["profile"]["top_kernels"] and step["profile"]["dir"].startswith(str(prof / "critic"))


def test_bench_train_ode_stage_times_the_block_causal_regression_step(tmp_path, repo_root, capsys):
  """`dsa-jax bench train --stage ode`: the ODE-regression step on stored (random) pairs, its model FLOPs the
  student's forward and backward over the keys the block-causal mask lets through (less than full attention's)."""
  from dsa_jax import cli
  from dsa_jax.config_lib import get_config, tokens_per_frame
  from dsa_jax.models import factory
  from dsa_jax.training.bench import step_model_flops
  out = tmp_path / "ode.json"
  assert cli.main(["bench", "train", "--config", f"{repo_root}/configs/tiny.py", "--stage", "ode", "--steps", "1",
                   "--json", str(out)]) == 0
  res = json.loads(out.read_text())
  step = res["steps"]["ode"]
  assert res["stage"] == "ode" and list(res["steps"]) == ["ode"] and step["step_s"] > 0
  assert {"loss_ode", "grad_norm_gen"} <= set(step["last_metrics"]) and res["mean_iteration_s"] == step["step_s"]
  config = get_config(f"{repo_root}/configs/tiny.py")
  ode = step_model_flops(config, None, "ode")
  tokens = config.video.num_frames * tokens_per_frame(config)
  full = 3 * factory.dit_forward_flops(factory.dit_config(config, "model"), tokens, tokens, config.video.num_frames)
  assert step["model_tflop_per_step"] * 1e12 == pytest.approx(ode) and 0 < ode < full
  capsys.readouterr()
  assert cli.main(["bench", "train", "--config", f"{repo_root}/configs/tiny.py", "--stage", "ode", "--only",
                   "gen"]) == 2
  assert "--only picks a DSA step function" in capsys.readouterr().err


def test_median_call_s_times_calls_enqueued_back_to_back(monkeypatch):
  """Per-call seconds over rounds of calls enqueued back to back, waited for once per round (not once per call:
  the host's wait would be counted in every call of a short kernel)."""
  import jax
  calls, waits = [], []
  real_block = jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready", lambda x: (waits.append(x), real_block(x))[1])

  def fn(a):
    calls.append(a)
    time.sleep(0.004)
    return len(calls)

  per_call, first = profiling.median_call_s(fn, (7,), reps=5, rounds=3)
  assert first == 1 and len(calls) == 1 + 15
  assert waits == [1, 6, 11, 16]  # the warm-up, then the last call of each round
  assert 0.004 <= per_call < 0.02


def test_device_memory_reports_every_local_device(monkeypatch):
  """A multi-GPU bench reports each GPU's peak and its share of the limit, so one GPU near its memory shows even
  when the first is not; a backend without counters gives None instead of zeros."""
  import jax

  class FakeDevice:
    def __init__(self, i, peak):
      self.i, self.peak = i, peak

    def memory_stats(self):
      return {"peak_bytes_in_use": self.peak, "bytes_in_use": self.peak // 2, "bytes_limit": 100}

    def __str__(self):
      return f"cuda:{self.i}"

  monkeypatch.setattr(jax, "local_devices", lambda: [FakeDevice(0, 40), FakeDevice(1, 95)])
  rows = profiling.device_memory()
  assert [r["device"] for r in rows] == ["cuda:0", "cuda:1"]
  assert [r["peak_fraction_of_limit"] for r in rows] == [0.4, 0.95]
  assert bench._peak_memory() == {"peak_bytes_in_use": 40, "bytes_in_use": 20, "bytes_limit": 100}
  monkeypatch.setattr(FakeDevice, "memory_stats", lambda self: None)
  assert profiling.device_memory() is None and bench._peak_memory() is None


def test_matmul_flops_counts_convolutions_dots_and_scans():
  import jax
  import jax.numpy as jnp
  x = jax.ShapeDtypeStruct((2, 10, 12, 3), jnp.float32)   # NHWC
  w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)     # HWIO
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert profiling.matmul_flops(conv, x, w) == 2 * (2 * 10 * 12 * 5) * (3 * 3 * 3)
  a, b = jax.ShapeDtypeStruct((4, 6, 7), jnp.float32), jax.ShapeDtypeStruct((4, 7, 9), jnp.float32)
  assert profiling.matmul_flops(lambda a, b: jnp.tanh(a @ b) * 2, a, b) == 2 * 4 * 6 * 9 * 7  # elementwise: none
  m = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  scan = lambda m: jax.lax.scan(lambda c, _: (jax.jit(lambda c: c @ m)(c), None), m, None, length=5)[0]
  assert profiling.matmul_flops(scan, m) == 5 * 2 * 8 * 8 * 8
  loop = lambda m: jax.lax.while_loop(lambda c: c[0, 0] < 1, lambda c: c @ m, m)
  with pytest.raises(ValueError, match="while loop"):
    profiling.matmul_flops(loop, m)


def test_decode_only_refuses_sampling_options_and_an_empty_batch(repo_root, capsys):
  """--decode-only times the VAE alone: a --ckpt, --steps or --guidance given with it would be dropped without a
  word, and --batch-size 0 decoded nothing (FPS 0): errors naming them, before the config loads."""
  from dsa_jax import cli
  tiny = f"{repo_root}/configs/tiny.py"
  assert cli.main(["bench", "sample", "--config", tiny, "--decode-only", "--ckpt", "/x", "--steps", "2",
                   "--guidance", "1.5", "--no-stream"]) == 2
  err = capsys.readouterr().err
  assert "--decode-only" in err and all(f in err for f in ("--ckpt", "--steps", "--guidance", "--no-stream"))
  assert "--runs" not in err
  assert cli.main(["bench", "sample", "--config", tiny, "--decode-only", "--batch-size", "0"]) == 2
  assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err
  with pytest.raises(ValueError, match="--batch-size"):
    bench.run_decode_bench(None, batch=0)


def test_bench_checks_its_json_target_before_running(tmp_path, capsys):
  """A --json path that cannot take the file failed only after the whole benchmark, losing its results: it is
  checked first (here before even the config, which does not exist)."""
  from dsa_jax import cli
  from dsa_jax.atomic import check_file_target
  folder = tmp_path / "results"
  folder.mkdir()
  for kind in ("sample", "train", "vae-convs", "attention"):  # every bench that writes a JSON
    assert cli.main(["bench", kind, "--config", str(tmp_path / "none.py"), "--json", str(folder)]) == 2, kind
    assert "--json" in capsys.readouterr().err.split("is a folder")[0], kind
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"--json .* is a file, not a folder"):
    check_file_target(str(blocker / "sub" / "out.json"), "--json")
  with pytest.raises(ValueError, match="--json: expected a file path"):
    check_file_target("", "--json")
  check_file_target(str(tmp_path / "new" / "deeper" / "out.json"), "--json")  # folders the writer makes are fine
  check_file_target(None, "--json")


def test_info_checks_the_estimate_options_even_without_an_estimate(repo_root, capsys):
  """--programs and --batch-size belong to the memory estimate: checked always, and an error without --mesh or
  --device-memory rather than dropped."""
  from dsa_jax import cli
  tiny = f"{repo_root}/configs/tiny.py"
  assert cli.main(["info", "--config", tiny, "--programs", "bogus", "--batch-size", "-4"]) == 2
  assert "--programs: expected sampling, training" in capsys.readouterr().err
  assert cli.main(["info", "--config", tiny, "--batch-size", "-4"]) == 2
  assert "--batch-size: must be >= 1, got -4" in capsys.readouterr().err
  assert cli.main(["info", "--config", tiny, "--programs", "training", "--batch-size", "2"]) == 2
  assert "--programs and --batch-size: only for the memory estimate, which needs --mesh or --device-memory" in (
      capsys.readouterr().err)
