"""Gradient estimators through the quantizer's rounding, as explicit custom VJPs.

Rounding has zero derivative almost everywhere, so QAT replaces it:

* STE (Bengio et al. 2013): dL/dx = dL/dx^. Calibration statistics (absmax,
  percentiles) are treated as constants: no gradient flows into them.
* Clipped STE: dL/dx = dL/dx^ * 1[lo <= x <= hi], with [lo, hi] the
  representable range (the dequantized extreme codes); values clipped by the
  quantizer get no gradient.
* LSQ (Esser et al., ICLR 2020, eqs. 3-5), learned step s, v = x / s:
    x^ = clip(round(v), Q_N, Q_P) * s
    dx^/dx = 1 if Q_N < v < Q_P else 0
    dx^/ds = round(v) - v  if Q_N < v < Q_P;  Q_N if v <= Q_N;  Q_P if v >= Q_P
  and the step's gradient is multiplied by g = 1 / sqrt(N * Q_P), N the
  number of values sharing the step (weights of the layer or channel) or the
  number of features (activations).
* LSQ+ (Bhalgat et al., CVPRW 2020, eq. 4), learned step s and offset beta,
  v = (x - beta) / s, for asymmetric grids:
    x^ = clip(round(v), Q_N, Q_P) * s + beta
    dx^/dx and dx^/ds as LSQ (with this v);  dx^/dbeta = 0 inside, 1 outside.
  Our choice: g scales both the step's and the offset's gradient.

``fake_quant_ste`` applies a static spec's quantizer with its STE / clipped
STE; learned steps are the dot module's params and call ``lsq`` / ``lsq_plus``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qtrain.quant import quantizer
from qtrain.quant.spec import QuantSpec


@jax.custom_vjp
def ste(x, x_hat):
  """Forward x_hat; backward dL/dx = dL/dx_hat, nothing into x_hat."""
  del x
  return x_hat


def _ste_fwd(x, x_hat):
  del x
  return x_hat, None


def _ste_bwd(_, g):
  return g, None


ste.defvjp(_ste_fwd, _ste_bwd)


@jax.custom_vjp
def clipped_ste(x, x_hat, lo, hi):
  """Forward x_hat; backward dL/dx = dL/dx_hat * 1[lo <= x <= hi]."""
  del x, lo, hi
  return x_hat


def _clipped_fwd(x, x_hat, lo, hi):
  return x_hat, (x >= lo) & (x <= hi)


def _clipped_bwd(inside, g):
  return jnp.where(inside, g, 0).astype(g.dtype), None, None, None


clipped_ste.defvjp(_clipped_fwd, _clipped_bwd)


def lsq_grad_scale(n: int, qp: float) -> float:
  """LSQ gradient scale g = 1 / sqrt(N * Q_P), Esser et al. 2020 sec. 2.2."""
  return float(1.0 / (n * qp) ** 0.5)


def _sum_to(t, shape):
  """Sums t over the axes that ``shape`` broadcasts (the step's shape)."""
  if len(shape) == 0:
    return jnp.sum(t)
  axes = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(t, axis=axes, keepdims=True)


def _lsq_parts(v, qn, qp):
  inside = (v > qn) & (v < qp)
  dv_ds = jnp.where(v <= qn, qn, jnp.where(v >= qp, qp, jnp.round(v) - v))
  return inside, dv_ds


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def lsq(x, step, qn: float, qp: float, grad_scale: float):
  """LSQ fake quantizer x^ = clip(round(x / s), Q_N, Q_P) * s (see module doc)."""
  v = x.astype(jnp.float32) / step
  return (jnp.clip(jnp.round(v), qn, qp) * step).astype(x.dtype)


def _lsq_fwd(x, step, qn, qp, grad_scale):
  return lsq(x, step, qn, qp, grad_scale), (x, step)


def _lsq_bwd(qn, qp, grad_scale, res, g):
  x, step = res
  inside, dv_ds = _lsq_parts(x.astype(jnp.float32) / step, qn, qp)
  g32 = g.astype(jnp.float32)
  dx = jnp.where(inside, g, 0).astype(x.dtype)
  dstep = _sum_to(g32 * dv_ds, step.shape).reshape(step.shape) * grad_scale
  return dx, dstep.astype(step.dtype)


lsq.defvjp(_lsq_fwd, _lsq_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def lsq_plus(x, step, offset, qn: float, qp: float, grad_scale: float):
  """LSQ+ fake quantizer x^ = clip(round((x - b) / s), Q_N, Q_P) * s + b."""
  v = (x.astype(jnp.float32) - offset) / step
  return (jnp.clip(jnp.round(v), qn, qp) * step + offset).astype(x.dtype)


def _lsq_plus_fwd(x, step, offset, qn, qp, grad_scale):
  return lsq_plus(x, step, offset, qn, qp, grad_scale), (x, step, offset)


def _lsq_plus_bwd(qn, qp, grad_scale, res, g):
  x, step, offset = res
  inside, dv_ds = _lsq_parts((x.astype(jnp.float32) - offset) / step, qn, qp)
  g32 = g.astype(jnp.float32)
  dx = jnp.where(inside, g, 0).astype(x.dtype)
  dstep = _sum_to(g32 * dv_ds, step.shape).reshape(step.shape) * grad_scale
  doffset = _sum_to(jnp.where(inside, 0.0, g32), offset.shape).reshape(offset.shape)
  return dx, dstep.astype(step.dtype), (doffset * grad_scale).astype(offset.dtype)


lsq_plus.defvjp(_lsq_plus_fwd, _lsq_plus_bwd)


def fake_quant_ste(x, spec: QuantSpec, *, contract_axis: int = -1, rng=None):
  """x^ = fake_quant(x) with the gradient of ``spec.estimator`` (ste / clipped_ste)."""
  if spec.estimator == "lsq":
    raise ValueError("estimator='lsq' needs a learned step: use lsq() / lsq_plus()")
  # Calibration is a constant of the estimator: do not differentiate through it.
  qt = quantizer.quantize(jax.lax.stop_gradient(x), spec, contract_axis=contract_axis, rng=rng)
  x_hat = quantizer.dequantize(qt, x.dtype)
  if spec.estimator == "clipped_ste":
    lo, hi = quantizer.representable_range(qt, spec, x.shape)
    return clipped_ste(x, x_hat, lo.astype(x.dtype), hi.astype(x.dtype))
  return ste(x, x_hat)
