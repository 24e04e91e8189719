"""A weight held as packed 4-bit codes + scales, and its product with x.

``PackedInt4`` is the resident form of a symmetric int4 weight W^ = q * s
(``qtrain.quant.quantizer``'s grid at bits=4: codes in [-7, 7]): the codes
two per byte in ``int4.pack_int4``'s "halves" layout (``codes`` int8
[K/2, N]: byte i holds rows i and i + K/2), the float32 scales as
``QTensor`` keeps them, [1, N] per output channel or [K/g, N] per group of g
rows of K. Half a byte per weight element instead of the int8 storage's
one (or bf16's two): the point at decode sizes, where a matmul is bound by
reading its weight.

``dot`` is the product x W^ for ``lax.dot_general``'s arguments (x's last
axis contracted with the weight's first):

* the XLA reference (``kernels="xla"``, any backend without a kernel, or
  activations that are not bf16): unpack, dequantize exactly as
  ``quantizer.dequantize`` (to the weight's param dtype, then the
  activations' dtype, as a ``Dense`` layer casts its kernel), and the same
  ``lax.dot_general``: bit-identical to the dense layer holding the
  dequantized weight, since the dot sees the very same operands;
* the W4A16 kernel (``int4.int4_matmul`` through ``dispatch.w4a16_dot``)
  for bf16 activations under ``kernels="auto"`` on GPU/TPU (or
  ``"interpret"``). The kernel sums each group in float32 and scales it
  once; per-channel scales enter as groups of ``kernel_group(K)`` rows
  that repeat the column's scale. It multiplies the exact codes and
  scales, where the dense dot first rounds q s to bf16 (the layer's cast
  of its kernel, 2^-9 relative per weight): the two differ by that
  rounding and float32 summation order, and the kernel is the closer to
  float64 (tests/test_int4_gemv.py). Shapes the kernel does not tile
  (K not a multiple of 2 g for a group g >= 16) take the XLA path.

The dequantized weight of the XLA path is a temporary of one matmul: under
``jit`` only the packed codes are resident between steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qtrain.kernels import dispatch, int4
from qtrain.quant.quantizer import QTensor, dequantize

MIN_KERNEL_GROUP = 16  # The kernel's tiles take at least 16 rows of K per group.


@jax.tree_util.register_pytree_node_class
class PackedInt4:
  """W^ = unpack(codes) * scales, [..., K, N] (leading axes: a scanned stack).

  codes: int8 [..., K/2, N] (halves layout); scales: float32 [..., 1, N] or
  [..., K/g, N]; ``dtype``: the dtype the dequantized weight is rounded to
  first (the param dtype of the dense kernel it stands for).
  """

  def __init__(self, codes, scales, dtype=jnp.float32):
    self.codes, self.scales, self.dtype = codes, scales, np.dtype(dtype)

  def tree_flatten(self):
    return (self.codes, self.scales), self.dtype

  @classmethod
  def tree_unflatten(cls, dtype, children):
    return cls(*children, dtype=dtype)

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.codes.shape[:-2], 2 * self.codes.shape[-2], self.codes.shape[-1])

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def unpacked(self):
    """The int8 codes [..., K, N] (the inverse of ``pack``)."""
    unpack = int4.unpack_int4
    for _ in range(self.codes.ndim - 2):
      unpack = jax.vmap(unpack)
    return unpack(self.codes)

  def dequantize(self):
    """W^ in ``dtype``, exactly as ``quantizer.dequantize`` of the unpacked codes."""
    return dequantize(QTensor(self.unpacked(), self.scales, None), self.dtype)


def pack(q, scales, dtype=jnp.float32) -> PackedInt4:
  """``PackedInt4`` of int8 codes q [..., K, N] in [-8, 7] and their scales."""
  fn = int4.pack_int4
  for _ in range(q.ndim - 2):
    fn = jax.vmap(fn)
  return PackedInt4(fn(q), scales, dtype)


def pack_host(q) -> np.ndarray:
  """NumPy ``pack``'s codes (int8 [..., K/2, N], halves layout) of codes q
  [..., K, N] in [-8, 7]: host-side, for exports, which must not run device
  ops (they may sit inside another computation's mesh context)."""
  q = np.asarray(q).astype(np.int16)
  k = q.shape[-2]
  if k % 2:
    raise ValueError(f"packing pairs rows of K: K={k} must be even")
  byte = (q[..., : k // 2, :] & 0xF) | ((q[..., k // 2:, :] & 0xF) << 4)
  return byte.astype(np.uint8).view(np.int8)


def unpack_host(codes) -> np.ndarray:
  """The inverse of ``pack_host``: int8 [..., K, N] (arithmetic shifts
  sign-extend each nibble)."""
  p = np.asarray(codes).astype(np.int8)
  lo = np.left_shift(p, np.int8(4)) >> np.int8(4)  # int8 wraps: the low nibble's sign.
  return np.concatenate([lo, p >> np.int8(4)], axis=-2)


def kernel_group(k: int, n_scales: int) -> int | None:
  """Rows per group as the kernel sees them, None when it cannot tile K.

  Per-channel scales (one row) are cut into groups of the largest of 128,
  64, 32, 16 rows whose pair divides K; group scales keep their own g = K/G.
  """
  if n_scales == 1:
    return next((g for g in (128, 64, 32, MIN_KERNEL_GROUP) if k % (2 * g) == 0), None)
  g = k // n_scales
  return g if g >= MIN_KERNEL_GROUP and k % (2 * g) == 0 else None


def takes_kernel(x, w: PackedInt4, kernels: str) -> bool:
  """Whether ``dot`` runs the W4A16 kernel for these operands."""
  return (dispatch.flavour(kernels, "int4") is not None and x.dtype == jnp.bfloat16
          and w.codes.ndim == 2 and kernel_group(w.shape[0], w.scales.shape[0]) is not None)


def dot(x, w: PackedInt4, dimension_numbers, precision=None, preferred_element_type=None, *,
        kernels: str = "xla"):
  """x W^ with x's last axis contracted with W^'s first (see the module doc)."""
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb or tuple(lc) != (x.ndim - 1,) or tuple(rc) != (0,) or w.codes.ndim != 2:
    raise ValueError(f"a packed int4 weight [K, N] multiplies x [..., K] on its last axis; "
                     f"got dimension_numbers={dimension_numbers} for x{x.shape}, w{w.shape}")
  if not takes_kernel(x, w, kernels):
    return jax.lax.dot_general(x, w.dequantize().astype(x.dtype), dimension_numbers,
                               precision=precision, preferred_element_type=preferred_element_type)
  k, n = w.shape
  g = kernel_group(k, w.scales.shape[0])
  scales = jnp.broadcast_to(w.scales.astype(jnp.float32), (k // g, n))  # [1, N] -> groups.
  y = dispatch.w4a16_dot(x.reshape(-1, k), w.codes, scales, group=g,
                         out_dtype=preferred_element_type or x.dtype, kernels=kernels)
  return y.reshape(*x.shape[:-1], n)
