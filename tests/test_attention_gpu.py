"""cuDNN flash attention vs the XLA reference path (GPU only; skipped on CPU).

Run on a GPU machine: ``python -m pytest tests/test_attention_gpu.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.layers.attention import cudnn_attention, xla_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _inputs(B=2, T=256, N=8, K=2, H=64, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
  k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
  return q, k, v


def _packed_segments(B, T):
  seg = np.zeros((B, T), np.int32)
  seg[0, :100], seg[0, 100:180], seg[0, 180:250] = 1, 2, 3  # 6 padding tokens.
  seg[1, :] = 1
  return jnp.asarray(seg)


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_matches_xla_forward_and_grad(packed):
  q, k, v = _inputs()
  seg = _packed_segments(q.shape[0], q.shape[1]) if packed else None
  valid = (seg > 0)[..., None, None] if packed else jnp.ones(q.shape[:2] + (1, 1), bool)

  def loss(fn, q, k, v):
    out = fn(q, k, v, seg).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, out, 0.0) ** 2), out

  (l_ref, o_ref), g_ref = jax.value_and_grad(
      lambda *a: loss(xla_attention, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (l_cud, o_cud), g_cud = jax.value_and_grad(
      lambda *a: loss(cudnn_attention, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  # bf16 inputs, float32 softmax in both: differences are bf16 rounding of the
  # probabilities and outputs (relative 2^-8), so compare at a few bf16 ulps.
  o_ref, o_cud = np.where(valid, o_ref, 0), np.where(valid, o_cud, 0)
  np.testing.assert_allclose(o_cud, o_ref, atol=3e-2, rtol=3e-2)
  for a, b in zip(g_cud, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=6e-2, rtol=6e-2)


# ------------------------ context parallel: the cuDNN block kernel (issue 14) --


def _block_masks(T=256):
  """name -> (pos_q, seg_q, pos_k, seg_k) of one (queries, keys) block, B = 2."""
  from qtrain.parallel.zigzag import zigzag_order
  ar = np.broadcast_to(np.arange(2 * T, dtype=np.int32), (2, 2 * T))
  ones = np.ones((2, 2 * T), np.int32)
  zz = ar[:, zigzag_order(2 * T, 2)]  # Device 0 holds chunks 0 and 3, device 1 chunks 1 and 2.
  seg = np.ones((2, T), np.int32)
  seg[0, 100:], seg[0, 180:] = 2, 3
  pos = np.stack([np.concatenate([np.arange(100), np.arange(80), np.arange(T - 180)]),
                  np.arange(T)]).astype(np.int32)
  return {
      "full": (ar[:, T:], ones[:, T:], ar[:, :T], ones[:, :T]),  # Later queries: all visible.
      "causal": (zz[:, :T], ones[:, :T], zz[:, :T], ones[:, :T]),  # Zig-zag diagonal block.
      "packed": (pos, seg, pos, seg),
      # No key of document 3: its queries see nothing.
      "empty_rows": (pos, seg, pos, np.where(seg == 3, 2, seg)),
  }


@pytest.mark.parametrize("name", ["full", "causal", "packed", "empty_rows"])
def test_cudnn_block_matches_xla_block(name):
  """cuDNN's block kernel against ``xla_block`` / ``xla_block_bwd`` on the
  same bf16 inputs: out, lse (natural log of the scaled logits: checked
  also by merging two key halves), and dq/dk/dv given a final lse and O.
  Tolerances: out 2e-2 absolute (bf16 probabilities and output, 2^-8
  relative, |v| <= ~4); lse 2e-3 (float32 in both, logits of the same bf16
  inputs); gradients 2e-2 in relative L2 norm (cuDNN returns them in bf16)."""
  from qtrain.parallel import blockwise as bw
  pos_q, seg_q, pos_k, seg_k = (jnp.asarray(x) for x in _block_masks()[name])
  mask = bw.visible(pos_q, seg_q, pos_k, seg_k)
  assert int(bw.mask_kind(mask)) == {"full": bw.ALL_VISIBLE, "causal": bw.CAUSAL}.get(name,
                                                                                   bw.OTHER)
  q, k, v = _inputs(T=256)
  scale = 64 ** -0.5
  (o_x, l_x), (o_c, l_c) = (jax.jit(f, static_argnums=4)(q, k, v, mask, scale)
                            for f in (bw.xla_block, bw.cudnn_block))
  empty = ~np.asarray(jnp.any(mask, -1))
  assert (name == "empty_rows") == bool(empty.any())
  np.testing.assert_array_equal(np.asarray(l_c)[empty], np.float32(bw._EMPTY))
  np.testing.assert_array_equal(np.asarray(o_c)[empty], 0.0)
  np.testing.assert_allclose(o_c, o_x, atol=2e-2, rtol=0)
  np.testing.assert_allclose(l_c, l_x, atol=2e-3, rtol=0)
  # Two key halves merged by their lse: only right if lse is the natural log
  # of the *scaled* logits.
  half = mask.shape[2] // 2
  halves = [jax.jit(bw.cudnn_block, static_argnums=4)(q, k[:, s], v[:, s], mask[:, :, s], scale)
            for s in (slice(0, half), slice(half, None))]
  o_m, l_m = bw.merge(*halves[0], *halves[1])
  np.testing.assert_allclose(o_m, o_x, atol=2e-2, rtol=0)
  np.testing.assert_allclose(l_m, l_x, atol=2e-3, rtol=0)

  out = o_x.astype(jnp.bfloat16)  # The final output, as the ring keeps it.
  do = jax.random.normal(jax.random.key(7), q.shape, jnp.bfloat16)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1)
  want, got = (jax.jit(f, static_argnums=8)(q, k, v, mask, l_x, delta, out, do, scale)
               for f in (bw.xla_block_bwd, bw.cudnn_block_bwd))
  for n, a, b in zip("qkv", got, want):
    assert a.dtype == jnp.float32
    err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert err <= 2e-2, f"d{n}: relative L2 error {err:.3g}"


@pytest.mark.parametrize("packed", [False, True])
def test_context_parallel_cudnn_kernel_matches_xla(packed):
  """``context_parallel_attention`` (one device: mode none, its own VJP)
  with kernel cudnn against kernel xla: values 2e-2 absolute, gradients
  2e-2 in relative L2 norm (bf16 as above)."""
  from qtrain.parallel.context_parallel import context_parallel_attention
  q, k, v = _inputs(T=512)
  seg = _packed_segments(2, 512) if packed else None
  pos = jnp.asarray(_positions(np.asarray(seg))) if packed else None
  w = jax.random.normal(jax.random.key(3), q.shape, jnp.bfloat16)

  def run(kernel, q, k, v, w):
    f = lambda q, k, v: context_parallel_attention(q, k, v, pos, seg, mode="none", kernel=kernel)
    out, back = jax.vjp(f, q, k, v)
    return out, back(w)

  _assert_kernels_agree(run, q, k, v, w)


def _positions(seg_BT):
  """Positions restarting at each segment's first token, int32."""
  B, T = seg_BT.shape
  starts = np.concatenate([np.ones((B, 1), bool), seg_BT[:, 1:] != seg_BT[:, :-1]], 1)
  idx = np.broadcast_to(np.arange(T), (B, T))
  return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)


def _assert_kernels_agree(run, q, k, v, w):
  """``run(kernel, q, k, v, w)`` -> (out, (dq, dk, dv)) with kernel cudnn
  against xla: out within 2e-2 (bf16 outputs of values ~1), each gradient
  within 2e-2 relative L2 (bf16 per-block gradients summed in float32)."""
  (o_x, g_x), (o_c, g_c) = (jax.jit(run, static_argnums=0)(kernel, q, k, v, w)
                            for kernel in ("xla", "cudnn"))
  np.testing.assert_allclose(np.asarray(o_c, np.float32), np.asarray(o_x, np.float32),
                             atol=2e-2, rtol=0)
  for name, a, b in zip("qkv", g_c, g_x):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert err <= 2e-2, f"d{name}: relative L2 error {err:.3g}"


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["ring", "all_gather"])
def test_context_parallel_cudnn_kernel_on_a_sequence_mesh(mode):
  """Ring / all-gather over ``sequence`` = every GPU, zig-zag order, packed
  rows: kernel cudnn against kernel xla (the same blocks merged by lse and
  the same custom VJP; bf16 tolerances as above). This is where the
  cuDNN primitives run inside shard_map and blocks take all three masks."""
  from qtrain.layers.config import ModelConfig
  from qtrain.parallel import Layout
  from qtrain.parallel.context_parallel import context_parallel_attention
  from qtrain.parallel.zigzag import zigzag_order
  n, T = jax.device_count(), 1024
  q, k, v = _inputs(T=T)
  seg_np = np.asarray(_packed_segments(2, T))
  pos_np = _positions(seg_np)
  order = zigzag_order(T, n)
  q, k, v = (x[:, order] for x in (q, k, v))
  pos, seg = jnp.asarray(pos_np[:, order], jnp.int32), jnp.asarray(seg_np[:, order])
  w = jax.random.normal(jax.random.key(3), q.shape, jnp.bfloat16)
  model = ModelConfig(vocab_size=64, d_model=512, n_layers=1, n_heads=8, n_kv_heads=2,
                      head_dim=64, d_ff=64)

  def run(kernel, q, k, v, w):
    f = lambda q, k, v: context_parallel_attention(q, k, v, pos, seg, mode=mode, kernel=kernel)
    out, back = jax.vjp(f, q, k, v)
    return out, back(w)

  with Layout.of(dict(sequence=n), model, jax.devices()):
    _assert_kernels_agree(run, q, k, v, w)
