"""Post-training quantization: RTN codes are qtrain.quant's, GPTQ against a
float64 NumPy transcription of the reference implementation and against
qwix's, GPTQ/AWQ beating RTN where they should, calibration statistics
against the layer inputs, the export's round trip, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.layers import ModelConfig, Transformer
from qtrain.quant import QuantRule, QuantSpec, dequantize, quantize, validate_quant
from qtrain.layers import Linear
from qtrain.quant import QuantProvider
from qtrain.quantize import (InputScale, collect_stats, dequantized_params, gptq, load_export,
                             load_quantized, ptq_providers, quantize_awq, quantize_gptq,
                             quantize_params, quantize_rtn, save_quantized, weight_sites)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("QTRAIN_TEST_DATA", ROOT / "data" / "kjv"))

W4 = QuantSpec(bits=4, granularity="channel")
W4_ASYM = QuantSpec(bits=4, granularity="channel", symmetric=False, calibration="minmax")
W4_G8 = QuantSpec(bits=4, granularity="group", group_size=8)
# d_ff = d_model = N * H: few distinct kernel shapes, so few compilations.
TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                   d_ff=16, max_seq_len=32)
LINEARS = r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


@pytest.fixture(scope="module")
def tiny_params():
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(jax.jit(Transformer(TINY).init)(jax.random.key(0), tokens)["params"])


def _rules(attn_spec=W4, mlp_spec=W4_ASYM, head_spec=W4):
  return (QuantRule(pattern=r"decoder/layers/attn/.*", weight=attn_spec),
          QuantRule(pattern=r"decoder/layers/mlp/.*", weight=mlp_spec),
          QuantRule(pattern="lm_head", weight=head_spec))


def _correlated(rng, n, k):
  """Rows with strongly correlated features (a random mixing plus noise)."""
  mix = rng.normal(size=(k, k)) / np.sqrt(k)
  return (rng.normal(size=(n, k)) @ mix + 0.2 * rng.normal(size=(n, k))).astype(np.float32)


def _out_err(x, w, w_hat):
  return float(np.linalg.norm(x @ np.asarray(w, np.float64) - x @ np.asarray(w_hat, np.float64)))


# --- RTN ----------------------------------------------------------------------


def np_rtn(k, spec):
  """Float64 RTN of a kernel [in, out], blocks along the contraction axis 0:
  (codes, scale, zero point or None) with the scale's shape as qtrain.quant's
  ([1, out] per channel, [in / g, out] per group)."""
  g = spec.group_size if spec.granularity == "group" else k.shape[0]
  kb = k.astype(np.float64).reshape(k.shape[0] // g, g, k.shape[1])  # [blocks, g, out]
  if spec.symmetric:
    qp = 2 ** (spec.bits - 1) - 1
    scale = np.abs(kb).max(1) / qp
    return np.clip(np.round(kb / scale[:, None]), -qp, qp).reshape(k.shape), scale, None
  top = 2 ** spec.bits - 1
  lo, hi = np.minimum(kb.min(1), 0), np.maximum(kb.max(1), 0)
  scale = (hi - lo) / top
  z = np.clip(np.round(-lo / scale), 0, top)
  q = np.clip(np.round(kb / scale[:, None]) + z[:, None], 0, top)
  return q.reshape(k.shape), scale, z


def test_rtn_codes_and_scales_equal_float64_numpy(tiny_params):
  sites, _ = weight_sites(TINY, _rules(mlp_spec=W4_ASYM, head_spec=W4_G8))
  assert len(sites) == 8
  qw = quantize_params("rtn", tiny_params, sites)
  for s in sites:
    kernel = np.asarray(_param(tiny_params, s.param))
    for l in range(kernel.shape[0]) if s.layered else [None]:
      k_l = kernel if l is None else kernel[l]
      got = jax.tree.map(lambda a, l=l: np.asarray(a if l is None else a[l]), qw[s.path].qt)
      want_q, want_s, want_z = np_rtn(k_l, s.spec)
      # Codes and zero points exactly: no weight of these seeds lies within
      # float32 rounding of a rounding boundary. Scales: qtrain computes them
      # in float32 (and divides by Q_P as a multiply by fl(1/Q_P)): 1e-6 is ~8 ulp.
      np.testing.assert_array_equal(got.q, want_q, err_msg=f"{s.path} layer {l}")
      np.testing.assert_allclose(got.scale, want_s, rtol=1e-6, err_msg=s.path)
      assert got.q.dtype == (np.int8 if s.spec.symmetric else np.uint8)
      if want_z is None:
        assert got.zero_point is None
      else:
        np.testing.assert_array_equal(got.zero_point, want_z, err_msg=s.path)


def _param(params, key_path):
  for k in key_path:
    params = params[k]
  return params


# --- GPTQ ---------------------------------------------------------------------


def _np_scale(w_rows, spec):
  """Scale and zero point of each row from qtrain.quant (float32; its numerics
  are tested against NumPy in test_quant_numerics). XLA divides by Q_P as a
  multiply by fl(1/Q_P), which a NumPy re-derivation would have to mimic."""
  gran = "tensor" if spec.granularity == "tensor" else "channel"
  qt = quantize(jnp.asarray(w_rows, jnp.float32), dataclasses.replace(spec, granularity=gran),
                contract_axis=1)
  return np.asarray(qt.scale), None if qt.zero_point is None else np.asarray(qt.zero_point,
                                                                               np.float32)


def _np_quant(w, s, z, spec):
  qn, qp = (-(2 ** (spec.bits - 1) - 1), 2 ** (spec.bits - 1) - 1) if spec.symmetric \
      else (0, 2 ** spec.bits - 1)
  v = np.round(w / s.astype(np.float64))
  if z is not None:
    v = v + z
  return np.clip(v, qn, qp)


def np_gptq(W, H, spec, blocksize, percdamp=0.01, act_order=False):
  """IST-DASLab gptq.py ``fasterquant`` transcribed to float64 NumPy."""
  W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
  R, C = W.shape
  g = spec.group_size if spec.granularity == "group" else C
  s, z = _np_scale(W, spec)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  if act_order:
    perm = np.argsort(-np.diag(H), kind="stable")
    W, H = W[:, perm], H[perm][:, perm]
  H[np.diag_indices(C)] += percdamp * np.mean(np.diag(H))
  U = np.linalg.cholesky(np.linalg.inv(H)).T  # Upper Cholesky factor of H^-1.
  Q = np.zeros_like(W)
  scales, zeros = [], []
  for i1 in range(0, C, blocksize):
    i2 = min(i1 + blocksize, C)
    W1, Err1, U1 = W[:, i1:i2].copy(), np.zeros((R, i2 - i1)), U[i1:i2, i1:i2]
    for i in range(i2 - i1):
      if spec.granularity == "group" and (i1 + i) % g == 0:
        s, z = _np_scale(W[:, i1 + i:i1 + i + g], spec)
        scales.append(s)
        zeros.append(z)
      w = W1[:, i:i + 1]
      q = _np_quant(w, s, z, spec)
      dq = (q - (0 if z is None else z.astype(np.float64))) * s.astype(np.float64)
      err = (w - dq) / U1[i, i]
      W1[:, i:] -= err @ U1[i:i + 1, i:]
      Q[:, i1 + i] = q[:, 0]
      Err1[:, i] = err[:, 0]
    W[:, i2:] -= Err1 @ U[i1:i2, i2:]
  if act_order:
    Q = Q[:, np.argsort(perm)]
  if spec.granularity == "group":
    s = np.concatenate(scales, 1)
    z = None if z is None else np.concatenate(zeros, 1)
  return Q, s, z


@pytest.mark.parametrize("spec,act_order", [(W4, False), (W4, True), (W4_ASYM, False),
                                            (W4_G8, False)],
                         ids=["channel", "act_order", "asymmetric", "group8"])
def test_gptq_matches_float64_numpy_reference(spec, act_order):
  rng = np.random.default_rng(1)
  x = _correlated(rng, 256, 32).astype(np.float64)
  W = rng.normal(size=(12, 32)) * 0.1  # [out, in]
  H = x.T @ x / len(x)
  H[:, 5] = H[5, :] = 0  # A dead input.
  # Block 12 with groups of 8: the group starting at 8 spans two blocks.
  want_q, want_s, want_z = np_gptq(W, H, spec, blocksize=12, act_order=act_order)
  with jax.enable_x64(True):
    got_q, got_s, got_z, damp = jax.jit(lambda w, h: gptq(w, h, spec, blocksize=12,
                                                            act_order=act_order))(W, H)
    got_q, got_s = np.asarray(got_q), np.asarray(got_s)
    assert float(damp) == 0.01  # A well-conditioned H needs no retry.
    got_z = None if got_z is None else np.asarray(got_z)
  np.testing.assert_array_equal(got_q, want_q)  # Codes: exact.
  np.testing.assert_array_equal(got_s, want_s)  # Scales: same float32 arithmetic.
  if spec.symmetric:
    assert got_z is None and want_z is None
  else:
    np.testing.assert_array_equal(got_z, want_z)
  assert np.abs(got_q).max() <= 7 if spec.symmetric else got_q.max() <= 15


def test_gptq_matches_qwix_gptq():
  """qwix's gptq_core.quantize_weight (Python-unrolled, hence a small matrix)
  on our grid gives the same codes; scales agree to float32 rounding (qwix
  computes absmax * (7.5/7) / 7.5)."""
  from qwix.contrib import gptq_core  # pylint: disable=g-import-not-at-top
  from qtrain.quantize import qwix_how  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = _correlated(rng, 256, 12)
  kernel = (rng.normal(size=(12, 6)) * 0.1).astype(np.float32)  # [in, out]
  H = jnp.asarray(x.T @ x / len(x))
  ours = quantize_gptq(jnp.asarray(kernel), H, W4, layered=False, blocksize=4)
  theirs, _ = gptq_core.quantize_weight(jnp.asarray(kernel.T), H, qwix_how(W4), blocksize=4)
  np.testing.assert_array_equal(np.asarray(theirs.qvalue, np.int8).T, ours.qt.q)
  np.testing.assert_allclose(np.asarray(theirs.scale).T, ours.qt.scale, rtol=2e-7)


def test_gptq_lowers_layer_output_error_vs_rtn():
  rng = np.random.default_rng(3)
  x = _correlated(rng, 2048, 64)
  kernel = (rng.normal(size=(64, 48)) * 0.05).astype(np.float32)
  H = jnp.asarray(x.T @ x / len(x))
  rtn = dequantize(quantize_rtn(jnp.asarray(kernel), W4, layered=False))
  gq = dequantize(quantize_gptq(jnp.asarray(kernel), H, W4, layered=False, blocksize=16).qt)
  e_rtn, e_gptq = _out_err(x, kernel, rtn), _out_err(x, kernel, gq)
  # Measured: GPTQ's output error is 0.74x RTN's here; demand a clear win.
  assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)


def _rank3_hessian(n_in=32):
  """H = X^T X / n of inputs spanning 3 of ``n_in`` dims: singular."""
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(256, 3)) @ rng.normal(size=(3, n_in))).astype(np.float32)
  return x, jnp.asarray(x.T @ x / len(x))


def test_gptq_rank_deficient_hessian_retries_with_more_damping():
  from qtrain.quantize.gptq_awq import _upper_inverse_cholesky_once  # pylint: disable=g-import-not-at-top
  x, H = _rank3_hessian()
  # The premise: at 1e-7 x mean(diag H) the float32 factor of this H is NaN
  # (measured: non-finite up to 1e-6, finite from 1e-5).
  assert not np.isfinite(np.asarray(_upper_inverse_cholesky_once(H, 1e-7))).all()
  kernel = (np.random.default_rng(6).normal(size=(32, 12)) * 0.1).astype(np.float32)
  W = jnp.asarray(kernel.T)
  got = jax.jit(lambda w, h: gptq(w, h, W4, blocksize=8, percdamp=1e-7))(W, H)
  # Two retries (x10 each) reach the first finite damping.
  np.testing.assert_allclose(float(got.percdamp), 1e-5, rtol=1e-6)
  again = jax.jit(lambda w, h: gptq(w, h, W4, blocksize=8, percdamp=1e-5))(W, H)
  np.testing.assert_array_equal(got.q, again.q)
  np.testing.assert_array_equal(got.scale, again.scale)
  # And the codes are GPTQ's: on these inputs' span it beats RTN by far.
  w_hat = np.asarray(got.q * got.scale).T
  rtn = dequantize(quantize_rtn(jnp.asarray(kernel), W4, layered=False))
  assert _out_err(x, kernel, w_hat) < 0.5 * _out_err(x, kernel, rtn)


@pytest.mark.parametrize("bad", ["indefinite", "nan"])
def test_gptq_unfactorable_hessian_fails_naming_the_matmul(bad):
  H = -np.eye(16, dtype=np.float32) if bad == "indefinite" else np.full((16, 16), np.nan,
                                                                           np.float32)
  H = jnp.asarray(np.stack([np.eye(16, dtype=np.float32), H]))  # Layer 1 is the bad one.
  kernel = jnp.ones((2, 16, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"GPTQ decoder/layers/mlp/up_proj: .*non-finite "
                                       r"\(layer\(s\) \[1\]\)"):
    quantize_gptq(kernel, H, W4, layered=True, path="decoder/layers/mlp/up_proj")


# --- AWQ ----------------------------------------------------------------------


def test_awq_not_worse_than_rtn_with_outlier_input_channels():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2048, 64)).astype(np.float32)
  x[:, [3, 17, 40]] *= 25.0  # Outlier input channels (salient weights).
  kernel = (rng.normal(size=(64, 48)) * 0.05).astype(np.float32)
  act = jnp.mean(jnp.abs(jnp.asarray(x)), axis=0)
  rtn = dequantize(quantize_rtn(jnp.asarray(kernel), W4, layered=False))
  aw = quantize_awq(jnp.asarray(kernel), act, W4, layered=False)
  w_hat = dequantize(aw.qt) / aw.awq_scale
  e_rtn, e_awq = _out_err(x, kernel, rtn), _out_err(x, kernel, w_hat)
  # Measured: AWQ 0.55x RTN's output error here. The search includes s = 1
  # (RTN itself), so AWQ may tie but must not lose.
  assert e_awq <= e_rtn, (e_awq, e_rtn)
  assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
  # The codes are our quantizer's codes of W diag(s).
  np.testing.assert_array_equal(
      aw.qt.q, quantize(jnp.asarray(kernel) * aw.awq_scale, W4, contract_axis=0).q)


A4_TOKEN = QuantSpec(bits=4, granularity="token", symmetric=False, calibration="minmax")


def np_int_quant(x, bits, symmetric, axis):
  """Float64 fake-quant, min/max (asymmetric) or absmax (symmetric) over ``axis``:
  the formulas of qtrain.quant.quantizer's docstring, written independently."""
  if symmetric:
    qp = 2 ** (bits - 1) - 1
    s = np.abs(x).max(axis, keepdims=True) / qp
    return np.clip(np.round(x / s), -qp, qp) * s
  lo = np.minimum(x.min(axis, keepdims=True), 0)
  hi = np.maximum(x.max(axis, keepdims=True), 0)
  s = (hi - lo) / (2 ** bits - 1)
  z = np.clip(np.round(-lo / s), 0, 2 ** bits - 1)
  return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


class _OneMatmul(nn.Module):
  providers: tuple

  @nn.compact
  def __call__(self, x):
    return Linear(16, ("embed", "mlp"), hooks=self.providers, name="proj")(x)


def test_awq_w4a4_matmul_quantizes_x_over_s():
  """y = Q_a(x / s) Q_w(diag(s) W) against float64 NumPy; the pre-fix model,
  Q_a(x) Q_w(diag(s) W) / s, differs."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(64, 32))
  x[:, [2, 9, 30]] *= 20.0  # Outlier channels: AWQ's s is far from 1 there.
  kernel = (rng.normal(size=(32, 16)) * 0.1).astype(np.float32)
  aw = quantize_awq(jnp.asarray(kernel), jnp.mean(jnp.abs(jnp.asarray(x, jnp.float32)), 0), W4,
                    layered=False)
  s = np.asarray(aw.awq_scale, np.float64)[:, 0]
  assert s.max() / s.min() > 2  # The search moved s away from 1 (else nothing is tested).
  w_hat = np_int_quant(s[:, None] * kernel, 4, True, axis=0)  # Per output channel.
  np.testing.assert_allclose(dequantize(aw.qt), w_hat, rtol=1e-6)  # float32 s * W vs float64.
  want = np_int_quant(x / s, 4, False, axis=1) @ w_hat  # Per token.
  model = _OneMatmul((InputScale({"proj": 1.0 / s.astype(np.float32)}),
                      QuantProvider(rules=(QuantRule(pattern="proj", act=A4_TOKEN),))))
  got = model.apply({"params": {"proj": {"kernel": dequantize(aw.qt)}}},
                    jnp.asarray(x, jnp.float32))
  # float32 vs float64 on the same codes (|y| up to ~5; measured 5.3e-6); one
  # activation code off would move an output by ~1e-2.
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
  unscaled = np_int_quant(x, 4, False, axis=1) @ (w_hat / s[:, None])
  assert np.abs(unscaled - want).max() > 100 * 2e-5


def _awq_stats(sites, seed=8):
  """Positive mean |x| per input channel, one array per norm group's input."""
  rng = np.random.default_rng(seed)
  by_shape = {}
  out = {}
  for s in sites:
    key = s.param[:-2] if s.path.endswith(("q_proj", "k_proj", "v_proj", "gate_proj",
                                            "up_proj")) else s.param
    if key not in by_shape:
      n_in = TINY.d_ff if s.path.endswith("down_proj") else TINY.d_model
      shape = (TINY.n_layers, n_in) if s.layered else (n_in,)
      by_shape[key] = jnp.asarray(np.exp(rng.normal(size=shape)), jnp.float32)
    out[s.path] = {"act_scale": by_shape[key]}
  return out


def test_awq_export_folds_norms_and_equals_explicit_scaling(tiny_params, tmp_path):
  """q/k/v, gate/up and lm_head share one s per norm, folded into it; o/down
  keep an explicit 1/s. The exported model equals the all-explicit one."""
  sites, _ = weight_sites(TINY, _rules(mlp_spec=W4, head_spec=W4))
  qw = quantize_params("awq", tiny_params, sites, _awq_stats(sites))
  a = lambda name: qw[f"decoder/layers/{name}"].awq_scale
  assert np.array_equal(a("attn/q_proj"), a("attn/v_proj"))
  assert np.array_equal(a("mlp/gate_proj"), a("mlp/up_proj"))
  save_quantized(str(tmp_path), tiny_params, qw, sites, {"recipe": "test", "method": "awq"})
  doc = json.loads((tmp_path / "ptq.json").read_text())
  explicit = {p for p, e in doc["weights"].items() if e["awq"] == "explicit"}
  assert explicit == {"decoder/layers/attn/o_proj", "decoder/layers/mlp/down_proj"}
  loaded = load_quantized(str(tmp_path))
  s_attn = np.asarray(a("attn/q_proj"))[..., 0]
  np.testing.assert_allclose(loaded["decoder"]["layers"]["attn_norm"]["scale"],
                             tiny_params["decoder"]["layers"]["attn_norm"]["scale"] / s_attn,
                             rtol=1e-7)
  # Reference: the unfolded params, every AWQ input divided explicitly.
  ref = _copy_tree(tiny_params)
  for s in sites:
    node = ref
    for k in s.param[:-1]:
      node = node[k]
    node["kernel"] = dequantize(qw[s.path].qt)
  every = InputScale({s.path: 1.0 / np.asarray(qw[s.path].awq_scale)[..., 0] for s in sites})
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, TINY.vocab_size)
  act = QuantProvider(rules=(QuantRule(pattern=".*", act=A4_TOKEN),))
  for quant in (None, act):  # Weight-only, then W4A4.
    want = _apply(Transformer(TINY, (every,) if quant is None else (every, quant)), ref, tokens)
    got = _apply(Transformer(TINY, ptq_providers(str(tmp_path), quant)), loaded, tokens)
    # gamma / s then x * gamma vs x * gamma then / s: float32 rounding only
    # (|logits| ~0.3; 1e-6 is ~30 ulp). Measured: bitwise equal with and without
    # A4 on CPU; one flipped activation code would move logits by ~1e-3.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Before the fix the export ran Q_a(x) against Q(diag(s) W) / s.
  old = dequantized_params(tiny_params, {}, [])
  for s in sites:
    node = old
    for k in s.param[:-1]:
      node = node[k]
    node["kernel"] = dequantize(qw[s.path].qt) / qw[s.path].awq_scale
  before = _apply(Transformer(TINY, act), old, tokens)
  assert np.abs(np.asarray(before) - np.asarray(got)).max() > 100 * 1e-6


def _apply(model, params, tokens):
  """``model``'s logits, compiled as one program (run eagerly, every op of
  the quantized model would compile on its own)."""
  return jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)


def _copy_tree(tree):
  return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


# --- calibration statistics ----------------------------------------------------


def test_calibration_stats_are_per_layer_input_moments(tiny_params):
  """H = X^T X / n and mean|x| of q_proj's input, per layer and averaged over
  two batches, against that input captured independently: the attention
  norm's output (flax capture_intermediates) over both batches at once."""
  sites, _ = weight_sites(TINY, _rules())
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, TINY.vocab_size)
  stats = collect_stats(TINY, tiny_params, [{"inputs": tokens[:2]}, {"inputs": tokens[2:]}],
                        sites)
  _, inter = jax.jit(lambda p, t: Transformer(TINY).apply(
      {"params": p}, t, capture_intermediates=True, mutable=["intermediates"]))(tiny_params, tokens)
  layers = inter["intermediates"]["decoder"]["layers"]
  x_q = np.asarray(layers["attn_norm"]["__call__"][0], np.float64)  # [L, B, T, D]
  x = x_q.reshape(TINY.n_layers, -1, TINY.d_model)
  want_h = np.einsum("lnk,lnm->lkm", x, x) / x.shape[1]
  # float32 sums of 16 products vs float64: rtol 1e-5 is ~100 ulp of slack.
  np.testing.assert_allclose(stats["decoder/layers/attn/q_proj"]["hessian"], want_h,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats["decoder/layers/attn/q_proj"]["act_scale"],
                             np.abs(x).mean(1), rtol=1e-5)
  assert stats["lm_head"]["hessian"].shape == (TINY.d_model, TINY.d_model)
  assert stats["decoder/layers/mlp/down_proj"]["hessian"].shape == (2, TINY.d_ff, TINY.d_ff)


# --- export -------------------------------------------------------------------


def test_export_round_trip_is_bit_identical(tiny_params, tmp_path):
  sites, _ = weight_sites(TINY, _rules(mlp_spec=W4_ASYM, head_spec=W4_G8))
  qw = quantize_params("rtn", tiny_params, sites)
  # One AWQ weight too, so the per-input-channel scale travels.
  down = next(s for s in sites if s.path.endswith("up_proj"))
  qw[down.path] = quantize_awq(tiny_params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"],
                               jnp.ones((2, TINY.d_model)) + jnp.arange(TINY.d_model),
                               down.spec, layered=True)
  in_memory = dequantized_params(tiny_params, qw, sites)
  save_quantized(str(tmp_path), tiny_params, qw, sites, {"recipe": "test", "method": "rtn"})
  loaded = load_quantized(str(tmp_path))
  flat_mem = jax.tree_util.tree_leaves_with_path(in_memory)
  flat_disk = dict(jax.tree_util.tree_leaves_with_path(loaded))
  assert len(flat_mem) == len(flat_disk)
  for path, a in flat_mem:
    b = flat_disk[path]
    assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
  doc, disk_qw, _ = load_export(str(tmp_path))
  assert doc["method"] == "rtn" and set(doc["weights"]) == {s.path for s in sites}
  for s in sites:
    for a, b in zip(jax.tree.leaves(qw[s.path]), jax.tree.leaves(disk_qw[s.path])):
      assert a.dtype == b.dtype and np.array_equal(a, b)
  q = disk_qw["decoder/layers/attn/q_proj"].qt.q
  assert q.dtype == jnp.int8 and int(jnp.abs(q).max()) == 7  # int4 values in int8.
  assert disk_qw["decoder/layers/mlp/down_proj"].qt.zero_point.dtype == jnp.uint8


# --- CLI ------------------------------------------------------------------------


def _env():
  # Devices as the caller set them (`make test`: 8 fake CPU devices).
  return dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.mark.slow
def test_cli_end_to_end_rtn_gptq_awq(smoke_run):
  """The session's 4-step smoke run (tests/conftest.py; a copy: the exports
  go into the run's directory) quantized by the CLI with each method."""
  run = smoke_run
  procs = {m: subprocess.Popen(
      [sys.executable, "-m", "qtrain.quantize", f"--workdir={run}", "--recipe=w4a4kv4",
       f"--method={m}", "--calib_batches=2"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for m in ("rtn", "gptq", "awq")}
  metrics = {}
  for m, p in procs.items():
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"{m}: {out}\n{err[-3000:]}"
    assert "held-out perplexity" in out and "unquantized" in out
    d = run / f"ptq_w4a4kv4_{m}"
    metrics[m] = json.loads((d / "ptq_metrics.json").read_text())
    assert json.loads((d / "ptq.json").read_text())["method"] == m
    assert (d / "weights").is_dir()
  for m, r in metrics.items():
    assert r["recipe"] == "w4a4kv4" and r["method"] == m
    assert r["unigram"] == pytest.approx(json.loads((DATA / "meta.json").read_text())
                                         ["unigram_ppl_validation"])
    assert np.isfinite(r["ppl_fp"]) and np.isfinite(r["ppl_ptq"])
    assert r["ppl_ptq"] != r["ppl_fp"]  # W4A4KV4 changes the model.
    assert len(r["quantized_matmuls"]) == 7  # q, k, v, o, gate, up, down (scanned).
  assert metrics["rtn"]["ppl_fp"] == metrics["gptq"]["ppl_fp"]  # Same fp model and batches.
  assert metrics["gptq"]["calib_batches"] == 2
  assert metrics["gptq"]["ppl_ptq"] != metrics["rtn"]["ppl_ptq"]  # Different weights.
  # GPTQ minimises each matmul's output error E = tr(dW^T H dW), H = X^T X / n
  # of its input. The held-out perplexity of this 4-step model is ~5780 (near
  # the 8k vocabulary) for every method, and moves by +-0.3% between methods
  # and weight noises: a GPTQ whose error propagation was flipped (the break
  # tried, on an earlier 4-step run) scored 6122 against RTN's 6149, "better".
  # So the check is E of the exported weights on held-out inputs (not the 2
  # calibration batches).
  err = _layer_errors(run, [run / f"ptq_w4a4kv4_{m}" for m in ("rtn", "gptq")])
  for path, (e_rtn, e_gptq) in err.items():
    # Measured: GPTQ/RTN 0.06 (o_proj) to 0.74 (v_proj) per matmul; 10% slack
    # for calibrating on 2 batches and measuring on 2 others.
    assert e_gptq <= 1.1 * e_rtn, (path, e_gptq, e_rtn)
  total = [sum(e[i] for e in err.values()) for i in (0, 1)]
  assert total[1] <= 0.8 * total[0], total  # Measured 0.45.


def _layer_errors(run, exports) -> dict:
  """{matmul path: [tr(dW^T H dW) of each export]}, H from 2 held-out batches."""
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.data.global_batch import to_global  # pylint: disable=g-import-not-at-top
  from qtrain.parallel import Layout  # pylint: disable=g-import-not-at-top
  from qtrain.quantize import evaluate as ev  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import model_config  # pylint: disable=g-import-not-at-top
  cfg = load_config(str(run))
  model_cfg = model_config(cfg)
  docs = [load_export(str(e)) for e in exports]
  sites, _ = weight_sites(model_cfg, validate_quant(ev.load_recipe("w4a4kv4"), cfg.model))
  layout = Layout.for_checkpoint(cfg)
  mesh = layout.mesh
  with layout:
    params, _ = ev.restore_params(str(run), cfg, mesh)
    batches = loader.make_eval_batches(DATA, seq_len=cfg.data.seq_len,
                                       global_batch_size=cfg.data.eval_batch_size, num_batches=2)
    stats = collect_stats(model_cfg, params, [to_global(b, mesh) for b in batches], sites,
                          ("hessian",))
  out = {}
  for s in sites:
    w = np.asarray(_param(params, s.param), np.float64)
    H = np.asarray(stats[s.path]["hessian"], np.float64)
    dws = [w - np.asarray(dequantize(qw[s.path].qt), np.float64) for _, qw, _ in docs]
    out[s.path] = [float(np.einsum("...io,...ij,...jo->...", dw, H, dw).sum()) for dw in dws]
  return out
