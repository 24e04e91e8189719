"""How the kernel benchmarks time a function (``/work/.library/device/METHOD.md``).

* Rotated inputs: ``sets`` independent input sets, enough that one pass over
  them outgrows the L2 (50 MB on an H100), so a repeat does not time the cache.
* One dispatch, many launches: a jitted function maps the op over all the
  sets, so host dispatch (tens of microseconds, longer than a decode-sized
  matmul) is paid once per ``len(sets)`` launches.
* Warm-up calls (compilation, autotuning) first, then the median of ``reps``
  timed calls, each ending in ``block_until_ready``.
* ``device_time_per_call``: the same dispatch under ``jax.profiler``, summing
  the GPU kernels' own durations (CUPTI): what a launch costs the device,
  without the host's launch gaps between kernels, which dominate decode-sized
  matmuls here (an empty Pallas launch costs ~11 us of wall time per call in
  one dispatch on an H100). METHOD.md's graph replay shrinks those gaps; the
  kernels' durations remove them.
* ``relative_error``: ||y - ref|| / ||ref|| in float64; NaN counts as failing.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

L2_BYTES = 50 * 2 ** 20


def n_sets(bytes_per_set: int, lo: int = 4, hi: int = 32) -> int:
  """Input sets to rotate: twice the L2 in all, between ``lo`` and ``hi``."""
  return int(min(hi, max(lo, -(-2 * L2_BYTES // max(1, bytes_per_set)))))


def time_per_call(fn, sets: list, reps: int = 20, warmup: int = 2, *, many=None) -> float:
  """Median seconds per ``fn(*s)``, ``fn`` run once on each of ``sets`` per
  timed call (one dispatch)."""
  many = many or jax.jit(lambda ss: [fn(*s) for s in ss])
  for _ in range(warmup):
    jax.block_until_ready(many(sets))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(many(sets))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / len(sets)


def spread(fn, sets, reps: int = 20) -> tuple[float, float]:
  """(median, median of a second identical measurement): the noise floor."""
  many = jax.jit(lambda ss: [fn(*s) for s in ss])
  return (time_per_call(fn, sets, reps, many=many),
          time_per_call(fn, sets, reps, warmup=0, many=many))


def device_time_per_call(fn, sets: list, reps: int = 5, *, many=None) -> float:
  """Seconds of GPU kernel time per ``fn(*s)``: ``reps`` dispatches of
  ``fn`` over ``sets`` (after one warm-up) traced by ``jax.profiler``, the
  durations of the kernels on the GPU's stream lines summed, divided by the
  calls. NaN where the trace holds no GPU kernel (a CPU run)."""
  many = many or jax.jit(lambda ss: [fn(*s) for s in ss])
  jax.block_until_ready(many(sets))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(reps):
        jax.block_until_ready(many(sets))
    events = load_trace(d)
  if events is None:
    return float("nan")
  return kernel_us(events) * 1e-6 / (reps * len(sets))


def load_trace(trace_dir: str) -> list | None:
  """The events of the newest Chrome trace ``jax.profiler.trace`` wrote under
  ``trace_dir``; None if it wrote none."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return None
  with gzip.open(sorted(files)[-1], "rt") as f:
    return json.load(f)["traceEvents"]


def gpu_kernel_events(events) -> list | None:
  """The complete events on the GPU's stream lines of a trace's ``events``,
  leaving out lines that repeat them per XLA op or module; None without a
  GPU in the trace."""
  meta = lambda kind: {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
                       if e.get("ph") == "M" and e.get("name") == kind}
  gpu = {pid for (pid, _), name in meta("process_name").items() if "/device:GPU" in name}
  if not gpu:
    return None
  threads = {key: name for key, name in meta("thread_name").items() if key[0] in gpu}
  streams = {key for key, name in threads.items() if "stream" in name.lower()}
  keep = streams or {key for key in threads if "xla" not in threads[key].lower()}
  line = lambda e: (e["pid"], e.get("tid")) in keep if keep else e["pid"] in gpu
  return [e for e in events if e.get("ph") == "X" and "dur" in e and line(e)]


def kernel_us(events) -> float:
  """Summed duration (us) of the GPU kernels of a trace's ``events``
  (``gpu_kernel_events``); NaN without a GPU."""
  kernels = gpu_kernel_events(events)
  return float("nan") if kernels is None else sum(e["dur"] for e in kernels)


def relative_error(y, ref) -> float:
  y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(y64).all():
    return float("nan")
  return float(np.linalg.norm(y64 - r64) / max(np.linalg.norm(r64), 1e-300))


def torch_time_per_call(fn, sets: list, reps: int = 20, warmup: int = 2) -> float:
  """The same protocol for torch on CUDA, timed with CUDA events."""
  import torch  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    for s in sets:
      fn(*s)
  torch.cuda.synchronize()
  times = []
  for _ in range(reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for s in sets:
      fn(*s)
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return statistics.median(times) / len(sets)
