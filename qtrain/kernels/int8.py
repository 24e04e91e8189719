"""int8 x int8 matmul with int32 accumulation and a fused scale epilogue.

    y[m, n] = (sum_k q_x[m, k] q_w[k, n]) * s_x[m] * s_w[n]

The integer sum is exact (int32 holds K * 127^2 for K < 133,000); the
epilogue multiplies in float32 in the order (acc * s_x) * s_w, the order of
``qtrain.quant.dot_general``'s int8 path, so the kernel and ``int8_matmul_xla``
round identically. Folding both scales into the matmul's last write is what
removes the separate rescale pass around every int8 dot that issue 16 measured
(the int8 step at 0.74x the bf16 step on an H100).

Flavours:

* ``gpu``: Pallas on the Triton backend. A (block_m, block_n) output tile per
  program; the K loop inside the program loads (block_m, block_k) and
  (block_k, block_n) int8 slices and ``jnp.dot`` with an int32 result, which
  Triton lowers to Hopper's s8 tensor-core instructions. Triton pipelines the
  loop's loads ``num_stages`` deep.
* ``tpu``: Pallas Mosaic TPU. A (M/bm, N/bn, K/bk) grid with K innermost
  ("arbitrary"), an int32 VMEM accumulator zeroed at k = 0 and scaled out at
  the last k.
* ``mosaic_gpu``: Pallas Mosaic GPU (Hopper): TMA-fed shared-memory
  pipeline and async s8 ``wgmma`` into an int32 register accumulator; needs
  x [M, K] and w [N, K] (K contiguous, what s8 wgmma reads) and transposes
  other layouts in XLA first. See ``int8_mosaic.py``.
* ``xla``: ``lax.dot_general`` on int8 with ``preferred_element_type=int32``
  and the same epilogue: the reference with identical numerics.

Operand layouts: ``x`` is [M, K] or, with ``x_transposed``, [K, M]; ``w`` is
[K, N] or, with ``w_transposed``, [N, K]. The backward dots of the int8
training step read the forward codes in those layouts (dW = Q_x^T Q_g,
dX = Q_g Q_w^T), so no transpose is materialised.

Shapes that do not tile: every dim is zero-padded up to a multiple of its
block (zero codes add exactly 0 to the integer sum; padded rows and columns
are sliced off). Block sizes shrink to the next power of two of a small dim
(floor 16, the tensor-core minimum), so a decode-sized M = 16 pads nothing.

``out_dtype=jnp.int32`` returns the raw accumulator (scales must be None):
the exact integer sum, which tests compare bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtrain.kernels import int8_mosaic

_MIN_BLOCK = 16  # tl.dot's smallest tile side.


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes and, for the GPU flavour, Triton's warps and pipeline depth.

  split_k (GPU): programs per output tile, each summing K / split_k into its
  own int32 (float32 for int4) partial; XLA adds the partials and applies
  the epilogue. For small M, where N / n tiles leave most SMs idle.
  group_m (GPU): output tiles are visited in column-major runs of group_m
  tile rows, so programs running together share x rows and w columns in L2
  (the grouped order of Triton's matmul tutorial); 1: row-major.
  """
  m: int = 128
  n: int = 128
  k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  split_k: int = 1
  group_m: int = 8


GPU_BLOCKS = Blocks(128, 128, 128, 8, 3)
TPU_BLOCKS = Blocks(256, 256, 512, 0, 0)
# Mosaic GPU: one warpgroup per tile (num_warps unused), num_stages TMA slots.
MOSAIC_BLOCKS = Blocks(128, 128, 128, 4, 4)
DEFAULT_BLOCKS = {"gpu": GPU_BLOCKS, "tpu": TPU_BLOCKS, "mosaic_gpu": MOSAIC_BLOCKS}
BACKENDS = tuple(DEFAULT_BLOCKS)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


# Smallest tile sides (m, n, k): tl.dot's 16 on GPU; on TPU int8 packs 32
# rows per vreg and lanes are 128 wide; Mosaic GPU: int8_mosaic.MIN_BLOCKS.
MIN_BLOCKS = {"gpu": (16, 16, 16), "tpu": (32, 128, 128), "mosaic_gpu": int8_mosaic.MIN_BLOCKS}


def fit_blocks(b: Blocks, m: int, n: int, k: int, backend: str = "gpu") -> Blocks:
  """``b`` with each tile side cut to the dim's next power of two, floored at
  the backend's minimum tile."""
  lo_m, lo_n, lo_k = MIN_BLOCKS[backend]
  fit = lambda blk, d, lo: max(lo, min(blk, _pow2_at_least(d)))
  return dataclasses.replace(b, m=fit(b.m, m, lo_m), n=fit(b.n, n, lo_n), k=fit(b.k, k, lo_k))


def with_poison(kernel, call_kwargs: dict, in_specs: list, args: list, out, out_spec):
  """Aliases ``out`` (a NaN/garbage-filled buffer of the padded output shape)
  to the kernel's output, so an element the kernel never writes keeps the
  poison: tests and benchmarks check that every element is written."""
  if out is None:
    return kernel
  i = len(args)
  call_kwargs["input_output_aliases"] = {i: 0}
  in_specs.append(out_spec)
  args.append(out)
  return lambda *refs: kernel(*refs[:i], *refs[i + 1:])  # The kernel never reads it.


def _pad_to(a, axis: int, mult: int):
  r = (-a.shape[axis]) % mult
  if not r:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, r)
  return jnp.pad(a, widths)


def _check(x, w, s_x, s_w, out_dtype, x_transposed, w_transposed):
  if x.dtype != jnp.int8 or w.dtype != jnp.int8:
    raise ValueError(f"int8_matmul multiplies int8 codes, got {x.dtype} x {w.dtype}")
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f"int8_matmul takes 2-D operands, got {x.shape} x {w.shape}")
  (m, k) = x.shape[::-1] if x_transposed else x.shape
  (k2, n) = w.shape[::-1] if w_transposed else w.shape
  if k != k2:
    raise ValueError(f"contraction dims differ: x {x.shape} (transposed={x_transposed}), "
                     f"w {w.shape} (transposed={w_transposed})")
  raw = jnp.dtype(out_dtype) == jnp.int32
  if raw != (s_x is None and s_w is None):
    raise ValueError("out_dtype=int32 returns the raw accumulator: pass s_x=s_w=None; any "
                     "other out_dtype needs both scales")
  if not raw and (s_x.shape != (m,) or s_w.shape != (n,)):
    raise ValueError(f"scales must be s_x [{m}] and s_w [{n}], got {s_x.shape}, {s_w.shape}")
  return m, n, k, raw


def int8_matmul_xla(x, w, s_x=None, s_w=None, *, out_dtype=jnp.bfloat16,
                    x_transposed=False, w_transposed=False):
  """The reference: XLA's int8 dot (int32 out) and the same float32 epilogue."""
  _, _, _, raw = _check(x, w, s_x, s_w, out_dtype, x_transposed, w_transposed)
  dims = (((0 if x_transposed else 1,), (1 if w_transposed else 0,)), ((), ()))
  acc = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)
  if raw:
    return acc
  return (acc.astype(jnp.float32) * s_x[:, None] * s_w[None, :]).astype(out_dtype)


def _epilogue(acc, s_x_M1, s_w_1N, o_ref):
  """Writes acc, or (acc * s_x) * s_w in float32 (the XLA path's order)."""
  if s_x_M1 is None:
    o_ref[...] = acc
  else:
    o_ref[...] = (acc.astype(jnp.float32) * s_x_M1 * s_w_1N).astype(o_ref.dtype)


def _gpu_kernel(x_ref, w_ref, *rest, nk: int, bk: int, xt: bool, wt: bool, split: bool):
  sx_ref, sw_ref, o_ref = rest if len(rest) == 3 else (None, None, rest[0])
  bm, bn = o_ref.shape
  k0 = pl.program_id(1) * nk if split else 0  # This program's share of K, in steps.

  def body(i, acc):
    ks = pl.ds(pl.multiple_of((k0 + i) * bk, bk), bk)
    x = x_ref[ks, :] if xt else x_ref[:, ks]
    w = w_ref[:, ks] if wt else w_ref[ks, :]
    dims = (((0 if xt else 1,), (1 if wt else 0,)), ((), ()))
    return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.int32))
  if sx_ref is None:
    _epilogue(acc, None, None, o_ref)
  else:
    _epilogue(acc, sx_ref[...][:, None], sw_ref[...][None, :], o_ref)


def grouped_tile(p, nm: int, nn: int, group_m: int):
  """(tile row, tile column) of program p: runs of ``group_m`` tile rows
  walked column by column (the last run may be shorter)."""
  # lax.div / lax.rem: p >= 0, so C division is floor division, without the
  # sign fix-ups jnp's // adds to a scalar program the kernel then carries.
  div, rem = jax.lax.div, jax.lax.rem
  width = group_m * nn
  first = div(p, width) * group_m
  rows = jax.lax.min(nm - first, group_m)
  return first + rem(rem(p, width), rows), div(rem(p, width), rows)


def _gpu_call(x, w, s_x, s_w, out_dtype, b: Blocks, xt, wt, interpret, out):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  kp = x.shape[0] if xt else x.shape[1]
  mp = x.shape[1] if xt else x.shape[0]
  np_ = w.shape[0] if wt else w.shape[1]
  sk, nm, nn = b.split_k, mp // b.m, np_ // b.n
  ti = lambda p: grouped_tile(p, nm, nn, b.group_m)[0]
  tj = lambda p: grouped_tile(p, nm, nn, b.group_m)[1]
  # Each program sees its rows (columns) of x and w over the whole K and
  # slices K itself: loads, not blocks, must be powers of two on Triton.
  x_spec = (pl.BlockSpec((kp, b.m), lambda p, s: (0, ti(p))) if xt
            else pl.BlockSpec((b.m, kp), lambda p, s: (ti(p), 0)))
  w_spec = (pl.BlockSpec((b.n, kp), lambda p, s: (tj(p), 0)) if wt
            else pl.BlockSpec((kp, b.n), lambda p, s: (0, tj(p))))
  in_specs, args = [x_spec, w_spec], [x, w]
  if s_x is not None and sk == 1:
    in_specs += [pl.BlockSpec((b.m,), lambda p, s: (ti(p),)),
                 pl.BlockSpec((b.n,), lambda p, s: (tj(p),))]
    args += [s_x, s_w]
  kernel = functools.partial(_gpu_kernel, nk=kp // (b.k * sk), bk=b.k, xt=xt, wt=wt,
                             split=sk > 1)
  if sk == 1:
    out_spec = pl.BlockSpec((b.m, b.n), lambda p, s: (ti(p), tj(p)))
    out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
  else:  # int32 partials [split_k, M, N]; a poison buffer is int32-min filled by the caller.
    out_spec = pl.BlockSpec((None, b.m, b.n), lambda p, s: (s, ti(p), tj(p)))
    out_shape = jax.ShapeDtypeStruct((sk, mp, np_), jnp.int32)
  kw = {}
  kernel = with_poison(kernel, kw, in_specs, args, out, out_spec)
  y = pl.pallas_call(
      kernel, grid=(nm * nn, sk), in_specs=in_specs, out_specs=out_spec,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
      interpret=interpret, name="int8_matmul", **kw)(*args)
  if sk == 1:
    return y
  acc = jnp.sum(y, axis=0, dtype=jnp.int32)  # Exact: integer partial sums.
  if s_x is None:
    return acc
  return (acc.astype(jnp.float32) * s_x[:, None] * s_w[None, :]).astype(out_dtype)


def _tpu_kernel(x_ref, w_ref, *rest, xt: bool, wt: bool):
  if len(rest) == 4:
    sx_ref, sw_ref, o_ref, acc_ref = rest
  else:
    (o_ref, acc_ref), sx_ref, sw_ref = rest, None, None
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  dims = (((0 if xt else 1,), (1 if wt else 0,)), ((), ()))
  acc_ref[...] += jax.lax.dot_general(x_ref[...], w_ref[...], dims,
                                      preferred_element_type=jnp.int32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    scales = (None, None) if sx_ref is None else (sx_ref[...], sw_ref[...])
    _epilogue(acc_ref[...], *scales, o_ref)


def _tpu_call(x, w, s_x, s_w, out_dtype, b: Blocks, xt, wt, interpret, out):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  kp = x.shape[0] if xt else x.shape[1]
  mp = x.shape[1] if xt else x.shape[0]
  np_ = w.shape[0] if wt else w.shape[1]
  x_spec = (pl.BlockSpec((b.k, b.m), lambda i, j, k: (k, i)) if xt
            else pl.BlockSpec((b.m, b.k), lambda i, j, k: (i, k)))
  w_spec = (pl.BlockSpec((b.n, b.k), lambda i, j, k: (j, k)) if wt
            else pl.BlockSpec((b.k, b.n), lambda i, j, k: (k, j)))
  in_specs, args = [x_spec, w_spec], [x, w]
  if s_x is not None:
    # Scales ride as an [M, 1] column and an [1, N] row: TPU tiles are 2-D,
    # and these broadcast against the accumulator with no relayout.
    in_specs += [pl.BlockSpec((b.m, 1), lambda i, j, k: (i, 0)),
                 pl.BlockSpec((1, b.n), lambda i, j, k: (0, j))]
    args += [s_x[:, None], s_w[None, :]]
  kernel = functools.partial(_tpu_kernel, xt=xt, wt=wt)
  out_spec = pl.BlockSpec((b.m, b.n), lambda i, j, k: (i, j))
  kw = {}
  kernel = with_poison(kernel, kw, in_specs, args, out, out_spec)
  if interpret:
    interpret = pltpu.InterpretParams()
  return pl.pallas_call(
      kernel, grid=(mp // b.m, np_ // b.n, kp // b.k), in_specs=in_specs,
      out_specs=out_spec, **kw,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      scratch_shapes=[pltpu.VMEM((b.m, b.n), jnp.int32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="int8_matmul")(*args)


def int8_matmul(x, w, s_x=None, s_w=None, *, out_dtype=jnp.bfloat16, backend: str = "gpu",
                blocks: Blocks | None = None, x_transposed: bool = False,
                w_transposed: bool = False, interpret: bool = False, out=None):
  """y = (q_x q_w) * s_x[:, None] * s_w[None, :] through the Pallas kernel of
  ``backend`` ("gpu": Triton, "tpu": Mosaic); see the module doc.

  ``out``: optional poisoned buffer of the padded output shape (``padded_out_shape``)
  aliased to the result, to check that every element is written.
  """
  m, n, k, raw = _check(x, w, s_x, s_w, out_dtype, x_transposed, w_transposed)
  if backend not in BACKENDS:
    raise ValueError(f"int8_matmul backend={backend!r}: one of {BACKENDS} (XLA: int8_matmul_xla)")
  b = effective_blocks(m, n, k, backend, blocks)
  if backend == "mosaic_gpu":
    if out is not None:
      raise ValueError("int8_matmul backend='mosaic_gpu' takes no out= poison buffer "
                       "(plgpu.kernel has no aliasing); its interpret mode NaN-fills the output")
    return _mosaic(x, w, s_x, s_w, out_dtype, b, x_transposed, w_transposed, interpret)[:m, :n]
  kb = b.k * b.split_k
  xp = _pad_to(_pad_to(x, int(x_transposed), b.m), int(not x_transposed), kb)
  wp = _pad_to(_pad_to(w, int(w_transposed), kb), int(not w_transposed), b.n)
  if not raw:
    s_x, s_w = _pad_to(s_x.astype(jnp.float32), 0, b.m), _pad_to(s_w.astype(jnp.float32), 0, b.n)
  call = _gpu_call if backend == "gpu" else _tpu_call
  want = padded_out_shape(m, n, k, backend, b), jnp.dtype(out_dtype if b.split_k == 1 else jnp.int32)
  if out is not None and (out.shape, out.dtype) != want:
    raise ValueError(f"out must be {want[1]}{want[0]} (the padded output; int32 partials with "
                     f"split_k), got {out.dtype}{out.shape}")
  y = call(xp, wp, s_x, s_w, jnp.dtype(out_dtype), b, x_transposed, w_transposed, interpret, out)
  return y[:m, :n]


def _mosaic(x, w, s_x, s_w, out_dtype, b: Blocks, xt: bool, wt: bool, interpret: bool):
  """x to [M, K], w to [N, K] (K-major: s8 wgmma's only layout; XLA
  transposes the others), padded to the tiles, through ``int8_mosaic.call``.
  Interpret mode feeds w as [K, N]: its wgmma cannot read a transposed ref."""
  x_mk = x.T if xt else x
  w_nk = w if wt else w.T
  xp = _pad_to(_pad_to(x_mk, 0, b.m), 1, b.k)
  wp = _pad_to(_pad_to(w_nk, 0, b.n), 1, b.k)
  if interpret:
    wp = wp.T
  if s_x is not None:
    s_x, s_w = _pad_to(s_x.astype(jnp.float32), 0, b.m), _pad_to(s_w.astype(jnp.float32), 0, b.n)
  return int8_mosaic.call(xp, wp, s_x, s_w, jnp.dtype(out_dtype), b, interpret)


def split_divisor(steps: int, split_k: int) -> int:
  """The largest divisor of ``steps`` up to ``split_k``: a split never pads K
  (padding K would copy the weight at every call)."""
  return max(d for d in range(1, max(1, split_k) + 1) if steps % d == 0)


def _up(d: int, mult: int) -> int:
  return -(-d // mult) * mult


def effective_blocks(m: int, n: int, k: int, backend: str = "gpu",
                     blocks: Blocks | None = None) -> Blocks:
  """The blocks a call runs: fitted to the dims, split_k cut to a divisor
  of the K steps."""
  b = fit_blocks(blocks or DEFAULT_BLOCKS[backend], m, n, k, backend)
  if backend == "mosaic_gpu":
    int8_mosaic.check_blocks(b.m, b.n, b.k, b.num_warps)
  if backend == "gpu" and any(v & (v - 1) for v in (b.m, b.n, b.k)):
    raise ValueError(f"GPU blocks must be powers of two (Triton loads), got {b}")
  if backend != "gpu" and b.split_k != 1:
    raise ValueError(f"split_k is a Triton GPU-flavour option, not {backend!r}'s (the TPU grid "
                     "already walks K; Mosaic GPU has none yet)")
  return dataclasses.replace(b, split_k=split_divisor(-(-k // b.k), b.split_k))


def padded_out_shape(m: int, n: int, k: int, backend: str = "gpu", blocks: Blocks | None = None):
  """``out``'s shape: the padded [M, N] the kernel writes before slicing,
  or with split_k the [split_k, M, N] int32 partials."""
  b = effective_blocks(m, n, k, backend, blocks)
  shape = (_up(m, b.m), _up(n, b.n))
  return shape if b.split_k == 1 else (b.split_k, *shape)
