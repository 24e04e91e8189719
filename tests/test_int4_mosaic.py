"""The Mosaic GPU W4A16 decode kernel (qtrain/kernels/int4_mosaic.py) in Pallas'
Mosaic GPU interpret mode on CPU, against float64 and the XLA W4A16 path; its
GPU form (register wgmma operand, transposed x) lowered for CUDA on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.kernels import int4 as k4
from qtrain.kernels import int4_mosaic as km

K, N = 1024, 256  # 8 groups of 128; 2 CTAs of 128 columns (1 warpgroup: 4 of 64).


def _case(m, seed=0, pow2_scales=True):
  rng = np.random.default_rng(seed)
  q = rng.integers(-8, 8, (N, K)).astype(np.int8)
  x = rng.integers(-4, 5, (m, K)).astype(np.float32)
  if pow2_scales:  # Every product and partial sum exact in float32 (< 2^24 ulps).
    scales = (2.0 ** rng.integers(-1, 2, (K // 128, N))).astype(np.float32)
  else:
    scales = rng.uniform(1e-3, 1e-2, (K // 128, N)).astype(np.float32)
  ref = np.zeros((m, N))
  for g in range(K // 128):
    ks = slice(g * 128, (g + 1) * 128)
    ref += (x[:, ks].astype(np.float64) @ q[:, ks].T.astype(np.float64)) * scales[g]
  return jnp.asarray(x, jnp.bfloat16), q, jnp.asarray(scales), ref


@pytest.mark.parametrize("m, cfg", [
    (5, km.MosaicGemvConfig(split_k=2)),  # Rows >= M padded; 2 groups a step, one wide tile.
    (16, km.MosaicGemvConfig(groups_per_step=4, split_k=1, compute_wgs=1)),
    (1, km.MosaicGemvConfig(groups_per_step=1, wide_w=False, split_k=8)),  # One group a CTA.
])
def test_exact_against_float64(m, cfg):
  x, q, scales, ref = _case(m)
  y = km.int4_mosaic(x, jnp.asarray(q).astype(jnp.int4), scales, out_dtype=jnp.float32,
                     config=cfg, interpret=True)
  assert y.shape == (m, N) and y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), ref)


def test_from_halves_equals_the_xla_w4a16_path():
  """The exports' halves-layout codes converted at load; real scales. Both
  sum the same exact bf16 products in float32 per group, then scale: only
  the summation order differs (rtol 1e-5 on float32 output)."""
  x, q, scales, _ = _case(16, seed=1, pow2_scales=False)
  packed = k4.pack_int4(jnp.asarray(q.T))
  w4 = km.from_halves(packed)
  np.testing.assert_array_equal(np.asarray(w4.astype(jnp.int8)), q)
  y = km.int4_mosaic(x, w4, scales, out_dtype=jnp.float32, interpret=True)
  ref = k4.int4_matmul_xla(x, packed, scales, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_split_rule_fills_one_wave():
  # llama_8b on an H100: gate_up's 112 column tiles run unsplit; down's and
  # attn_out's 32 split 4 ways (the sweep's best); never past one wave.
  assert km.split_for(112, 16) == 1
  assert km.split_for(32, 56) == 4 and km.split_for(32, 16) == 4
  assert km.split_for(16, 22) == 2  # Divisors of 22: 11 would be 176 CTAs.
  assert km.split_for(200, 16) == 1 and km.split_for(32, 16, split_k=3) == 2


def test_gpu_form_lowers_to_one_mosaic_gpu_kernel():
  """The GPU path (the unpacked tile as wgmma's register operand, x read
  through a transposed view) lowered for CUDA on CPU: Mosaic GPU's layout
  inference and operand rules run; compiling to SASS is the GPU run's."""
  s = jax.ShapeDtypeStruct
  for m, cfg in [(16, km.MosaicGemvConfig()), (1, km.MosaicGemvConfig(groups_per_step=4)),
                 (16, km.MosaicGemvConfig(wide_w=False, compute_wgs=1))]:
    fn = jax.jit(lambda x, w, sc, cfg=cfg: km.int4_mosaic(x, w, sc, config=cfg))
    text = fn.trace(s((m, 4096), jnp.bfloat16), s((1024, 4096), jnp.int4),
                    s((32, 1024), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1, cfg


@pytest.mark.parametrize("args, match", [
    (dict(m=17), "M <= 16 rows"),
    (dict(n=192), "N=192 a multiple of 128"),
    (dict(dtype=jnp.int8), "codes must be int4"),
    (dict(cfg=km.MosaicGemvConfig(groups_per_step=3)), "groups_per_step=3 must divide"),
    (dict(cfg=km.MosaicGemvConfig(compute_wgs=3)), "compute_wgs=3: 1 or 2"),
    (dict(cfg=km.MosaicGemvConfig(stages=0)), "stages=0"),
])
def test_bad_calls_fail_naming_the_rule(args, match):
  m, n = args.get("m", 4), args.get("n", 256)
  x = jnp.zeros((m, K), jnp.bfloat16)
  w = jnp.zeros((n, K), args.get("dtype", jnp.int4))
  with pytest.raises(ValueError, match=match):
    km.int4_mosaic(x, w, jnp.ones((K // 128, n), jnp.float32), config=args.get("cfg"),
                   interpret=True)
