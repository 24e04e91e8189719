"""Pallas kernels (qtrain/kernels) against their XLA paths and float64 NumPy.

The GPU flavour runs in Pallas' interpret mode and the TPU flavour in TPU
interpret mode (``pltpu.InterpretParams``), both on CPU. Interpret mode fills
outputs it was not told to write with NaN (int32: its min) and the ``out``
buffers we alias are NaN-filled, so "no NaN and equal to the reference" also
says every element was written. Blocks are small (16/32) so the odd shapes
span several tiles and need padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from qtrain.kernels import int8 as k8

SMALL_GPU = k8.Blocks(16, 32, 32, 4, 2, group_m=2)  # Runs of 2 tile rows, a short last run.
SMALL_TPU = k8.Blocks(32, 128, 128, 0, 0)  # TPU's smallest legal int8 tiles.
BLOCKS = {"gpu": SMALL_GPU, "tpu": SMALL_TPU}


def _codes(rng, shape):
  return jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)


def _scales(rng, n):
  return jnp.asarray(rng.uniform(1e-3, 1.0, n), jnp.float32)


SPLIT_GPU = k8.Blocks(16, 32, 32, 4, 2, split_k=3)


_SHAPES = [(17, 40, 100, False, False), (100, 48, 160, True, False), (33, 130, 64, False, True)]


@pytest.mark.parametrize("backend,m,n,k,xt,wt",
                         [("gpu", *c) for c in _SHAPES] + [("tpu", *c) for c in _SHAPES]
                         + [("gpu_split", 17, 40, 100, False, True)])
def test_int8_accumulator_exact(backend, m, n, k, xt, wt):
  """Raw int32 sums equal float64 NumPy's bit for bit: integer arithmetic is
  exact, so any difference is a wrong index, a dropped tile or padding."""
  rng = np.random.default_rng(m * n + k)
  x, w = _codes(rng, (m, k)), _codes(rng, (k, n))
  ref = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
  blocks = SPLIT_GPU if backend == "gpu_split" else BLOCKS[backend]
  acc = k8.int8_matmul(x.T if xt else x, w.T if wt else w, out_dtype=jnp.int32,
                       backend=backend.removesuffix("_split"), blocks=blocks, x_transposed=xt,
                       w_transposed=wt, interpret=True)
  assert acc.dtype == jnp.int32 and acc.shape == (m, n)
  np.testing.assert_array_equal(np.asarray(acc, np.int64), ref)
  np.testing.assert_array_equal(acc, k8.int8_matmul_xla(x, w, out_dtype=jnp.int32))


@pytest.mark.parametrize("backend", ["gpu", "tpu", "gpu_split"])
def test_int8_scaled_epilogue(backend):
  """bf16 out: bit-equal to the XLA path (same int32 sum, same float32
  products in the same order, one rounding to bf16), and within 2^-8
  relative of float64 (bf16's half-ulp 2^-9 plus float32 epilogue error)."""
  m, n, k = 45, 70, 96
  rng = np.random.default_rng(1)
  x, w, s_x, s_w = _codes(rng, (m, k)), _codes(rng, (k, n)), _scales(rng, m), _scales(rng, n)
  if backend == "gpu_split":  # Poisoned int32 partials: an unwritten one wrecks the sum.
    b, backend = SPLIT_GPU, "gpu"
    poison = jnp.full(k8.padded_out_shape(m, n, k, backend, b), -2 ** 31, jnp.int32)
    assert poison.ndim == 3  # The split really happens (K = 96: 3 steps of 32).
  else:
    b = BLOCKS[backend]
    poison = jnp.full(k8.padded_out_shape(m, n, k, backend, b), jnp.nan, jnp.bfloat16)
  y = k8.int8_matmul(x, w, s_x, s_w, backend=backend, blocks=b, interpret=True, out=poison)
  y32 = np.asarray(y, np.float32)
  assert not np.isnan(y32).any(), "an output element was never written"
  np.testing.assert_array_equal(y32, np.asarray(k8.int8_matmul_xla(x, w, s_x, s_w), np.float32))
  ref = (np.asarray(x, np.float64) @ np.asarray(w, np.float64)) * np.asarray(s_x, np.float64)[:, None]
  ref = ref * np.asarray(s_w, np.float64)[None, :]
  np.testing.assert_array_less(np.abs(y32 - ref), 2.0 ** -8 * np.abs(ref) + 1e-30)


def test_poison_buffer_catches_an_unwritten_tile():
  """The poison check can fail: a kernel that skips one tile leaves NaN there."""
  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) != 1)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((64, 16), jnp.float32)
  spec = pl.BlockSpec((16, 16), lambda i: (i, 0))
  in_specs, args, kw = [spec], [x], {}
  body = k8.with_poison(kernel, kw, in_specs, args, jnp.full((64, 16), jnp.nan), spec)
  y = pl.pallas_call(body, grid=(4,), in_specs=in_specs, out_specs=spec,
                     out_shape=jax.ShapeDtypeStruct((64, 16), jnp.float32), interpret=True,
                     **kw)(*args)
  nan_rows = np.isnan(np.asarray(y)).any(axis=1)
  np.testing.assert_array_equal(nan_rows, np.arange(64) // 16 == 1)


def test_int8_rejects_bad_inputs():
  x = jnp.zeros((4, 8), jnp.int8)
  with pytest.raises(ValueError, match="int8 codes"):
    k8.int8_matmul(x.astype(jnp.float32), jnp.zeros((8, 4), jnp.int8))
  with pytest.raises(ValueError, match="contraction"):
    k8.int8_matmul(x, jnp.zeros((4, 4), jnp.int8), jnp.ones(4), jnp.ones(4))
  with pytest.raises(ValueError, match="raw accumulator"):
    k8.int8_matmul(x, jnp.zeros((8, 4), jnp.int8), out_dtype=jnp.int32, s_x=jnp.ones(4),
                   s_w=jnp.ones(4))


# --- int8 tile configs of the sweep and the Mosaic GPU flavour ---------------

from benchmarks import matmul as bench  # noqa: E402  pylint: disable=g-import-not-at-top
from qtrain.kernels import int8_mosaic  # noqa: E402  pylint: disable=g-import-not-at-top


def _int8_case(seed, m, n, k):
  rng = np.random.default_rng(seed)
  return _codes(rng, (m, k)), _codes(rng, (k, n)), _scales(rng, m), _scales(rng, n)


@pytest.mark.parametrize("spec", bench.SWEEP_CONFIGS)
def test_int8_sweep_configs_exact(spec):
  """Every config the GPU sweep times (``benchmarks/matmul.py --sweep``),
  in its weight layout, on an odd shape that pads every dim and takes two
  or more K steps: the raw int32 sums equal float64 NumPy's bit for bit
  (integer arithmetic is exact), and the bf16 output equals the XLA path's
  bit for bit (same sums, same float32 (acc * s_x) * s_w, one rounding).
  The warp-specialized Mosaic configs (warps 12) run two consumer
  warpgroups and a producer thread in the interpreter (~5 s a call).
  Triton configs write into a NaN-poisoned aliased buffer; Mosaic GPU's
  interpret mode NaN-fills its output itself, so a skipped tile fails the
  equality either way."""
  backend, wt, b = bench.parse_sweep_config(spec)
  m, n, k = 70, 130, 200
  x, w, s_x, s_w = _int8_case(len(spec), m, n, k)
  w_in = w.T if wt else w
  run = functools.partial(k8.int8_matmul, backend=backend, blocks=b, w_transposed=wt,
                          interpret=True)
  poison = {}
  if backend == "gpu":
    assert k8.effective_blocks(m, n, k, backend, b).k * 2 <= k8._up(k, b.k)  # >= 2 K steps.
    poison = {"out": jnp.full(k8.padded_out_shape(m, n, k, backend, b), jnp.nan, jnp.bfloat16)}
  acc = run(x, w_in, out_dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(acc, np.int64),
                                np.asarray(x, np.int64) @ np.asarray(w, np.int64))
  y = run(x, w_in, s_x, s_w, **poison)
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(k8.int8_matmul_xla(x, w, s_x, s_w), np.float32))


@pytest.mark.parametrize("xt,wt", [(True, False), (False, False)])
def test_int8_mosaic_layouts_and_small_tiles(xt, wt):
  """Mosaic GPU with x given [K, M] and w [K, N] (XLA transposes them to the
  K-major layouts s8 wgmma reads), 64 x 64 x 128 tiles over a 2 x 3 grid
  and 2 K steps: int32 sums exact against float64 NumPy."""
  m, n, k = 100, 150, 200
  x, w, _, _ = _int8_case(3, m, n, k)
  acc = k8.int8_matmul(x.T if xt else x, w.T if wt else w, out_dtype=jnp.int32,
                       backend="mosaic_gpu", blocks=k8.Blocks(64, 64, 128, 4, 2),
                       x_transposed=xt, w_transposed=wt, interpret=True)
  assert acc.shape == (m, n)
  np.testing.assert_array_equal(np.asarray(acc, np.int64),
                                np.asarray(x, np.int64) @ np.asarray(w, np.int64))


def test_mosaic_interpret_mode_poisons_unwritten_output():
  """The Mosaic GPU interpret mode's NaN fill can fail a test: a kernel that
  writes every tile but one leaves NaN exactly there."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  def body(x_gmem, o_gmem, tile_smem):
    i = jax.lax.axis_index("i")

    @pl.when(i != 1)
    def _():
      tile_smem[...] = jnp.ones((64, 64), jnp.float32)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(tile_smem, o_gmem.at[pl.ds(i * 64, 64)])
      plgpu.wait_smem_to_gmem(0)

  y = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((192, 64), jnp.float32),
                   scratch_types=[plgpu.SMEM((64, 64), jnp.float32)], grid=(3,),
                   grid_names=("i",), interpret=int8_mosaic.interpret_params())(
                       jnp.zeros((8,), jnp.float32))
  nan_rows = np.isnan(np.asarray(y)).all(axis=1)
  np.testing.assert_array_equal(nan_rows, np.arange(192) // 64 == 1)


def test_int8_mosaic_rejects_bad_configs():
  x, w = jnp.zeros((64, 128), jnp.int8), jnp.zeros((128, 64), jnp.int8)
  with pytest.raises(ValueError, match="multiple of 64"):  # n = 320 > wgmma's 256.
    k8.int8_matmul(x, jnp.zeros((128, 512), jnp.int8), out_dtype=jnp.int32,
                   backend="mosaic_gpu", blocks=k8.Blocks(64, 320, 128, 4, 2))
  with pytest.raises(ValueError, match="num_warps=8"):  # 4: one warpgroup, 12: specialized.
    k8.int8_matmul(x, w, out_dtype=jnp.int32, backend="mosaic_gpu",
                   blocks=k8.Blocks(64, 64, 128, 8, 2))
  with pytest.raises(ValueError, match="split_k"):
    k8.int8_matmul(x, w, out_dtype=jnp.int32, backend="mosaic_gpu",
                   blocks=k8.Blocks(64, 64, 128, 4, 2, split_k=2))
  with pytest.raises(ValueError, match="no out= poison"):
    k8.int8_matmul(x, w, out_dtype=jnp.int32, backend="mosaic_gpu", out=jnp.zeros((64, 64)))
  with pytest.raises(ValueError, match="--sweep_configs"):
    bench.parse_sweep_config("mosaic:mk:128,128,128,4,4")
  # The sweep records a config that fails and goes on (no compile reached here).
  q = (x, w, jnp.ones(64), jnp.ones(64))
  entry = bench.sweep_config("mosaic:nk:64,64,128,8,2", 0, [q], q[0], 1, True)
  assert "num_warps=8" in entry["error"] and "s" not in entry


def test_ptx_s8_report_counts_each_mma_kind(tmp_path):
  """The sweep's PTX check tells Hopper's s8 wgmma from the warp-level
  mma.sync, and ignores bf16 MMAs and files without int8 MMAs."""
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "a.ptx").write_text(
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {...};\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};\n"
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {...};\n" * 2)
  (tmp_path / "b.ptx").write_text("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32;\n")
  lines = bench.ptx_s8_report(str(tmp_path))
  assert lines[1:] == ["  a.ptx: wgmma s8 2, mma.sync s8 2"]


def test_sweep_configs_lower_for_cuda():
  """Each sweep config lowers on this CPU machine at a benchmark shape:
  Triton ones to XLA:GPU's Triton call, Mosaic GPU ones through Mosaic's own
  compiler to its custom call (that step checks the shared-memory budget,
  the swizzled tiling and the s8 wgmma operand layouts, which interpret
  mode does not) and emit s8 wgmma fed by TMA. Triton's PTX and the run are
  the GPU sweep's (``--dump_dir``)."""
  s = jax.ShapeDtypeStruct
  m, k, n = 1024, 2048, 1024
  for spec in bench.SWEEP_CONFIGS:
    backend, wt, b = bench.parse_sweep_config(spec)
    fn = functools.partial(k8.int8_matmul, backend=backend, blocks=b, w_transposed=wt)
    args = (s((m, k), jnp.int8), s((n, k) if wt else (k, n), jnp.int8), s((m,), jnp.float32),
            s((n,), jnp.float32))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert ("xla.gpu.triton" if backend == "gpu" else "mosaic_gpu") in text, spec
    if backend == "mosaic_gpu":
      # Mosaic's module carries its instructions as inline PTX: Hopper's s8
      # wgmma at the warpgroup's tile width (64 rows x bn, k 32 a step) and
      # TMA bulk-tensor copies, not a fallback.
      wgmma = f"wgmma.mma_async.sync.aligned.m64n{b.n}k32.s32.s8.s8"
      assert wgmma in text and "cp.async.bulk.tensor" in text, spec


# --- Walsh-Hadamard kernel --------------------------------------------------

from qtrain.kernels import fwht as kh  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.parametrize("backend,n,rows", [("gpu", 64, 37), ("gpu", 512, 20), ("gpu", 2048, 3),
                                            ("tpu", 64, 37), ("tpu", 512, 5)])
def test_hadamard_matches_dense_float64(backend, n, rows):
  """float32 in/out with random signs: within 1e-6 relative (Frobenius) of
  the dense float64 (x * s) H_n / sqrt(n). Three bf16 pieces carry float32's
  24 bits and H's +-1 are exact, so only float32 accumulation rounding is
  left (~1e-7); a two-piece split sits near 3e-6 and fails. Covers the
  dense path (n <= 128) and the Kronecker path with a = b and a != b, in
  both flavours (TPU in TPU interpret mode)."""
  rng = np.random.default_rng(n + rows)
  x = rng.standard_normal((rows, n))
  s = rng.choice([-1.0, 1.0], n)
  ref = (x * s) @ kh.sylvester(n).astype(np.float64) / np.sqrt(n)
  poison = jnp.full((kh.padded_rows(rows, n), n), jnp.nan, jnp.float32)
  y = kh.hadamard(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32), backend=backend,
                  interpret=True, out=poison)
  y = np.asarray(y, np.float64)
  assert np.isfinite(y).all(), "an output element was never written"
  assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-6


def test_hadamard_bf16_against_xla_path():
  """bf16 in/out (leading dims kept): within one bf16 ulp (2^-8 relative) of
  the XLA butterflies, which round the same float32 transform to bf16."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
  y = np.asarray(kh.hadamard(x, interpret=True), np.float32)
  ref = np.asarray(jax.jit(kh.hadamard_xla)(x), np.float32)  # jit: eager butterflies are slow.
  assert y.shape == (2, 3, 256)
  np.testing.assert_array_less(np.abs(y - ref), 2.0 ** -8 * np.abs(ref) + 1e-30)


def test_hadamard_falls_back_outside_the_kernel():
  """n = 8 (below the tile) runs the XLA path; a non-power of two says why."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)), jnp.float32)
  np.testing.assert_array_equal(kh.hadamard(x, interpret=True), jax.jit(kh.hadamard_xla)(x))
  with pytest.raises(ValueError, match="power-of-two"):
    kh.hadamard(jnp.ones((2, 24)), interpret=True)


def test_hadamard_dense_xla_path_and_the_dispatch_rule(monkeypatch):
  """n <= 128 under kernels="auto" on a GPU goes to XLA's dense matmul
  (``hadamard_dense``: 92% of copy at n = 128 on an H100 against the
  kernel's 47%), larger n to the kernel. Dense float32 (HIGHEST): within
  1e-6 of float64 like the kernel; bf16: within one bf16 ulp of the XLA
  butterflies (same float32 transform, one rounding each)."""
  rng = np.random.default_rng(11)
  x = rng.standard_normal((37, 128))
  s = rng.choice([-1.0, 1.0], 128)
  ref = (x * s) @ kh.sylvester(128).astype(np.float64) / np.sqrt(128)
  y = np.asarray(jax.jit(kh.hadamard_dense)(jnp.asarray(x, jnp.float32), jnp.asarray(s)),
                 np.float64)
  assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-6
  xb = jnp.asarray(x, jnp.bfloat16)
  yb = np.asarray(jax.jit(kh.hadamard_dense)(xb), np.float32)
  rb = np.asarray(jax.jit(kh.hadamard_xla)(xb), np.float32)
  np.testing.assert_array_less(np.abs(yb - rb), 2.0 ** -8 * np.abs(rb) + 1e-30)
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  calls = lambda n: _pallas_calls(lambda v: dispatch.hadamard(v, kernels="auto"),
                                  jnp.ones((16, n), jnp.bfloat16))
  assert calls(128) == 0 and calls(64) == 0 and calls(256) == 1


# --- W4A16: packed int4 -----------------------------------------------------

from qtrain.kernels import int4 as k4  # noqa: E402  pylint: disable=g-import-not-at-top
from qtrain.quant import quantizer  # noqa: E402  pylint: disable=g-import-not-at-top
from qtrain.quant.spec import QuantSpec  # noqa: E402  pylint: disable=g-import-not-at-top


def test_int4_pack_unpack_round_trip_every_pair():
  """All 16 x 16 (low, high) code pairs survive packing, sign included."""
  lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
  q = jnp.asarray(np.concatenate([lo.reshape(1, -1), hi.reshape(1, -1)]), jnp.int8)  # [2, 256]
  packed = k4.pack_int4(q)
  assert packed.shape == (1, 256) and packed.dtype == jnp.int8
  assert len(np.unique(np.asarray(packed))) == 256  # Every byte value used once.
  np.testing.assert_array_equal(k4.unpack_int4(packed), q)


def test_int4_quantize_is_the_projects_group_quantizer():
  """Packed codes and scales dequantize exactly to the quantizer's 4-bit
  group fake-quant of W (same grid, same scales)."""
  w = jnp.asarray(np.random.default_rng(3).standard_normal((128, 24)), jnp.float32)
  packed, scales = jax.jit(k4.quantize_int4, static_argnums=1)(w, 32)
  spec = QuantSpec(bits=4, granularity="group", group_size=32)
  ref = jax.jit(lambda w: quantizer.fake_quant(w, spec, contract_axis=0))(w)
  np.testing.assert_array_equal(k4.dequantize_int4(packed, scales, 32), ref)


@pytest.mark.parametrize("split_k", [1, 2])
def test_int4_matmul_matches_xla_and_float64(split_k):
  """M = 17, N = 40 pad to the 16 x 32 tiles; 4 groups of 32 along K = 128.
  Against the XLA path: within one bf16 ulp (2^-8) per element (same bf16
  products, float32 sums in another order, one rounding to bf16). Against
  float64 x @ dequant(W): relative Frobenius error < 4e-3 (the bf16 output's
  rounding, ~2^-9 rms; the int4 codes and bf16 x are exact inputs here)."""
  m, k, n, g = 17, 128, 40, 32
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  packed, scales = jax.jit(k4.quantize_int4, static_argnums=1)(
      jnp.asarray(rng.standard_normal((k, n)), jnp.float32), g)
  b = k8.Blocks(16, 32, 0, 4, 2, split_k=split_k)  # split_k=2: float32 partials, poisoned too.
  poison = jnp.full(k4.padded_out_shape(m, n, k, g, b), jnp.nan,
                    jnp.bfloat16 if split_k == 1 else jnp.float32)
  y = np.asarray(k4.int4_matmul(x, packed, scales, group=g, blocks=b, interpret=True, out=poison),
                 np.float32)
  assert not np.isnan(y).any(), "an output element was never written"
  y_xla = np.asarray(jax.jit(functools.partial(k4.int4_matmul_xla, group=g))(x, packed, scales),
                     np.float32)
  np.testing.assert_array_less(np.abs(y - y_xla), 2.0 ** -8 * np.abs(y_xla) + 1e-30)
  ref = np.asarray(x, np.float64) @ (np.asarray(k4.unpack_int4(packed), np.float64)
                                     * np.repeat(np.asarray(scales, np.float64), g, axis=0))
  assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 4e-3
  if split_k == 1:  # The Mosaic TPU flavour, TPU interpret mode, its smallest tiles (16 x 128).
    tb = k8.Blocks(16, 128, 0, 0, 0)
    poison = jnp.full(k4.padded_out_shape(m, n, k, g, tb, "tpu"), jnp.nan, jnp.bfloat16)
    y_tpu = np.asarray(k4.int4_matmul(x, packed, scales, group=g, blocks=tb, backend="tpu",
                                      interpret=True, out=poison), np.float32)
    np.testing.assert_array_less(np.abs(y_tpu - y_xla), 2.0 ** -8 * np.abs(y_xla) + 1e-30)
  with pytest.raises(ValueError, match="2 \\* group"):
    k4.int4_matmul(x[:, :96], packed[:48], scales[:3], group=g, interpret=True)


# --- dispatcher and the int8 training matmul --------------------------------

from qtrain.kernels import dispatch  # noqa: E402  pylint: disable=g-import-not-at-top
from qtrain.quant.dot_general import DotSpec, quant_dot  # noqa: E402  pylint: disable=g-import-not-at-top


def _pallas_calls(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def test_dispatch_rules():
  assert dispatch.flavour("xla", "int8") is None
  assert dispatch.flavour("auto", "int8") is None  # CPU: no Pallas flavour, XLA.
  assert dispatch.flavour("interpret", "int4") == ("gpu", True)
  with pytest.raises(ValueError, match="config.quant.kernels"):
    dispatch.flavour("triton", "int8")
  x, w = jnp.ones((8, 32), jnp.int8), jnp.ones((32, 32), jnp.int8)
  dot = lambda m: dispatch.int8_dot(m, w, out_dtype=jnp.int32, kernels="interpret")
  assert _pallas_calls(dot, x) == 0  # M = 8 < 16: XLA by the shape rule.
  assert _pallas_calls(dot, jnp.ones((16, 32), jnp.int8)) == 1


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_quant_dot_int8_through_kernel_equals_xla(granularity):
  """config.quant.kernels only changes where the int8 dots run: forward
  values and both gradients (int8 backward) are bit-equal between the XLA
  path and the kernel (interpret mode), which runs all three dots."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((2, 12, 32)), jnp.float32)  # M = 24 tokens.
  w = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((2, 12, 48)), jnp.float32)
  dims = (((2,), (0,)), ((), ()))

  def loss(kernels, x, w):
    spec = DotSpec(weight=QuantSpec(bits=8, granularity="channel"),
                   act=QuantSpec(bits=8, granularity=granularity), mode="int8", kernels=kernels)
    return jnp.sum(quant_dot(spec, None, None, x, w, dims) * r)

  grads = {k: jax.jit(jax.value_and_grad(functools.partial(loss, k), argnums=(0, 1)))(x, w)
           for k in ("xla", "interpret")}
  assert _pallas_calls(jax.grad(functools.partial(loss, "interpret"), argnums=(0, 1)), x, w) == 3
  (v0, (dx0, dw0)), (v1, (dx1, dw1)) = grads["xla"], grads["interpret"]
  np.testing.assert_array_equal(v1, v0)
  np.testing.assert_array_equal(dx1, dx0)
  np.testing.assert_array_equal(dw1, dw0)
  assert float(jnp.abs(dw0).max()) > 0


@pytest.mark.parametrize("nm,nn,g", [(5, 3, 2), (8, 4, 8), (3, 7, 1), (1, 5, 8)])
def test_grouped_tile_order_visits_every_tile_once(nm, nn, g):
  """The grouped program order is a permutation of the tiles, and with
  group_m = 1 it is row-major."""
  tiles = [tuple(int(v) for v in k8.grouped_tile(jnp.int32(p), nm, nn, g)) for p in range(nm * nn)]
  assert sorted(tiles) == [(i, j) for i in range(nm) for j in range(nn)]
  if g == 1:
    assert tiles == [(i, j) for i in range(nm) for j in range(nn)]


def test_gpu_flavours_lower_to_triton_for_cuda():
  """Each GPU kernel at a benchmark-sized shape lowers, on this CPU machine,
  to an XLA:GPU Triton call (JAX's Pallas -> Triton IR step: power-of-two
  loads, supported ops, block specs). Compiling that IR to PTX is left to
  the GPU run."""
  s = jax.ShapeDtypeStruct
  k, n = 4096, 1024
  cases = {
      "int8": (functools.partial(k8.int8_matmul, backend="gpu"),
               (s((256, k), jnp.int8), s((k, n), jnp.int8), s((256,), jnp.float32),
                s((n,), jnp.float32))),
      "int8 split-K, transposed": (
          functools.partial(k8.int8_matmul, backend="gpu", blocks=k8.Blocks(16, 64, 128, 4, 4, 4),
                            x_transposed=True, w_transposed=True, out_dtype=jnp.float32),
          (s((k, 16), jnp.int8), s((n, k), jnp.int8), s((16,), jnp.float32), s((n,), jnp.float32))),
      "w4a16 split-K": (functools.partial(k4.int4_matmul, group=128,
                                          blocks=k8.Blocks(16, 64, 0, 4, 4, 4)),
                        (s((16, k), jnp.bfloat16), s((k // 2, n), jnp.int8),
                         s((k // 128, n), jnp.float32))),
      "hadamard 8192": (kh.hadamard, (s((64, 8192), jnp.bfloat16), s((8192,), jnp.float32))),
      "hadamard 128": (kh.hadamard, (s((512, 128), jnp.bfloat16),)),
  }
  for name, (fn, args) in cases.items():
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text, name


def test_config_quant_kernels_routes_the_w8a8_model_through_the_dispatcher(monkeypatch):
  """config.quant.kernels reaches every int8 dot of a w8a8 model, forward and
  both backward dots (the dispatcher is recorded, then runs the kernel's XLA
  reference: the kernel itself equals it bit for bit in the tests above, and
  interpret mode over a whole model is minutes on CPU); the loss and gradients
  equal the kernels='xla' model's exactly. Wrong values fail validation
  naming the field."""
  from configs import default
  from qtrain.config import ConfigError, validate
  from qtrain.kernels import dispatch
  from qtrain.train.build import build_model

  calls = []

  def recorded(x, w, s_x=None, s_w=None, *, out_dtype, kernels="xla", **kw):
    calls.append(kernels)
    return k8.int8_matmul_xla(x, w, s_x, s_w, out_dtype=out_dtype, **kw)

  monkeypatch.setattr(dispatch, "int8_dot", recorded)

  def loss_and_grads(kernels):
    c = default.get_config("smoke,w8a8")
    c.model.update(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64)
    c.quant.kernels = kernels
    validate(c, n_devices=1)
    model = build_model(c)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 16)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # Jitted: eager is ~10 s.
    f = lambda p: jnp.mean(model.apply({"params": p}, tokens).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  l_x, g_x = loss_and_grads("xla")
  assert not calls  # The xla switch never reaches the dispatcher.
  l_k, g_k = loss_and_grads("interpret")
  # w8a8 quantizes the 7 block projections (q, k, v, o, gate, up, down): a
  # forward and two backward dots each, more with init's and remat's forwards.
  assert set(calls) == {"interpret"} and len(calls) >= 3 * 7 and len(calls) % 7 == 0, calls
  assert float(l_x) == float(l_k)
  jax.tree.map(np.testing.assert_array_equal, g_x, g_k)

  c = default.get_config("smoke,w8a8")
  c.quant.kernels = "triton"
  with pytest.raises((ConfigError, ValueError), match="config.quant.kernels"):
    validate(c, n_devices=1)
  c = default.get_config("smoke,w8a8")
  c.quant.kernels = "auto"
  with pytest.raises((ConfigError, ValueError), match="config.quant.kernels='auto' on 8"):
    validate(c, n_devices=8)
  c = default.get_config("smoke")
  c.quant.kernels = "auto"
  with pytest.raises((ConfigError, ValueError), match="needs config.quant.mode='int8'"):
    validate(c, n_devices=1)


def test_auto_on_a_gpu_routes_int8_to_the_mosaic_kernel_with_the_swept_tile(monkeypatch):
  """kernels='auto' on a GPU backend calls the Mosaic GPU flavour: the
  warp-specialized 128 x 256 x 128 tile where M >= 128 and N >= 256 (the
  sweep's fastest), the one-warpgroup default below; each choice is a tile
  that Mosaic's own rules accept for that shape (effective_blocks checks them)."""
  calls = []
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(dispatch.int8, "int8_matmul",
                      lambda x, w, s_x, s_w, **kw: calls.append(kw) or "kernel")
  for m, k, n in ((4096, 2048, 5632), (128, 256, 256), (64, 256, 512), (4096, 256, 128)):
    x, w = jnp.zeros((m, k), jnp.int8), jnp.zeros((k, n), jnp.int8)
    assert dispatch.int8_dot(x, w, jnp.ones(m), jnp.ones(n), out_dtype=jnp.bfloat16,
                             kernels="auto") == "kernel"
    kw = calls.pop()
    assert kw["backend"] == "mosaic_gpu" and not kw.get("interpret", False)
    want = dispatch.GPU_INT8_LARGE if m >= 128 and n >= 256 else None
    assert kw["blocks"] == want, (m, k, n, kw["blocks"])
    k8.effective_blocks(m, n, k, "mosaic_gpu", kw["blocks"])  # Raises on a tile Mosaic refuses.
  # Interpret mode (the CPU tests) keeps the Triton flavour.
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "cpu")
  dispatch.int8_dot(jnp.zeros((64, 64), jnp.int8), jnp.zeros((64, 64), jnp.int8), jnp.ones(64),
                    jnp.ones(64), out_dtype=jnp.bfloat16, kernels="interpret")
  assert calls.pop()["backend"] == "gpu"


def test_kernel_time_sums_the_gpu_streams_only():
  """timing.kernel_us: the GPU's stream lines, not the XLA op/module lines
  that repeat the same time per op, nor the host; NaN without a GPU."""
  from qtrain.kernels import timing  # pylint: disable=g-import-not-at-top
  meta = lambda ph_name, pid, tid, name: dict(ph="M", name=ph_name, pid=pid, tid=tid,
                                              args=dict(name=name))
  events = [meta("process_name", 1, 0, "/device:GPU:0"), meta("process_name", 2, 0, "/host:CPU"),
            meta("thread_name", 1, 7, "Stream #7(Compute)"), meta("thread_name", 1, 9, "XLA Ops"),
            dict(ph="X", pid=1, tid=7, name="gemm", dur=30.0),
            dict(ph="X", pid=1, tid=7, name="fusion", dur=12.5),
            dict(ph="X", pid=1, tid=9, name="dot.1", dur=42.5),
            dict(ph="X", pid=2, tid=1, name="dispatch", dur=100.0)]
  assert timing.kernel_us(events) == 42.5
  assert np.isnan(timing.kernel_us(events[1:2]))
