"""The fp8 cast+transpose kernel (qtrain/kernels/cast_transpose.py) against
its XLA reference and the quantizer, and the per-tensor fp8 matmul through it.

The kernel runs in Pallas interpret mode (Triton flavour) on CPU; interpret
mode fills an output it was not told to write with NaN, which no reference
code here is (the values are clipped to the format's range), so bit equality
also says every element of both outputs was written. All comparisons are
bit for bit: the kernel and the references compute the same float32 product
by a power of two and the same cast.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.kernels import cast_transpose as ct
from qtrain.kernels import dispatch
from qtrain.quant import dot_general as dg
from qtrain.quant import quantizer
from qtrain.quant.spec import QuantSpec

FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
_bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))


@pytest.mark.parametrize("fmt", sorted(FP8))
@pytest.mark.parametrize("src", [jnp.bfloat16, jnp.float32])
def test_kernel_equals_the_reference_and_the_quantizer(fmt, src):
  """Both layouts bit-equal to ``cast_transpose_xla`` and to the quantizer's
  codes (``quantize(cast_rounds=True)``, per-tensor power-of-two scale) on a
  [128, 192] matrix (2 x 3 tiles), values past the format's range
  included (scaled so the absmax lands beyond it and clips)."""
  dt = FP8[fmt]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_t(3, size=(128, 192)) * 30, src)
  spec = QuantSpec(format=fmt, bits=8, granularity="tensor", scale_pow2=True)
  qt = quantizer.quantize(x, spec, cast_rounds=True)
  scale = qt.scale / 4  # Codes up to 4x the range: the clip matters.
  q, q_t = ct.cast_transpose(x, 1.0 / scale.reshape(()), dtype=dt, interpret=True)
  r, r_t = ct.cast_transpose_xla(x, scale, dt)
  assert q.dtype == dt and q_t.shape == (192, 128)
  np.testing.assert_array_equal(_bits(q), _bits(r))
  np.testing.assert_array_equal(_bits(q_t), _bits(r_t))
  np.testing.assert_array_equal(_bits(r_t), _bits(r).T)
  assert np.abs(np.asarray(q, np.float32)).max() == float(jnp.finfo(dt).max)
  # At the quantizer's own scale the codes are the quantizer's.
  q, _ = ct.cast_transpose(x, 1.0 / qt.scale.reshape(()), dtype=dt, interpret=True)
  np.testing.assert_array_equal(_bits(q), _bits(qt.q))


def test_dispatch_falls_back_by_its_rules():
  """XLA where the dims do not tile by 64 or the scale is not a power of two
  (the reference then divides, as the quantizer does); the kernel under
  'interpret' otherwise. Same bits in every case."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(96, 128)), jnp.float32)
  s = jnp.float32(0.013)  # Not a power of two: x / s, not x * (1 / s).
  q, q_t = dispatch.fp8_both_layouts(x, s, jnp.float8_e4m3fn, pow2=False, kernels="interpret")
  want = quantizer.codes(x, s, None, QuantSpec(format="fp8_e4m3", granularity="tensor"),
                         cast_rounds=True)
  np.testing.assert_array_equal(_bits(q), _bits(want))
  np.testing.assert_array_equal(_bits(q_t), _bits(want).T)
  assert not ct.supports(96, 128) and ct.supports(128, 192)
  with pytest.raises(ValueError, match="tiles 64 x 64"):
    ct.cast_transpose(x, s, dtype=jnp.float8_e4m3fn, interpret=True)


def _program(kernels):
  e4 = QuantSpec(format="fp8_e4m3", granularity="tensor", scale_pow2=True)
  spec = dg.DotSpec(weight=e4, act=e4, mode="fp8", kernels=kernels)
  dims = (((2,), (0,)), ((), ()))
  return lambda x, w, ct_: jnp.sum(
      dg.quant_dot(spec, None, None, x, w, dims).astype(jnp.float32) * ct_)


@pytest.mark.parametrize("tokens", [(2, 64), (3, 20)])
def test_fp8_tensorwise_matmul_through_the_kernel_equals_xla(tokens):
  """Loss, dX and dW of the per-tensor fp8 matmul with X's, W's and dY's
  codes cast by the kernel (interpret mode, 'interpret') equal the XLA
  path's bit for bit; 3 x 20 tokens (M = 60) do not tile, so X and dY fall
  back and only W [128, 192] takes the kernel: 3 calls, or 1."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(*tokens, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(128, 192)) * 0.1, jnp.float32)
  ct_ = jnp.asarray(rng.normal(size=(*tokens, 192)), jnp.float32)
  out = {}
  for kernels in ("xla", "interpret"):
    f = jax.jit(jax.value_and_grad(_program(kernels), argnums=(0, 1)))
    out[kernels] = f(x, w, ct_)
    calls = len(re.findall(r"call @cast_transpose", f.lower(x, w, ct_).as_text()))
    tiles = tokens[0] * tokens[1] % 64 == 0
    assert calls == (0 if kernels == "xla" else 3 if tiles else 1), (kernels, calls)
  (l0, g0), (l1, g1) = out["xla"], out["interpret"]
  assert float(l0) == float(l1)
  for a, b in zip(g0, g1):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
