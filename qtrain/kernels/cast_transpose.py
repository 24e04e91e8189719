"""Float8 codes of a matrix in both layouts from one read: ``cast_transpose``.

The per-tensor fp8 training matmul (``qtrain.quant.dot_general``, mode fp8
with one scale per tensor) multiplies the same codes twice: X's in the
forward (x w, contraction over K) and in dW = X^T dY (contraction over the
tokens M), dY's in dX = dY W^T and in dW. cuBLASLt's fp8 GEMM reads both
operands contraction-major, so dW needs X's and dY's codes laid out [K, M]
and [N, M]. Through XLA that is a cast pass, then a transpose of the 1-byte
codes as a pass of its own, which ran at ~1 TB/s on an H100 (10.6 of the
llama_1b fp8 step's 190 ms). Here one kernel reads a tile of x once, scales,
clips and casts it, and writes the tile and its transpose.

The rounding is the cast's (to nearest, ties to even; the same bits as
``quantizer.codes(..., cast_rounds=True)`` and the XLA reference
``cast_transpose_xla``). The scale is an input: the caller has already
reduced x to its absmax (current scaling).

On an H100 (2026-11-24, .snap probe recorded in KERNEL_NOTES.md) the kernel
read bf16 and wrote both codes at 2.70 TB/s (93% of a copy's), 1.75x faster
than XLA's cast then transpose ([16384, 2048]: 50.7 vs 89.1 us; [16384,
5632]: 136 vs 244 us), bit-equal.

Flavours: Triton ("gpu"; interpret mode on CPU for tests) and the XLA
reference (``qtrain.kernels.dispatch.fp8_both_layouts`` picks; shapes whose
dims are not multiples of the tile take XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qtrain.quant import quantizer
from qtrain.quant.spec import QuantSpec

BLOCK = 64  # Tile side: 64 x 64 of float32 in registers, 4 warps.


def supports(m: int, n: int) -> bool:
  """Whether the kernel tiles an [m, n] matrix (else the XLA reference)."""
  return m % BLOCK == 0 and n % BLOCK == 0


def cast_transpose_xla(x, scale, dtype, *, pow2: bool = True):
  """(q [M, N], q^T [N, M]): the quantizer's per-tensor codes of x
  (``quantizer.codes(..., cast_rounds=True)``: x / scale in float32, clipped
  to the range of ``dtype`` and cast) and their transpose; the reference the
  kernel (given 1 / scale) must equal bit for bit. ``pow2``: scale is a power
  of two, so x * (1 / scale) is x / scale."""
  fmt = {jnp.dtype(d): f for f, d in quantizer.FP8_DTYPES.items()}[jnp.dtype(dtype)]
  spec = QuantSpec(format=fmt, granularity="tensor", scale_pow2=pow2)
  q = quantizer.codes(x.astype(jnp.float32), jnp.asarray(scale, jnp.float32).reshape(()),
                      None, spec, cast_rounds=True)
  return q, q.T


def _kernel(x_ref, s_ref, q_ref, qt_ref, *amax_ref, top: float):
  x = x_ref[...].astype(jnp.float32)
  v = jnp.clip(x * s_ref[0], -top, top)
  q_ref[...] = v.astype(q_ref.dtype)
  qt_ref[...] = v.T.astype(qt_ref.dtype)  # Transposed as float32, then cast: the same codes.
  if amax_ref:  # The tile's absmax, from the read that casts it (delayed scaling).
    amax_ref[0][...] = jnp.max(jnp.abs(x)).reshape(1, 1)


def _call(x, s, dtype, interpret: bool, num_warps: int, block: int, amax: bool = False):
  m, n = x.shape
  out_specs = [pl.BlockSpec((block, block), lambda i, j: (i, j)),
               pl.BlockSpec((block, block), lambda i, j: (j, i))]
  out_shape = [jax.ShapeDtypeStruct((m, n), dtype), jax.ShapeDtypeStruct((n, m), dtype)]
  if amax:  # One float32 per tile; the caller reduces the [m / block, n / block] grid.
    out_specs.append(pl.BlockSpec((1, 1), lambda i, j: (i, j)))
    out_shape.append(jax.ShapeDtypeStruct((m // block, n // block), jnp.float32))
  return pl.pallas_call(
      functools.partial(_kernel, top=float(jnp.finfo(dtype).max)),
      grid=(m // block, n // block),
      in_specs=[pl.BlockSpec((block, block), lambda i, j: (i, j)),
                pl.BlockSpec((1,), lambda i, j: (0,))],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="cast_transpose")(x, s)


@functools.partial(jax.jit,
                   static_argnames=("dtype", "interpret", "num_warps", "block", "amax"))
def cast_transpose(x, inv_scale, *, dtype, interpret: bool = False, num_warps: int = 4,
                   block: int = BLOCK, amax: bool = False):
  """``cast_transpose_xla`` as one Pallas (Triton) kernel; x is [M, N] with
  both dims multiples of ``block`` (``supports``), inv_scale one float32.
  ``amax``: also max |x| (float32) from the same read, a third value:
  delayed scaling casts with a scale from earlier steps' absmax and records
  this one's, so no pass of its own reads x for it."""
  if x.shape[0] % block or x.shape[1] % block:
    raise ValueError(f"cast_transpose tiles {block} x {block}: got {x.shape}")
  out = _call(x, jnp.asarray(inv_scale, jnp.float32).reshape(1), dtype, interpret, num_warps,
              block, amax)
  return (out[0], out[1], jnp.max(out[2])) if amax else tuple(out)


def _local(x, s, dtype, interpret: bool, amax: bool = False):
  """One device's shard: the kernel where the shard tiles, else the XLA
  reference at 1 / s (s = 1 / scale with scale a power of two: the same
  bits as the kernel's x * s). ``amax``: also the shard's max |x|, from the
  kernel's tile grid, or a reduction beside the XLA reference."""
  if supports(*x.shape):
    return cast_transpose(x, s, dtype=dtype, interpret=interpret, amax=amax)
  out = cast_transpose_xla(x, 1.0 / s[0], dtype)
  return (*out, jnp.max(jnp.abs(x)).astype(jnp.float32)) if amax else out


def _mesh_axes(spec) -> tuple[str, ...]:
  """The mesh axes a PartitionSpec splits over, in order."""
  names = []
  for entry in spec:
    names += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
  return tuple(names)


def _out_shardings(arg_shapes, amax: bool):
  """(q's, q^T's[, the absmax's]): x's sharding, its transpose, replicated."""
  x_sh = arg_shapes[0].sharding
  rows, cols = (tuple(x_sh.spec) + (None, None))[:2]
  out = (NamedSharding(x_sh.mesh, P(rows, cols)), NamedSharding(x_sh.mesh, P(cols, rows)))
  return out + (NamedSharding(x_sh.mesh, P()),) if amax else out


def _partition(dtype, interpret, mesh, arg_shapes, result_shape, *, amax: bool):
  """Each device casts its own block of x: q keeps x's sharding, q^T the
  transposed one, the scale is replicated; no data moves. With ``amax``
  each device also reduces its block (whether or not the block tiles) and
  one all-reduce (max) of that scalar over the axes splitting x combines them."""
  del result_shape
  out_sh = _out_shardings(arg_shapes, amax)
  axes = _mesh_axes(arg_shapes[0].sharding.spec)

  def lower(x, s):
    out = tuple(_local(x, s, dtype, interpret, amax))
    if amax and axes:
      out = (*out[:2], jax.lax.pmax(out[2], axes))
    return out

  return mesh, lower, out_sh, (out_sh[0], NamedSharding(out_sh[0].mesh, P(None)))


def _infer(dtype, interpret, mesh, arg_shapes, result_shape, *, amax: bool):
  del dtype, interpret, mesh, result_shape
  return _out_shardings(arg_shapes, amax)


def _partitioned_op(amax: bool):
  """The custom-partitioned call, without or with the absmax output (the
  sharding rule names each output, so the two are two ops)."""
  @functools.partial(custom_partitioning, static_argnums=(2, 3))
  def op(x, s, dtype, interpret):
    return tuple(_local(x, s, dtype, interpret, amax))

  op.def_partition(
      partition=functools.partial(_partition, amax=amax),
      infer_sharding_from_operands=functools.partial(_infer, amax=amax),
      sharding_rule="m n, o -> m n, n m" + (", " if amax else ""))
  return op


_PARTITIONED = {False: _partitioned_op(False), True: _partitioned_op(True)}


def cast_transpose_sharded(x, inv_scale, *, dtype, interpret: bool = False, amax: bool = False):
  """``cast_transpose`` for an x split over a mesh: a ``custom_partitioning``
  op whose SPMD partitioning runs the kernel on each device's block (q
  sharded as x, q^T as its transpose, no gather), and where a block does
  not tile, the XLA reference on that block. The kernel alone would take
  the whole operand: XLA cannot partition a Pallas call and gathers it.
  ``amax``: also max |x| over the whole x, replicated: each block's from
  its own read, then one scalar all-reduce."""
  return _PARTITIONED[amax](x, jnp.asarray(inv_scale, jnp.float32).reshape(1), dtype, interpret)
