"""qtrain.quant numerics against float64 NumPy written here, independently.

Each reference quantizes one scale block at a time in float64 (ml_dtypes for
the fp8 casts), straight from the formulas of the module docstrings. Every
tolerance is stated next to its assertion with its reason.
"""

import ml_dtypes
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.quant import (QuantSpec, clipped_ste, dequantize, lsq, lsq_grad_scale, lsq_plus,
                          quantize, ste, validate_quant)
from qtrain.quant import quantizer
from qtrain.quant.config import quant_config_defaults

EPS_TIE = 1e-5  # Quotients within this relative distance of a rounding tie are "near-tie".
FP8 = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


def ref_block(v, spec):
  """(codes, scale, zero point, stable) of one 1-D float64 block."""
  if spec.format == "ternary":  # TWN: threshold 0.7 * mean|v|, scale mean|v| above it.
    delta = 0.7 * np.mean(np.abs(v))
    keep = np.abs(v) > delta
    s = np.mean(np.abs(v[keep])) if keep.any() else 1.0
    stable = np.abs(np.abs(v) - delta) > EPS_TIE * delta
    return np.sign(v) * keep, s, 0.0, stable
  if spec.format in FP8:
    m = float(ml_dtypes.finfo(FP8[spec.format]).max)
    s = np.max(np.abs(v)) / m
    to_code = lambda u: np.clip(u, -m, m).astype(FP8[spec.format]).astype(np.float64)
    u, z = v / s, 0.0
  elif spec.symmetric:
    qp = 2 ** (spec.bits - 1) - 1
    s = np.max(np.abs(v)) / qp
    to_code = lambda u: np.clip(np.round(u), -qp, qp)
    u, z = v / s, 0.0
  else:
    top = 2 ** spec.bits - 1
    lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
    s = (hi - lo) / top
    z = np.clip(np.round(-lo / s), 0, top)
    to_code = lambda u: np.clip(np.round(u) + z, 0, top)
    u = v / s
  stable = to_code(u * (1 + EPS_TIE)) == to_code(u * (1 - EPS_TIE))
  return to_code(u), s, z, stable


def ref_quantize(x, spec, axis):
  """Per-element (codes, scale, zero point, stable), looping over scale blocks."""
  xm = np.moveaxis(x.astype(np.float64), axis, -1)
  if spec.granularity == "tensor":
    blocks = xm.reshape(1, -1)
  elif spec.granularity == "group":
    blocks = xm.reshape(-1, spec.group_size)
  else:  # channel / token: one block per vector along the contraction axis.
    blocks = xm.reshape(-1, xm.shape[-1])
  out = [np.empty(blocks.shape) for _ in range(4)]
  for i, v in enumerate(blocks):
    q, s, z, stable = ref_block(v, spec)
    for o, val in zip(out, (q, s, z, stable)):
      o[i] = val
  return [np.moveaxis(o.reshape(xm.shape), -1, axis) for o in out]


FORMATS = [dict(format="int", bits=b, symmetric=sym, calibration="absmax" if sym else "minmax")
           for b in (2, 4, 8) for sym in (True, False)]
FORMATS += [dict(format="fp8_e4m3", bits=8), dict(format="fp8_e5m2", bits=8),
            dict(format="ternary", bits=2)]
# (granularity, operand): weights are [in, out] contracted on axis 0, activations
# [B, T, in] on axis -1.
LAYOUTS = [("tensor", "weight"), ("channel", "weight"), ("token", "act"), ("group", "weight"),
           ("group", "act")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-{l[1]}")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f['format']}{f['bits']}"
                         + ("" if f.get("symmetric", True) else "asym"))
def test_quantize_matches_numpy(fmt, layout):
  granularity, operand = layout
  spec = QuantSpec(granularity=granularity, group_size=8, **fmt)
  rng = np.random.default_rng(LAYOUTS.index(layout))
  shape, axis = ((32, 6), 0) if operand == "weight" else ((2, 3, 32), 2)
  x = rng.standard_t(4, size=shape).astype(np.float32)  # Heavy tails, as activations have.
  qt = quantize(jnp.asarray(x), spec, contract_axis=axis)
  q_ref, s_ref, z_ref, stable = ref_quantize(x, spec, axis)
  full = lambda a: np.broadcast_to(quantizer.expand(a, x.shape), x.shape).astype(np.float64)
  q, s = np.asarray(qt.q.astype(jnp.float32), np.float64), full(qt.scale)
  # float32 vs float64 quotients differ by ~1e-7 relative: only near-ties may
  # round differently, and there must be few of them or the test says nothing.
  assert stable.mean() > 0.98, stable.mean()
  np.testing.assert_array_equal(q[stable == 1], q_ref[stable == 1])
  # The scale is a float32 max (or TWN mean) over float32 inputs divided by a
  # constant: a few ulps (measured <= 2.4e-7 relative).
  np.testing.assert_allclose(s, s_ref, rtol=1e-6)
  if qt.zero_point is not None:
    np.testing.assert_array_equal(full(qt.zero_point), z_ref)
  x_hat_ref = (q_ref - z_ref) * s_ref
  x_hat = np.asarray(dequantize(qt), np.float64)
  # Dequantization is one float32 multiply of exact codes by the scale.
  np.testing.assert_allclose(x_hat[stable == 1], x_hat_ref[stable == 1], rtol=1e-6, atol=1e-30)


def test_percentile_and_mse_calibration_match_numpy():
  rng = np.random.default_rng(1)
  w = rng.standard_t(3, size=(64, 5)).astype(np.float32)
  w64 = w.astype(np.float64)
  pct = QuantSpec(bits=4, calibration="percentile", percentile=99.0)
  qt = quantize(jnp.asarray(w), pct, contract_axis=0)
  want = np.percentile(np.abs(w64), 99.0, axis=0, keepdims=True) / 7
  # Interpolation between order statistics 62 and 63 at fraction 0.99 * 63: in
  # float32 the fraction is off by up to 63 * 2^-24, which the gap between the
  # two (large in heavy tails) magnifies; plus a few ulps of the result.
  top = np.sort(np.abs(w64), axis=0)[-2:]
  bound = (63 * 2.0 ** -24 * (top[1] - top[0]) + 4 * 2.0 ** -24 * top[1]) / 7
  assert np.all(np.abs(np.asarray(qt.scale, np.float64) - want) <= bound)

  w[:, 1] = rng.uniform(-1, 1, 64)  # Light tails: a different clipping ratio wins.
  w64 = w.astype(np.float64)
  mse = QuantSpec(bits=4, calibration="mse")
  grid = mse.mse_grid
  qt = quantize(jnp.asarray(w), mse, contract_axis=0)
  amax = np.max(np.abs(w64), axis=0)
  want, margins = [], []
  for c in range(w.shape[1]):
    errs = np.array([np.sum((w64[:, c] - np.clip(np.round(w64[:, c] / (r * amax[c] / 7)), -7, 7)
                             * (r * amax[c] / 7)) ** 2) for r in grid])
    want.append(grid[int(np.argmin(errs))] * amax[c] / 7)
    margins.append(np.diff(np.sort(errs)[:2])[0] / errs.min())
  assert len(set(np.round(np.asarray(want) / (amax / 7), 3))) > 1, "grid choice is trivial"
  # The best ratio beats the next by >= 0.3% (float32 errors are ~1e-6
  # relative), so the argmin is the same; the scale is then float32 r*amax/7.
  assert min(margins) > 3e-3
  np.testing.assert_allclose(qt.scale[0], want, rtol=1e-6)


def test_stochastic_rounding_is_unbiased():
  # Scale 0.1 (absmax 0.7 on 7 levels); 999 values at 2.37 steps.
  x = jnp.concatenate([jnp.array([0.7]), jnp.full((999,), 0.237)])
  spec = QuantSpec(bits=4, granularity="tensor", stochastic_rounding=True)
  q = quantize(x, spec, rng=jax.random.key(0)).q[1:].astype(jnp.float32)
  assert set(np.unique(q)) == {2.0, 3.0}
  # Bernoulli(0.37) mean over 999 draws: sd 0.0153; 4 sd.
  assert abs(float(q.mean()) - 2.37) < 0.062
  nearest = quantize(x, QuantSpec(bits=4, granularity="tensor")).q[1:]
  assert np.all(np.asarray(nearest) == 2)  # Round-to-nearest is biased by -0.37 steps.


def _grads(f, *args):
  c = jnp.asarray(np.random.default_rng(7).normal(size=f(*args).shape), jnp.float32)
  return jax.grad(lambda *a: jnp.sum(c * f(*a)), argnums=tuple(range(len(args))))(*args), c


def test_ste_and_clipped_ste_gradients():
  x = jnp.linspace(-2, 2, 41)
  x_hat = jnp.round(x * 2) / 2
  (dx, dxh), c = _grads(ste, x, x_hat)
  np.testing.assert_array_equal(dx, c)  # Identity: exact.
  np.testing.assert_array_equal(dxh, 0)  # Nothing into the quantized value.
  lo, hi = jnp.full_like(x, -1.0), jnp.full_like(x, 1.5)
  (dx, *_), c = _grads(clipped_ste, x, x_hat, lo, hi)
  np.testing.assert_array_equal(dx, np.where((x >= -1.0) & (x <= 1.5), c, 0.0))


def lsq_formula(x, s, qn, qp, g, offset=0.0):
  """Esser et al. 2020 eq. 3 (and Bhalgat et al. 2020 for the offset), float64."""
  v = (x - offset) / s
  inside = (v > qn) & (v < qp)
  dv_ds = np.where(v <= qn, qn, np.where(v >= qp, qp, np.round(v) - v))
  return inside, dv_ds, ~inside


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_match_formula(per_channel):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  s = np.float32(0.3) if not per_channel else rng.uniform(0.2, 0.4, (1, 4)).astype(np.float32)
  qn, qp = -7.0, 7.0
  g = lsq_grad_scale(x.size // np.size(s), qp)
  assert g == pytest.approx(1 / np.sqrt(x.size / np.size(s) * 7))
  (dx, ds), c = _grads(lambda a, b: lsq(a, b, qn, qp, g), jnp.asarray(x), jnp.asarray(s))
  inside, dv_ds, _ = lsq_formula(x.astype(np.float64), np.float64(s), qn, qp, g)
  c = np.asarray(c, np.float64)
  assert 0 < inside.mean() < 1  # Both branches exercised.
  np.testing.assert_array_equal(dx, np.where(inside, c, 0.0))
  axes = None if not per_channel else 0
  want = g * np.sum(c * dv_ds, axis=axes, keepdims=per_channel)
  # float32 sum of 16-64 O(1) terms (measured 2e-7 relative).
  np.testing.assert_allclose(ds, want, rtol=1e-5, atol=1e-7)


def test_lsq_plus_offset_and_step_gradients():
  rng = np.random.default_rng(4)
  x = rng.normal(loc=1.0, size=(32,)).astype(np.float32)
  s, b, qn, qp = np.float32(0.2), np.float32(0.4), 0.0, 15.0
  g = lsq_grad_scale(32, qp)
  (dx, ds, db), c = _grads(lambda *a: lsq_plus(*a, qn, qp, g), jnp.asarray(x), jnp.asarray(s),
                           jnp.asarray(b))
  inside, dv_ds, outside = lsq_formula(x.astype(np.float64), float(s), qn, qp, g, float(b))
  c = np.asarray(c, np.float64)
  assert 0 < outside.sum() < 32
  np.testing.assert_array_equal(dx, np.where(inside, c, 0.0))
  # float32 sums of 32 O(1) terms.
  np.testing.assert_allclose(ds, g * np.sum(c * dv_ds), rtol=1e-5)
  np.testing.assert_allclose(db, g * np.sum(c * outside), rtol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_rounding_is_the_cast_and_survives_compilation(fmt):
  dt = FP8[fmt]
  top = float(ml_dtypes.finfo(dt).max)
  rng = np.random.default_rng(5)
  v = rng.standard_normal(20000) * np.exp2(rng.uniform(-24, 12, 20000))
  # Every finite value of the format, every midpoint of two neighbours (the
  # ties, exact in float32: one more mantissa bit), subnormals included.
  values = np.arange(256, dtype=np.uint8).view(dt).astype(np.float64)
  values = np.unique(values[np.isfinite(values)])
  ties = ((values[1:] + values[:-1]) / 2).astype(np.float32)
  # A float32 ulp either side of each tie: where a cast that rounded twice
  # (through float16, say) would land on the wrong side.
  near = np.concatenate([np.nextafter(ties, np.float32(np.inf)),
                         np.nextafter(ties, np.float32(-np.inf))])
  v = np.clip(np.concatenate([v, values, ties, near]), -top, top).astype(np.float32)
  want = v.astype(dt).astype(np.float32)
  got = jax.jit(lambda a: quantizer.round_fp8(a, fmt))(v)
  # Bit-exact: ml_dtypes' cast rounds to nearest, ties to even, as ours must.
  np.testing.assert_array_equal(np.asarray(got), want)
  # The compiled cast itself rounds so too: the real fp8 matmul's codes skip
  # round_fp8 (quantize(cast_rounds=True)) and must be the same bits. The
  # same check ran on every float32 in range on an H100 (KERNEL_NOTES.md).
  cast = jax.jit(lambda a: jax.lax.bitcast_convert_type(a.astype(dt), jnp.uint8))(v)
  np.testing.assert_array_equal(np.asarray(cast), v.astype(dt).view(np.uint8))
  spec = QuantSpec(format=fmt, bits=8, granularity="tensor")
  both = [np.asarray(quantize(v, spec, cast_rounds=c).q.astype(jnp.float32)) for c in (0, 1)]
  np.testing.assert_array_equal(both[0], both[1])
  # The fake-quant program rounds with reduce_precision: a bare f32 -> f8 ->
  # f32 cast round trip is folded away by XLA's GPU compiler (H100, measured).
  program = jax.jit(lambda a: dequantize(quantize(a, spec))).lower(v).as_text()
  assert "reduce_precision" in program


@pytest.mark.parametrize("fields,axis", [
    (dict(bits=8, granularity="token"), -1), (dict(format="fp8_e4m3", granularity="tensor"), 0),
    (dict(bits=4, granularity="group", group_size=8), -1)])
def test_scale_pow2_rounds_each_scale_up_to_a_power_of_two(fields, axis):
  x = jnp.asarray(np.random.default_rng(6).standard_t(4, size=(4, 32)) * 3.7, jnp.float32)
  qt = quantize(x, QuantSpec(scale_pow2=True, **fields), contract_axis=axis)
  s0 = np.asarray(quantize(x, QuantSpec(**fields), contract_axis=axis).scale, np.float64)
  s = np.asarray(qt.scale, np.float64)
  mantissa, _ = np.frexp(s)
  assert np.all(mantissa == 0.5), s  # Powers of two, exactly.
  assert np.all(s >= s0) and np.all(s < 2 * s0)  # The nearest one above the absmax scale.
  # Dequantizing is exact (a power-of-two product) and within half a step of x
  # (fp8: within the format's relative rounding, 2^-4 for e4m3 normals).
  x_hat = np.asarray(dequantize(qt), np.float64)
  np.testing.assert_array_equal(x_hat, np.asarray(qt.q.astype(jnp.float32), np.float64)
                                * np.broadcast_to(quantizer.expand(s, x.shape), x.shape))
  half = np.broadcast_to(quantizer.expand(s, x.shape), x.shape) / 2
  bound = half if fields.get("format", "int") == "int" else 2.0 ** -4 * np.abs(
      np.asarray(x)) + 2.0 ** -9 * 2 * half
  assert np.all(np.abs(x_hat - np.asarray(x, np.float64)) <= bound * (1 + 1e-6))


@pytest.mark.parametrize("fields,dim,needle", [
    (dict(bits=1), None, ".bits=1: bits must be in 2..8"),
    (dict(granularity="group", group_size=48), 160,
     ".group_size=48: does not divide the contraction dim 160"),
    (dict(format="ternary", bits=2, symmetric=False), None, ".symmetric=False: ternary"),
    (dict(format="fp8_e4m3", bits=4), None, ".bits=4: format fp8_e4m3 is 8 bits"),
    (dict(estimator="lsq"), None, ".estimator='lsq': lsq learns a step"),
    (dict(granularity="token"), None, ".granularity='token': weights have no tokens"),
    (dict(symmetric=False, calibration="minmax", scale_pow2=True), None,
     ".scale_pow2=True: rounds a calibrated symmetric scale"),
])
def test_bad_specs_fail_naming_the_field(fields, dim, needle):
  where = "config.quant.rules[2].weight"
  with pytest.raises(ValueError) as e:
    QuantSpec(**fields).validate(where, role="weight", dim=dim)
  assert str(e.value).startswith(where + needle), str(e.value)


def test_config_validation_names_the_rule_field():
  q = quant_config_defaults()
  q.mode = "fake"
  q.rules = (dict(pattern="lm_head", weight=dict(bits=8)),
             dict(pattern=".*", weight=dict(bits=1)))
  with pytest.raises(ValueError, match=r"^config\.quant\.rules\[1\]\.weight\.bits=1: bits"):
    validate_quant(q)
  q.rules = (dict(pattern=".*", weight=dict(bitz=4)),)
  with pytest.raises(ValueError, match=r"rules\[0\]\.weight\.bitz is not a field; did you mean "
                     r"config\.quant\.rules\[0\]\.weight\.bits"):
    validate_quant(q)
  q.mode = "int8"
  q.rules = (dict(pattern=".*", weight=dict(bits=8)),)
  with pytest.raises(ValueError, match=r"rules\[0\]\.act=None: config\.quant\.mode='int8'"):
    validate_quant(q)
