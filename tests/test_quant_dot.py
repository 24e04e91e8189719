"""The quantized dot-general: modes against each other, against qwix, in the
compiled program, and LSQ learning. Tolerances and their reasons sit next to
the assertions."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix

from configs.quant import fp8, w4a4kv4, w4a8, w4a16, w4a4, w8a8
from qtrain.layers import Linear, ModelConfig, Transformer, trace_sites
from qtrain.quant import (QuantDotGeneral, QuantProvider, QuantRule, QuantSpec, dequantize,
                          provider_from_config, quantize)
from qtrain.quant.rules import first_match

U = 2.0 ** -24  # float32 unit roundoff.
DN = (((2,), (0,)), ((), ()))  # x [B, T, K] . w [K, N]
W8 = QuantSpec(bits=8, granularity="channel")
A8 = QuantSpec(bits=8, granularity="token")
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, init_std=0.2, attention_impl="xla")


def operands(seed=0, shape=(2, 8, 32), n=16):
  rng = np.random.default_rng(seed)
  x = rng.standard_t(5, size=shape).astype(np.float32)
  w = (rng.normal(size=(shape[-1], n)) * rng.uniform(0.2, 2.0, n)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w)


@functools.partial(jax.jit, static_argnums=(0, 4))
def value_and_grads(dot, x, w, c, dn=DN):
  """y and the grads of sum(c * y) w.r.t. x and w."""
  f = lambda x, w: jnp.sum(c * dot.apply({}, x, w, dn))
  return dot.apply({}, x, w, dn), jax.grad(f, argnums=(0, 1))(x, w)


def quantized(x, w, act=A8, weight=W8):
  qx, qw = quantize(x, act, contract_axis=-1), quantize(w, weight, contract_axis=0)
  return qx, qw, np.asarray(dequantize(qx), np.float64), np.asarray(dequantize(qw), np.float64)


def test_fake_and_int8_forward_agree():
  x, w = operands()
  c = jnp.ones((2, 8, 16))
  y_fake, _ = value_and_grads(QuantDotGeneral(weight=W8, act=A8, mode="fake"), x, w, c)
  y_int8, _ = value_and_grads(QuantDotGeneral(weight=W8, act=A8, mode="int8"), x, w, c)
  qx, qw, x_hat, w_hat = quantized(x, w)
  mag = np.abs(x_hat) @ np.abs(w_hat)
  # Both compute sum_k x^_k w^_k: int8 exactly (int32) then two scale products,
  # fake in float32 over K=32 terms of float32-rounded x^, w^: |diff| <= (K+4) u sum|x^ w^|.
  assert np.all(np.abs(np.asarray(y_int8) - np.asarray(y_fake)) <= (32 + 4) * U * mag)
  # Against the unquantized product: within one half-step of each operand,
  # |x^ w^ - x w| <= sum_k (s_x/2 |w^_k| + |x_k| s_w/2) (plus float32 slop).
  s_x, s_w = np.asarray(qx.scale, np.float64), np.asarray(qw.scale, np.float64)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  bound = s_x / 2 * np.sum(np.abs(w_hat), 0) + np.sum(np.abs(x64), -1, keepdims=True) * s_w / 2
  err = np.abs(np.asarray(y_int8, np.float64) - x64 @ w64)
  assert np.all(err <= bound + 64 * U * mag)
  assert err.max() > 1e-3 * bound.max()  # The quantization did something.
  # The tied LM head's layout, w as [N, K] contracted on its dim 1: the same
  # codes and scales (per N), the same int32 sums, so the same bits.
  int8 = QuantDotGeneral(weight=W8, act=A8, mode="int8")
  c = jnp.asarray(np.random.default_rng(8).normal(size=(2, 8, 16)), jnp.float32)
  y, (dx, dw) = value_and_grads(int8, x, w, c)
  y_t, (dx_t, dw_t) = value_and_grads(int8, x, w.T, c, (((2,), (1,)), ((), ())))
  for a, b in ((y, y_t), (dx, dx_t), (dw, dw_t.T)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("int8_backward", [True, False])
def test_int8_backward_close_to_fake_quant_grads(int8_backward):
  x, w = operands(seed=1)
  c = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 16)), jnp.float32)
  _, (dx_f, dw_f) = value_and_grads(QuantDotGeneral(weight=W8, act=A8, mode="fake"), x, w, c)
  _, (dx_i, dw_i) = value_and_grads(
      QuantDotGeneral(weight=W8, act=A8, mode="int8", int8_backward=int8_backward), x, w, c)
  qx, qw, x_hat, w_hat = quantized(x, w)
  c64 = np.asarray(c, np.float64).reshape(16, 16)
  err_x = np.abs(np.asarray(dx_i - dx_f, np.float64)).reshape(16, 32)
  err_w = np.abs(np.asarray(dw_i - dw_f, np.float64))
  slop_x = 40 * U * (np.abs(c64) @ np.abs(w_hat).T)  # float32 dots over 16 terms + epilogue.
  slop_w = 40 * U * (np.abs(x_hat.reshape(16, 32)).T @ np.abs(c64))
  if not int8_backward:  # float32 on the same X^, W^: rounding only.
    assert np.all(err_x <= slop_x) and np.all(err_w <= slop_w)
    return
  # int8 dY: dX = (dY s_w) Q_w^T with dY s_w rounded per row to s_g/2, s_g =
  # max_n |dY s_w| / 127, so |err dX_mk| <= s_g,m / 2 * sum_n |Q_w,kn|; dW likewise
  # with s_x dY rounded per column: |err dW_kn| <= s_g,n / 2 * sum_m |Q_x,mk|.
  q_w = np.abs(np.asarray(qw.q, np.float64))
  q_x = np.abs(np.asarray(qx.q, np.float64)).reshape(16, 32)
  g_x = np.abs(c64 * np.asarray(qw.scale, np.float64))
  g_w = np.abs(c64 * np.asarray(qx.scale, np.float64).reshape(16, 1))
  bound_x = g_x.max(1, keepdims=True) / 127 / 2 * q_w.sum(1)[None, :]
  bound_w = q_x.sum(0)[:, None] * (g_w.max(0, keepdims=True) / 127 / 2)
  assert np.all(err_x <= bound_x + slop_x) and np.all(err_w <= bound_w + slop_w)
  assert err_x.max() > 1e-3 * bound_x.max()  # dY really went through int8.
  rel = np.linalg.norm(err_w) / np.linalg.norm(np.asarray(dw_f))
  assert rel < 0.01, rel  # int8 dY: 0.65% relative error in dW (measured).


def test_int8_backward_stochastic_rounding_is_unbiased():
  x, w = operands(seed=9)
  c = jnp.asarray(np.random.default_rng(10).normal(size=(2, 8, 16)), jnp.float32)
  _, (dx_f, dw_f) = value_and_grads(QuantDotGeneral(weight=W8, act=A8, mode="fake"), x, w, c)
  _, (dx_n, dw_n) = value_and_grads(QuantDotGeneral(weight=W8, act=A8, mode="int8"), x, w, c)
  sr = QuantDotGeneral(weight=W8, act=A8, mode="int8", grad_stochastic_rounding=True)
  loss = lambda x, w, key: jnp.sum(c * sr.apply({}, x, w, DN, rngs={"quant": key}))
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0)))
  dx_s, dw_s = grads(x, w, jax.random.split(jax.random.key(0), 256))
  for sampled, nearest, fake in ((dx_s, dx_n, dx_f), (dw_s, dw_n, dw_f)):
    err = lambda a: float(jnp.linalg.norm(a - fake))
    assert err(sampled[0]) > 0 and err(sampled[0]) != err(sampled[1])  # Random per key.
    # Unbiased: the mean of 256 draws is ~16x closer than one draw, and much
    # closer than round-to-nearest, whose error does not average out.
    assert err(sampled.mean(0)) < 0.3 * err(nearest), (err(sampled.mean(0)), err(nearest))


def test_fp8_mode_matches_fake_fp8():
  x, w = operands(seed=3)
  e4 = lambda g: QuantSpec(format="fp8_e4m3", granularity=g)
  c = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 16)), jnp.float32)
  fake = QuantDotGeneral(weight=e4("channel"), act=e4("token"), mode="fake")
  real = QuantDotGeneral(weight=e4("channel"), act=e4("token"), mode="fp8")
  (y_f, (dx_f, dw_f)), (y_r, (dx_r, dw_r)) = [value_and_grads(d, x, w, c) for d in (fake, real)]
  _, _, x_hat, w_hat = quantized(x, w, e4("token"), e4("channel"))
  mag = np.abs(x_hat) @ np.abs(w_hat)
  # Same fp8 codes and scales; float32 accumulation in both (see int8 test).
  assert np.all(np.abs(np.asarray(y_r - y_f)) <= (32 + 4) * U * mag)
  # e5m2 gradients: 2 mantissa bits, relative rounding <= 2^-3 per element of dY.
  c64 = np.abs(np.asarray(c, np.float64)).reshape(16, 16)
  bound_x = 2.0 ** -3 * (c64 @ np.abs(w_hat).T) * (1 + 1e-5)
  assert np.all(np.abs(np.asarray(dx_r - dx_f)).reshape(16, 32) <= bound_x)
  assert np.all(np.abs(np.asarray(dw_r - dw_f)) <= 2.0 ** -3 * np.abs(x_hat.reshape(16, 32)).T
                @ c64 * (1 + 1e-5))
  # The program: e4m3 x e4m3 forward, e5m2 dY against e4m3 codes backward.
  loss = lambda x, w: jnp.sum(c * real.apply({}, x, w, DN))
  counts = count_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr)
  e4, e5 = "float8_e4m3fn", "float8_e5m2"
  assert counts == {(e4, e4, "float32"): 1, (e5, e4, "float32"): 1, (e4, e5, "float32"): 1}


def test_fp8_tensorwise_matches_float64_and_runs_scaled_fp8_dots():
  """fp8 with per-tensor power-of-two scales: y, dX and dW against float64
  NumPy on the same codes, and the program a GPU folds into cuBLASLt's fp8
  GEMM: float8 dots straight to the output dtype, no float32 product."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  x, w = operands(seed=11)
  c = jnp.asarray(np.random.default_rng(12).normal(size=(2, 8, 16)), jnp.float32)
  e4 = QuantSpec(format="fp8_e4m3", granularity="tensor", scale_pow2=True)
  real = QuantDotGeneral(weight=e4, act=e4, mode="fp8")
  y, (dx, dw) = value_and_grads(real, x, w, c)

  def codes(a, dt):  # Per-tensor absmax scale rounded up to a power of two.
    a = np.asarray(a, np.float64)
    top = float(ml_dtypes.finfo(dt).max)
    s = 2.0 ** np.ceil(np.log2(np.abs(a).max() / top))
    return (a / s).astype(np.float32).astype(dt).astype(np.float64) * s

  x_hat, w_hat = codes(x, ml_dtypes.float8_e4m3fn), codes(w, ml_dtypes.float8_e4m3fn)
  g_hat = codes(c, ml_dtypes.float8_e5m2).reshape(16, 16)  # One scale for dY.
  x2 = x_hat.reshape(16, 32)
  # float32 accumulation of K exact products of codes, then one exact
  # power-of-two product: |err| <= K u sum|a b| (K = 32, 16, 16).
  for got, want, mag, k in ((y, x_hat @ w_hat, np.abs(x_hat) @ np.abs(w_hat), 32),
                            (dx, g_hat @ w_hat.T, np.abs(g_hat) @ np.abs(w_hat).T, 16),
                            (dw, x2.T @ g_hat, np.abs(x2).T @ np.abs(g_hat), 16)):
    got = np.asarray(got, np.float64).reshape(want.shape)
    assert np.all(np.abs(got - want) <= (k + 2) * U * mag)
  # dY went through e5m2 (2 mantissa bits): far from the exact-dY gradient.
  assert np.abs(np.asarray(dw) - x2.T @ np.asarray(c, np.float64).reshape(16, 16)).max() > 1e-3
  # bf16 operands: every dot is float8 x float8 -> bf16, times one scalar.
  xb, wb, cb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), c.astype(jnp.bfloat16)
  loss = lambda x, w: jnp.sum(cb * real.apply({}, x, w, DN))
  counts = count_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(xb, wb).jaxpr)
  f4, f5, bf = "float8_e4m3fn", "float8_e5m2", "bfloat16"
  assert counts == {(f4, f4, bf): 1, (f5, f4, bf): 1, (f4, f5, bf): 1}, counts


class QwixDense(nn.Module):
  """A dense layer calling jax.lax.dot_general with its own param, which is
  what qwix's interception needs to tell the weight from the activation."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features))
    return jax.lax.dot_general(x, kernel, DN)


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, None)])
def test_fake_quant_matches_qwix_qat(w_bits, a_bits):
  x, w = operands(seed=5)
  qtype = {8: jnp.int8, 4: jnp.int4}
  # qwix maps absmax to Q_P + 0.5 (127.5, 7.5); the calibration factor
  # (Q_P + 0.5) / Q_P gives our scale absmax / Q_P, so the codes match.
  cal = lambda b: f"absmax,{(2 ** (b - 1) - 0.5) / (2 ** (b - 1) - 1)!r}"
  rule = qwix.QtRule(module_path=".*", weight_qtype=qtype[w_bits],
                     weight_calibration_method=cal(w_bits),
                     act_qtype=qtype.get(a_bits), act_calibration_method=cal(a_bits or 8))
  theirs = qwix.quantize_model(QwixDense(16), qwix.QtProvider([rule]))
  y_qwix = jax.jit(theirs.apply)({"params": {"kernel": w}}, x)
  act = QuantSpec(bits=a_bits, granularity="token") if a_bits else None
  ours = Linear(16, ("embed", "mlp"), hooks=QuantProvider(
      rules=(QuantRule(pattern=".*", weight=QuantSpec(bits=w_bits), act=act),), mode="fake"))
  y_ours = jax.jit(ours.apply)({"params": {"kernel": w}}, x)
  _, _, x_hat, w_hat = quantized(x, w, act or QuantSpec(bits=8, granularity="token"),
                                 QuantSpec(bits=w_bits))
  x_hat = x_hat if a_bits else np.asarray(x, np.float64)
  # Same codes and scales (up to one ulp of the scale); the two accumulate
  # differently (qwix int32 or float32, ours float32): float32 rounding only.
  mag = np.abs(x_hat) @ np.abs(w_hat)
  assert np.all(np.abs(np.asarray(y_ours - y_qwix)) <= (32 + 8) * U * mag)
  y_exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert np.abs(np.asarray(y_ours) - y_exact).max() > 1e3 * (40 * U * mag).max()  # Not trivial.


def count_dots(jaxpr, counts=None):
  """{(lhs dtype, rhs dtype, out dtype): n} over a jaxpr and all sub-jaxprs."""
  counts = {} if counts is None else counts
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      key = tuple(str(v.aval.dtype) for v in (*eqn.invars, eqn.outvars[0]))
      counts[key] = counts.get(key, 0) + 1
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          count_dots(sub, counts)
  return counts


@pytest.mark.parametrize("arg,scan", [("", True), ("lm_head", True), ("", False)])
def test_int8_preset_runs_3_int8_dots_per_weight_matmul(arg, scan):
  cfg = CFG if scan else ModelConfig(**{**CFG.__dict__, "scan_layers": False})
  model = Transformer(cfg, provider_from_config(w8a8.get_quant(arg)))
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]

  def loss(p):
    return jnp.mean(model.apply({"params": p}, tokens).astype(jnp.float32) ** 2)

  counts = count_dots(jax.make_jaxpr(jax.value_and_grad(loss))(nn.unbox(params)).jaxpr)
  # 7 weight matmuls per block; a scanned block's body appears once in the
  # program (forward scan + transposed scan), unrolled blocks L times; the LM
  # head only when a rule matches it. Each: forward + dX + dW int8 dots.
  matmuls = 7 * (1 if scan else cfg.n_layers) + (arg == "lm_head")
  assert counts.pop(("int8", "int8", "int32")) == 3 * matmuls
  assert not [k for k in counts if "int8" in k], counts  # No other int8 dots.


def test_lsq_learns_the_step_of_a_toy_regression():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
  spec = QuantSpec(bits=3, granularity="tensor", calibration="lsq", estimator="lsq")
  dot = QuantDotGeneral(weight=spec, mode="fake")
  dn = (((1,), (0,)), ((), ()))
  params = dot.init(jax.random.key(0), x, w, dn)["params"]
  s0 = float(params["weight_step"])
  assert s0 == pytest.approx(2 * float(jnp.mean(jnp.abs(w))) / np.sqrt(3), rel=1e-6)  # LSQ init.
  loss = lambda p: jnp.mean((dot.apply({"params": p}, x, w, dn) - x @ w) ** 2)
  tx = optax.adam(1e-2)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, o = carry
      l, g = jax.value_and_grad(loss)(p)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), l
    (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), None, length=300)
    return p, losses

  p, losses = train(params)
  s = float(p["weight_step"])
  w64, x64 = np.asarray(w, np.float64), np.asarray(x, np.float64)
  grid = np.linspace(0.3, 1.2, 901)
  true_loss = [np.mean((x64 @ ((np.clip(np.round(w64 / g), -3, 3) * g) - w64)) ** 2) for g in grid]
  s_best = grid[int(np.argmin(true_loss))]
  assert losses[-1] < 0.7 * losses[0]  # Measured 2.66 -> 1.50.
  # LSQ's gradient is the STE's, not the true loss's: it lands near, not on,
  # the brute-force optimum (measured 0.677 vs 0.658, from 0.943).
  assert abs(s - s_best) < 0.05 * s_best and abs(s0 - s_best) > 0.2 * s_best
  assert float(losses[-1]) < 1.05 * min(true_loss)


def test_lsq_step_gradient_uses_n_of_the_layer():
  x, w = operands(seed=6)
  spec = QuantSpec(bits=4, granularity="tensor", calibration="lsq", estimator="lsq")
  dot = QuantDotGeneral(weight=spec, mode="fake")
  params = dot.init(jax.random.key(0), x, w, DN)["params"]
  c = jnp.asarray(np.random.default_rng(7).normal(size=(2, 8, 16)), jnp.float32)
  grad = jax.grad(lambda p: jnp.sum(c * dot.apply({"params": p}, x, w, DN)))(params)
  s = float(params["weight_step"])
  w64 = np.asarray(w, np.float64)
  v = w64 / s
  dv_ds = np.where(v <= -7, -7, np.where(v >= 7, 7, np.round(v) - v))
  dy_dw = np.einsum("btk,btn->kn", np.asarray(x, np.float64), np.asarray(c, np.float64))
  want = np.sum(dy_dw * dv_ds) / np.sqrt(w64.size * 7)  # g = 1/sqrt(N Q_P), N = 32*16.
  # float32 sums over 512 weights and 16 tokens.
  assert float(grad["weight_step"]) == pytest.approx(want, rel=1e-4)


def test_provider_reports_unmatched_paths_and_unused_rules():
  rules = (QuantRule(pattern=r"decoder/layers/mlp/.*", weight=W8, act=A8),
           QuantRule(pattern=r"decoder/layers/attn/q_proj", weight=W8, act=A8),
           QuantRule(pattern=r"nothing/here", weight=W8))
  provider = QuantProvider(rules=rules, mode="fake")
  jax.eval_shape(Transformer(CFG, provider).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  assert provider.unused_rules() == [2]
  assert provider.unmatched_paths() == ["decoder/layers/attn/k_proj", "decoder/layers/attn/o_proj",
                                        "decoder/layers/attn/v_proj", "lm_head"]
  report = provider.report()
  assert "lm_head: high precision (no rule)" in report and "rule 2 ('nothing/here')" in report
  # The provider saw every matmul the traced registry lists, and nothing else.
  assert sorted(provider.log.paths) == sorted(trace_sites(Transformer(CFG)).paths())


@pytest.mark.parametrize("preset", [w8a8, w4a16, w4a8, w4a4, w4a4kv4, fp8],
                         ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_presets_build_and_leave_the_lm_head_unquantized(preset):
  quantizes = lambda p, path: p.dot_spec(first_match(p.rules, path, 0)).quantizes
  provider = provider_from_config(preset.get_quant(), CFG)
  assert not quantizes(provider, "lm_head")
  assert quantizes(provider, "decoder/layers/mlp/down_proj")
  with_head = provider_from_config(preset.get_quant("lm_head"), CFG)
  assert quantizes(with_head, "lm_head")


def test_fp8_tensor_switch_and_unknown_switches():
  rule = fp8.get_quant("tensor").rules.linears
  for spec in (rule.weight, rule.act):
    assert spec.granularity == "tensor" and spec.scale_pow2
  assert fp8.get_quant().rules.linears.act.granularity == "token"
  with pytest.raises(ValueError, match=r"w8a8\.py: unknown switch 'tensor'"):
    w8a8.get_quant("tensor")
