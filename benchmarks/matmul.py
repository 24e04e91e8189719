"""Low-bit Pallas matmuls against XLA's bf16 dot on Llama layer shapes.

  python benchmarks/matmul.py --out=/tmp/matmul.json            # GPU (H100)
  python benchmarks/matmul.py --smoke                           # CPU, interpret mode
  python benchmarks/matmul.py --train --out=/tmp/train.json     # fwd + bwd of the int8 training matmul
  python benchmarks/matmul.py --sweep --out=/tmp/sweep.json     # int8 tile / flavour / layout sweep
  python benchmarks/matmul.py --decode --out=/tmp/decode.json   # W4A16 at M = 1, 16: int4_gemv

For each layer shape (K, N) of ``llama_1b`` (d 2048, d_ff 5632) and
``llama_8b`` (d 4096, d_ff 14336): attention out (d, d), gate/up (d, d_ff)
and down (d_ff, d), and M tokens from 16 to 16384, in one process:

* ``xla_bf16``: ``jnp.dot`` of bf16 operands, bf16 out (the baseline; timed
  twice, the two medians give the noise);
* ``xla_int8``: XLA's int8 dot with the same scale epilogue as the kernel
  (``int8_matmul_xla``, today's w8a8 path);
* ``pallas_int8``: ``qtrain.kernels.int8_matmul`` (Triton flavour on GPU),
  each block config of ``--int8_configs``; the fastest is reported;
* ``xla_w4a16`` / ``pallas_w4a16``: packed-int4 weights (group 128) times
  bf16 x, the XLA reference path and the Pallas kernel (best of
  ``--w4a16_configs``);
* ``torch_int_mm``: ``torch._int_mm`` (int8 x int8 -> int32, no epilogue),
  when torch sees a CUDA device, with B column-major (``b_nk.t()``: the
  layout cuBLASLt's fast int8 path takes; issue 16's 1.34x XLA bf16), and
  ``torch_int_mm_rowmajor`` with a row-major (k, n) B beside it (0.24x in
  KERNEL_NOTES' first run, which timed only that layout).

Before timing, each variant's output is checked against its reference
(relative error ||y - ref|| / ||ref||; NaN fails) with the Pallas output
buffer poisoned with NaN (aliased), so an unwritten element fails the check.
Times are medians over ``--reps`` calls of one jitted function that runs the
op over rotated input sets (``qtrain/kernels/timing.py``). Each row prints
the speedup over xla_bf16 and the two floors of an H100 (FLOP floor at the
measured 798 TFLOP/s bf16 / 1979 TOP/s int8 datasheet; byte floor at the
measured 3.0 TB/s). A short table is printed last; full rows go to --out.

``--decode`` (issue 16's W4A16 target, >= 2.5x XLA bf16 at M <= 16): M = 16
and 1 on every layer shape, ``int4_gemv`` (each of ``--gemv_configs``) beside
v1 (``int4_matmul`` with the dispatcher's decode blocks), XLA's W4A16 path
and XLA bf16, and the floors timed alike in the same run: an empty Pallas
launch, one XLA read of the packed bytes (a max over K) and a copy of them
(``benchmarks/matmul_decode.py``). Starts no shape after 90 s by default.

``--sweep`` (issue 16's int8 target, >= 1.6x XLA bf16 at large M): every
layer shape of both models at M = 16384 and 4096, each config of
``--sweep_configs`` (``flavour:layout:bm,bn,bk,warps,stages``; flavour
``triton`` = ``backend="gpu"``, ``mosaic`` = ``backend="mosaic_gpu"``;
layout ``kn``: w [K, N] as the forward weight is stored, ``nk``: w [N, K],
K contiguous, the only layout s8 wgmma reads) as a ratio to XLA bf16 timed
in the same row, beside XLA int8 and ``torch._int_mm``. A config that fails
to compile or gives a wrong result is recorded with its error and the sweep
goes on. Each config compiles once and is checked against XLA int8 (bit-
equal expected, rel err < 1e-2 accepted and recorded) first on codes drawn
for it alone, so a stale buffer cannot pass for an unwritten tile (Mosaic
GPU has no output aliasing for the NaN poison of the other modes; the
tests poison both flavours in interpret mode), then on the timed sets.
Up to 12 rows x 8 configs: the sweep starts no shape after ``--budget_s``
(170 s by default here) and says which it left out. ``--dump_dir``
keeps XLA's PTX (and asks Mosaic GPU for its PTX) and counts s8
``wgmma`` against s8 ``mma.sync`` per file, the check that Triton's int8
dot reached Hopper's wgmma.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from qtrain.kernels import int4 as k4  # noqa: E402
from qtrain.kernels import int8 as k8  # noqa: E402
from qtrain.kernels import timing  # noqa: E402
from benchmarks import matmul_decode  # noqa: E402

BF16_FLOPS, INT8_OPS, COPY_BPS = 798e12, 1979e12, 3.0e12
MODELS = {"llama_1b": (2048, 5632), "llama_8b": (4096, 14336)}
M_FULL = (16, 64, 256, 1024, 4096, 16384)
# (block_m, block_n, block_k, num_warps, num_stages[, split_k]): small-M
# (weight-bound) tiles, split over K to fill the SMs, then the usual Hopper
# tensor-core tiles. Configs whose tile does not suit M are skipped (``_suits``).
INT8_CONFIGS = ("16,64,256,4,4", "16,64,128,4,4,4", "16,128,128,4,4,8", "32,128,128,4,4",
                "64,128,128,4,4", "128,128,128,8,3", "128,256,128,8,3", "256,128,128,8,3")


# The sweep's configs: today's Triton default in both weight layouts (is
# the row-major B what costs 2x?), a 128 x 256 tile 4 stages deep, and
# Mosaic GPU (TMA + wgmma) tiles: the default (160 KB of shared memory, one
# CTA per SM), with row-major tile order (the 7-field entry, group_m 1: what
# the L2-grouped order buys), bk = 64 (96 KB: two CTAs per SM, one's
# epilogue under the other's MMAs), and warps = 12: warp-specialized, two
# consumer warpgroups on the row halves of a 256 x 128 or 128 x 256 CTA
# tile, sharing its w tile, fed by a TMA producer warpgroup.
SWEEP_CONFIGS = ("triton:kn:128,128,128,8,3", "triton:nk:128,128,128,8,3",
                 "triton:nk:128,256,128,8,4", "mosaic:nk:128,128,128,4,4",
                 "mosaic:nk:128,128,128,4,4,1,1", "mosaic:nk:128,128,64,4,4",
                 "mosaic:nk:256,128,128,12,3", "mosaic:nk:128,256,128,12,3")
SWEEP_MS = (16384, 4096)
FLAVOURS = {"triton": "gpu", "mosaic": "mosaic_gpu"}


W4A16_CONFIGS = ("16,64,0,4,4", "16,64,0,4,4,4", "16,128,0,4,4,8", "64,128,0,4,3",
                 "128,128,0,8,3", "128,256,0,8,3")


def layer_shapes(model: str):
  d, ff = MODELS[model]
  return {"attn_out": (d, d), "gate_up": (d, ff), "down": (ff, d)}


def floors(m, n, k, op_bytes, peak):
  flop = 2.0 * m * n * k
  moved = op_bytes * (m * k + k * n) + 2 * m * n  # Operands once, bf16 out once.
  return flop / peak, moved / COPY_BPS


def _inputs(key, m, n, k, sets):
  out = []
  for i in range(sets):
    kx, kw, ks = jax.random.split(jax.random.fold_in(key, i), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.bfloat16) * (k ** -0.5)
    qx = jax.random.randint(kx, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
    qw = jax.random.randint(kw, (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    sx = jax.random.uniform(ks, (m,), jnp.float32, 1e-3, 1e-2)
    sw = jax.random.uniform(jax.random.fold_in(ks, 1), (n,), jnp.float32, 1e-3, 1e-2)
    out.append(dict(x=x, w=w, qx=qx, qw=qw, sx=sx, sw=sw))
  return out


def _blocks(spec: str) -> k8.Blocks:
  return k8.Blocks(*(int(v) for v in spec.split(",")))


def _suits(spec: str, m: int) -> bool:
  """Small tiles and split-K at small M only, big tiles at big M only: the
  rest would only spend the run's time (the fitted duplicates included)."""
  b = _blocks(spec)
  if m >= 1024:
    return b.m >= 64 and b.split_k == 1
  return b.m <= max(16, m) or b.m <= 64


def tune(name, configs, m, make, sets, ref, poison, reps, row, tol=1e-2):
  """Times ``make(blocks)`` for each config that suits M and returns the
  fastest entry after re-running it on a poisoned output buffer.

  Per config one compile: the timed function's first outputs are checked
  against ``ref`` (relative error < ``tol``; NaN fails). The winner alone is
  re-run with ``out=poison(blocks)`` aliased (a second compile), so a buffer
  that happened to hold the right values cannot hide an unwritten tile.
  """
  best = None
  for spec in [c for c in configs if _suits(c, m)]:
    b, entry = _blocks(spec), {"config": spec}
    try:
      fn = make(b)
      many = jax.jit(lambda ss, fn=fn: [fn(*s_) for s_ in ss])
      entry["rel_err"] = err = timing.relative_error(many(sets)[0], ref)
      if not err < tol:
        entry["error"] = "wrong result: not timed"
      else:
        entry["s"] = timing.time_per_call(fn, sets, reps, many=many)
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    row.setdefault(f"{name}_configs", []).append(entry)
    if "s" in entry and (best is None or entry["s"] < best["s"]):
      best = entry
  if best is None:
    return None
  b = _blocks(best["config"])
  best["poisoned_rel_err"] = err = timing.relative_error(
      jax.jit(make(b))(*sets[0], out=poison(b)), ref)
  if not err < tol:
    row[name] = f"config {best['config']}: an output element was not written (poison survived)"
    return None
  return best


def bench_int8(sets, m, n, k, configs, interpret, reps, row):
  """The int8 kernel's configs against XLA's int8 path; the winner's int32
  accumulator must also equal XLA's bit for bit."""
  qsets = [(s["qx"], s["qw"], s["sx"], s["sw"]) for s in sets]
  ref = k8.int8_matmul_xla(*qsets[0])
  make = lambda b: functools.partial(k8.int8_matmul, backend="gpu", blocks=b, interpret=interpret)

  def poison(b):
    shape = k8.padded_out_shape(m, n, k, "gpu", b)  # 3-D: split_k's int32 partials.
    if len(shape) == 2:
      return jnp.full(shape, jnp.nan, jnp.bfloat16)
    return jnp.full(shape, jnp.iinfo(jnp.int32).min, jnp.int32)

  # Same int32 sums, same float32 epilogue: 0 expected, bf16 ulps at most.
  best = tune("pallas_int8", configs, m, make, qsets, ref, poison, reps, row)
  if best is None:
    return
  acc = jax.jit(functools.partial(make(_blocks(best["config"])), out_dtype=jnp.int32))(*qsets[0][:2])
  best["acc_exact"] = bool(jnp.array_equal(
      acc, k8.int8_matmul_xla(*qsets[0][:2], out_dtype=jnp.int32)))
  if best["acc_exact"]:
    row["pallas_int8_s"], row["pallas_int8_config"] = best["s"], best["config"]
  else:
    row["pallas_int8"] = f"config {best['config']}: int32 accumulator differs from XLA's"


def _torch_status() -> str:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "unavailable: torch is not installed"
  if not torch.cuda.is_available():
    return f"unavailable: torch {torch.__version__} sees no CUDA device"
  return f"torch {torch.__version__} on {torch.cuda.get_device_name()}"


def bench_torch_int_mm(m, n, k, reps, row):
  """``torch._int_mm`` with B column-major (``torch_int_mm``) and row-major
  (``torch_int_mm_rowmajor``): the same (k, n) values, two memory layouts."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      row["torch_int_mm"] = "unavailable: torch sees no CUDA device"
      return
  except ImportError as e:
    row["torch_int_mm"] = f"unavailable: {e}"
    return
  g = torch.Generator(device="cuda").manual_seed(0)
  per = m * k + k * n + 4 * m * n
  draw = lambda shape: torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8,
                                     generator=g)
  col = [(draw((m, k)), draw((n, k)).t()) for _ in range(timing.n_sets(per))]  # B: stride (1, k).
  layouts = {"torch_int_mm": col,
             "torch_int_mm_rowmajor": [(a, b.contiguous()) for a, b in col]}
  for key, sets in layouts.items():
    try:
      a, b = sets[0]
      ref = a.double().cpu() @ b.double().cpu()
      err = float((torch._int_mm(a, b).double().cpu() - ref).norm() / ref.norm())  # pylint: disable=protected-access
      row[f"{key}_rel_err"] = err
      row[f"{key}_s"] = timing.torch_time_per_call(torch._int_mm, sets, reps)  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      row[key] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"


def bench_shape(model, name, m, k, n, args, interpret):
  row = dict(model=model, layer=name, M=m, K=k, N=n)
  per_set = 2 * (m * k + k * n) + m * k + k * n + 2 * m * n
  sets = _inputs(jax.random.key(m * 7 + n * 3 + k), m, n, k, 2 if args.smoke else timing.n_sets(per_set))
  bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  xy = [(s["x"], s["w"]) for s in sets]
  row["xla_bf16_s"], row["xla_bf16_s_again"] = timing.spread(bf16, xy, args.reps)
  xla8 = jax.jit(k8.int8_matmul_xla)
  row["xla_int8_s"] = timing.time_per_call(
      xla8, [(s["qx"], s["qw"], s["sx"], s["sw"]) for s in sets], args.reps)
  bench_int8(sets, m, n, k, args.int8_configs.split(";"), interpret, args.reps, row)
  bench_w4a16(sets, m, n, k, args.w4a16_configs.split(";"), interpret, args.reps, row,
              args.group)
  if not args.smoke:
    bench_torch_int_mm(m, n, k, args.reps, row)
  row["floor_bf16_flop_s"], row["floor_bf16_byte_s"] = floors(m, n, k, 2, BF16_FLOPS)
  row["floor_int8_flop_s"], row["floor_int8_byte_s"] = floors(m, n, k, 1, INT8_OPS)
  row["floor_w4a16_byte_s"] = (2 * m * k + k * n / 2 + 2 * m * n) / COPY_BPS
  for key in ("xla_int8", "pallas_int8", "xla_w4a16", "pallas_w4a16", "torch_int_mm",
              "torch_int_mm_rowmajor"):
    if f"{key}_s" in row:
      row[f"{key}_speedup"] = row["xla_bf16_s"] / row[f"{key}_s"]
  return row


def bench_train(model, name, m, k, n, args, interpret):
  """One training matmul, forward and backward (y, dX, dW for a random
  cotangent): the bf16 dot against ``quant_dot``'s int8 mode (per-token x,
  per-channel W, int8 backward) through XLA and through the Pallas kernel
  (the dispatcher's default blocks). The kernel path must equal the XLA path
  (same codes, same epilogues) before it is timed."""
  from qtrain.quant.dot_general import DotSpec, quant_dot  # pylint: disable=g-import-not-at-top
  from qtrain.quant.spec import QuantSpec  # pylint: disable=g-import-not-at-top
  row = dict(model=model, layer=name, M=m, K=k, N=n, kind="train")
  dims = (((1,), (0,)), ((), ()))
  n_sets = 2 if args.smoke else timing.n_sets(6 * (m * k + k * n + m * n), lo=2, hi=8)
  key = jax.random.key(m + k + n)
  sets = []
  for i in range(n_sets):
    kx, kw, kg = jax.random.split(jax.random.fold_in(key, i), 3)
    sets.append((jax.random.normal(kx, (m, k), jnp.bfloat16),
                 (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16),
                 jax.random.normal(kg, (m, n), jnp.bfloat16)))

  def fwd_bwd(dot):
    def f(x, w, g):
      y, vjp = jax.vjp(dot, x, w)
      return (y, *vjp(g))
    return f

  bf16 = fwd_bwd(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
  quantized = lambda spec: fwd_bwd(lambda x, w: quant_dot(spec, None, None, x, w, dims))
  int8 = lambda kernels: quantized(DotSpec(weight=QuantSpec(bits=8, granularity="channel"),
                                           act=QuantSpec(bits=8, granularity="token"),
                                           mode="int8", kernels=kernels))
  pallas = "interpret" if interpret else "auto"
  outs = [jax.jit(int8(kk))(*sets[0]) for kk in ("xla", pallas)]
  row["kernel_vs_xla_max_abs"] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                                     for a, b in zip(*outs))
  row["kernel_vs_xla_rel_err"] = max(timing.relative_error(b, a) for a, b in zip(*outs))
  row["bf16_s"], row["bf16_s_again"] = timing.spread(bf16, sets, args.reps)
  row["int8_xla_s"] = timing.time_per_call(int8("xla"), sets, args.reps)
  # Same codes and epilogues: bit-equal expected (it is on CPU); a bf16 ulp
  # would mean XLA reordered an epilogue, more means a wrong kernel.
  if row["kernel_vs_xla_rel_err"] < 1e-2:
    row["int8_pallas_s"] = timing.time_per_call(int8(pallas), sets, args.reps)
  else:
    row["int8_pallas"] = "differs from the XLA path: not timed"
  # fp8 through XLA (cuBLASLt): per token / channel with a float32 product
  # and an epilogue (the `fp8` preset), and per tensor with power-of-two
  # scales, one scaled GEMM per dot (`fp8+tensor`).
  e4 = lambda g, **kw: QuantSpec(format="fp8_e4m3", granularity=g, **kw)
  for key_, spec in (("fp8_token", DotSpec(weight=e4("channel"), act=e4("token"), mode="fp8")),
                     ("fp8_tensor", DotSpec(weight=e4("tensor", scale_pow2=True),
                                            act=e4("tensor", scale_pow2=True), mode="fp8"))):
    row[f"{key_}_s"] = timing.time_per_call(quantized(spec), sets, args.reps)
  for key_ in ("int8_xla", "int8_pallas", "fp8_token", "fp8_tensor"):
    if f"{key_}_s" in row:
      row[f"{key_}_speedup"] = row["bf16_s"] / row[f"{key_}_s"]
  return row


def bench_w4a16(sets, m, n, k, configs, interpret, reps, row, group=128):
  """bf16 x against int4 codes of the set's w (group scales): the XLA path
  and the kernel's configs."""
  if k % (2 * group):
    row["pallas_w4a16"] = f"unavailable: K={k} is not a multiple of 2 * group={2 * group}"
    return
  quant = jax.jit(functools.partial(k4.quantize_int4, group=group))
  wsets = [(s["x"], *quant(s["w"])) for s in sets]
  ref = k4.int4_matmul_xla(*wsets[0], group=group)
  row["xla_w4a16_s"] = timing.time_per_call(
      functools.partial(k4.int4_matmul_xla, group=group), wsets, reps)
  make = lambda b: functools.partial(k4.int4_matmul, group=group, blocks=b, interpret=interpret)

  def poison(b):
    shape = k4.padded_out_shape(m, n, k, group, b)  # 3-D: split_k's float32 partials.
    return jnp.full(shape, jnp.nan, jnp.bfloat16 if len(shape) == 2 else jnp.float32)

  # Same bf16 products, float32 sums reordered: ~1e-3 at most.
  best = tune("pallas_w4a16", configs, m, make, wsets, ref, poison, reps, row)
  if best:
    row["pallas_w4a16_s"], row["pallas_w4a16_config"] = best["s"], best["config"]


def main_decode(args, interpret) -> None:
  if args.smoke:
    args.reps, args.group, args.gemv_configs = 1, 32, "32,0,4,2,0,magic;32,1,4,2,1,shift;t:32,1,4,2,0,magic"
    # int4_mosaic takes group 128 only: its interpret-mode tests cover it.
    args.mosaic_configs = ""
    shapes = [("smoke", "tiny", m, 128, 96) for m in (16, 1)]
  else:
    ms = (matmul_decode.DECODE_MS if args.ms == ",".join(map(str, M_FULL))
          else tuple(map(int, args.ms.split(","))))
    shapes = [(model, name, m, k, n) for model in reversed(args.models.split(","))
              for name, (k, n) in layer_shapes(model).items() if name in args.layers.split(",")
              for m in ms]
  rows = run_shapes(shapes, matmul_decode.decode_shape, args, interpret)
  matmul_decode.print_table(rows)
  if args.device_time:
    matmul_decode.print_device_table(rows)


def parse_sweep_config(spec: str):
  """"flavour:layout:bm,bn,bk,warps,stages[,split_k,group_m]" -> (backend,
  w_transposed, Blocks)."""
  try:
    flavour, layout, blocks = spec.split(":")
    backend, wt = FLAVOURS[flavour], {"kn": False, "nk": True}[layout]
  except (ValueError, KeyError) as e:
    raise ValueError(f"--sweep_configs entry {spec!r}: flavour:layout:bm,bn,bk,warps,stages "
                     f"with flavour in {tuple(FLAVOURS)} and layout kn or nk") from e
  return backend, wt, _blocks(blocks)


_XLA_INT8 = jax.jit(k8.int8_matmul_xla)  # One executable per shape for the whole sweep.


def _fresh_codes(key, m, n, k):
  kx, kw, ks = jax.random.split(key, 3)
  return (jax.random.randint(kx, (m, k), -127, 128, jnp.int32).astype(jnp.int8),
          jax.random.randint(kw, (k, n), -127, 128, jnp.int32).astype(jnp.int8),
          jax.random.uniform(ks, (m,), jnp.float32, 1e-3, 1e-2),
          jax.random.uniform(jax.random.fold_in(ks, 1), (n,), jnp.float32, 1e-3, 1e-2))


def sweep_config(spec, idx, qsets, ref, reps, interpret):
  """One config's entry: checks, time, or the error (one compile).

  The config's first call runs on codes drawn for this config alone (its
  output buffers are fresh, and no earlier config computed these values, so
  an unwritten element cannot hold a right answer left over); then on the
  timed sets. Both against XLA's int8 path: bit-equal expected (same int32
  sums, same epilogue), rel err < 1e-2 accepted and recorded."""
  entry = {"config": spec}
  try:
    backend, wt, b = parse_sweep_config(spec)
    fn = functools.partial(k8.int8_matmul, backend=backend, blocks=b, w_transposed=wt,
                           interpret=interpret)
    layout = lambda x, w, sx, sw: (x, w.T if wt else w, sx, sw)  # w.T: one [N, K] copy.
    (m, k), n = qsets[0][0].shape, qsets[0][1].shape[1]
    k8.effective_blocks(m, n, k, backend, b)  # A bad tile fails here, before any work.
    fresh = _fresh_codes(jax.random.key(1000 + idx), m, n, k)
    fresh_ref = _XLA_INT8(*fresh)
    sets = [layout(*s_) for s_ in qsets]
    def run_sets(ss):
      return [fn(*s_) for s_ in ss]

    # The config in the jit's name: XLA's dumped modules (--dump_dir) say which is which.
    run_sets.__name__ = "sweep_" + re.sub(r"\W", "_", spec)
    many = jax.jit(run_sets)
    y_fresh = many([layout(*fresh)] + sets[1:])[0]  # Same shapes: the same executable.
    y = many(sets)[0]
    entry["fresh_rel_err"] = err_fresh = timing.relative_error(y_fresh, fresh_ref)
    entry["rel_err"] = err = timing.relative_error(y, ref)
    entry["bit_equal_xla"] = bool(jnp.array_equal(y, ref) and jnp.array_equal(y_fresh, fresh_ref))
    if not (err < 1e-2 and err_fresh < 1e-2):
      entry["error"] = "wrong result (or an unwritten element): not timed"
    else:
      entry["s"] = timing.time_per_call(fn, sets, reps, many=many)
  except Exception as e:  # pylint: disable=broad-except
    entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  return entry


def sweep_shape(model, name, m, k, n, args, interpret):
  """XLA bf16 (twice: the noise), XLA int8, torch._int_mm and every sweep
  config on one shape."""
  row = dict(model=model, layer=name, M=m, K=k, N=n, kind="sweep")
  per_set = 2 * (m * k + k * n) + m * k + 2 * k * n + 2 * m * n
  n_sets = 2 if args.smoke else timing.n_sets(per_set, lo=2, hi=8)
  sets = _inputs(jax.random.key(m * 7 + n * 3 + k), m, n, k, n_sets)
  bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  row["xla_bf16_s"], row["xla_bf16_s_again"] = timing.spread(bf16, [(s["x"], s["w"]) for s in sets],
                                                             args.reps)
  qsets = [(s["qx"], s["qw"], s["sx"], s["sw"]) for s in sets]
  row["xla_int8_s"] = timing.time_per_call(_XLA_INT8, qsets, args.reps)
  ref = _XLA_INT8(*qsets[0])
  row["configs"] = [sweep_config(spec, i, qsets, ref, args.reps, interpret)
                    for i, spec in enumerate(args.sweep_configs.split(";"))]
  del sets, qsets
  if not args.smoke:
    bench_torch_int_mm(m, n, k, args.reps, row)
  row["floor_bf16_flop_s"], _ = floors(m, n, k, 2, BF16_FLOPS)
  row["floor_int8_flop_s"], row["floor_int8_byte_s"] = floors(m, n, k, 1, INT8_OPS)
  for key in ("xla_int8", "torch_int_mm", "torch_int_mm_rowmajor"):
    if f"{key}_s" in row:
      row[f"{key}_speedup"] = row["xla_bf16_s"] / row[f"{key}_s"]
  for c in row["configs"]:
    if "s" in c:
      c["speedup"] = row["xla_bf16_s"] / c["s"]
      c["int8_tops"] = 2 * m * n * k / c["s"] / 1e12
  return row


def run_shapes(shapes, bench, args, interpret) -> list[dict]:
  """``bench(model, name, m, k, n, args, interpret)`` per shape until
  ``args.budget_s`` is spent; each row printed as JSON and appended to
  ``args.out``, with the seconds elapsed since the first shape."""
  rows, t0 = [], time.perf_counter()
  for model, name, m, k, n in shapes:
    if time.perf_counter() - t0 > args.budget_s:
      print(f"budget: {args.budget_s:.0f} s spent, shapes left out from here on", flush=True)
      break
    row = bench(model, name, m, k, n, args, interpret)
    row["elapsed_s"] = time.perf_counter() - t0
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
  return rows


def main_sweep(args, interpret) -> None:
  if args.dump_dir:
    print(f"dumps: XLA's modules and PTX under {args.dump_dir}", flush=True)
  if args.smoke:
    args.reps = 1
    if args.sweep_configs == ";".join(SWEEP_CONFIGS):
      args.sweep_configs = "triton:kn:16,32,32,4,2;triton:nk:32,64,64,4,2;mosaic:nk:64,64,128,4,2"
    shapes = [("smoke", "tiny", 70, 200, 130)]
  else:
    ms = SWEEP_MS if args.ms == ",".join(map(str, M_FULL)) else tuple(map(int, args.ms.split(",")))
    shapes = [(model, name, m, k, n) for m in ms for model in reversed(args.models.split(","))
              for name, (k, n) in layer_shapes(model).items() if name in args.layers.split(",")]
  rows = run_shapes(shapes, sweep_shape, args, interpret)
  if args.dump_dir:
    for line in ptx_s8_report(args.dump_dir):
      print(line)
  specs = args.sweep_configs.split(";")
  print("\nint8 sweep: speedup over XLA bf16 (same row); ERR: failed (error in the JSON)")
  for i, spec in enumerate(specs):
    print(f"  c{i}: {spec}")
  print(f"{'model':9s} {'layer':8s} {'M':>6s} {'bf16 us':>8s} {'xla_i8':>7s} {'torch8':>7s} "
        + " ".join(f"{'c' + str(i):>6s}" for i in range(len(specs))))
  for r in rows:
    cells = [f"{c['speedup']:6.2f}" if "speedup" in c else "   ERR" for c in r["configs"]]
    print(f"{r['model']:9s} {r['layer']:8s} {r['M']:6d} {r['xla_bf16_s'] * 1e6:8.1f} "
          f"{_fmt(r, 'xla_int8')} {_fmt(r, 'torch_int_mm')} " + " ".join(cells))


def ptx_s8_report(dump_dir: str) -> list[str]:
  """Per dumped PTX file that holds an int8 MMA: how many s8 wgmma
  (Hopper's async warpgroup MMA) and s8 mma.sync (the Ampere-style
  warp MMA) instructions it has."""
  lines = [f"PTX s8 MMA instructions under {dump_dir} (wgmma = Hopper path, mma.sync = older):"]
  for path in sorted(pathlib.Path(dump_dir).rglob("*.ptx")):
    text = path.read_text(errors="replace")
    wg = sum("wgmma.mma_async" in l and ".s8" in l for l in text.splitlines())
    ms = sum("mma.sync" in l and ".s8" in l for l in text.splitlines())
    if wg or ms:
      lines.append(f"  {path.name}: wgmma s8 {wg}, mma.sync s8 {ms}")
  return lines


def _fmt(row, key):
  v = row.get(f"{key}_speedup")
  return f"{v:6.2f}x" if v else "    --"


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="llama_1b,llama_8b")
  p.add_argument("--ms", default=",".join(map(str, M_FULL)))
  p.add_argument("--layers", default="attn_out,gate_up,down")
  p.add_argument("--int8_configs", default=";".join(INT8_CONFIGS),
                 help="';'-separated block_m,block_n,block_k,num_warps,num_stages[,split_k]")
  p.add_argument("--w4a16_configs", default=";".join(W4A16_CONFIGS),
                 help="';'-separated block_m,block_n,0,num_warps,num_stages (block_k: the group)")
  p.add_argument("--group", type=int, default=128)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
  p.add_argument("--budget_s", type=float, default=540.0,
                 help="start no new shape after this many seconds (the table still prints)")
  p.add_argument("--train", action="store_true",
                 help="forward + backward of the int8 training matmul (quant_dot) instead")
  p.add_argument("--sweep", action="store_true",
                 help="int8 flavours, layouts and tiles at large M (SWEEP_CONFIGS) instead")
  p.add_argument("--sweep_configs", default=";".join(SWEEP_CONFIGS),
                 help="';'-separated flavour:layout:bm,bn,bk,warps,stages (see the module doc)")
  p.add_argument("--dump_dir", default=None,
                 help="--sweep: dump XLA's PTX (and Mosaic GPU's) here and count s8 MMAs")
  p.add_argument("--decode", action="store_true",
                 help="W4A16 at decode M (1, 16): int4_gemv configs, v1, XLA, byte floors instead")
  p.add_argument("--device_time", action="store_true",
                 help="--decode: also time each variant by its kernels' GPU time (jax.profiler)")
  p.add_argument("--dev_reps", type=int, default=5, help="--device_time: traced dispatches")
  p.add_argument("--gemv_configs", default=";".join(matmul_decode.GEMV_CONFIGS),
                 help="--decode: ';'-separated bn,split_k,warps,stages,swap(0/1),unpack[,per_sm]")
  p.add_argument("--mosaic_configs", default=";".join(matmul_decode.MOSAIC_CONFIGS),
                 help="--decode: ';'-separated int4_mosaic stages,split_k,groups_per_step,"
                      "wide_w(0/1),compute_wgs(1/2); empty: none")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  if args.decode:
    for spec in args.gemv_configs.split(";"):
      matmul_decode.gemv_config(spec)  # A typo fails here, before any compile.
    for spec in filter(None, args.mosaic_configs.split(";")):
      matmul_decode.mosaic_config(spec)
    if args.budget_s == p.get_default("budget_s"):
      args.budget_s = 90.0  # Starts no shape after 90 s: the run stays near 2 minutes.
  if args.sweep:
    for spec in args.sweep_configs.split(";"):
      parse_sweep_config(spec)  # A typo fails here, before any compile.
    if args.budget_s == p.get_default("budget_s"):
      args.budget_s = 170.0  # The whole sweep stays under 4 minutes on an H100.
  if args.dump_dir:  # Read when the backend starts, i.e. after this point.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={args.dump_dir}").strip()
    os.environ.setdefault("MOSAIC_GPU_DUMP_TO", args.dump_dir)
    os.environ.setdefault("MOSAIC_GPU_DUMP_PTX", "1")  # Not SASS: that needs nvdisasm there.
  backend = jax.default_backend()
  interpret = backend != "gpu"
  print(f"device: {jax.devices()[0].device_kind} ({backend}); jax {jax.__version__}", flush=True)
  if backend != "gpu":
    print(f"pallas_int8 GPU flavour: no GPU ({backend}), running in interpret mode (times "
          "are not kernel speeds)", flush=True)
  print(f"torch_int_mm: {_torch_status()}", flush=True)
  if backend != "tpu":
    print("pallas_int8 TPU flavour: unavailable on this backend (tests run it in TPU "
          "interpret mode)", flush=True)
  if args.smoke:
    args.reps = 2
    args.int8_configs = "16,32,32,4,2;32,64,64,4,2;16,32,32,4,2,2"
    args.w4a16_configs, args.group = "16,32,0,4,2;16,32,0,4,2,2", 32
    shapes = [("smoke", "tiny", m, k, n) for m, k, n in ((16, 128, 64), (40, 96, 80))]
  else:
    shapes = [(model, name, m, k, n) for model in args.models.split(",")
              for name, (k, n) in layer_shapes(model).items() if name in args.layers.split(",")
              for m in map(int, args.ms.split(","))]
  if args.sweep:
    return main_sweep(args, interpret)
  if args.decode:
    return main_decode(args, interpret)
  if args.train:
    if not args.smoke and args.ms == ",".join(map(str, M_FULL)):
      args.ms = "2048,8192,16384"  # Tokens per microbatch of a training step.
    return main_train(args, interpret)
  rows = run_shapes(shapes, bench_shape, args, interpret)
  print("\nspeedup over XLA bf16 (same run); floors in us (bf16 flop / int8 flop / int8 bytes)")
  print(f"{'model':9s} {'layer':8s} {'M':>6s} {'bf16 us':>8s} {'xla_i8':>7s} {'pallas8':>7s} "
        f"{'w4a16':>7s} {'torch8':>7s} {'t8 rowB':>7s}  floors")
  for r in rows:
    print(f"{r['model']:9s} {r['layer']:8s} {r['M']:6d} {r['xla_bf16_s'] * 1e6:8.1f} "
          f"{_fmt(r, 'xla_int8')} {_fmt(r, 'pallas_int8')} {_fmt(r, 'pallas_w4a16')} "
          f"{_fmt(r, 'torch_int_mm')} {_fmt(r, 'torch_int_mm_rowmajor')}  "
          f"{r['floor_bf16_flop_s'] * 1e6:.1f}/"
          f"{r['floor_int8_flop_s'] * 1e6:.1f}/{r['floor_int8_byte_s'] * 1e6:.1f}")


def main_train(args, interpret) -> None:
  if args.smoke:
    shapes = [("smoke", "tiny", 32, 64, 48)]
  else:
    shapes = [(model, name, m, k, n) for model in args.models.split(",")
              for name, (k, n) in layer_shapes(model).items() if name in args.layers.split(",")
              for m in map(int, args.ms.split(","))]
  rows = run_shapes(shapes, bench_train, args, interpret)
  print("\ntraining matmul (y, dX, dW), speedup over the bf16 dot's forward + backward")
  print(f"{'model':9s} {'layer':8s} {'M':>6s} {'bf16 us':>8s} {'int8 xla':>9s} {'int8 pallas':>12s}"
        f" {'fp8 token':>10s} {'fp8 tensor':>11s}")
  for r in rows:
    print(f"{r['model']:9s} {r['layer']:8s} {r['M']:6d} {r['bf16_s'] * 1e6:8.1f} "
          f"{_fmt(r, 'int8_xla'):>9s} {_fmt(r, 'int8_pallas'):>12s} "
          f"{_fmt(r, 'fp8_token'):>10s} {_fmt(r, 'fp8_tensor'):>11s}")


if __name__ == "__main__":
  main()
