"""max|x| of a whole tensor as one read at the copy's bandwidth: ``absmax``.

The per-tensor fp8 training matmul (``qtrain.quant.dot_general``) scales X,
W and dY by their absmax before casting (current scaling). Through XLA that
reduction fuses into the op producing the tensor as a second output, and
XLA's GPU reduction emitter ran those multi-output fusions far below the
copy's rate: on an H100 (llama_1b fp8 step, ``benchmarks/profile_step.py``)
the SwiGLU product h = silu(g) u with its absmax read g, u and wrote h at
1.1 TB/s, 7.9 of the step's 182 ms, where a plain elementwise fusion runs
near 2.8 TB/s. Taking the reduction out into this kernel leaves the producer
a loop fusion and reads the tensor once more, at bandwidth.

The tensor is read as the flat [rows, ``ROW``] view of its row-major bytes
(a bitcast). Each program loops over ``steps`` tiles of [``TILE_ROWS``,
ROW], keeping an elementwise running max in the input's dtype (abs and max
are exact in any float dtype), and reduces it to one float32 partial at the
end; the caller's ``jnp.max`` over the partials fuses with the scale's
arithmetic that follows. The result equals ``jnp.max(jnp.abs(x))`` bit for
bit on finite input (max is exact and order-free).

Flavours: Triton ("gpu"; interpret mode on CPU for tests) and the XLA
reference (``absmax_xla``); ``qtrain.kernels.dispatch.tensor_absmax`` picks
(sizes that are not a multiple of one tile, or below ``MIN_SIZE``, take
XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ROW = 1024  # Elements per row of the flat view.
TILE_ROWS = 8  # Rows per load: 8 x 1024 elements, 64 per thread at 4 warps.
TARGET_PROGRAMS = 512  # ~4 per SM on an H100 (132 SMs): enough to hide the loads.


def supports(size: int) -> bool:
  """Whether the kernel tiles a tensor of ``size`` elements (else XLA)."""
  return size > 0 and size % (ROW * TILE_ROWS) == 0


def absmax_xla(x):
  """max|x| as float32: the reference."""
  return jnp.max(jnp.abs(x.astype(jnp.float32)))


def steps_per_program(size: int) -> int:
  """Tiles per program: the largest power of two leaving >= TARGET_PROGRAMS
  programs (1 for small tensors), dividing the tile count."""
  tiles = size // (ROW * TILE_ROWS)
  s = 1
  while tiles % (2 * s) == 0 and tiles // (2 * s) >= TARGET_PROGRAMS:
    s *= 2
  return s


def _kernel(x_ref, o_ref, *, steps: int):
  def body(i, acc):
    t = x_ref[pl.ds(i * TILE_ROWS, TILE_ROWS), :]
    return jnp.maximum(acc, jnp.abs(t))

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((TILE_ROWS, ROW), x_ref.dtype))
  o_ref[...] = jnp.full((1,), jnp.max(acc).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages"))
def absmax(x, *, interpret: bool = False, num_warps: int = 4, num_stages: int = 3):
  """``absmax_xla(x)`` through the kernel; ``x.size`` a multiple of
  ROW * TILE_ROWS (``supports``)."""
  if not supports(x.size):
    raise ValueError(f"absmax reads [{TILE_ROWS}, {ROW}] tiles: got {x.shape}")
  steps = steps_per_program(x.size)
  rows = x.size // ROW
  grid = rows // (TILE_ROWS * steps)
  partials = pl.pallas_call(
      functools.partial(_kernel, steps=steps),
      grid=(grid,),
      in_specs=[pl.BlockSpec((TILE_ROWS * steps, ROW), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((1,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct((grid,), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="absmax")(x.reshape(rows, ROW))
  return jnp.max(partials)
