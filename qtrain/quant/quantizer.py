"""Quantize / dequantize numerics for every format and granularity of a spec.

Grids (codes q, scale s, integer zero point z):

* int, symmetric:  q = clip(round(x / s), -Q_P, Q_P),  Q_P = 2^(b-1) - 1,
                   s = hi / Q_P;  x^ = q * s.  The most negative code is left
                   out so the grid is symmetric and 0 is a code.
* int, asymmetric: q = clip(round(x / s) + z, 0, 2^b - 1),
                   s = (hi - lo) / (2^b - 1),  z = clip(round(-lo / s), 0, 2^b - 1);
                   x^ = (q - z) * s.  [lo, hi] contains 0 (calibration).
* fp8 e4m3 / e5m2: q = cast_fp8(clip(x / s, -M, M)), s = hi / M with M the
                   format's largest finite value (448 / 57344); x^ = q * s.
                   The rounding is written out (``round_fp8``), not left to
                   the cast: see there.
* ternary (TWN, Li et al. 2016): threshold D = 0.7 * mean|x|,
                   q = sign(x) * [|x| > D],  s = mean(|x| over |x| > D);
                   x^ = q * s.  Both statistics are per scale block.

Granularity picks the blocks that share one scale, relative to the dot's
contraction axis: "tensor" (one block), "channel" and "token" (reduce over the
contraction axis: per output column of a weight [in, out], per row of
activations [..., in]), "group" (``group_size`` consecutive elements along
the contraction axis). Codes keep ``x.shape``; ``scale`` (and ``zero_point``)
keep ``x.ndim`` with each dim 1, equal to x's, or x's / group_size.

Rounding is round-half-to-even (``jnp.round``), or stochastic floor(v + u),
u ~ U[0, 1), which is unbiased: E[q] = v inside the grid.

``spec.scale_pow2`` rounds each symmetric scale up to a power of two (the
MX formats' shared exponents do the same): x / s and q * s are then exact in
any float dtype, so a dot that folds s into its epilogue (cuBLASLt's fp8
GEMM, ``qtrain.quant.dot_general``) rounds exactly as the unfused product.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qtrain.quant import calibration
from qtrain.quant.spec import QuantSpec

FP8_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
_TINY = float(np.sqrt(np.finfo(np.float32).tiny))  # An all-zero block gets scale 1.
# (smallest normal exponent, mantissa bits) of each float8 format.
_FP8_GRID = {"fp8_e4m3": (-6, 3), "fp8_e5m2": (-14, 2)}


class QTensor(NamedTuple):
  """x ~= dequantize(q, scale, zero_point).

  q: codes with ``x.shape`` (int8 symmetric/ternary, uint8 asymmetric, float8 fp8).
  scale: float32, rank of x, each dim 1, x's, or x's / group_size.
  zero_point: like scale, dtype of q; None for symmetric grids.
  """
  q: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None


def grid(spec: QuantSpec) -> tuple[float, float]:
  """(Q_N, Q_P): the smallest and largest code."""
  if spec.format == "ternary":
    return -1.0, 1.0
  if spec.format in FP8_DTYPES:
    m = float(jnp.finfo(FP8_DTYPES[spec.format]).max)
    return -m, m
  if spec.symmetric:
    qp = 2.0 ** (spec.bits - 1) - 1
    return -qp, qp
  return 0.0, 2.0 ** spec.bits - 1


def blocked(x, spec: QuantSpec, contract_axis: int):
  """(xb, axes): x reshaped so that each scale block is reduced over ``axes``."""
  axis = contract_axis % x.ndim
  if spec.granularity == "tensor":
    return x, tuple(range(x.ndim))
  if spec.granularity in ("channel", "token"):
    return x, (axis,)
  g = spec.group_size
  if x.shape[axis] % g:
    raise ValueError(f"group_size={g} does not divide the contraction dim {x.shape[axis]}")
  shape = x.shape[:axis] + (x.shape[axis] // g, g) + x.shape[axis + 1:]
  return x.reshape(shape), (axis + 1,)


def _unblock_scale(sb, x_shape, spec: QuantSpec, contract_axis: int):
  if spec.granularity != "group":
    return sb
  axis = contract_axis % len(x_shape)
  return sb.reshape(sb.shape[:axis + 1] + sb.shape[axis + 2:])


def _round(v, rng):
  if rng is None:
    return jnp.round(v)
  return jnp.floor(v + jax.random.uniform(rng, v.shape, v.dtype))


def scale_zero_point(lo, hi, spec: QuantSpec):
  """Scale (and zero point) putting [lo, hi] on the spec's grid."""
  qn, qp = grid(spec)
  if spec.symmetric:
    s = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / qp
    s = jnp.where(s > _TINY, s, 1.0)
    return (pow2_ceil(s) if spec.scale_pow2 else s), None
  s = (hi - lo) / (qp - qn)
  s = jnp.where(s > _TINY, s, 1.0)
  return s, jnp.clip(jnp.round(qn - lo / s), qn, qp)


def pow2_ceil(s):
  """The smallest power of two >= s (s > 0, float32): exact, by the exponent."""
  m, e = jnp.frexp(s)  # s = m 2^e, m in [0.5, 1).
  return jnp.where(m == 0.5, s, jnp.ldexp(jnp.ones_like(s), e))


def round_fp8(v, fmt: str):
  """float32 v, inside the format's range, rounded to the nearest float8
  value (ties to even), still float32.

  Written with ``lax.reduce_precision`` and the subnormal step instead of a
  cast to float8 and back: XLA's GPU compiler, which allows excess precision
  by default, folds a chain of float conversions (f32 -> f8 -> f32) into
  none, so a cast round trip would silently skip the rounding of fake-quant
  fp8 on a GPU (measured on an H100: benchmarks/KERNEL_NOTES.md, "fp8").
  Normals: 3 (e4m3) or 2 (e5m2) mantissa bits under a wider exponent, the
  same rounding; below the smallest normal, multiples of the subnormal step.
  """
  emin, mbits = _FP8_GRID[fmt]
  normal = jax.lax.reduce_precision(v, exponent_bits=6, mantissa_bits=mbits)
  step = 2.0 ** (emin - mbits)
  return jnp.where(jnp.abs(v) < 2.0 ** emin, jnp.round(v / step) * step, normal)


def codes(x, scale, zero_point, spec: QuantSpec, rng=None, cast_rounds: bool = False):
  """Codes of float32 x on the grid given scale (and zero point), as floats
  (float8 for fp8 formats); ``cast_rounds``: see ``quantize``."""
  qn, qp = grid(spec)
  # x * (1 / s) is x / s exactly when s is a power of two, and a product is
  # cheaper than a division on every element.
  v = x * (1.0 / scale) if spec.scale_pow2 else x / scale
  if spec.format in FP8_DTYPES:
    v = jnp.clip(v, qn, qp)
    if not cast_rounds:  # On the grid already: the cast is exact.
      v = round_fp8(v, spec.format)
    return v.astype(FP8_DTYPES[spec.format])
  v = _round(v, rng)
  if zero_point is not None:
    v = v + zero_point
  return jnp.clip(v, qn, qp)


def _storage(q, spec: QuantSpec):
  if spec.format in FP8_DTYPES:
    return q
  return q.astype(jnp.int8 if spec.symmetric else jnp.uint8)


def _ternary(xb, axes):
  a = jnp.abs(xb)
  delta = 0.7 * jnp.mean(a, axis=axes, keepdims=True)
  keep = a > delta
  n = jnp.maximum(jnp.sum(keep, axis=axes, keepdims=True), 1)
  s = jnp.sum(jnp.where(keep, a, 0.0), axis=axes, keepdims=True) / n
  return jnp.where(keep, jnp.sign(xb), 0.0), jnp.where(s > _TINY, s, 1.0)


def _fake_quant_range(spec: QuantSpec):
  def fq(xb, lo, hi):
    s, z = scale_zero_point(lo, hi, spec)
    q = codes(xb, s, z, spec).astype(jnp.float32)
    return (q - z) * s if z is not None else q * s
  return fq


def _calibrated(xb, axes, spec: QuantSpec):
  """(scale, zero point) of blocked x: the spec's calibration, then its grid."""
  lo, hi = calibration.calibrate(xb, axes, spec, _fake_quant_range(spec))
  return scale_zero_point(lo, hi, spec)


def scale_of(x, spec: QuantSpec, *, contract_axis: int = -1):
  """``quantize(x, spec).scale`` without the codes (a caller that casts x
  itself: ``qtrain.kernels.cast_transpose``); symmetric, non-ternary specs."""
  xb, axes = blocked(x.astype(jnp.float32), spec, contract_axis)
  return _unblock_scale(_calibrated(xb, axes, spec)[0], x.shape, spec, contract_axis)


def scale_of_amax(amax, spec: QuantSpec):
  """The scale ``scale_of`` gives a tensor whose largest |value| is ``amax``
  (symmetric specs calibrated by absmax or minmax, which agree there), for
  delayed scaling: the amax is an earlier step's. Shape [1, 1]."""
  a = jnp.asarray(amax, jnp.float32).reshape(1, 1)
  return scale_zero_point(-a, a, spec)[0]


def quantize(x, spec: QuantSpec, *, contract_axis: int = -1, rng=None,
             cast_rounds: bool = False) -> QTensor:
  """Calibrates x per ``spec`` and returns its codes, scale and zero point.

  ``cast_rounds`` (fp8 formats): the caller only feeds the codes to float8
  dots or bit views, never converts them back to a wider float in the same
  program, so the float32 -> float8 cast's own rounding (to nearest, ties to
  even: the same bits as ``round_fp8``, tests/test_quant_numerics.py) is
  the rounding, and ``round_fp8``'s emulation, a dozen ALU ops per element
  in every quantization pass of the fp8 training step, is skipped. A codes
  -> float32 conversion in the same program could be folded away with the
  cast (see ``round_fp8``), so the fake-quant path keeps the emulation."""
  if spec.stochastic_rounding and rng is None:
    raise ValueError("spec.stochastic_rounding=True needs an rng key")
  x32 = x.astype(jnp.float32)
  xb, axes = blocked(x32, spec, contract_axis)
  if spec.format == "ternary":
    qb, sb = _ternary(xb, axes)
    zb = None
  else:
    sb, zb = _calibrated(xb, axes, spec)
    qb = codes(xb, sb, zb, spec, rng if spec.stochastic_rounding else None, cast_rounds)
  q = _storage(qb.reshape(x.shape), spec)
  scale = _unblock_scale(sb, x.shape, spec, contract_axis)
  zero_point = None if zb is None else _unblock_scale(zb, x.shape, spec, contract_axis)
  return QTensor(q, scale, None if zero_point is None else zero_point.astype(q.dtype))


def expand(a, shape):
  """Repeats a scale-shaped array to ``shape`` (group blocks become elements)."""
  for axis, (n, m) in enumerate(zip(a.shape, shape)):
    if n not in (1, m):
      a = jnp.repeat(a, m // n, axis=axis)
  return a


def dequantize(qt: QTensor, dtype=jnp.float32):
  """x^ = (q - z) * s."""
  q = qt.q.astype(jnp.float32)
  if qt.zero_point is not None:
    q = q - expand(qt.zero_point.astype(jnp.float32), q.shape)
  return (q * expand(qt.scale, q.shape)).astype(dtype)


def representable_range(qt: QTensor, spec: QuantSpec, shape):
  """[lo, hi]: the smallest and largest dequantized values, at ``shape``."""
  qn, qp = grid(spec)
  z = 0.0 if qt.zero_point is None else qt.zero_point.astype(jnp.float32)
  return expand((qn - z) * qt.scale, shape), expand((qp - z) * qt.scale, shape)


def fake_quant(x, spec: QuantSpec, *, contract_axis: int = -1, rng=None):
  """dequantize(quantize(x)) in x's dtype (no gradient rule: see estimators)."""
  return dequantize(quantize(x, spec, contract_axis=contract_axis, rng=rng), x.dtype)
