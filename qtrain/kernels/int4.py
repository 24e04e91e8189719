"""W4A16: a bf16 x packed-int4 matmul with group scales along K.

    y[m, n] = sum_g s[g, n] * sum_{k in group g} x[m, k] q[k, n]

q: symmetric 4-bit codes in [-7, 7] (``qtrain.quant.quantizer``'s int grid
at bits=4, groups of ``group`` rows of K, absmax scales), packed two per
byte. The weight is read as half a byte per element, which is the point at
decode sizes (M <= 16), where the matmul is bound by reading the weight:
the byte floor is K N / 2 against the bf16 dot's 2 K N (issue 16's target:
2.5x XLA's bf16 dot there).

Packing ("halves" layout): ``packed[i, n]`` (int8) holds q[i, n] in its low
nibble and q[i + K/2, n] in its high nibble. A kernel step over ``group``
packed rows then yields two whole groups (rows i.. and K/2 + i..) as two
plain tiles, with no interleaving of K inside the kernel: unpacking is a
shift pair, (p << 4) >> 4 and p >> 4, arithmetic shifts that sign-extend.

Kernels: Pallas Triton ("gpu") and Mosaic TPU ("tpu", the K steps on an
"arbitrary" grid axis with a float32 VMEM accumulator). GPU: an output tile per program; per K step it loads
x's two [bm, group] slices, one [group, bn] packed tile and the two groups'
scale rows, unpacks the codes to bf16 (exact: |q| <= 7) and accumulates
dot(x_lo, q_lo) * s_lo + dot(x_hi, q_hi) * s_hi in float32: a group's
partial sum is scaled once per output element instead of dequantizing every
weight element. ``int4_matmul_xla`` computes the same grouped sums in XLA
(the reference; only float32 summation order differs).

Decode sizes (M <= 16) have their own kernel, ``int4_gemv.py`` (same
packing and numerics; one launch, no padding, cheaper unpacking).

Shapes: K must be a multiple of 2 * group (else ValueError: the dispatcher
takes the XLA path); M and N are zero-padded to their blocks. ``split_k``
(``Blocks``) splits the group pairs over more programs for small M, each
writing a float32 partial that XLA sums (the sum order differs from the
unsplit kernel's by float32 rounding only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtrain.kernels.int8 import Blocks, fit_blocks, split_divisor, with_poison
from qtrain.quant import quantizer
from qtrain.quant.spec import QuantSpec

GPU_BLOCKS = Blocks(m=64, n=128, k=0, num_warps=4, num_stages=3)  # k: the group.
# M <= 16 (decode): the fastest config of KERNEL_NOTES' H100 run at M = 16
# (1.17x XLA bf16): narrow tiles and split-K 4, so N / 64 * 4 programs fill the SMs.
GPU_DECODE_BLOCKS = Blocks(m=16, n=64, k=0, num_warps=4, num_stages=4, split_k=4)
TPU_BLOCKS = Blocks(m=256, n=256, k=0, num_warps=0, num_stages=0)


def pack_int4(q_KN):
  """int8 codes in [-8, 7], [K, N] (K even) -> packed [K/2, N] int8 (halves layout)."""
  k = q_KN.shape[0]
  if k % 2:
    raise ValueError(f"packing pairs rows of K: K={k} must be even")
  lo, hi = q_KN[: k // 2].astype(jnp.int32), q_KN[k // 2:].astype(jnp.int32)
  byte = (lo & 0xF) | ((hi & 0xF) << 4)
  return jnp.where(byte > 127, byte - 256, byte).astype(jnp.int8)


def unpack_int4(packed):
  """packed [K/2, N] int8 -> codes [K, N] int8 (the inverse of ``pack_int4``)."""
  lo, hi = _nibbles(packed)
  return jnp.concatenate([lo, hi], axis=0)


def _nibbles(p):
  lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(p, jnp.int8(4)), jnp.int8(4))
  return lo, jax.lax.shift_right_arithmetic(p, jnp.int8(4))


def quantize_int4(w_KN, group: int = 128):
  """(packed [K/2, N] int8, scales [K/group, N] float32): symmetric 4-bit
  absmax codes per group of K rows, through the project's quantizer."""
  spec = QuantSpec(bits=4, granularity="group", group_size=group)
  qt = quantizer.quantize(w_KN, spec, contract_axis=0)
  return pack_int4(qt.q), qt.scale


def dequantize_int4(packed, scales, group: int):
  q = unpack_int4(packed).astype(jnp.float32)
  return q * jnp.repeat(scales, group, axis=0)


def _check(x, packed, scales, group):
  m, k = x.shape
  if packed.dtype != jnp.int8 or packed.shape[0] * 2 != k:
    raise ValueError(f"packed weight must be int8 [K/2={k // 2}, N], got {packed.dtype}{packed.shape}")
  n = packed.shape[1]
  if k % (2 * group):
    raise ValueError(f"int4 kernel steps over pairs of groups: K={k} must be a multiple of "
                     f"2 * group={2 * group}")
  if scales.shape != (k // group, n):
    raise ValueError(f"scales must be [K/group={k // group}, N={n}], got {scales.shape}")
  return m, n, k


def int4_matmul_xla(x, packed, scales, *, group: int = 128, out_dtype=jnp.bfloat16):
  """The reference: per-group dots of bf16 values (float32 out) scaled and
  summed in XLA. The operands are bf16 values held in float32 (XLA:CPU has
  no batched bf16 x bf16 -> f32 dot): their products are exact in float32
  and in TF32 alike, so this is the kernel's bf16 dot with float32 sums."""
  m, n, k = _check(x, packed, scales, group)
  q = unpack_int4(packed).astype(jnp.float32).reshape(k // group, group, n)
  x_MGK = x.astype(jnp.bfloat16).astype(jnp.float32).reshape(m, k // group, group)
  part_MGN = jnp.einsum("mgk,gkn->mgn", x_MGK, q, preferred_element_type=jnp.float32)
  return jnp.sum(part_MGN * scales[None], axis=1).astype(out_dtype)


def _kernel(x_ref, p_ref, s_ref, o_ref, *, group: int, half_groups: int, steps: int):
  bm, bn = o_ref.shape
  j0 = pl.program_id(2) * steps  # This program's share of the group pairs (split-K).

  def body(j, acc):
    j = j0 + j
    rows = pl.ds(pl.multiple_of(j * group, group), group)
    lo, hi = _nibbles(p_ref[rows, :])
    x_lo = x_ref[:, rows]
    x_hi = x_ref[:, pl.ds(pl.multiple_of((j + half_groups) * group, group), group)]
    d_lo = jnp.dot(x_lo, lo.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    d_hi = jnp.dot(x_hi, hi.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return acc + d_lo * s_ref[j, :][None, :] + d_hi * s_ref[j + half_groups, :][None, :]

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(xlo_ref, xhi_ref, p_ref, slo_ref, shi_ref, o_ref, acc_ref):
  @pl.when(pl.program_id(2) == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  lo, hi = _nibbles(p_ref[...])
  d_lo = jnp.dot(xlo_ref[...], lo.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
  d_hi = jnp.dot(xhi_ref[...], hi.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
  acc_ref[...] += d_lo * slo_ref[...] + d_hi * shi_ref[...]

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tpu_call(xp, pp, sp, b: Blocks, group: int, out_dtype, interpret, out):
  """Mosaic TPU: grid (M/bm, N/bn, group pairs), K innermost; x enters twice
  (its low- and high-half group as two [bm, group] blocks) and the scales as
  [K/group, 1, N] so each group's row is a legal (1, bn) tile."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  (mp, k), np_ = xp.shape, pp.shape[1]
  hg = k // (2 * group)
  s3 = sp.reshape(k // group, 1, np_)
  specs = [pl.BlockSpec((b.m, group), lambda i, j, g: (i, g)),
           pl.BlockSpec((b.m, group), lambda i, j, g: (i, g + hg)),
           pl.BlockSpec((group, b.n), lambda i, j, g: (g, j)),
           pl.BlockSpec((None, 1, b.n), lambda i, j, g: (g, 0, j)),
           pl.BlockSpec((None, 1, b.n), lambda i, j, g: (g + hg, 0, j))]
  args, kw = [xp, xp, pp, s3, s3], {}
  out_spec = pl.BlockSpec((b.m, b.n), lambda i, j, g: (i, j))
  kernel = with_poison(_tpu_kernel, kw, specs, args, out, out_spec)
  return pl.pallas_call(
      kernel, grid=(mp // b.m, np_ // b.n, hg), in_specs=specs, out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      scratch_shapes=[pltpu.VMEM((b.m, b.n), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False, name="int4_matmul", **kw)(*args)


def int4_matmul(x, packed, scales, *, group: int = 128, out_dtype=jnp.bfloat16,
                blocks: Blocks | None = None, backend: str = "gpu", interpret: bool = False,
                out=None):
  """x [M, K] (cast to bf16) times the packed int4 weight through the Pallas
  kernel of ``backend`` ("gpu": Triton, "tpu": Mosaic); see the module doc."""
  m, n, k = _check(x, packed, scales, group)
  if backend == "tpu":
    b = fit_blocks(blocks or TPU_BLOCKS, m, n, group, "tpu")
    mp, np_ = -(-m // b.m) * b.m, -(-n // b.n) * b.n
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, mp - m), (0, 0)))
    pp = jnp.pad(packed, ((0, 0), (0, np_ - n)))
    sp = jnp.pad(scales.astype(jnp.float32), ((0, 0), (0, np_ - n)))
    if out is not None and out.shape != (mp, np_):
      raise ValueError(f"out must be the padded output {(mp, np_)}, got {out.shape}")
    return _tpu_call(xp, pp, sp, b, group, out_dtype, interpret, out)[:m, :n]
  if backend != "gpu":
    raise ValueError(f"int4_matmul backend={backend!r}: 'gpu' or 'tpu' (XLA: int4_matmul_xla)")
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  b = fit_blocks(dataclasses.replace(blocks or GPU_BLOCKS, k=group), m, n, group)
  mp, np_ = -(-m // b.m) * b.m, -(-n // b.n) * b.n
  xp = jnp.pad(x.astype(jnp.bfloat16), ((0, mp - m), (0, 0)))
  pp = jnp.pad(packed, ((0, 0), (0, np_ - n)))
  sp = jnp.pad(scales.astype(jnp.float32), ((0, 0), (0, np_ - n)))
  hg = k // (2 * group)
  sk = split_divisor(hg, b.split_k)  # Never more programs than group pairs, never uneven.
  specs = [pl.BlockSpec((b.m, k), lambda i, j, s: (i, 0)),
           pl.BlockSpec((k // 2, b.n), lambda i, j, s: (0, j)),
           pl.BlockSpec((k // group, b.n), lambda i, j, s: (0, j))]
  args, kw = [xp, pp, sp], {}
  if sk == 1:
    out_spec = pl.BlockSpec((b.m, b.n), lambda i, j, s: (i, j))
    out_shape = (mp, np_)
  else:  # float32 partials [split_k, M, N], summed below.
    out_spec = pl.BlockSpec((None, b.m, b.n), lambda i, j, s: (s, i, j))
    out_shape = (sk, mp, np_)
  kernel = functools.partial(_kernel, group=group, half_groups=hg, steps=hg // sk)
  if out is not None:
    if out.shape != out_shape:
      raise ValueError(f"out must be the padded output {out_shape}, got {out.shape}")
    kernel = with_poison(kernel, kw, specs, args, out, out_spec)
  y = pl.pallas_call(
      kernel, grid=(mp // b.m, np_ // b.n, sk), in_specs=specs, out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype if sk == 1 else jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
      interpret=interpret, name="int4_matmul", **kw)(*args)
  if sk > 1:
    y = jnp.sum(y, axis=0).astype(out_dtype)
  return y[:m, :n]


def padded_out_shape(m: int, n: int, k: int, group: int, blocks: Blocks | None = None,
                     backend: str = "gpu"):
  """``out``'s shape: the padded [M, N], or [split_k, M, N] float32 partials."""
  if backend == "tpu":
    b = fit_blocks(blocks or TPU_BLOCKS, m, n, group, "tpu")
    return -(-m // b.m) * b.m, -(-n // b.n) * b.n
  b = fit_blocks(dataclasses.replace(blocks or GPU_BLOCKS, k=16), m, n, 16)
  shape = (-(-m // b.m) * b.m, -(-n // b.n) * b.n)
  sk = split_divisor(k // (2 * group), b.split_k)
  return shape if sk == 1 else (sk, *shape)
