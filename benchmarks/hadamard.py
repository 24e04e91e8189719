"""The Pallas Walsh-Hadamard kernel against XLA's butterflies and the copy bandwidth.

  python benchmarks/hadamard.py --out=/tmp/hadamard.json        # GPU (H100)
  python benchmarks/hadamard.py --smoke                         # CPU, interpret mode

For each (n, rows): n = 128 (per-head R3/R4 rotations, rows = tokens x heads)
and n = 2048 .. 16384 (FFN and residual widths), rows = tokens from 16 to
16384, bf16 in and out (``--dtype=float32`` for the float32 case), in one
process:

* ``copy``: ``-x`` through XLA (one read, one write): the bandwidth ceiling
  measured in the same run (the target is >= 80% of it);
* ``xla_fwht``: ``qtrain.layers.hadamard.fwht`` (log2 n butterfly stages;
  XLA fuses what it can);
* ``xla_dense``: x @ H_n as one XLA bf16 matmul (an n^2 FLOP alternative);
* ``pallas``: ``qtrain.kernels.hadamard``, each of ``--configs``
  (block_rows,num_warps[,num_stages]); the fastest is reported (by kernel
  time with ``--device_time``, each config's GPU kernels' own durations).

Each variant's output is checked before timing: relative error against the
XLA butterflies (bf16: both round the same float32 transform, so ~1e-3 at
most), NaN failing; the fastest kernel config is re-run on a NaN-poisoned
output buffer. Rows print
the achieved bandwidth (bytes read + written / time) and its fraction of the
copy's; a short table is printed last; full rows go to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from qtrain.kernels import fwht as kh  # noqa: E402
from qtrain.kernels import timing  # noqa: E402

CASES = [(128, r) for r in (16 * 32, 1024 * 32, 16384 * 32)] + [
    (n, r) for n in (2048, 4096, 8192, 16384) for r in (16, 256, 4096, 16384)]
CONFIGS = ("0,4", "1,4", "4,4", "16,4", "4,8")  # block_rows (0: the default), num_warps


def kernel(spec: str, interpret: bool, **kw):
  """``kh.hadamard`` at config "block_rows,num_warps[,num_stages]" (block_rows 0:
  the kernel's default; num_stages 1 unless given)."""
  br, warps, *stages = (int(v) for v in spec.split(","))
  return functools.partial(kh.hadamard, backend="gpu", block_rows=br or None, num_warps=warps,
                           num_stages=stages[0] if stages else 1, interpret=interpret, **kw)


def bench_case(n, rows, dtype, configs, interpret, reps, device_time=False):
  row = dict(n=n, rows=rows, dtype=jnp.dtype(dtype).name)
  nbytes = 2 * rows * n * jnp.dtype(dtype).itemsize  # One read, one write.
  key = jax.random.key(n * 31 + rows)
  sets = [(jax.random.normal(jax.random.fold_in(key, i), (rows, n), jnp.float32).astype(dtype),)
          for i in range(2 if interpret else timing.n_sets(nbytes))]
  signs = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 10 ** 6), 0.5, (n,)), 1.0, -1.0)
  ref = kh.hadamard_xla(sets[0][0], signs)
  row["copy_s"], row["copy_s_again"] = timing.spread(jnp.negative, sets, reps)
  row["xla_fwht_s"] = timing.time_per_call(lambda x: kh.hadamard_xla(x, signs), sets, reps)
  h = jnp.asarray(kh.sylvester(n) / n ** 0.5, dtype)
  dense = lambda x: jnp.dot(x * signs.astype(dtype), h, preferred_element_type=jnp.float32).astype(dtype)
  row["xla_dense_rel_err"] = timing.relative_error(jax.jit(dense)(sets[0][0]), ref)
  row["xla_dense_s"] = timing.time_per_call(dense, sets, reps)
  best, measure = None, "dev_s" if device_time else "s"  # The fastest by the measure asked for.
  for spec in configs:  # One compile each: the timed function's outputs are checked.
    fn = kernel(spec, interpret)
    entry = {"config": spec}
    try:
      many = jax.jit(lambda ss, fn=fn: [fn(x_, signs) for (x_,) in ss])
      entry["rel_err"] = err = timing.relative_error(many(sets)[0], ref)
      if not err < 1e-2:  # bf16 rounding of one float32 transform: <= 2^-8 per element.
        entry["error"] = "wrong result: not timed"
      else:
        entry["s"] = timing.time_per_call(None, sets, reps, many=many)
        if device_time:
          entry["dev_s"] = timing.device_time_per_call(None, sets, 5, many=many)
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    row.setdefault("pallas_configs", []).append(entry)
    if measure in entry and (best is None or entry[measure] < best[measure]):
      best = entry
  if best:  # The winner again on a NaN-poisoned output buffer.
    br = int(best["config"].split(",")[0])
    poison = jnp.full((kh.padded_rows(rows, n, br or None), n), jnp.nan, dtype)
    fn = kernel(best["config"], interpret, out=poison)
    best["poisoned_rel_err"] = err = timing.relative_error(jax.jit(fn)(sets[0][0], signs), ref)
    if err < 1e-2:
      row["pallas_s"], row["pallas_config"] = best["s"], best["config"]
      if device_time:
        row["pallas_dev_s"] = best["dev_s"]
    else:
      row["pallas"] = f"config {best['config']}: an output element was not written"
  if device_time:  # The same variants by their kernels' own GPU time.
    fns = {"copy": jnp.negative, "xla_fwht": lambda x: kh.hadamard_xla(x, signs),
           "xla_dense": dense}
    for k, fn in fns.items():
      row[f"{k}_dev_s"] = timing.device_time_per_call(fn, sets, 5)
  for k in ("copy", "xla_fwht", "xla_dense", "pallas"):
    for t in ("", "_dev"):
      if f"{k}{t}_s" in row:
        row[f"{k}{t}_TBps"] = nbytes / row[f"{k}{t}_s"] / 1e12
        row[f"{k}{t}_of_copy"] = row[f"copy{t}_s"] / row[f"{k}{t}_s"]
  return row


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--configs", default=";".join(CONFIGS))
  p.add_argument("--ns", default=None, help="comma list of n (default: the issue's cases)")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
  p.add_argument("--budget_s", type=float, default=540.0,
                 help="start no new shape after this many seconds (the table still prints)")
  p.add_argument("--device_time", action="store_true",
                 help="also time each variant by its kernels' GPU time (jax.profiler)")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  backend = jax.default_backend()
  interpret = backend != "gpu"
  print(f"device: {jax.devices()[0].device_kind} ({backend}); jax {jax.__version__}", flush=True)
  if interpret:
    print(f"pallas hadamard GPU flavour: no GPU ({backend}), running in interpret mode (times "
          "are not kernel speeds)", flush=True)
  cases = CASES
  if args.ns:
    cases = [c for c in CASES if c[0] in {int(v) for v in args.ns.split(",")}]
  if args.smoke:
    args.reps, args.configs = 2, "0,4;2,4"
    cases = [(64, 40), (512, 6)]
  rows, t0 = [], time.perf_counter()
  for n, r in cases:
    if time.perf_counter() - t0 > args.budget_s:
      print(f"budget: {args.budget_s:.0f} s spent, shapes left out from here on", flush=True)
      break
    row = bench_case(n, r, jnp.dtype(args.dtype), args.configs.split(";"), interpret, args.reps,
                     args.device_time)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
  for t, what in (("", "wall time per call"), ("_dev", "the kernels' GPU time")):
    if t and not args.device_time:
      continue
    print(f"\nbandwidth in TB/s (bytes read + written / time), and as a fraction of the "
          f"copy's, by {what}")
    print(f"{'n':>6s} {'rows':>7s} {'copy':>6s} {'fwht':>12s} {'dense':>12s} {'pallas':>12s}  "
          "config")
    for r in rows:
      cell = lambda k: (f"{r[k + t + '_TBps']:5.2f} ({r[k + t + '_of_copy']:4.0%})"
                        if f"{k}{t}_s" in r else f"{'--':>12s}")
      print(f"{r['n']:6d} {r['rows']:7d} {r['copy' + t + '_TBps']:6.2f} {cell('xla_fwht')} "
            f"{cell('xla_dense')} {cell('pallas')}  {r.get('pallas_config', '-')}")


if __name__ == "__main__":
  main()
