"""W4A16 at decode M, one shape at a time: ``python benchmarks/matmul.py --decode``.

``int4_gemv`` (``qtrain/kernels/int4_gemv.py``) at each of ``GEMV_CONFIGS``
beside v1 (``int4_matmul`` with the dispatcher's decode blocks), XLA's
W4A16 path and XLA's bf16 dot, and the floors of the packed bytes timed
alike in the same run (``decode_shape``). ``matmul.py`` owns the CLI, the
shapes and the budgeted loop; this module the per-shape measurement and
its table (benchmarks/KERNEL_NOTES.md, W4A16 v2). ``int4_mosaic`` (the
warp-specialized Mosaic GPU kernel, "v4") runs at each of
``MOSAIC_CONFIGS`` on the same weights converted once by ``from_halves``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtrain.kernels import int4 as k4
from qtrain.kernels import int4_gemv as k4g
from qtrain.kernels import int4_mosaic as k4m
from qtrain.kernels import timing

# int4_gemv configs "[t:]bn,split_k,warps,stages,swap,unpack[,per_sm]"
# (split_k 0: the kernel's rule, >= per_sm programs per SM, 4 by default;
# "t:" runs the kernel on the weight tiled by ``int4_gemv.tile_codes(codes,
# bn)``, tiled once outside the timing): its default, the swapped dot, a
# narrow tile aiming at one program per SM (the fewest split-K partials), a
# wide tile (half the x re-reads), Triton's own int8 -> bf16 conversion; on
# the tiled layout, 64- and 32-column tiles at the split rule and at split 4
# (the fastest in KERNEL_NOTES' v3 probe). Each compiles for sm_90 without
# spilling (benchmarks/triton_sass.py, KERNEL_NOTES).
GEMV_CONFIGS = ("128,0,4,3,0,magic", "128,0,4,3,1,magic", "64,0,4,4,0,magic,1",
                "256,0,8,3,0,magic", "128,0,4,3,0,shift", "t:64,0,4,3,0,magic",
                "t:64,4,4,3,0,magic", "t:32,4,4,3,0,magic")
TILED = "t:"
# int4_mosaic configs "stages,split_k,groups_per_step,wide_w,compute_wgs"
# (split_k 0: one wave): the rule, and the best of KERNEL_NOTES' v4 sweeps
# on llama_8b (gate_up: unsplit, 4 groups a step; down: split 4).
MOSAIC_CONFIGS = ("4,0,2,1,2", "4,1,4,1,2", "4,4,2,1,2")
DECODE_MS = (16, 1)
DECODE_CALLS = 16  # Launches per timed dispatch at least: the host's share per call / 16.


def gemv_config(spec: str) -> k4g.GemvConfig:
  """"[t:]bn,split_k,warps,stages,swap,unpack[,per_sm]" -> ``int4_gemv.GemvConfig``."""
  try:
    bn, split, warps, stages, swap, unpack, *per_sm = spec.removeprefix(TILED).split(",")
    cfg = k4g.GemvConfig(int(bn), int(split), int(warps), int(stages), bool(int(swap)), unpack,
                         *map(int, per_sm))
    k4g.check_config(cfg)
  except (ValueError, TypeError) as e:
    raise ValueError(f"--gemv_configs entry {spec!r}: [t:]bn,split_k,warps,stages,swap(0/1),"
                     f"unpack({'/'.join(k4g.UNPACKS)})[,per_sm]: {e}") from e
  return cfg


def mosaic_config(spec: str) -> k4m.MosaicGemvConfig:
  """"stages,split_k,groups_per_step,wide_w,compute_wgs" -> ``MosaicGemvConfig``."""
  try:
    stages, split, gps, wide, wgs = map(int, spec.split(","))
    cfg = k4m.MosaicGemvConfig(split_k=split, stages=stages, groups_per_step=gps,
                               wide_w=bool(wide), compute_wgs=wgs)
    k4m.check_config(cfg)
  except (ValueError, TypeError) as e:
    raise ValueError(f"--mosaic_configs entry {spec!r}: stages,split_k,groups_per_step,"
                     f"wide_w(0/1),compute_wgs(1/2): {e}") from e
  return cfg


def _empty_launch(x, interpret):
  """The smallest Pallas launch: one program copying a [M, 128] slice of x."""
  m = x.shape[0]
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]
  spec = pl.BlockSpec((m, 128), lambda i: (0, 0))
  return pl.pallas_call(kernel, grid=(1,), in_specs=[spec], out_specs=spec, interpret=interpret,
                        out_shape=jax.ShapeDtypeStruct((m, 128), x.dtype))(x)


_BYTE_FLOORS = {}  # (K, N) -> the read and copy times of its packed bytes.


def decode_shape(model, name, m, k, n, args, interpret):
  """W4A16 at decode M, one shape: XLA bf16, the floors (``_floors``), XLA's
  W4A16 path, ``int4_matmul`` v1 (the dispatcher's decode blocks) and each
  ``int4_gemv`` config (``_variants``), all timed alike.

  Every timed dispatch runs >= DECODE_CALLS launches on distinct x (no two
  identical calls for XLA to merge) cycling over weight sets that outgrow
  the L2 twice."""
  row = dict(model=model, layer=name, M=m, K=k, N=n, kind="decode",
             packed_bytes=k * n // 2 + 4 * n * k // args.group)  # Codes + float32 scales.
  n_w = 2 if args.smoke else timing.n_sets(k * n // 2, lo=2, hi=48)  # Packed bytes > 2 L2.
  calls = max(n_w, 2 if args.smoke else DECODE_CALLS)
  key = jax.random.key(m * 7 + n * 3 + k)
  ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * k ** -0.5
        for i in range(n_w)]
  quant = jax.jit(functools.partial(k4.quantize_int4, group=args.group))
  qs = [quant(w) for w in ws]
  xs = [jax.random.normal(jax.random.fold_in(key, 1000 + i), (m, k), jnp.bfloat16)
        for i in range(calls)]
  bf16 = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  bf16_sets = [(xs[i], ws[i % n_w]) for i in range(calls)]
  row["xla_bf16_s"], row["xla_bf16_s_again"] = timing.spread(bf16, bf16_sets, args.reps)
  if args.device_time:  # The kernels' own time, twice: the noise floor of that measure.
    row["xla_bf16_dev_s"] = timing.device_time_per_call(bf16, bf16_sets, args.dev_reps)
    row["xla_bf16_dev_s_again"] = timing.device_time_per_call(bf16, bf16_sets, args.dev_reps)
  w4 = [(xs[i], *qs[i % n_w]) for i in range(calls)]
  _floors(row, xs, [q[0] for q in qs], args, interpret)
  _variants(row, w4, args, interpret)
  return row


def _floors(row, xs, codes, args, interpret):
  """An empty Pallas launch per call; XLA reading the packed codes once (a
  max over K) and copying them (a xor), on a scalar distinct per call so
  XLA merges none: timed once per (K, N), M does not change them. A floor
  that fails is recorded (NaN time and the error) and the run goes on."""
  k, n = row["K"], row["N"]
  floors = {"empty": (lambda x: _empty_launch(x, interpret), [(x,) for x in xs])}
  if (k, n) not in _BYTE_FLOORS:
    sets = [(codes[i % len(codes)], jnp.int8(i % 100 + 1)) for i in range(len(xs))]
    floors.update(read=(lambda p, c: jnp.max(p ^ c, axis=0), sets), copy=(lambda p, c: p ^ c, sets))
  for key, (fn, sets) in floors.items():
    try:
      row[f"{key}_s"] = timing.time_per_call(fn, sets, args.reps)
      if args.device_time:
        row[f"{key}_dev_s"] = timing.device_time_per_call(fn, sets, args.dev_reps)
    except Exception as e:  # pylint: disable=broad-except
      row[f"{key}_s"], row[key] = float("nan"), f"{type(e).__name__}: {str(e)[:200]}"
  if (k, n) not in _BYTE_FLOORS:
    _BYTE_FLOORS[k, n] = {key: row[key] for key in ("read_s", "copy_s", "read_dev_s", "copy_dev_s")
                          if key in row}
  row.update(_BYTE_FLOORS[k, n])
  row["read_bps"] = k * n / 2 / row["read_s"]
  row["copy_bps"] = k * n / row["copy_s"]  # Read + write.


def _variants(row, w4, args, interpret):
  """Each W4A16 variant checked against XLA's W4A16 path (rel err < 1e-2:
  same bf16 products, float32 sums reordered, ~1e-3 at most), then timed;
  the fastest gemv config re-run on a NaN-poisoned output buffer."""
  ref = k4.int4_matmul_xla(*w4[0], group=args.group)
  variants = {"xla_w4a16": functools.partial(k4.int4_matmul_xla, group=args.group),
              "v1_w4a16": functools.partial(k4.int4_matmul, group=args.group, interpret=interpret,
                                            blocks=k4.GPU_DECODE_BLOCKS)}
  variants.update({f"gemv:{c}": functools.partial(k4g.int4_gemv, group=args.group,
                                                  config=gemv_config(c), interpret=interpret)
                   for c in args.gemv_configs.split(";")})
  variants.update({f"mosaic:{c}": functools.partial(k4m.int4_mosaic, group=args.group,
                                                    config=mosaic_config(c), interpret=interpret)
                   for c in filter(None, args.mosaic_configs.split(";"))})
  row["variants"], timed, sets_of, by_layout = {}, [], {}, {}
  for name, fn in variants.items():
    entry = row["variants"][name] = {}
    try:
      sets_of[name] = _sets_in_layout(w4, name, by_layout)
      many = jax.jit(lambda ss, fn=fn: [fn(*s_) for s_ in ss])
      entry["rel_err"] = err = timing.relative_error(many(sets_of[name])[0], ref)
      if not err < 1e-2:
        entry["error"] = "wrong result: not timed"
        continue
      entry["s"] = timing.time_per_call(fn, sets_of[name], args.reps, many=many)
      entry["speedup"] = row["xla_bf16_s"] / entry["s"]
      entry["read_fraction"] = row["read_s"] / entry["s"]
      if args.device_time:
        entry["dev_s"] = timing.device_time_per_call(fn, sets_of[name], args.dev_reps, many=many)
        entry["dev_speedup"] = row["xla_bf16_dev_s"] / entry["dev_s"]
        entry["dev_read_fraction"] = row.get("read_dev_s", float("nan")) / entry["dev_s"]
      timed += [(entry["s"], name)] if name.startswith("gemv:") else []
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  if not timed:
    return
  row["gemv_best"] = best = min(timed)[1]
  # The kernel's own output: [M, N] bf16, or split-K's float32 partials.
  shape = k4g.out_shape(row["M"], row["N"], row["K"], args.group, gemv_config(best[5:]))
  poison = jnp.full(shape, jnp.nan, jnp.bfloat16 if len(shape) == 2 else jnp.float32)
  try:
    y = jax.jit(functools.partial(variants[best], out=poison))(*sets_of[best][0])
    row["gemv_best_poisoned_rel_err"] = timing.relative_error(y, ref)
  except Exception as e:  # pylint: disable=broad-except
    row["gemv_best_poisoned"] = f"{type(e).__name__}: {str(e)[:200]}"


def _sets_in_layout(w4, name, by_layout):
  """``w4``'s (x, codes, scales) sets for variant ``name``: for a "t:" config
  the codes tiled by ``tile_codes`` at its bn, for int4_mosaic converted by
  ``from_halves``, each distinct weight converted once per layout
  (``by_layout`` keeps them for the run's other variants)."""
  if name.startswith("mosaic:"):
    layout, convert = "int4 [N, K]", k4m.from_halves
  elif name.startswith("gemv:" + TILED):
    bn = gemv_config(name[5:]).bn
    layout, convert = f"tiled {bn}", functools.partial(k4g.tile_codes, bn=bn)
  else:
    return w4
  if layout not in by_layout:
    convert, done = jax.jit(convert), {}  # id(codes) -> its copy; w4 keeps every codes alive.
    for _, codes, _ in w4:
      if id(codes) not in done:
        done[id(codes)] = convert(codes)
    by_layout[layout] = [(x, done[id(codes)], scales) for x, codes, scales in w4]
  return by_layout[layout]


def _best(variants, prefix, key):
  """(name, entry) of the fastest variant named ``prefix``... by ``key``."""
  timed = [(e[key], k) for k, e in variants.items() if k.startswith(prefix) and key in e]
  return (min(timed)[1], variants[min(timed)[1]]) if timed else (None, {})


def print_device_table(rows) -> None:
  """``--device_time``: the same variants by the kernels' own GPU time."""
  print("\nW4A16 at decode M by kernel time (jax.profiler, CUPTI): us per call; x = XLA bf16's "
        "kernel time / the variant's; read: XLA's kernel reading the packed bytes once")
  print(f"{'model':9s} {'layer':8s} {'M':>3s} {'bf16':>6s} {'again':>6s} {'read':>6s} "
        f"{'xla_w4':>7s} {'v1':>7s} {'best gemv':>9s} {'us':>6s}  {'config':19s} "
        f"{'mosaic':>7s} {'us':>6s}  config")
  for r in rows:
    if "xla_bf16_dev_s" not in r:
      continue
    v = r["variants"]
    cell = lambda e: f"{e['dev_speedup']:6.2f}x" if "dev_speedup" in e else "    ERR"
    best, b = _best(v, "gemv:", "dev_s")
    mbest, mb = _best(v, "mosaic:", "dev_s")
    print(f"{r['model']:9s} {r['layer']:8s} {r['M']:3d} {r['xla_bf16_dev_s'] * 1e6:6.1f} "
          f"{r['xla_bf16_dev_s_again'] * 1e6:6.1f} {r.get('read_dev_s', float('nan')) * 1e6:6.1f} "
          f"{cell(v.get('xla_w4a16', {}))} {cell(v.get('v1_w4a16', {}))}   {cell(b)} "
          f"{b.get('dev_s', float('nan')) * 1e6:6.1f}  {(best or '-----')[5:]:19s} {cell(mb)} "
          f"{mb.get('dev_s', float('nan')) * 1e6:6.1f}  {(mbest or '-------')[7:]}")


def print_table(rows) -> None:
  """The short table ``--decode`` prints last."""
  print("\nW4A16 at decode M: us per call; x = XLA bf16 time / variant time (same run); "
        "read: XLA reading the packed bytes once (us/TB/s), max = bf16 / read (the ratio a "
        "kernel at that rate reaches); copy: TB/s")
  print(f"{'model':9s} {'layer':8s} {'M':>3s} {'bf16':>6s} {'empty':>6s} {'read':>9s} {'max':>6s} "
        f"{'copy':>5s} {'xla_w4':>7s} {'v1':>7s} {'gemv':>7s} {'gemv us':>7s} {'%read':>5s}  "
        "best gemv config")
  for r in rows:
    v = r["variants"]
    cell = lambda key: f"{v[key]['speedup']:6.2f}x" if "speedup" in v.get(key, {}) else "    ERR"
    b = v.get(r.get("gemv_best"), {})
    print(f"{r['model']:9s} {r['layer']:8s} {r['M']:3d} {r['xla_bf16_s'] * 1e6:6.1f} "
          f"{r['empty_s'] * 1e6:6.1f} {r['read_s'] * 1e6:4.1f}/{r['read_bps'] / 1e12:4.2f} "
          f"{r['xla_bf16_s'] / r['read_s']:5.2f}x {r['copy_bps'] / 1e12:5.2f} "
          f"{cell('xla_w4a16')} {cell('v1_w4a16')} "
          f"{cell(r['gemv_best']) if b else '    ERR'} {b.get('s', float('nan')) * 1e6:7.1f} "
          f"{100 * b.get('read_fraction', float('nan')):5.0f}  {r.get('gemv_best', '-')[5:]}"
          f" (poisoned rel err {r.get('gemv_best_poisoned_rel_err', float('nan')):.1e})")
