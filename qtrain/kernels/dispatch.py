"""Picks a Pallas kernel or its XLA reference at trace time.

``kernels`` (``config.quant.kernels``):

* ``"xla"`` (the default): always the XLA path (``lax.dot_general`` int8,
  the grouped int4 einsum, ``fwht``'s butterflies).
* ``"auto"``: the Pallas flavour of ``jax.default_backend()`` where one is
  built (int8: Mosaic GPU on "gpu", see ``GPU_INT8_LARGE``, Mosaic TPU on
  "tpu"; int4 and Hadamard: Triton on "gpu", Mosaic on "tpu"), else XLA;
  on CPU that is XLA, so nothing changes there.
* ``"interpret"``: the GPU flavour in Pallas interpret mode on any backend
  (tests; slow).

Shape rules (checked on static shapes, so the choice is made once per trace):
int8 takes the kernel when M, N and K are all >= 16 (a smaller dim would be
padded to a 16-wide tile: more padding than work); other shapes that do not
tile are zero-padded inside the kernel call. int4 needs K a multiple of
2 * group (its K step takes two groups), else XLA; on GPU, M <= 16 runs
the decode blocks (16 x 64 tiles, split-K 4: the best of the H100 run at
M = 16). Hadamard: n <= 128
(per-head rotations) goes to XLA's dense [rows, n] x [n, n] matmul
(``hadamard_dense``): on an H100 it ran at 92% of the copy bandwidth
against the kernel's 47% at n = 128 over 524,288 rows (KERNEL_NOTES.md), so
the kernel takes power-of-two n in (128, 65536] and falls back by itself
elsewhere. fp8 codes in both layouts (``cast_transpose``, the per-tensor
fp8 matmul): the Triton kernel where both dims are multiples of its 64-wide
tile and the scale is a power of two (the kernel multiplies by 1 / s, which
equals x / s only then), on a GPU of compute capability 8.9 or later
(``has_fp8``: Triton's float8 types), else XLA; no TPU flavour (XLA there).

Meshes (``mesh_kind``). A Pallas call is opaque to XLA's partitioner, which
gathers its operands. The cast+transpose kernel is wrapped per shard
(``cast_transpose_sharded``, a ``custom_partitioning`` op: each device casts
its own block, blocks that do not tile take XLA on that block), so it runs
on any mesh under jit; inside a shard_map (a pipeline stage) it takes XLA.
The int8, int4 and Hadamard kernels see whole operands: use them on one
device (training config validation refuses ``kernels`` other than "xla"
with int8 on several devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qtrain.kernels import cast_transpose, fwht, int4, int8

KERNELS = ("xla", "auto", "interpret")
_BUILT = {"int8": ("gpu", "tpu"), "int4": ("gpu", "tpu"), "hadamard": ("gpu", "tpu"),
          "cast_transpose": ("gpu",)}


def flavour(kernels: str, op: str) -> tuple[str, bool] | None:
  """(pallas backend, interpret) for ``op`` under ``kernels``; None: XLA."""
  if kernels not in KERNELS:
    raise ValueError(f"config.quant.kernels={kernels!r}: one of {KERNELS}")
  if kernels == "xla":
    return None
  if kernels == "interpret":
    return "gpu", True
  backend = jax.default_backend()
  if backend not in _BUILT[op]:
    return None
  if op == "cast_transpose" and not has_fp8(jax.devices()[0]):
    return None
  return backend, False


def has_fp8(device) -> bool:
  """Whether a GPU's Triton build can cast to float8: compute capability 8.9
  (Ada) or later. On older GPUs (an A100 is 8.0) Triton refuses the float8
  types, while XLA still runs fp8 dots by upcasting, so the cast+transpose
  kernel falls back to XLA there."""
  cc = getattr(device, "compute_capability", None)
  if not cc:
    return False
  major, _, minor = str(cc).partition(".")
  return (int(major), int(minor or 0)) >= (8, 9)


# int8 under "auto" on a GPU runs the Mosaic GPU flavour (TMA + s8 wgmma,
# qtrain/kernels/int8_mosaic.py), not Triton: in the H100 sweep of 2026-11-23
# (benchmarks/KERNEL_NOTES.md) Triton on our [K, N] weights ran 0.28-0.37x
# XLA's bf16 dot at M = 16384, Mosaic's warp-specialized 128 x 256 x 128 tile
# 1.60-2.20x. That tile needs M >= 128 and N >= 256 (two consumer warpgroups
# on 64-row halves); smaller dims take the one-warpgroup default.
GPU_INT8_LARGE = int8.Blocks(128, 256, 128, int8.int8_mosaic.WS_WARPS, 3)


def gpu_int8_blocks(m: int, n: int, k: int, out_dtype=jnp.bfloat16) -> "int8.Blocks | None":
  """The Mosaic GPU tile for an [M, K] x [K, N] int8 dot (None: the default).
  A 4-byte output tile of 128 x 256 (128 KiB) beside three 48 KiB stages
  exceeds the H100's 227 KiB of shared memory: those take the default."""
  if jnp.dtype(out_dtype).itemsize > 2:
    return None
  return GPU_INT8_LARGE if m >= 128 and n >= 256 and k >= 128 else None


def int8_dot(x, w, s_x=None, s_w=None, *, out_dtype, kernels: str = "xla",
             x_transposed: bool = False, w_transposed: bool = False):
  """``int8.int8_matmul`` or ``int8.int8_matmul_xla`` (same arguments);
  on GPU the Mosaic flavour (see ``GPU_INT8_LARGE``), in interpret mode the
  Triton one (what the CPU tests can run)."""
  m = x.shape[1] if x_transposed else x.shape[0]
  k = x.shape[0] if x_transposed else x.shape[1]
  n = w.shape[0] if w_transposed else w.shape[1]
  pick = flavour(kernels, "int8")
  kw = dict(out_dtype=out_dtype, x_transposed=x_transposed, w_transposed=w_transposed)
  if pick is None or min(m, n, k) < 16:
    return int8.int8_matmul_xla(x, w, s_x, s_w, **kw)
  backend, interpret = pick
  if backend == "gpu" and not interpret:
    return int8.int8_matmul(x, w, s_x, s_w, backend="mosaic_gpu", blocks=gpu_int8_blocks(m, n, k, out_dtype),
                            **kw)
  return int8.int8_matmul(x, w, s_x, s_w, backend=backend, interpret=interpret, **kw)


def w4a16_dot(x, packed, scales, *, group: int, out_dtype, kernels: str = "xla"):
  """``int4.int4_matmul`` or its XLA path; on GPU, M <= 16 (decode) takes
  ``int4.GPU_DECODE_BLOCKS`` (split-K), larger M the default blocks."""
  pick = flavour(kernels, "int4")
  if pick is None or x.shape[1] % (2 * group):
    return int4.int4_matmul_xla(x, packed, scales, group=group, out_dtype=out_dtype)
  blocks = int4.GPU_DECODE_BLOCKS if pick[0] == "gpu" and x.shape[0] <= 16 else None
  return int4.int4_matmul(x, packed, scales, group=group, out_dtype=out_dtype,
                          blocks=blocks, backend=pick[0], interpret=pick[1])


def hadamard(x, signs=None, *, kernels: str = "xla"):
  """(x * signs) H_n / sqrt(n) over the last axis: the kernel, the dense
  matmul (n <= 128) or ``fwht``."""
  pick = flavour(kernels, "hadamard")
  if pick is None:
    return fwht.hadamard_xla(x, signs)
  if x.shape[-1] <= fwht.DENSE_MAX_N and not pick[1]:  # Interpret mode: tests of the kernel.
    return fwht.hadamard_dense(x, signs)
  return fwht.hadamard(x, signs, backend=pick[0], interpret=pick[1])


def fp8_both_layouts(x, scale, dtype, *, pow2: bool, kernels: str = "xla", amax: bool = False):
  """(q [M, N], q^T [N, M]): the float8 codes of x / scale (clipped to the
  format's range, rounded by the cast) in both layouts: the kernel
  (``cast_transpose.cast_transpose``, one pass) where it applies, else
  ``cast_transpose.cast_transpose_xla``; the same bits either way.
  ``pow2``: scale is a power of two (the kernel multiplies by 1 / scale).
  ``amax``: also max |x| as float32 (delayed scaling records it): from the
  kernel's own read, on one device or on each device's block of a mesh
  (then one scalar all-reduce); through XLA a reduction that XLA may fuse
  with the cast (no data dependency between them)."""
  pick = flavour(kernels, "cast_transpose")
  mesh = mesh_kind()
  if pick is None or not pow2 or not cast_transpose.supports(*x.shape) or mesh == "manual":
    out = cast_transpose.cast_transpose_xla(x, scale, dtype, pow2=pow2)
  else:
    inv = 1.0 / jnp.asarray(scale, jnp.float32).reshape(())
    call = cast_transpose.cast_transpose if mesh == "single" else cast_transpose.cast_transpose_sharded
    return call(x, inv, dtype=dtype, interpret=pick[1], amax=amax)  # The kernel's read: the absmax.
  return (*out, jnp.max(jnp.abs(x)).astype(jnp.float32)) if amax else out


def mesh_kind() -> str:
  """What the mesh being traced under asks of a kernel call: "single" (no
  mesh, or one device: the operand is whole), "sharded" (XLA partitions: the
  call must say how, ``custom_partitioning``) or "manual" (inside a
  shard_map over some or all axes, e.g. a pipeline stage: JAX's partitioning
  callback cannot read partly manual shardings, and a Pallas call's outputs
  carry no varying-axes type for shard_map's check)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return "single"
  return "manual" if mesh.manual_axes else "sharded"
