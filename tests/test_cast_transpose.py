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
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

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


def _collectives(hlo: str) -> list[str]:
  return re.findall(r"all-gather|all-to-all|collective-permute|all-reduce(?!-)", hlo)


@pytest.mark.parametrize("spec,amax", [(P("a", "b"), False), (P("a", "b"), True),
                                       (P("b", None), True), (P(None, ("a", "b")), True)])
def test_sharded_kernel_casts_each_block_where_it_lies(spec, amax):
  """On a 2 x 4 mesh of CPU devices the custom-partitioned call equals the
  reference bit for bit, keeps x's sharding on q and the transposed one on
  q^T, and moves no data (no collective in the compiled program); with
  ``amax`` it also returns max |x| exactly (each device's kernel reduces its
  block's tile grid), replicated, for one scalar all-reduce. Blocks:
  [128, 128] under P('a', 'b'), [64, 512] under P('b', None), [256, 64]
  under P(None, ('a', 'b')): each tiles, so each device runs the kernel.
  The largest |x| sits in one block only (seen to fail without the pmax)."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  x = np.random.default_rng(5).normal(size=(256, 512)) * 30
  x[200, 300] = -1000.0  # In one device's block under each spec.
  x = jnp.asarray(x, jnp.bfloat16)
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  f = jax.jit(lambda x, s: ct.cast_transpose_sharded(x, s, dtype=jnp.float8_e4m3fn,
                                                     interpret=True, amax=amax))
  q, q_t, *m = f(xs, jnp.float32(0.25))
  r, r_t = ct.cast_transpose_xla(x, 4.0, jnp.float8_e4m3fn)
  np.testing.assert_array_equal(_bits(q), _bits(r))
  np.testing.assert_array_equal(_bits(q_t), _bits(r_t))
  rows, cols = (tuple(spec) + (None,))[:2]
  assert q.sharding.is_equivalent_to(NamedSharding(mesh, P(rows, cols)), 2)
  assert q_t.sharding.is_equivalent_to(NamedSharding(mesh, P(cols, rows)), 2)
  hlo = f.lower(xs, jnp.float32(0.25)).compile().as_text()
  if amax:
    assert float(m[0]) == 1000.0 and m[0].dtype == jnp.float32
    assert m[0].sharding.is_fully_replicated
    assert _collectives(hlo) == ["all-reduce"], _collectives(hlo)
  else:
    assert not _collectives(hlo)


def test_sharded_blocks_that_do_not_tile_take_xla_there():
  """[256, 512] over 8 devices by rows: [32, 512] blocks, under the 64-row
  tile, so each device runs the XLA reference on its block (same bits) and
  reduces its block's absmax beside it."""
  mesh = jax.make_mesh((8,), ("a",), axis_types=(AxisType.Auto,))
  x = jnp.asarray(np.random.default_rng(6).normal(size=(256, 512)) * 30, jnp.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P("a", None)))
  q, q_t, m = jax.jit(lambda x: ct.cast_transpose_sharded(
      x, jnp.float32(2.0), dtype=jnp.float8_e5m2, interpret=True, amax=True))(xs)
  r, r_t = ct.cast_transpose_xla(x, 0.5, jnp.float8_e5m2)
  np.testing.assert_array_equal(_bits(q), _bits(r))
  np.testing.assert_array_equal(_bits(q_t), _bits(r_t))
  assert float(m) == float(jnp.max(jnp.abs(x)))


def test_dispatch_reads_the_mesh():
  """One device: the plain kernel; a sharded mesh: the partitioned call;
  inside a shard_map (a pipeline stage: manual over some axes): XLA."""
  assert dispatch.mesh_kind() == "single"
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  x = jnp.ones((128, 256), jnp.bfloat16)
  both = lambda x: dispatch.fp8_both_layouts(x, jnp.float32(1.0), jnp.float8_e4m3fn, pow2=True,
                                             kernels="interpret")
  assert "call @cast_transpose" in jax.jit(both).lower(x).as_text()
  seen = []

  def body(x):
    seen.append(dispatch.mesh_kind())
    return both(x)[0]

  with jax.set_mesh(mesh):
    assert dispatch.mesh_kind() == "sharded"
    assert "CustomSPMDPartitioning" in jax.jit(both).lower(x).as_text()
    with_amax = lambda x: dispatch.fp8_both_layouts(x, jnp.float32(1.0), jnp.float8_e4m3fn,
                                                    pow2=True, kernels="interpret", amax=True)
    text = jax.jit(with_amax).lower(x).as_text()  # The absmax: the partitioned call's 3rd output.
    assert "CustomSPMDPartitioning" in text and "stablehlo.reduce" not in text
    stage = jax.jit(jax.shard_map(body, in_specs=P("a"), out_specs=P("a"), axis_names={"a"}))
    text = stage.lower(x).as_text()
  assert seen == ["manual"]
  assert "cast_transpose" not in text and "CustomSPMDPartitioning" not in text


def test_fp8_tensorwise_step_on_a_mesh_through_the_kernel_equals_xla():
  """The smoke model's loss and gradients under fp8+tensor on data x fsdp x
  tensor = 2 x 2 x 2, the codes cast by the per-shard kernel (interpret
  mode), equal the same mesh's XLA path bit for bit; config validation lets
  fp8 (not int8) use kernels on several devices."""
  from parallel_util import Run, batch, smoke_config  # pylint: disable=g-import-not-at-top
  from qtrain.config.validate import ConfigError, validate  # pylint: disable=g-import-not-at-top
  mesh = dict(data=2, fsdp=2, tensor=2)
  out = {}
  state = Run(smoke_config()).init_state()
  for kernels in ("xla", "interpret"):
    cfg = smoke_config("fp8+tensor", **mesh)
    cfg.quant.kernels = kernels
    loss, grads, hlo = Run(cfg).loss_and_grads(state.params, batch())
    out[kernels] = (loss, grads)
    if kernels == "interpret":
      assert "cast_transpose" in hlo
  assert out["xla"][0] == out["interpret"][0]
  for a, b in zip(jax.tree.leaves(out["xla"][1]), jax.tree.leaves(out["interpret"][1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg = smoke_config("w8a8", **mesh)
  cfg.quant.kernels = "auto"
  with pytest.raises(ConfigError, match="int8 kernels take whole operands"):
    validate(cfg, n_devices=8)


def test_the_kernel_needs_a_gpu_with_float8():
  """Triton casts to float8 from compute capability 8.9 (Ada, Hopper) on;
  an A100 (8.0) takes XLA, as does a device that reports none (CPU)."""
  dev = lambda cc: type("Device", (), {"compute_capability": cc})()
  assert dispatch.has_fp8(dev("9.0")) and dispatch.has_fp8(dev("8.9"))
  assert dispatch.has_fp8(dev("10.0")) and dispatch.has_fp8(dev("12.1"))
  assert not dispatch.has_fp8(dev("8.0")) and not dispatch.has_fp8(dev("8.6"))
  assert not dispatch.has_fp8(dev(None)) and not dispatch.has_fp8(jax.devices()[0])
