"""The w8a8 training matmul's memory passes (issue 16): what the kernel path
writes around its int8 dots, counted in compiled HLO, and its numerics.

Every change here is a layout or dtype choice with the same arithmetic, so
the reference is the XLA int8 path (``kernels='xla'``, the step's numerics
since phase 1) and the comparison is bit for bit. The kernel runs in Pallas
interpret mode (Triton flavour) for numerics; for structure it is replaced
by an opaque stand-in (``benchmarks.quant_passes``), as the Mosaic GPU
custom call is opaque to XLA.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import quant_passes
from qtrain.kernels import dispatch
from qtrain.kernels import int8 as k8
from qtrain.quant import dot_general as dg
from qtrain.quant.spec import QuantSpec

_DIMS = (((2,), (0,)), ((), ()))  # x [B, T, K] . w [K, N]


def _spec(kernels, estimator="ste", sr=False):
  int8 = lambda g: QuantSpec(bits=8, format="int", granularity=g, calibration="absmax",
                             estimator=estimator)
  return dg.DotSpec(weight=int8("channel"), act=int8("token"), mode="int8",
                    grad_stochastic_rounding=sr, kernels=kernels)


def _value_and_grads(spec, x, w, ct, rng):
  f = lambda x, w: jnp.sum((dg.quant_dot(spec, None, None, x, w, _DIMS, rng=rng)
                            .astype(jnp.float32) * ct))
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("estimator,sr,w_dtype", [("ste", False, jnp.float32),
                                                   ("clipped_ste", False, jnp.float32),
                                                   ("ste", True, jnp.float32),
                                                   ("ste", False, jnp.bfloat16)])
def test_kernel_path_equals_the_xla_int8_path_bit_for_bit(estimator, sr, w_dtype):
  """Loss, dX and dW of the kernel path (interpret mode; dX / dW written in
  the operands' dtype by the epilogue) equal the
  XLA int8 path's exactly: the same integer sums, scales and one rounding.
  Odd shapes (48 tokens, K = 40, N = 80) pad every tile."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 24, 40)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(40, 80)) * 0.1, w_dtype)
  ct = jnp.asarray(rng.normal(size=(2, 24, 80)), jnp.float32)
  key = jax.random.key(1) if sr else None
  (l_x, (dx_x, dw_x)) = _value_and_grads(_spec("xla", estimator, sr), x, w, ct, key)
  (l_k, (dx_k, dw_k)) = _value_and_grads(_spec("interpret", estimator, sr), x, w, ct, key)
  assert dx_k.dtype == x.dtype and dw_k.dtype == w.dtype
  assert float(l_x) == float(l_k)
  np.testing.assert_array_equal(np.asarray(dx_x, np.float32), np.asarray(dx_k, np.float32))
  np.testing.assert_array_equal(np.asarray(dw_x, np.float32), np.asarray(dw_k, np.float32))
  assert np.abs(np.asarray(dw_k, np.float32)).max() > 0  # Not all zero.


@pytest.mark.parametrize("estimator", ["ste", "clipped_ste"])
def test_backward_dots_ask_for_their_output_dtype(monkeypatch, estimator):
  """What the kernel path asks the dispatcher for: dX in bf16 (float32 only
  where a clipped-STE mask follows), dW in w's dtype, the forward codes read
  in place (x_transposed for dW, w_transposed for dX)."""
  calls = []

  def recorded(x, w, s_x=None, s_w=None, *, out_dtype, kernels, **kw):
    calls.append((x.shape, w.shape, jnp.dtype(out_dtype), kw))
    return k8.int8_matmul_xla(x, w, s_x, s_w, out_dtype=out_dtype, **kw)

  monkeypatch.setattr(dispatch, "int8_dot", recorded)
  x = jnp.ones((2, 24, 40), jnp.bfloat16)
  w = jnp.full((40, 80), 0.5, jnp.float32)
  # Traced, not run: the dispatcher is called while the gradient is traced.
  jax.eval_shape(jax.grad(lambda x, w: jnp.sum(dg.quant_dot(_spec("auto", estimator), None, None,
                                                            x, w, _DIMS).astype(jnp.float32)),
                          argnums=(0, 1)), x, w)
  fwd, dx, dw = calls
  assert fwd[2] == jnp.bfloat16 and fwd[:2] == ((48, 40), (40, 80))
  assert dx[:2] == ((48, 80), (40, 80)) and dx[3]["w_transposed"]
  assert dx[2] == (jnp.bfloat16 if estimator == "ste" else jnp.float32)
  assert dw[:2] == ((48, 40), (48, 80)) and dw[3] == dict(x_transposed=True, w_transposed=False)
  assert dw[2] == jnp.float32


def test_pass_counter_on_a_known_program():
  """The counter on a program whose passes are known: two elementwise
  results and a row sum of an [M, K] array are three passes reading it (CPU
  has no multi-output fusion), two of them writing [M, K]; the sum's [M]
  result and any partial sums are not [M, K]-sized, so not counted."""
  m, k = 96, 40
  f = jax.jit(lambda a: (a * 2, a + 1, jnp.sum(a, axis=1)))
  hlo = f.lower(jax.ShapeDtypeStruct((m, k), jnp.float32)).compile().as_text()
  ps = quant_passes.passes(hlo, {"MK": (m, k)})
  mk = ("MK", "f32", m * k * 4)
  assert sorted(tuple(p.writes) for p in ps) == [(), (mk,), (mk,)], [str(p) for p in ps]
  assert all(p.reads == [mk] for p in ps), [str(p) for p in ps]


def test_kernel_path_passes_around_one_matmul():
  """Compiled on CPU with the kernel as an opaque call: the forward program
  runs one kernel, the backward two (remat's forward dot is dead there); dX
  leaves the kernel in bf16 (no float32 [M, K] write and cast pass); no pass
  copies or transposes int8 codes on their own (they are written in the
  layout the kernel reads by the pass that quantizes)."""
  m, k, n = 384, 128, 256  # Whole Mosaic tiles, as llama's dims are (no padding passes).
  c = quant_passes.count(m, k, n, "auto", stub=True)
  calls = {part: [p for p in ps if p.op == "custom-call"] for part, ps in c.items()}
  assert len(calls["fwd"]) == 1 and len(calls["bwd"]) == 2, quant_passes.summary(c)
  assert [cls[:2] for p in calls["bwd"] for cls in p.writes] == [("MK", "bf16"), ("KN", "f32")]
  for p in c["fwd"] + c["bwd"]:
    codes_only = p.reads and all(d == "s8" for _, d, _ in p.reads)
    assert not (codes_only and p.op != "custom-call"), str(p)
    assert not ([r[:2] for r in p.reads] == [("MK", "f32")]
                and [w[:2] for w in p.writes] == [("MK", "bf16")]), str(p)


def test_saved_output_name_keeps_remat_from_rerunning_forward_kernels():
  """Under dots_no_batch a Pallas kernel's output is not a dot, so remat ran
  6 of a block's 7 forward int8 kernels again in the backward (27 kernels a
  block, not 21 = 7 forward + 14 backward). qtrain's ``dots_no_batch`` also
  saves ``dg.SAVED_OUT``: it runs 21, and its backward writes the fewest int8
  codes; JAX's plain policy (registered for the call) shows the 27.
  Values do not depend on what remat keeps: two
  checkpointed int8 matmuls give the same loss and grads bit for bit under
  both policies (XLA path)."""
  from qtrain.layers import decoder

  cp = jax.checkpoint_policies
  policy = decoder.REMAT_POLICIES["dots_no_batch"]
  saved = {"jax_dots_no_batch": cp.dots_with_no_batch_dims_saveable}
  # The codes recomputed (the default; the test below keeps them).
  hlos = {name: quant_passes.step_hlo("auto", name, stub=True, extra_policies=saved)
          for name in ("jax_dots_no_batch", "dots_no_batch")}
  kernels = {name: len(quant_passes._KERNEL_CALL.findall(h)) for name, h in hlos.items()}  # pylint: disable=protected-access
  assert kernels == {"jax_dots_no_batch": 27, "dots_no_batch": 21}, kernels
  # The backward body then quantizes each block input once for dW and dY
  # twice per matmul: 4 + 2 * 7 code passes, the fewest (was 21).
  backward = max(quant_passes.step_code_passes(hlos["dots_no_batch"]), key=lambda c: c[1])
  assert backward[1:] == (14, 18), backward
  assert "jax_dots_no_batch" not in decoder.REMAT_POLICIES  # Registered for the call only.

  spec = _spec("xla")
  mm = lambda x, w: dg.quant_dot(spec, None, None, x, w, _DIMS)
  block = lambda x, w1, w2: mm(jax.nn.silu(mm(x, w1)), w2)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.bfloat16)
  w1, w2 = (jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32) for s in ((32, 48), (48, 32)))
  out = []
  for p in (cp.dots_with_no_batch_dims_saveable, policy):
    f = lambda *a, p=p: jnp.sum(jax.checkpoint(block, policy=p)(*a).astype(jnp.float32) ** 2)
    out.append(jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w1, w2))
  assert float(out[0][0]) == float(out[1][0])
  jax.tree.map(np.testing.assert_array_equal, out[0][1], out[1][1])


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_saved_codes_spare_the_backward_a_second_quantization(mode):
  """``config.model.save_quant_codes`` (off by default) keeps each low-precision
  matmul's operand codes and scales (``dg.QUANT_CODES``) under the dots
  policies. Two checkpointed matmuls: the forward quantizes X1, W1, X2, W2
  (4 absmax reductions) and the backward dY once per matmul (fp8 per tensor)
  or twice (int8: per row for dX, per column for dW). Without the codes the
  backward quantizes X and W again (4 more); with them it reads the saved
  codes (int8 / uint8-viewed float8 residuals named QUANT_CODES), and loss and grads are
  the same bit for bit. Counted in the lowered program (after JAX's dead-code
  elimination, before XLA's CSE could merge the recomputation away on CPU)."""
  from qtrain.layers import ModelConfig, decoder

  if mode == "int8":
    spec, code_dtype, dy_maxes = _spec("xla"), "int8", 4
  else:
    e4 = QuantSpec(format="fp8_e4m3", granularity="tensor", scale_pow2=True)
    # Saved as uint8 bit patterns: JAX's reduce_precision on a kept float8_e4m3fn
    # residual made codes above 240 inf (dg._residual); then the loss was NaN.
    spec, code_dtype, dy_maxes = dg.DotSpec(weight=e4, act=e4, mode="fp8"), "uint8", 2
  mm = lambda x, w: dg.quant_dot(spec, None, None, x, w, _DIMS)
  block = lambda x, w1, w2: mm(jax.nn.silu(mm(x, w1)), w2)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.bfloat16)
  w1, w2 = (jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32) for s in ((32, 48), (48, 32)))
  out, maxes = [], []
  for save in (False, True):
    cfg = ModelConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      head_dim=16, d_ff=48, remat_policy="dots_no_batch", save_quant_codes=save)
    policy = decoder.remat_policy(cfg)
    f = lambda *a, p=policy: jnp.sum(jax.checkpoint(block, policy=p)(*a).astype(jnp.float32) ** 2)
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    lowered = g.lower(x, w1, w2).as_text()
    maxes.append(len(re.findall(r"stablehlo\.reduce\(.*applies stablehlo\.maximum", lowered)))
    saved = jax._src.ad_checkpoint.saved_residuals(f, x, w1, w2)  # pylint: disable=protected-access
    codes = sorted(str(aval.dtype) for aval, why in saved if dg.QUANT_CODES in why)
    # Q and s of X1, W1, X2, W2 with the codes; nothing so named without.
    assert codes == (sorted([code_dtype] * 4 + ["float32"] * 4) if save else []), saved
    out.append(g(x, w1, w2))
  assert maxes == [4 + 4 + dy_maxes, 4 + dy_maxes], maxes
  assert float(out[0][0]) == float(out[1][0])
  jax.tree.map(np.testing.assert_array_equal, out[0][1], out[1][1])
