"""int8 x int8 matmul on Hopper through Pallas Mosaic GPU (wgmma + TMA).

    y[m, n] = (sum_k q_x[m, k] q_w[n, k]) * s_x[m] * s_w[n]

The same function as ``int8.int8_matmul`` (int32 accumulation, the float32
epilogue (acc * s_x) * s_w, one rounding to ``out_dtype``), written for the
Mosaic GPU backend instead of Triton. Why a second flavour: the Triton one ran
at 0.48x XLA bf16 at M = 16384 on an H100 (benchmarks/KERNEL_NOTES.md), and
Hopper's s8 tensor-core instruction (``wgmma.mma_async ... .s32.s8.s8``)
reads both operands K-major from shared memory (PTX ISA: the transpose
immediates exist for 16-bit types only). Our forward weight is [K, N]
row-major, i.e. N-major; Mosaic GPU refuses that layout for int8 (mma_utils:
"Only f16 WGMMA supports transposes") instead of silently taking a slower
path, so this kernel states the layout it needs:

* x: [M, K] (K contiguous), w: [N, K] (K contiguous; ``w_transposed=True`` in
  ``int8.int8_matmul``'s terms). Other layouts are transposed by XLA before
  the call (one extra pass over that operand: K * N bytes for the weight,
  cheap next to 2 M K N operations at large M, but not free at small M).

One CTA per (block_m, block_n) output tile (a warpgroup, 128 threads),
visited in ``int8.grouped_tile``'s order (runs of ``group_m`` tile rows
column by column): with row-major order a wave of 132 CTAs at N = 14336
spans about one tile row and so every column of w, 58 MB for llama_8b's
gate_up, more than the 50 MB L2, re-read from memory for every tile row
(~2 ms of traffic at M = 16384 against a ~1 ms int8 FLOP floor); runs of 8
rows cut a wave's distinct bytes ~5x. The K
loop is ``plgpu.emit_pipeline``: TMA copies of the (bm, bk) x tile and the
(bn, bk) w tile into swizzled shared memory, ``num_stages`` slots deep, and
one async ``wgmma`` per step into an int32 register accumulator (the wait
allows one wgmma in flight, so the copy of step k+1 overlaps the MMA of step
k). Epilogue: the tile's scales are copied to shared memory, loaded into the
accumulator's row / column layouts, and the scaled tile goes out through
shared memory and a TMA store.

``Blocks.num_warps = 12`` selects the warp-specialized kernel instead: three
warpgroups per CTA, the last a TMA producer
(``plgpu.emit_pipeline_warp_specialized``, 40 registers), the other two
each owning a bm/2-row half of the CTA tile with its own bm/2 x bn
accumulator. Both read the same w tile from shared memory, so a 256 x 128
CTA tile moves the bytes of one 256 x 128 tile with the registers of two
128 x 128 ones, and the producer keeps copying while both consume (the
layout of the fast bf16 Hopper kernels).

Tiles: bm a multiple of 64 (wgmma's M), bn a multiple of 64 (the 128-byte
swizzle of a bf16 output row) and <= 256 (wgmma's N), bk a multiple of the
swizzle width (128 int8 elements; 32 or 64 take the 32- / 64-byte swizzle).
One warpgroup holds the bm x bn int32 accumulator in registers: 128 x 128 is
128 registers a thread; 128 x 256 would need 256 and spills (the sweep
records what it does). Every dim is zero-padded to its tile, as in
``int8.py``.

Testing: Pallas' Mosaic GPU interpret mode (CPU) runs this kernel except for
one thing it lacks, a transposed shared-memory ref as a wgmma operand; there
the w tile is fed [bk, bn] from a [K, N] weight (``_interpret_layout``), the
same integer products. The real layout is checked by lowering to the Mosaic
GPU custom call for CUDA on CPU (shared-memory budget, tiling, wgmma operand
rules) and, on a GPU, by the benchmark's exact comparison with XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# (m, n, k) smallest tile sides: wgmma M = 64; a bf16 output row of 64
# elements fills the 128-byte swizzle; K: one 128-byte swizzle of int8.
MIN_BLOCKS = (64, 64, 128)
# Blocks.num_warps = 12: the warp-specialized kernel (two consumer
# warpgroups on bm/2-row halves, one TMA producer); 4: one warpgroup.
WS_WARPS = 12


def interpret_params():
  """Mosaic GPU interpret mode with NaN-filled fresh buffers (an output
  element the kernel never writes stays NaN, int32 its min). Private in jax
  0.10: imported here only, so a move costs one line."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  return InterpretGPUParams(uninitialized_memory="nan")


def smem_transforms(dtype, minor: int):
  """Shared-memory tiling + swizzle for a tile whose minor dim is ``minor``
  elements: the widest swizzle (32/64/128 bytes) one minor row fills.
  Sub-byte dtypes (int4) count their bits."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  bits = (jnp.iinfo if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo)(dtype).bits
  swizzle = min(128, minor * bits // 8)
  if swizzle not in (32, 64, 128):
    raise ValueError(f"Mosaic GPU tile minor dim {minor} x {bits} bits: "
                     "needs a 32, 64 or 128-byte swizzle")
  return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def check_blocks(bm: int, bn: int, bk: int, num_warps: int = 4) -> None:
  """Raises with the rule a Mosaic GPU tile breaks (before tracing)."""
  if bm % 64 or bn % 64 or bn > 256 or bk % 32 or (bk > 128 and bk % 128):
    raise ValueError(f"Mosaic GPU int8 blocks (m={bm}, n={bn}, k={bk}): m a multiple of 64, "
                     "n a multiple of 64 up to 256, k 32, 64 or a multiple of 128")
  if num_warps not in (4, WS_WARPS) or (num_warps == WS_WARPS and bm % 128):
    raise ValueError(f"Mosaic GPU int8 num_warps={num_warps}: 4 (one warpgroup) or {WS_WARPS} "
                     "(two consumer warpgroups, m a multiple of 128, and a producer)")


def _kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, o_gmem, o_smem, *, bm, bn, bk, nk, stages,
            tile_of, interpret_layout):
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  i, j = tile_of(lax.axis_index("tile"))
  rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)
  int8_t = smem_transforms(jnp.int8, bk)

  def mma(acc_ref):
    def step(_, x_smem, w_smem):
      # K-major B for s8 wgmma: the [bn, bk] tile read as its [bk, bn] transpose.
      w_kn = w_smem if interpret_layout else plgpu.transpose_ref(w_smem, (1, 0))
      plgpu.wgmma(acc_ref, x_smem, w_kn)
      plgpu.wgmma_wait(1)  # One MMA in flight; delay_release keeps its slots alive.

    w_spec = (plgpu.BlockSpec((bk, bn), lambda k: (k, 0), transforms=smem_transforms(jnp.int8, bn),
                              delay_release=1) if interpret_layout else
              plgpu.BlockSpec((bn, bk), lambda k: (0, k), transforms=int8_t, delay_release=1))
    plgpu.emit_pipeline(
        step, grid=(nk,), max_concurrent_steps=stages,
        in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=int8_t,
                                  delay_release=1), w_spec],
    )(x_gmem.at[rows, :], w_gmem.at[:, cols] if interpret_layout else w_gmem.at[cols, :])
    return acc_ref[...]  # Waits for the last wgmma.

  acc = pl.run_scoped(mma, plgpu.ACC((bm, bn), jnp.int32))
  if sx_gmem is None:
    y = acc
  else:
    def scales(sx_smem, sw_smem, bar):
      plgpu.copy_gmem_to_smem(sx_gmem.at[rows], sx_smem, bar.at[0])
      plgpu.copy_gmem_to_smem(sw_gmem.at[cols], sw_smem, bar.at[1])
      plgpu.barrier_wait(bar.at[0])
      plgpu.barrier_wait(bar.at[1])
      return sx_smem[...], sw_smem[...]

    s_x, s_w = pl.run_scoped(scales, plgpu.SMEM((bm,), jnp.float32),
                             plgpu.SMEM((bn,), jnp.float32), plgpu.Barrier(num_barriers=2))
    # (acc * s_x) * s_w in float32: int8.int8_matmul_xla's order, so both round alike.
    y = (acc.astype(jnp.float32) * lax.broadcast_in_dim(s_x, (bm, bn), (0,))
         * lax.broadcast_in_dim(s_w, (bm, bn), (1,)))
  o_smem[...] = y.astype(o_smem.dtype)
  plgpu.commit_smem()  # Orders the register stores before the TMA engine reads.
  plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows, cols])
  plgpu.wait_smem_to_gmem(0)


def _ws_kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, o_gmem, o_smem, sx_smem, sw_smem, bar, *, bm,
               bn, bk, nk, stages, tile_of, interpret_layout):
  """Warp-specialized: a CTA tile of bm rows is two bm/2-row halves, one per
  compute warpgroup, both reading the one w tile the third (producer)
  warpgroup copies in; each compute warpgroup scales and stores its half."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  wg = lax.axis_index("wg")
  i, j = tile_of(lax.axis_index("tile"))
  hm = bm // 2
  cols = pl.ds(j * bn, bn)

  def compute(run_pipeline):
    def with_acc(acc_ref):
      run_pipeline(acc_ref)
      acc = acc_ref[...]
      rows = pl.ds(i * bm + wg * hm, hm)
      if sx_gmem is None:
        y = acc
      else:
        plgpu.copy_gmem_to_smem(sx_gmem.at[rows], sx_smem.at[wg], bar.at[2 * wg])
        plgpu.copy_gmem_to_smem(sw_gmem.at[cols], sw_smem.at[wg], bar.at[2 * wg + 1])
        plgpu.barrier_wait(bar.at[2 * wg])
        plgpu.barrier_wait(bar.at[2 * wg + 1])
        # (acc * s_x) * s_w in float32, as in _kernel.
        y = (acc.astype(jnp.float32) * lax.broadcast_in_dim(sx_smem[wg], (hm, bn), (0,))
             * lax.broadcast_in_dim(sw_smem[wg], (hm, bn), (1,)))
      o_smem[wg] = y.astype(o_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[rows, cols])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(with_acc, plgpu.ACC((hm, bn), jnp.int32))

  def step(_, x_smem, w_smem, acc_ref):
    w_kn = w_smem if interpret_layout else plgpu.transpose_ref(w_smem, (1, 0))
    plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * hm, hm)], w_kn)
    plgpu.wgmma_wait(1)
    return acc_ref

  int8_t = smem_transforms(jnp.int8, bk)
  w_spec = (plgpu.BlockSpec((bk, bn), lambda k: (k, 0), transforms=smem_transforms(jnp.int8, bn),
                            delay_release=1) if interpret_layout else
            plgpu.BlockSpec((bn, bk), lambda k: (0, k), transforms=int8_t, delay_release=1))
  plgpu.emit_pipeline_warp_specialized(
      step, grid=(nk,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
      max_concurrent_steps=stages, compute_context=compute,
      in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=int8_t, delay_release=1),
                w_spec],
  )(x_gmem.at[pl.ds(i * bm, bm), :], w_gmem.at[:, cols] if interpret_layout else w_gmem.at[cols, :])


def _ws_call(xp, wp, s_x, s_w, out_dtype, b, interpret, kw, n_tiles: int, np_: int):
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  kernel = functools.partial(_ws_kernel, **kw)
  if s_x is None:
    body = lambda x, w, o, *scratch: kernel(x, w, None, None, o, *scratch)
    args = (xp, wp)
  else:
    body, args = kernel, (xp, wp, s_x, s_w)
  hm = b.m // 2
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((xp.shape[0], np_), out_dtype),
      scratch_types=[plgpu.SMEM((2, hm, b.n), out_dtype,
                                transforms=smem_transforms(out_dtype, b.n)),
                     plgpu.SMEM((2, hm), jnp.float32), plgpu.SMEM((2, b.n), jnp.float32),
                     plgpu.Barrier(num_barriers=4)],
      grid=(n_tiles,), grid_names=("tile",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params() if interpret else None)(*args)


def call(xp, wp, s_x, s_w, out_dtype, b, interpret: bool):
  """The padded call: xp [Mp, Kp]; wp [Np, Kp] ([Kp, Np] in interpret mode);
  scales float32 [Mp], [Np] or both None (int32 out)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  from qtrain.kernels.int8 import grouped_tile  # pylint: disable=g-import-not-at-top
  mp, kp = xp.shape
  np_ = wp.shape[1] if interpret else wp.shape[0]
  nm, nn = mp // b.m, np_ // b.n
  tile_of = lambda p: grouped_tile(p, nm, nn, max(1, b.group_m))
  # stages >= 2: a slot stays held one step after its wgmma (delay_release).
  kw = dict(bm=b.m, bn=b.n, bk=b.k, nk=kp // b.k, stages=max(2, b.num_stages), tile_of=tile_of,
            interpret_layout=interpret)
  if b.num_warps == WS_WARPS:
    return _ws_call(xp, wp, s_x, s_w, out_dtype, b, interpret, kw, nm * nn, np_)
  kernel = functools.partial(_kernel, **kw)
  if s_x is None:
    body = lambda x, w, o, o_smem: kernel(x, w, None, None, o, o_smem)
    args = (xp, wp)
  else:
    body, args = kernel, (xp, wp, s_x, s_w)
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      scratch_types=[plgpu.SMEM((b.m, b.n), out_dtype, transforms=smem_transforms(out_dtype, b.n))],
      grid=(nm * nn,), grid_names=("tile",),
      # Warpgroup semantics: Mosaic infers the scale vectors' register layouts
      # from the accumulator they broadcast against.
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params() if interpret else None)(*args)

