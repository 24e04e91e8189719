"""W4A16 at decode sizes (M <= 16) on Hopper through Pallas Mosaic GPU: a
TMA producer warpgroup streams the int4 codes while consumer warpgroups
unpack and multiply them.

    y[m, n] = sum_g s[g, n] * sum_{k in group g} x[m, k] q[n, k]

Why a third decode kernel (after ``int4.int4_matmul`` and ``int4_gemv``):
the Triton ones take the time to read the codes *plus* the time to unpack
and multiply them. On an H100 the tiled ``int4_gemv`` body reading alone
reached 16-17 us on llama_8b's gate/down, the full kernel ~8 us more
(benchmarks/KERNEL_NOTES.md, "v3"): Triton's software pipeline issues
loads, unpack and MMA from the same warps. Here they are separate warps
(``plgpu.emit_pipeline_warp_specialized``): the producer only issues TMA
copies, ``stages`` steps ahead; the consumers only unpack and multiply.
Measured (same file, "v4"): 2.30-2.43x XLA's bf16 dot on llama_8b's
gate_up and down at M = 16 (the tiled ``int4_gemv``: 1.64-1.78x in the
same runs).

Layout (chosen for the tensor cores, not the exports): the codes as
``jnp.int4`` [N, K], K contiguous (XLA packs two per byte), so a [64,
group] tile of them is wgmma's left operand after Mosaic's int4 -> bf16
register conversion (``FragmentedArray.astype``'s lop3 magic-number path,
CUTLASS's); x, padded to 16 rows (wgmma's N), is the right operand through
a transposed shared-memory view of its [16, group] tile. The dot thus runs
as y^T = W x^T, N on the tensor core's 64-row side. ``from_halves``
converts the exports' halves layout (``int4.pack_int4``'s) once, at load.

Numerics: ``int4_gemv``'s. Each group is its own wgmma into a fresh
float32 accumulator (the bf16 products code x x are exact, |code| <= 8),
scaled by s[g, n] in float32 and added to a float32 running sum, so the
result differs from ``int4.int4_matmul_xla`` by float32 summation order
only.

Grid: one CTA per (64 x compute_wgs columns of N, K / split); the split-K
partials (float32 [split, N, 16]) are summed by XLA, with the transpose
back to [M, N], in one fusion.

Interpret mode (CPU tests): Pallas' Mosaic GPU interpreter takes wgmma
operands from shared memory only, and no transposed view; there the
unpacked tile is stored to shared memory first and x comes as x^T tiles
(``x_transposed``). The register operand and the transposed x are checked
by lowering for CUDA on CPU and, on a GPU, by the benchmark's comparison
with XLA (benchmarks/matmul.py --decode).

Not routed by ``qtrain.kernels.dispatch`` yet: the exports write the halves
layout, and the dispatcher's decode path (``packed.dot``) would take
``from_halves`` codes at load.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qtrain.kernels.int4 import unpack_int4
from qtrain.kernels.int8_mosaic import interpret_params, smem_transforms

WG_ROWS = 64  # wgmma's M: weight rows (output columns) per consumer warpgroup.
MAX_M = 16
SMS = 132  # An H100's.


@dataclasses.dataclass(frozen=True)
class MosaicGemvConfig:
  """One CTA per (64 compute_wgs columns of N, K / split_k).

  split_k: CTAs per column tile (0: ``split_for``'s one-wave rule); stages:
  pipeline steps in flight (TMA copies issued ahead of the consumers);
  groups_per_step: groups per step, each its own wgmma accumulator (the
  next group's unpack overlaps the previous group's wgmma); wide_w: a step's
  codes as one [cta_n, gps group] tile (128-byte rows at gps 2) instead of
  one tile per group (64-byte rows); x_transposed: x^T [K, 16] tiles
  (32-byte rows; interpret mode always) instead of x [16, K] read through a
  transposed view; compute_wgs: consumer warpgroups, 64 columns each.
  Defaults: the best of the H100 sweeps (benchmarks/KERNEL_NOTES.md, "v4").
  """
  split_k: int = 0
  stages: int = 4
  groups_per_step: int = 2
  wide_w: bool = True
  x_transposed: bool = False
  compute_wgs: int = 2


def from_halves(packed):
  """Halves-layout codes [K/2, N] (int8, ``int4.pack_int4``) -> int4 [N, K]."""
  return unpack_int4(packed).T.astype(jnp.int4)


def split_for(n_ctas: int, steps: int, split_k: int = 0, sms: int = SMS) -> int:
  """The split a call runs, a divisor of the pipeline steps (a split never
  pads K): ``split_k`` cut down to one; for 0 the largest that keeps all
  CTAs in one wave (n_ctas x split <= SMs: one CTA per SM, its shared memory
  taken by the pipeline), at least 1. On the H100: llama_8b gate_up
  (112 column tiles) 1, down and attn_out (32) 4, which were the best splits
  of the sweep; a second wave cost 15-40%."""
  divisors = [d for d in range(1, steps + 1) if steps % d == 0]
  if split_k:
    return max(d for d in divisors if d <= split_k)
  return max([d for d in divisors if n_ctas * d <= sms] or [1])


def _kernel(x_gmem, w_gmem, s_gmem, o_gmem, o_smem, *a_smem, group, gps, steps, stages, xt,
            wide, wgs):
  """One CTA: columns [j cta_n, (j + 1) cta_n) of N (cta_n = 64 wgs) over
  split ``sk``'s K range, ``steps`` pipeline steps of ``gps`` groups each."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  j, sk = lax.axis_index("n"), lax.axis_index("s")
  cta_n = WG_ROWS * wgs
  cols = pl.ds(j * cta_n, cta_n)
  ks = pl.ds(sk * steps * gps * group, steps * gps * group)
  gs = pl.ds(sk * steps * gps, steps * gps)

  def compute(run_pipeline):
    wg = lax.axis_index("wg")
    total = run_pipeline(jnp.zeros((WG_ROWS, MAX_M), jnp.float32))
    o_smem[wg] = total
    plgpu.commit_smem()  # Orders the register stores before the TMA engine reads.
    plgpu.copy_smem_to_gmem(o_smem.at[wg],
                            o_gmem.at[sk, pl.ds(j * cta_n + wg * WG_ROWS, WG_ROWS)])
    plgpu.wait_smem_to_gmem(0)

  def step(_, *refs):
    nw = 1 if wide else gps
    w_smem, x_smem, (s_smem, total) = refs[:nw], refs[nw:nw + gps], refs[nw + gps:]
    wg = lax.axis_index("wg")
    rows = pl.ds(wg * WG_ROWS, WG_ROWS)

    # The int4 -> bf16 register path; ``wide``: one [64, gps group] tile of
    # 128-byte rows, loaded and converted once, cut into groups in registers.
    whole = w_smem[0][rows].astype(jnp.bfloat16) if wide else None

    def mma(*accs):
      # Each group its own accumulator, one wait per step drains them all;
      # unwide, group i + 1's unpack overlaps group i's wgmma.
      for i, acc_ref in enumerate(accs):
        a = (whole[:, i * group:(i + 1) * group] if wide
             else w_smem[i][rows].astype(jnp.bfloat16))  # [64, group]
        if a_smem:  # Interpret mode: its wgmma takes shared-memory operands only.
          a_smem[0][wg, i] = a
          plgpu.commit_smem()
          a = a_smem[0].at[wg, i]
        # [64, group] x [group, 16]: x^T as is, or x [16, group] read transposed.
        plgpu.wgmma(acc_ref, a, x_smem[i] if xt else plgpu.transpose_ref(x_smem[i], (1, 0)))
      return [acc_ref[...] for acc_ref in accs]  # The first read waits for all.

    accs = pl.run_scoped(mma, *[plgpu.ACC((WG_ROWS, MAX_M), jnp.float32)] * gps)
    for i, acc in enumerate(accs):  # Each group's partial scaled in float32, as in int4_gemv.
      total = total + acc * lax.broadcast_in_dim(s_smem[i, rows], (WG_ROWS, MAX_M), (0,))
    return total

  if wide:
    w_specs = [plgpu.BlockSpec((cta_n, gps * group), lambda g: (0, g),
                               transforms=smem_transforms(jnp.int4, gps * group))]
  else:
    w_specs = [plgpu.BlockSpec((cta_n, group), lambda g, i=i: (0, g * gps + i),
                               transforms=smem_transforms(jnp.int4, group)) for i in range(gps)]
  if xt:
    x_specs = [plgpu.BlockSpec((group, MAX_M), lambda g, i=i: (g * gps + i, 0),
                               transforms=smem_transforms(jnp.bfloat16, MAX_M)) for i in range(gps)]
  else:
    x_specs = [plgpu.BlockSpec((MAX_M, group), lambda g, i=i: (0, g * gps + i),
                               transforms=smem_transforms(jnp.bfloat16, group)) for i in range(gps)]
  plgpu.emit_pipeline_warp_specialized(
      step, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=wgs,
      max_concurrent_steps=stages, compute_context=compute,
      in_specs=[*w_specs, *x_specs, plgpu.BlockSpec((gps, cta_n), lambda g: (g, 0))],
  )(*[w_gmem.at[cols, ks]] * len(w_specs), *[x_gmem.at[ks, :] if xt else x_gmem.at[:, ks]] * gps,
    s_gmem.at[gs, cols])


def check_config(cfg: MosaicGemvConfig):
  if cfg.split_k < 0 or cfg.stages < 1 or cfg.groups_per_step < 1:
    raise ValueError(f"MosaicGemvConfig split_k={cfg.split_k} (>= 0, 0: one wave), "
                     f"stages={cfg.stages} (>= 1), groups_per_step={cfg.groups_per_step} (>= 1)")
  if cfg.compute_wgs not in (1, 2):
    raise ValueError(f"MosaicGemvConfig.compute_wgs={cfg.compute_wgs}: 1 or 2 consumer "
                     "warpgroups (64 columns each)")


def int4_mosaic(x, w4, scales, *, group: int = 128, out_dtype=jnp.bfloat16,
                config: MosaicGemvConfig | None = None, interpret: bool = False):
  """x [M <= 16, K] (cast to bf16) times int4 codes w4 [N, K]
  (``from_halves``) with float32 group scales [K/group, N] (group 128);
  N a multiple of 64 x compute_wgs."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  cfg = config or MosaicGemvConfig()
  check_config(cfg)
  m, k = x.shape
  n, k2 = w4.shape
  if w4.dtype != jnp.int4 or k2 != k:
    raise ValueError(f"int4_mosaic: codes must be int4 [N, K={k}], got {w4.dtype} {w4.shape}")
  if m > MAX_M:
    raise ValueError(f"int4_mosaic takes M <= {MAX_M} rows (decode), got M={m}")
  cta_n = WG_ROWS * cfg.compute_wgs
  if n % cta_n or k % group or group != 128:
    raise ValueError(f"int4_mosaic: N={n} a multiple of {cta_n}, group 128 dividing K={k}")
  if scales.shape != (k // group, n):
    raise ValueError(f"scales must be [K/group, N] = {(k // group, n)}, got {scales.shape}")
  # x [16, K], rows >= M zero (one small XLA fusion: pad and cast); x^T
  # [K, 16] in interpret mode, which has no transposed wgmma operand, or by
  # config (32-byte TMA rows instead of 128).
  xt = interpret or cfg.x_transposed
  xp = jnp.pad(x.astype(jnp.bfloat16), ((0, MAX_M - m), (0, 0)))
  xp = xp.T if xt else xp
  n_ctas = n // cta_n
  gps = cfg.groups_per_step
  if (k // group) % gps:
    raise ValueError(f"MosaicGemvConfig.groups_per_step={gps} must divide K/group={k // group}")
  sk = split_for(n_ctas, k // group // gps, cfg.split_k)
  kernel = functools.partial(_kernel, group=group, gps=gps, steps=k // group // gps // sk,
                             stages=cfg.stages, xt=xt,
                             wide=cfg.wide_w, wgs=cfg.compute_wgs)
  y = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((sk, n, MAX_M), jnp.float32),
      scratch_types=[plgpu.SMEM((cfg.compute_wgs, WG_ROWS, MAX_M), jnp.float32)] + (
          [plgpu.SMEM((cfg.compute_wgs, gps, WG_ROWS, group), jnp.bfloat16,
                      transforms=smem_transforms(jnp.bfloat16, group))] if interpret else []),
      grid=(n_ctas, sk), grid_names=("n", "s"), num_threads=cfg.compute_wgs + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret_params() if interpret else None,
  )(xp, w4, scales.astype(jnp.float32))
  return jnp.sum(y, axis=0).T[:m].astype(out_dtype)
