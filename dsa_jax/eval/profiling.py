"""Profiles for the benchmarks: one call of a function under `jax.profiler`, the top kernels of its trace, the
median time of repeated calls, the FLOPs of a function's convolutions and matmuls, and the XLA settings a run was
made with.

`profile_one` writes the trace (TensorBoard's profile plugin, or the Perfetto JSON in ui.perfetto.dev) and returns
the kernels that took the most device time, summed by name, so a benchmark's JSON says where the time went.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import time


XLA_ENVIRONMENT = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                   "XLA_PYTHON_CLIENT_ALLOCATOR", "CUDA_VISIBLE_DEVICES")


def median_call_s(fn, args, reps: int, rounds: int = 3) -> tuple[float, object]:
  """(seconds per call of fn(*args), the warm-up call's output): the median over `rounds` of `reps` calls enqueued
  back to back and waited for once. A kernel of a few hundred microseconds timed one call at a time would also
  count the host's dispatch and wait per call (0.2-0.8 ms on a GPU: the first chunk's cache attention read 0.51
  instead of 0.29 ms), which the device never spends inside a program."""
  import jax
  import numpy as np
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(rounds, 1)):
    t = time.perf_counter()
    last = None
    for _ in range(max(reps, 1)):
      last = fn(*args)
    jax.block_until_ready(last)
    times.append((time.perf_counter() - t) / max(reps, 1))
  return float(np.median(times)), out


def _inner_jaxprs(params):
  for value in params.values():
    for x in (value if isinstance(value, (list, tuple)) else (value,)):
      if hasattr(x, "jaxpr") and hasattr(x, "consts"):  # a closed jaxpr
        yield x.jaxpr
      elif type(x).__name__ == "Jaxpr":
        yield x


def _jaxpr_matmul_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
      window = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * window
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    elif name == "while":
      raise ValueError("matmul_flops: a while loop's trip count is not static; count its body per iteration")
    else:
      times = eqn.params.get("length", 1) if name == "scan" else 1
      total += times * sum(_jaxpr_matmul_flops(inner) for inner in _inner_jaxprs(eqn.params))
  return total


def matmul_flops(fn, *args) -> float:
  """FLOPs of the convolutions and matmuls `fn(*args)` traces to (args may be abstract: `jax.ShapeDtypeStruct`):
  2 per multiply-add over each convolution's whole kernel window, scans counted per iteration. Read from the jaxpr,
  so the same on every backend (a GPU's compiled cost analysis leaves out the cuDNN calls); elementwise work is not
  counted."""
  import jax
  return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_environment() -> dict:
  """The environment variables that change what a benchmark measures (memory cap, XLA flags, visible GPUs), as set
  for this process: a bench JSON's command line alone does not say them."""
  return {k: os.environ[k] for k in XLA_ENVIRONMENT if k in os.environ}


def device_memory() -> list[dict] | None:
  """Each local device's allocator counters (peak and current bytes in use, the limit), so a multi-GPU bench says
  whether any one GPU ran near its memory, not only the first; None where the backend keeps no counters (CPU)."""
  import jax
  out = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # not every backend implements it
      return None
    if not stats:
      return None
    row = {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}
    row["device"] = str(d)
    if row.get("bytes_limit"):
      row["peak_fraction_of_limit"] = row.get("peak_bytes_in_use", 0) / row["bytes_limit"]
    out.append(row)
  return out


def device_peak(memory) -> dict:
  """{device_peak_gb, device_peak_fraction} of the local device whose allocator peaked highest against its limit
  (`device_memory()` rows; {} without them): on several GPUs the one nearest to running out."""
  rows = [r for r in memory or [] if r.get("bytes_limit")]
  if not rows:
    return {}
  top = max(rows, key=lambda r: r["peak_fraction_of_limit"])
  return {"device_peak_gb": top.get("peak_bytes_in_use", 0) / 1e9,
          "device_peak_fraction": top["peak_fraction_of_limit"]}


def profile_one(fn, log_dir: str, top: int = 25, log=print, what: str = "one video") -> dict:
  """Runs `fn` once under jax.profiler (trace in `log_dir`) and returns the top kernels by summed time, read from
  the Perfetto JSON the profiler writes next to its XPlane (None when it cannot be read)."""
  import jax
  os.makedirs(log_dir, exist_ok=True)
  before = set(glob.glob(os.path.join(log_dir, "plugins", "profile", "*")))
  t0 = time.perf_counter()
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    fn()
  wall = time.perf_counter() - t0
  runs = sorted(set(glob.glob(os.path.join(log_dir, "plugins", "profile", "*"))) - before)
  run_dir = runs[-1] if runs else log_dir
  out = {"dir": run_dir, "wall_s": wall, "top_kernels": None,
         "how_to_open": f"tensorboard --logdir {log_dir} (profile plugin), or load "
                        f"{os.path.join(run_dir, 'perfetto_trace.json.gz')} in ui.perfetto.dev"}
  files = sorted(glob.glob(os.path.join(run_dir, "*.trace.json.gz")) +
                 glob.glob(os.path.join(run_dir, "perfetto_trace.json.gz")))
  if files:
    try:
      out["top_kernels"], out["device_events"] = top_kernels(files[-1], top)
    except Exception as e:  # a trace format we do not know: say where it is
      out["parse_error"] = f"{type(e).__name__}: {e}"
  log(f"  profile: trace of {what} ({wall:.2f} s) in {run_dir}; open it with {out['how_to_open']}")
  if out["top_kernels"]:
    where = "device" if out["device_events"] else "host (no device timeline in the trace)"
    log(f"  top kernels by time ({where}):")
    for k in out["top_kernels"]:
      log(f"    {k['total_ms']:9.2f} ms {k['share']:6.1%} x{k['count']:<5d} {k['name'][:90]}")
  return out


def _is_device_process(name: str) -> bool:
  return ("/device:" in name and "/device:CPU" not in name) or name.startswith(("GPU", "TPU"))


def top_kernels(path: str, top: int = 15) -> tuple[list[dict], bool]:
  """Summed durations by event name in a Chrome/Perfetto trace JSON: on device timelines (GPU/TPU) the kernels of
  the stream lines (derived lines such as 'XLA Ops' and 'XLA Modules' left out: they overlap the kernels); without
  a device timeline the host's XLA ops (Python frames and executor wrappers left out). Returns (rows, whether device
  processes were found)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = lambda kind: {(e.get("pid"), e.get("tid")) if kind == "thread_name" else e.get("pid"):
                       str(e.get("args", {}).get("name", "")) for e in events
                       if e.get("ph") == "M" and e.get("name") == kind}
  names, threads = meta("process_name"), meta("thread_name")
  device = {pid for pid, n in names.items() if _is_device_process(n)}
  derived = ("XLA Ops", "XLA Modules", "Steps", "Framework", "Source", "TraceMe", "Launch")
  groups = {"kernels": ({}, {}), "ops": ({}, {})}
  for e in events:
    if e.get("ph") != "X" or "dur" not in e or (device and e.get("pid") not in device):
      continue
    n = str(e.get("name", "?"))
    line = threads.get((e.get("pid"), e.get("tid")), "")
    if device:
      group = "ops" if "XLA Ops" in line else None if any(d in line for d in derived) else "kernels"
    else:  # the host's XLA ops without Python frames and executor wrappers
      group = None if n.startswith("$") or n.startswith("ThunkExecutor") else "kernels"
    if group is None:
      continue
    totals, counts = groups[group]
    totals[n] = totals.get(n, 0.0) + float(e["dur"])
    counts[n] = counts.get(n, 0) + 1
  totals, counts = groups["kernels"] if groups["kernels"][0] else groups["ops"]
  whole = sum(totals.values()) or 1.0
  rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return [{"name": n, "total_ms": t / 1e3, "count": counts[n], "share": t / whole} for n, t in rows], bool(device)
