"""A one-pass Walsh-Hadamard transform kernel over the last axis.

y = (x * signs) H_n / sqrt(n), n = 2^k, H_n Sylvester's (the ordering of
``scipy.linalg.hadamard`` and of ``qtrain.layers.hadamard.fwht``, the XLA
reference path). Random signs make it QuaRot's randomized Hadamard
(Ashkboos et al. 2024); without them it is OSP's FFN Hadamard.

How: Sylvester's H_n is a Kronecker product, H_n = H_a (x) H_b with n = a b,
so a row x viewed row-major as an [a, b] matrix X transforms as

    Y = H_a X H_b,

two small matrix products per row (a, b the two halves of k's bits), done
in one program while the row sits in registers/shared memory: the input is
read once and the output written once. Tensor cores take the products: H's
entries are +-1, exact in bf16, and each float32 operand is split into
``terms`` bf16 pieces x = x_1 + x_2 (+ x_3) (8 significant bits each),
multiplied separately with float32 accumulation and summed. Three pieces
carry float32's 24 bits (float32 math, as the brief asks: tests hold it to
1e-6 of the float64 transform); a bf16 output is rounded to 8 bits, so two
pieces (16 bits) are plenty there and cost a third less. A bf16 input times
+-1 signs is exact in one piece.

For n <= 128 (per-head rotations: head_dim 64, 128) a block of rows is one
[rows, n] x [n, n] product with the dense H_n instead. The dispatcher sends
those sizes to XLA's own dense matmul (``hadamard_dense``), which measured
92% of copy at n = 128 against this kernel's 47%.

Flavours: the kernel bodies are ref loads/stores and dots only, so the same
bodies run on Triton ("gpu") and Mosaic TPU ("tpu"; checked in TPU interpret
mode; on a real TPU, b >= 128 keeps the row tile lane-dense, i.e. n >= 2^14
for the Kronecker path or n = 128 for the dense one).

Not tiled: n not a power of two, n < 16 or n > 2^16 (a, b <= 256 keeps the
[a, b] row in one program). ``hadamard`` falls back to the XLA path there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qtrain.layers.hadamard import fwht, is_power_of_two

MIN_N, MAX_N, DENSE_MAX_N = 16, 2 ** 16, 128


def sylvester(n: int) -> np.ndarray:
  """Unnormalised H_n (entries +-1)."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def kernel_supports(n: int) -> bool:
  return is_power_of_two(n) and MIN_N <= n <= MAX_N


def hadamard_xla(x, signs=None):
  """The reference: butterflies in XLA (``fwht``), float32 inside."""
  if signs is not None:
    x = (x.astype(jnp.float32) * signs.astype(jnp.float32)).astype(x.dtype)
  return fwht(x)


def hadamard_dense(x, signs=None):
  """(x * signs) H_n / sqrt(n) as one XLA matmul with the dense H_n: what the
  dispatcher runs for n <= DENSE_MAX_N, where it is at the byte floor already
  (92% of copy at n = 128 on an H100). bf16 x: one bf16 product (H's +-1 and
  x * signs are exact in bf16) summed in float32; float32 x: a HIGHEST
  precision product, float32 math (TF32 would keep 10 bits)."""
  n = x.shape[-1]
  if signs is not None:
    x = (x.astype(jnp.float32) * signs.astype(jnp.float32)).astype(x.dtype)
  h = jnp.asarray(sylvester(n), x.dtype)
  precision = None if x.dtype == jnp.bfloat16 else jax.lax.Precision.HIGHEST
  y = jnp.dot(x, h, precision=precision, preferred_element_type=jnp.float32)
  return (y * (1.0 / n ** 0.5)).astype(x.dtype)


def _pieces(z, terms: int):
  """z (float32) as ``terms`` bf16 arrays summing to z to 8 * terms bits."""
  out = []
  for _ in range(terms):
    p = z.astype(jnp.bfloat16)
    out.append(p)
    z = z - p.astype(jnp.float32)
  return out


def _mm(a_pieces, b_pieces):
  """sum of products of bf16 pieces, float32 accumulation."""
  acc = None
  for a in a_pieces:
    for b in b_pieces:
      t = jnp.dot(a, b, preferred_element_type=jnp.float32)
      acc = t if acc is None else acc + t
  return acc


def _input_pieces(x, s_ref, terms):
  if s_ref is not None:
    x = x * s_ref[...].astype(x.dtype)  # +-1: exact in any dtype.
  if x.dtype == jnp.bfloat16:
    return [x]
  return _pieces(x.astype(jnp.float32), terms)


def _kron_kernel(x_ref, ha_ref, hb_ref, *rest, rows: int, terms: int, scale: float):
  s_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
  ha, hb = ha_ref[...], hb_ref[...]

  def body(r, carry):
    z = _mm(_input_pieces(x_ref[r], s_ref, terms), [hb])  # X H_b
    y = _mm([ha], _pieces(z, terms))  # H_a (X H_b)
    o_ref[r] = (y * scale).astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, rows, body, 0)


def _dense_kernel(x_ref, h_ref, *rest, terms: int, scale: float):
  s_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
  y = _mm(_input_pieces(x_ref[...], s_ref, terms), [h_ref[...]])
  o_ref[...] = (y * scale).astype(o_ref.dtype)


def _call_params(backend, num_warps, interpret, num_stages=1):
  """(compiler_params, interpret) of the backend's flavour: the kernel bodies
  are plain ref loads/stores and dots, shared by Triton and Mosaic TPU."""
  if backend == "gpu":
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages), interpret
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  params = pltpu.CompilerParams(dimension_semantics=("parallel",))
  return params, (pltpu.InterpretParams() if interpret else False)


def _split(n: int) -> tuple[int, int]:
  k = n.bit_length() - 1
  return 1 << (k // 2), 1 << (k - k // 2)


def hadamard(x, signs=None, *, backend: str = "gpu", block_rows: int | None = None,
             terms: int | None = None, num_warps: int = 4, interpret: bool = False, out=None,
             num_stages: int | None = None):
  """(x * signs) H_n / sqrt(n) over the last axis through the Pallas kernel.

  x: [..., n] float32 or bf16; signs: [n] of +-1 or None. ``terms``: bf16
  pieces per float32 operand (default 3 for a float32 output, 2 for bf16).
  ``out``: optional poisoned [rows_padded, n] buffer aliased to the result.
  ``num_stages`` (GPU): Triton's software pipelining of the row loop's loads;
  default 2 where a program loops over >= 4 rows (n <= 4096), else 1 (on an
  H100 by kernel time, 16384 rows: n = 4096 66% -> 79% of copy bandwidth;
  n = 8192, 2 rows per program, 60% -> 40%: benchmarks/KERNEL_NOTES.md).
  Falls back to ``hadamard_xla`` when ``kernel_supports(n)`` is False.
  """
  n = x.shape[-1]
  if not kernel_supports(n):
    return hadamard_xla(x, signs)
  if backend not in ("gpu", "tpu"):
    raise ValueError(f"hadamard backend={backend!r}: 'gpu' (Triton) or 'tpu' (Mosaic)")
  terms = terms or (3 if x.dtype == jnp.float32 else 2)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, n)
  rows = x2.shape[0]
  dense = n <= DENSE_MAX_N
  br = block_rows or (max(16, 2048 // n) if dense else max(1, 16384 // n))
  br = min(br, max(16 if dense else 1, 1 << max(0, (rows - 1).bit_length())))
  rp = -(-rows // br) * br
  if num_stages is None:
    num_stages = 2 if br >= 4 and not dense else 1
  x2 = jnp.pad(x2, ((0, rp - rows), (0, 0))) if rp != rows else x2
  scale = 1.0 / n ** 0.5
  kw = {}
  if dense:
    h = jnp.asarray(sylvester(n), jnp.bfloat16)
    args = [x2, h]
    specs = [pl.BlockSpec((br, n), lambda i: (i, 0)), pl.BlockSpec((n, n), lambda i: (0, 0))]
    if signs is not None:
      args.append(signs.reshape(1, n))
      specs.append(pl.BlockSpec((1, n), lambda i: (0, 0)))
    out_spec = pl.BlockSpec((br, n), lambda i: (i, 0))
    kernel = functools.partial(_dense_kernel, terms=terms, scale=scale)
    out_shape = (rp, n)
  else:
    a, b = _split(n)
    args = [x2.reshape(rp, a, b), jnp.asarray(sylvester(a), jnp.bfloat16),
            jnp.asarray(sylvester(b), jnp.bfloat16)]
    specs = [pl.BlockSpec((br, a, b), lambda i: (i, 0, 0)), pl.BlockSpec((a, a), lambda i: (0, 0)),
             pl.BlockSpec((b, b), lambda i: (0, 0))]
    if signs is not None:
      args.append(signs.reshape(a, b))
      specs.append(pl.BlockSpec((a, b), lambda i: (0, 0)))
    out_spec = pl.BlockSpec((br, a, b), lambda i: (i, 0, 0))
    kernel = functools.partial(_kron_kernel, rows=br, terms=terms, scale=scale)
    out_shape = (rp, a, b)
  if out is not None:
    from qtrain.kernels.int8 import with_poison  # pylint: disable=g-import-not-at-top
    kernel = with_poison(kernel, kw, specs, args, out.reshape(out_shape), out_spec)
  params, interpret = _call_params(backend, num_warps, interpret, num_stages)
  y = pl.pallas_call(
      kernel, grid=(rp // br,), in_specs=specs, out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct(out_shape, x.dtype),
      compiler_params=params, interpret=interpret, name="hadamard", **kw)(*args)
  return y.reshape(rp, n)[:rows].reshape(*lead, n)


def padded_rows(rows: int, n: int, block_rows: int | None = None) -> int:
  """Rows of the buffer the kernel writes (the ``out`` shape is [that, n])."""
  dense = n <= DENSE_MAX_N
  br = block_rows or (max(16, 2048 // n) if dense else max(1, 16384 // n))
  br = min(br, max(16 if dense else 1, 1 << max(0, (rows - 1).bit_length())))
  return -(-rows // br) * br
