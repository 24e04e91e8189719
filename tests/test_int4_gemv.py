"""The decode-sized W4A16 kernel (qtrain/kernels/int4_gemv.py) in Pallas
interpret mode, against float64 NumPy.

Exactness: with x small integers, codes in [-8, 7] and power-of-two scales,
every product and every partial sum is an integer multiple of 2^-4 below
2^18, so float32 holds each exactly whatever the summation order: the
float32 output must equal float64 bit for bit, and the bf16 output must be
float64's value rounded once to bf16. Random values then check the same
code against float64 with the tolerance of its bf16 output.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qtrain.kernels import int4 as k4
from qtrain.kernels import int4_gemv as g


def _dequant64(packed, scales, group):
  return (np.asarray(k4.unpack_int4(packed), np.float64)
          * np.repeat(np.asarray(scales, np.float64), group, axis=0))


def _run(x, packed, scales, group, cfg, out_dtype):
  m, k = x.shape
  shape = g.out_shape(m, scales.shape[1], k, group, cfg)
  poison = jnp.full(shape, jnp.nan, out_dtype if len(shape) == 2 else jnp.float32)
  y = g.int4_gemv(x, packed, scales, group=group, out_dtype=out_dtype, config=cfg,
                  interpret=True, out=poison)
  y = np.asarray(y, np.float64)
  assert not np.isnan(y).any(), "an output element was never written (poison survived)"
  return y


# (M, K, N, group, config): M = 1 (decode), 5 (rows masked), 16 (no row mask);
# N = 40 and 72 do not divide the column tile (columns masked); each config
# flips one of swap / unpack / split-K.
CASES = [
    (1, 128, 72, 32, g.GemvConfig(bn=32, split_k=1)),
    (5, 128, 40, 16, g.GemvConfig(bn=16, split_k=2, swap=True)),
    (16, 192, 72, 32, g.GemvConfig(bn=32, split_k=3, unpack="shift")),
    (16, 128, 64, 32, g.GemvConfig(bn=64, split_k=1, swap=True)),
]


@pytest.mark.parametrize("m,k,n,group,cfg", CASES)
def test_exact_against_float64(m, k, n, group, cfg):
  rng = np.random.default_rng(m * 1000 + n)
  x = jnp.asarray(rng.integers(-4, 5, (m, k)), jnp.bfloat16)
  q = jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8)  # -8 too: the whole nibble range.
  scales = jnp.asarray(2.0 ** rng.integers(-4, 5, (k // group, n)), jnp.float32)
  packed = k4.pack_int4(q)
  ref = np.asarray(x, np.float64) @ _dequant64(packed, scales, group)
  assert np.abs(ref).max() < 2 ** 18 and np.all(ref * 16 == np.round(ref * 16))  # Exact in f32.
  y32 = _run(x, packed, scales, group, cfg, jnp.float32)
  np.testing.assert_array_equal(y32, ref)
  if cfg.split_k == 1:  # The bf16 store inside the kernel (split-K casts in XLA).
    y16 = _run(x, packed, scales, group, cfg, jnp.bfloat16)
    np.testing.assert_array_equal(y16, ref.astype(ml_dtypes.bfloat16).astype(np.float64))


@pytest.mark.parametrize("swap", [False, True])
def test_tiled_layout_exact_and_equal_to_the_halves_layout(swap):
  """The tiled codes ([N/bn, K/2, bn], tile_codes) give float64's exact
  value (integer data as above) and the halves layout's output bit for bit,
  split-K (3 splits of 2 group pairs) and M = 5 (rows masked); tile_codes /
  untile_codes round-trip. Seen to fail with the tile index map's column
  tile reversed."""
  m, k, n, group = 5, 384, 96, 32
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.integers(-4, 5, (m, k)), jnp.bfloat16)
  q = jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8)
  scales = jnp.asarray(2.0 ** rng.integers(-4, 5, (k // group, n)), jnp.float32)
  packed = k4.pack_int4(q)
  tiled = g.tile_codes(packed, 32)
  assert tiled.shape == (3, k // 2, 32)
  np.testing.assert_array_equal(g.untile_codes(tiled), packed)
  cfg = g.GemvConfig(bn=32, split_k=3, swap=swap)
  y = _run(x, tiled, scales, group, cfg, jnp.float32)
  np.testing.assert_array_equal(y, np.asarray(x, np.float64) @ _dequant64(packed, scales, group))
  np.testing.assert_array_equal(y, _run(x, packed, scales, group, cfg, jnp.float32))


def test_random_values_against_float64_and_the_xla_path():
  """Normal x and the project's group quantizer: within one bf16 ulp
  (2^-8 relative) of int4_matmul_xla per element (same bf16 products,
  float32 sums reordered, one rounding each), and relative Frobenius error
  < 4e-3 against float64 (the bf16 output's rounding, ~2^-9 rms)."""
  m, k, n, group = 5, 256, 40, 32
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  packed, scales = jax.jit(k4.quantize_int4, static_argnums=1)(
      jnp.asarray(rng.standard_normal((k, n)), jnp.float32), group)
  y = _run(x, packed, scales, group, g.GemvConfig(bn=32, split_k=2), jnp.bfloat16)
  y_xla = np.asarray(jax.jit(functools.partial(k4.int4_matmul_xla, group=group))(x, packed, scales),
                     np.float64)
  np.testing.assert_array_less(np.abs(y - y_xla), 2.0 ** -8 * np.abs(y_xla) + 1e-30)
  ref = np.asarray(x, np.float64) @ _dequant64(packed, scales, group)
  assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 4e-3


@pytest.mark.parametrize("unpack", g.UNPACKS)
def test_unpack_every_byte(unpack):
  """Both unpackings give unpack_int4's codes for all 256 bytes, exactly."""
  p = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
  lo, hi = jax.jit(functools.partial(g.unpack_bf16, unpack=unpack))(p)
  assert lo.dtype == hi.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.concatenate([lo, hi]).astype(np.int8), k4.unpack_int4(p))


def test_split_rule():
  """Programs per SM first, under the partials' byte cap K / (128 M)."""
  assert g.split_for(1, 4096, 112, 16) == 8  # 8b gate_up, bn 128: 112 x 8 = 896 >= 528 programs.
  assert g.split_for(16, 4096, 112, 16) == 2  # M = 16: the partials cap it at 2.
  assert g.split_for(16, 14336, 32, 56) == 7  # 8b down: 7 <= 14336 / 2048, a divisor of 56.
  assert g.split_for(1, 2048, 16, 8) == 8  # 1b attn: never enough, every group pair its own program.
  assert g.split_for(1, 4096, 600, 16) == 1
  assert g.split_for(1, 6144, 10, 12, split_k=5) == 4  # A divisor of the group pairs, at most 5.
  assert g.split_for(1, 4096, 224, 16, per_sm=2) == 2  # bn 64: 448 >= 264 programs.


def test_one_kernel_and_no_glue_at_decode_shapes():
  """M = 16 and a tile dividing N: the traced call is the Pallas call alone
  (no pad, slice or cast in XLA); with split-K, one reduction besides."""
  s = jax.ShapeDtypeStruct
  args = (s((16, 512), jnp.bfloat16), s((256, 256), jnp.int8), s((4, 256), jnp.float32))
  prims = lambda cfg: [e.primitive.name for e in jax.make_jaxpr(functools.partial(
      g.int4_gemv, group=128, config=cfg))(*args).eqns]
  assert prims(g.GemvConfig(bn=128, split_k=1)) == ["pallas_call"]
  assert prims(g.GemvConfig(bn=128, split_k=2)) == ["pallas_call", "reduce_sum", "convert_element_type"]


def test_lowers_to_triton_for_cuda():
  """Each variant at the 8b gate_up shape (M = 1) lowers on this CPU machine
  to one XLA:GPU Triton call (Pallas -> Triton IR; PTX is made on the GPU)."""
  s = jax.ShapeDtypeStruct
  k, n = 4096, 14336
  for cfg in (g.DEFAULT, g.GemvConfig(bn=256, swap=True), g.GemvConfig(unpack="shift", split_k=1)):
    fn = functools.partial(g.int4_gemv, group=128, config=cfg)
    text = jax.jit(fn).trace(s((1, k), jnp.bfloat16), s((k // 2, n), jnp.int8),
                             s((k // 128, n), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1, cfg


def test_errors_name_the_fix():
  x, p, s = jnp.ones((17, 128), jnp.bfloat16), jnp.ones((64, 32), jnp.int8), jnp.ones((4, 32))
  with pytest.raises(ValueError, match="M <= 16"):
    g.int4_gemv(x, p, s, group=32)
  with pytest.raises(ValueError, match="2 \\* group"):
    g.int4_gemv(x[:1, :96], p[:48], s[:3], group=32)
  with pytest.raises(ValueError, match="GemvConfig.bn"):
    g.int4_gemv(x[:1], p, s, group=32, config=g.GemvConfig(bn=48))
  with pytest.raises(ValueError, match="tile width 16"):
    g.int4_gemv(x[:1], g.tile_codes(p, 16), s, group=32, config=g.GemvConfig(bn=32))
  with pytest.raises(ValueError, match="multiple of the tile width"):
    g.tile_codes(p, 64)


def test_decode_benchmark_configs_lower_for_cuda():
  """Every config ``matmul.py --decode`` times parses and lowers to one
  Triton call at a multi-step shape (8b down, M = 16: split 7, 8 group
  pairs per program) and a one-step one (1b attn_out, M = 1), so a GPU
  run does not spend its time on a config that cannot build."""
  from benchmarks import matmul_decode as bench  # pylint: disable=g-import-not-at-top
  s = jax.ShapeDtypeStruct
  for spec in bench.GEMV_CONFIGS:
    for m, k, n in ((16, 14336, 4096), (1, 2048, 2048)):
      cfg = bench.gemv_config(spec)
      codes = (s((n // cfg.bn, k // 2, cfg.bn), jnp.int8) if spec.startswith(bench.TILED)
               else s((k // 2, n), jnp.int8))
      fn = functools.partial(g.int4_gemv, group=128, config=cfg)
      text = jax.jit(fn).trace(s((m, k), jnp.bfloat16), codes,
                               s((k // 128, n), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("xla.gpu.triton") == 1, (spec, m)
  with pytest.raises(ValueError, match="--gemv_configs"):
    bench.gemv_config("128,0,4,3,0,fast")


def test_gemv_on_a_packed_weight():
  """The kernel on what ``packed.dot`` would hand it (per-channel
  scales as groups of ``kernel_group(K)`` rows, x flattened to [M, K]),
  against float64 x (q s): each element within one bf16 rounding of the
  exact value plus float32 summation error (2^-20 of the sum of |terms|).
  The XLA path of ``packed.dot`` rounds q s to bf16 first (the dense
  layer's cast), so it is checked against the same float64 value with that
  rounding added (2^-8 of the sum of |terms|): the kernel is the closer."""
  from qtrain.kernels import packed as kp  # pylint: disable=g-import-not-at-top
  k, n = 256, 48
  rng = np.random.default_rng(9)
  q = jnp.asarray(rng.integers(-7, 8, (k, n)), jnp.int8)
  w = kp.pack(q, jnp.asarray(rng.uniform(0.01, 0.02, (1, n)), jnp.float32), jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.bfloat16)  # M = 6 tokens.
  x64, w64 = np.asarray(x, np.float64).reshape(-1, k), np.asarray(q, np.float64) * np.asarray(w.scales)
  ref, terms = x64 @ w64, np.abs(x64) @ np.abs(w64)
  g_ = kp.kernel_group(k, 1)
  scales = jnp.broadcast_to(w.scales, (k // g_, n))
  y = g.int4_gemv(x.reshape(-1, k), w.codes, scales, group=g_, out_dtype=jnp.bfloat16,
                 interpret=True)
  err = np.abs(np.asarray(y, np.float64) - ref)
  np.testing.assert_array_less(err, 2.0 ** -8 * np.abs(ref) + 2.0 ** -20 * terms)
  y_xla = np.asarray(kp.dot(x, w, (((2,), (0,)), ((), ())), kernels="xla"), np.float64).reshape(-1, n)
  err_xla = np.abs(y_xla - ref)
  np.testing.assert_array_less(err_xla, 2.0 ** -8 * (np.abs(ref) + terms))
  assert np.linalg.norm(err) < np.linalg.norm(err_xla)
