"""The per-tensor absmax kernel (qtrain/kernels/absmax.py) against
``jnp.max(jnp.abs(x))``, its dispatch rules, and the per-tensor fp8 matmul
with its scales reduced by the kernel.

The kernel runs in Pallas interpret mode (Triton flavour) on CPU. Max is
exact and order-free, so every comparison is exact. Interpret mode fills an
output the kernel did not write with NaN, and the final max over the
per-program partials would then be NaN: equality also says every program
wrote its partial. The largest magnitude is planted at the first, the last
and an interior element in turn, so a program or loop step that skipped a
tile would be caught.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.kernels import absmax as am
from qtrain.kernels import dispatch
from qtrain.quant import dot_general as dg
from qtrain.quant import quantizer
from qtrain.quant.spec import QuantSpec


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape,programs", [((64, 1024), 512), ((96, 512), 512),
                                            ((256, 384), 2), ((8 * 1024 * 5,), 1)])
def test_kernel_equals_the_reference(dtype, shape, programs, monkeypatch):
  """Bit-equal to ``absmax_xla`` for 2-D shapes whose rows are not the
  kernel's 1024 (its flat view crosses rows) and a 1-D one; with few target
  programs each program loops over several tiles (checked: steps > 1)."""
  monkeypatch.setattr(am, "TARGET_PROGRAMS", programs)
  size = int(np.prod(shape))
  if programs == 2:
    assert am.steps_per_program(size) == 4  # 12 tiles: 3 programs of 4 steps.
  rng = np.random.default_rng(size)
  base = rng.standard_t(3, size=shape)
  for where in (0, size - 1, size // 3 + 7):
    x = base.reshape(-1).copy()
    x[where] = -1e3  # The largest magnitude is negative: abs matters.
    x = jnp.asarray(x.reshape(shape), dtype)
    got = am.absmax(x, interpret=True)
    assert got.dtype == jnp.float32
    assert float(got) == float(am.absmax_xla(x)) == 1e3, (where, float(got))
  zeros = jnp.zeros(shape, dtype)
  assert float(am.absmax(zeros, interpret=True)) == 0.0


def test_steps_leave_enough_programs():
  """Tiles per program: a power of two dividing the tile count, leaving at
  least TARGET_PROGRAMS programs where there are that many tiles."""
  tile = am.ROW * am.TILE_ROWS
  assert am.steps_per_program(16384 * 5632) == 16  # 11,264 tiles: 704 programs.
  assert am.steps_per_program(16384 * 2048) == 8  # 4,096 tiles: 512 programs.
  assert am.steps_per_program(100 * tile) == 1
  for tiles in (1, 7, 512, 1024, 1536, 11264, 65536):
    s = am.steps_per_program(tiles * tile)
    assert tiles % s == 0 and (s == 1 or tiles // s >= am.TARGET_PROGRAMS), (tiles, s)
    assert s & (s - 1) == 0


def test_dispatch_rules(monkeypatch):
  """None (the caller's fused XLA reduction) under 'xla', below
  ABSMAX_MIN_SIZE, or for a size that does not tile; the kernel's value
  otherwise. A precomputed absmax gives the quantizer's own scale."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(64, 256)), jnp.float32)
  assert dispatch.tensor_absmax(x, kernels="interpret") is None  # 2^14 < 2^22.
  monkeypatch.setattr(dispatch, "ABSMAX_MIN_SIZE", 1)
  assert dispatch.tensor_absmax(x, kernels="xla") is None
  assert dispatch.tensor_absmax(x[:, :200], kernels="interpret") is None
  amax = dispatch.tensor_absmax(x, kernels="interpret")
  assert float(amax) == float(jnp.max(jnp.abs(x)))
  spec = QuantSpec(format="fp8_e4m3", bits=8, granularity="tensor", scale_pow2=True)
  np.testing.assert_array_equal(quantizer.scale_of(x, spec, absmax=amax),
                                quantizer.quantize(x, spec).scale)
  with pytest.raises(ValueError, match="per-tensor absmax"):
    quantizer.scale_of(x, QuantSpec(format="fp8_e4m3", bits=8, granularity="token"),
                       absmax=amax)
  with pytest.raises(ValueError, match="tiles"):
    am.absmax(x[:, :200], interpret=True)


def test_fp8_tensorwise_matmul_with_kernel_absmax_equals_xla(monkeypatch):
  """Loss, dX and dW of the per-tensor fp8 matmul with X's, W's and dY's
  absmax reduced by the kernel (interpret mode) equal the XLA path's bit
  for bit: 3 kernel calls (X [128, 128], W [128, 192], dY [128, 192])."""
  monkeypatch.setattr(dispatch, "ABSMAX_MIN_SIZE", 1)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 64, 128)) * 3, jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(128, 192)) * 0.1, jnp.float32)
  ct_ = jnp.asarray(rng.normal(size=(2, 64, 192)), jnp.float32)
  e4 = QuantSpec(format="fp8_e4m3", granularity="tensor", scale_pow2=True)
  dims = (((2,), (0,)), ((), ()))
  out = {}
  for kernels in ("xla", "interpret"):
    spec = dg.DotSpec(weight=e4, act=e4, mode="fp8", kernels=kernels)
    loss = lambda x, w, spec=spec: jnp.sum(
        dg.quant_dot(spec, None, None, x, w, dims).astype(jnp.float32) * ct_)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    out[kernels] = f(x, w)
    calls = len(re.findall(r"call @absmax", f.lower(x, w).as_text()))
    assert calls == (0 if kernels == "xla" else 3), (kernels, calls)
  (l0, g0), (l1, g1) = out["xla"], out["interpret"]
  assert float(l0) == float(l1)
  for a, b in zip(g0, g1):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
