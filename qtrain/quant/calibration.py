"""Calibration: from a tensor to the clipping range [lo, hi] of its quantizer.

Every function takes the tensor in *blocked* form ``xb`` and the axes to
reduce (``qtrain.quant.quantizer.blocked`` makes them from a granularity) and
returns ``(lo, hi)`` with ``keepdims=True``, so one range serves one scale.
Symmetric ranges have ``lo = -hi``; asymmetric ranges always contain 0, so
that 0 stays exactly representable (zero padding, ReLU zeros).

* absmax:     hi = max|x|
* minmax:     [min(x, 0), max(x, 0)]
* percentile: hi = P_p(|x|) (symmetric) or [P_{100-p}(x), P_p(x)]
* mse:        r* = argmin_{r in grid} ||x - fq_r(x)||^2 with fq_r quantizing on
              the range r * base (base = absmax or minmax), chosen per block
              (e.g. per channel), as in the clipping search of RoSTE /
              SpinQuant (c in {1, 0.95, 0.9}).
* LSQ init:   s0 = 2 * mean|x| / sqrt(Q_P)  (Esser et al. 2020, sec. 2.1)
* LSQ+ init:  s0 = (max - min) / (Q_P - Q_N), beta0 = min - Q_N * s0, the
              min/max initialisation of Bhalgat et al. 2020 (the paper also
              proposes an MSE initialisation; we start from min/max).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

Range = tuple  # (lo, hi), each keepdims over the reduced axes.


def absmax(xb, axes) -> Range:
  hi = jnp.max(jnp.abs(xb), axis=axes, keepdims=True)
  return -hi, hi


def minmax(xb, axes) -> Range:
  lo = jnp.minimum(jnp.min(xb, axis=axes, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(xb, axis=axes, keepdims=True), 0.0)
  return lo, hi


def percentile(xb, axes, p: float, symmetric: bool) -> Range:
  """Clips the tails: useful when a few outliers would waste the grid."""
  if symmetric:
    hi = jnp.percentile(jnp.abs(xb), p, axis=axes, keepdims=True)
    return -hi, hi
  lo = jnp.minimum(jnp.percentile(xb, 100.0 - p, axis=axes, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.percentile(xb, p, axis=axes, keepdims=True), 0.0)
  return lo, hi


def mse(xb, axes, base: Range, ratios, fake_quant_range: Callable) -> Range:
  """Per block, the ratio of ``ratios`` minimising the squared error.

  ``fake_quant_range(xb, lo, hi)`` quantizes and dequantizes on [lo, hi]. Ties
  go to the earlier ratio (list 1.0 first to prefer no clipping).
  """
  lo, hi = base
  errs = jnp.stack([
      jnp.sum(jnp.square(xb - fake_quant_range(xb, r * lo, r * hi)), axis=axes, keepdims=True)
      for r in ratios])
  best = jnp.asarray(ratios, jnp.float32)[jnp.argmin(errs, axis=0)]
  return best * lo, best * hi


def calibrate(xb, axes, spec, fake_quant_range: Callable) -> Range:
  """The range of ``spec.calibration`` (a static one; learned steps live in
  the dot module's params)."""
  base = absmax(xb, axes) if spec.symmetric else minmax(xb, axes)
  if spec.calibration == "absmax":  # Asymmetric grids then span [-max|x|, max|x|].
    return absmax(xb, axes)
  if spec.calibration == "minmax":  # Symmetric grids then span the larger tail.
    return base
  if spec.calibration == "percentile":
    return percentile(xb, axes, spec.percentile, spec.symmetric)
  if spec.calibration == "mse":
    return mse(xb, axes, base, spec.mse_grid, fake_quant_range)
  raise ValueError(f"calibration={spec.calibration!r} is learned, not computed from data")


def lsq_init_step(x, qp: float, axes=None):
  """LSQ's initial step 2 * mean|x| / sqrt(Q_P) (Esser et al. 2020), over
  ``axes`` (None: the whole tensor) with keepdims."""
  keep = axes is not None
  mean_abs = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=keep)
  return jnp.maximum(2.0 * mean_abs / jnp.sqrt(qp), 1e-8)


def lsq_plus_init(x, qn: float, qp: float, axes=None):
  """LSQ+ (step, offset) from min/max: x_min maps to code Q_N, x_max to Q_P."""
  keep = axes is not None
  lo = jnp.min(x.astype(jnp.float32), axis=axes, keepdims=keep)
  hi = jnp.max(x.astype(jnp.float32), axis=axes, keepdims=keep)
  step = jnp.maximum((hi - lo) / (qp - qn), 1e-8)
  return step, lo - qn * step


def sum_sown(model, collection: str, params, batches, dtype=None):
  """(sum over ``batches`` of what ``model``'s providers sow into
  ``collection``, the batch count, the row count): the pass that GPTQ/AWQ
  statistics and RoSTE's rotation errors share. Matmuls at highest precision
  (no TF32 in X^T X on GPUs); ``dtype`` casts each batch's tree before the sum.
  ``batches``: dicts of ``inputs`` (+ ``positions``, ``segment_ids``)."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def sown(params, batch):
    _, state = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                           batch.get("segment_ids"), mutable=[collection])
    return state[collection]

  total, n, rows = None, 0, 0
  with jax.default_matmul_precision("highest"):
    for batch in batches:
      tree = sown(params, batch)
      if dtype is not None:
        tree = jax.tree.map(lambda v: v.astype(dtype), tree)
      total = tree if total is None else jax.tree.map(jnp.add, total, tree)
      n += 1
      rows += batch["inputs"].shape[0]
  return total, n, rows

