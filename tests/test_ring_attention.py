"""Context-parallel attention equals single-device attention, on 8 fake CPU devices.

Ring (``ppermute`` of K/V chunks, merged by log-sum-exp) and all-gather-KV
attention over the ``sequence`` axis, against a float64 NumPy reference
(values) and single-device autodiff of ``xla_attention`` (gradients wrt q, k,
v): causal, packed rows with several documents whose positions restart, GQA
(4 query heads on 2 kv heads, also with the kv heads fewer than ``tensor``),
in contiguous and zig-zag token order. The compiled ring program exchanges
K/V with collective-permutes and gathers nothing; the all-gather one gathers.

The cuDNN block kernel runs only on GPU (``tests/test_attention_gpu.py``);
here, its dispatch: which mask kind ring blocks are (all visible, causal,
other), its traced program (fused calls only, no float32 logits), and the
unsplit fallback's VJP through the block backward's interface.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.layers.attention import dot_product_attention, xla_attention
from qtrain.layers.config import ModelConfig
from qtrain.parallel import Layout
from qtrain.parallel import blockwise as bw
from qtrain.parallel.zigzag import zigzag_order

B, T, N, K, H = 2, 32, 4, 2, 16
U = 2.0 ** -24  # float32 unit roundoff.
# An output is a convex combination of at most T value rows; float32 exp,
# sums and the LSE merges each round to u relative, so the error stays below
# T * u * max|v| (~1e-5 here). Measured: <= 6e-7 for values, <= 1.2e-6 for
# gradients (their reference is float32 autodiff, also rounded).
TOL = T * U
MODEL = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=N, n_kv_heads=K,
                    head_dim=H, d_ff=64)
LAYOUTS = {
    "seq4_data2": dict(data=2, sequence=4),
    # tensor=4 over 4 query heads and 2 kv heads: k/v replicated over tensor,
    # each shard's kv head picked inside the shard_map.
    "seq2_tensor4": dict(sequence=2, tensor=4),
    "seq8": dict(sequence=8),  # 16 chunks of 2 tokens; the ring's scan runs 6 steps.
}


def packed_inputs(seed=0):
  """q, k, v, positions, segment ids: row 0 packs 3 documents (10, 10, 12
  tokens, positions restarting at 0), row 1 is one document."""
  r = np.random.default_rng(seed)
  q = r.normal(size=(B, T, N, H)).astype(np.float32)
  k = r.normal(size=(B, T, K, H)).astype(np.float32)
  v = r.normal(size=(B, T, K, H)).astype(np.float32)
  seg = np.ones((B, T), np.int32)
  seg[0, 10:], seg[0, 20:] = 2, 3
  pos = np.stack([np.concatenate([np.arange(10), np.arange(10), np.arange(12)]),
                  np.arange(T)]).astype(np.int32)
  return q, k, v, pos, seg


def reference(q, k, v, seg):
  """Float64 NumPy: token t sees s iff s <= t (index order) in its segment."""
  q, k, v = (x.astype(np.float64) for x in (q, k, v))
  k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  mask = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  logits = np.where(mask[:, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def vjp_fn(attention):
  """(out, (dq, dk, dv)) of ``attention`` for the cotangent ``w``."""

  def fn(q, k, v, w):
    out, back = jax.vjp(attention, q, k, v)
    return out, back(w)

  return jax.jit(fn)


@functools.cache
def reference_grads(seed=0):
  q, k, v, _, seg = packed_inputs(seed)
  w = np.random.default_rng(seed + 1).normal(size=q.shape).astype(np.float32)
  _, grads = vjp_fn(lambda q, k, v: xla_attention(q, k, v, jnp.asarray(seg)))(q, k, v, w)
  return w, [np.asarray(g) for g in grads]


def run_sharded(mode, layout, order):
  """(out, grads, compiled text) on ``layout``; inputs permuted by ``order``
  along the sequence, results permuted back."""
  q, k, v, pos, seg = packed_inputs()
  w, _ = reference_grads()
  perm = lambda x: x[:, order]
  inv = np.argsort(order)
  attention = lambda q, k, v: dot_product_attention(
      q, k, v, jnp.asarray(perm(seg)), positions_BT=jnp.asarray(perm(pos)), impl="xla",
      context_parallel=mode)
  with Layout.of(LAYOUTS[layout], MODEL, jax.devices()[:8]):
    fn = vjp_fn(attention)
    args = [perm(x) for x in (q, k, v, w)]
    compiled = fn.lower(*args).compile()
    out, grads = compiled(*args)
  return (np.asarray(out)[:, inv], [np.asarray(g)[:, inv] for g in grads], compiled.as_text())


CASES = [("ring", "seq4_data2", "zigzag"), ("all_gather", "seq4_data2", "zigzag"),
         ("ring", "seq2_tensor4", "contiguous"), ("all_gather", "seq2_tensor4", "contiguous"),
         ("ring", "seq8", "zigzag")]


@pytest.fixture(scope="module")
def results():
  cache = {}

  def get(mode, layout, order_name):
    key = (mode, layout, order_name)
    if key not in cache:
      n = LAYOUTS[layout]["sequence"]
      order = zigzag_order(T, n) if order_name == "zigzag" else np.arange(T)
      cache[key] = run_sharded(mode, layout, order)
    return cache[key]

  return get


@pytest.mark.parametrize("mode,layout,order", CASES)
def test_values_and_grads_equal_single_device(results, mode, layout, order):
  out, grads, _ = results(mode, layout, order)
  q, k, v, _, seg = packed_inputs()
  want = reference(q, k, v, seg)
  err = np.abs(out - want).max()
  assert err <= TOL * np.abs(v).max(), f"values: max |diff| {err:.3g}"
  _, ref_grads = reference_grads()
  for name, g, r in zip("qkv", grads, ref_grads):
    err = np.abs(g - r).max()
    assert err <= TOL * np.abs(r).max(), f"d{name}: max |diff| {err:.3g} of {np.abs(r).max():.3g}"


def _collectives(text):
  ops = ("collective-permute", "all-gather", "all-reduce", "all-to-all")
  return {op: text.count(f" {op}(") + text.count(f" {op}-start(") for op in ops}


@pytest.mark.parametrize("layout", ["seq4_data2", "seq2_tensor4"])
def test_ring_permutes_and_all_gather_gathers(results, layout):
  """Forward and backward: the ring moves K/V only by collective-permutes
  (dK/dV travel back the same way); the all-gather variant gathers K/V and
  reduce-scatters their gradients, and permutes nothing."""
  order = "zigzag" if layout == "seq4_data2" else "contiguous"
  ring = _collectives(results("ring", layout, order)[2])
  assert ring["collective-permute"] > 0 and ring["all-gather"] == 0, ring
  gathered = _collectives(results("all_gather", layout, order)[2])
  assert gathered["all-gather"] > 0 and gathered["collective-permute"] == 0, gathered


def test_block_merge_against_one_block():
  """Two halves of the keys merged by LSE equal one block over all keys, for
  rows where one half is empty too (the merge's guard against inf - inf)."""
  q, k, v, pos, seg = (jnp.asarray(x) for x in packed_inputs())
  half = T // 2

  @jax.jit  # One compile, not one per op (eager: 14 s on CPU).
  def blocks(q, k, v, pos, seg):
    mask = bw.visible(pos, seg, pos, seg)
    a = bw.xla_block(q, k[:, :half], v[:, :half], mask[..., :half], H ** -0.5)
    b = bw.xla_block(q, k[:, half:], v[:, half:], mask[..., half:], H ** -0.5)
    return bw.xla_block(q, k, v, mask, H ** -0.5), b, bw.merge(*a, *b)

  (whole, whole_lse), b, (out, lse) = blocks(q, k, v, pos, seg)
  assert np.all(np.asarray(b[1])[:, :half] == bw._EMPTY)  # Early rows see nothing in b.
  np.testing.assert_allclose(out, whole, atol=TOL * float(jnp.abs(v).max()), rtol=0)
  np.testing.assert_allclose(lse, whole_lse, atol=TOL * float(jnp.abs(whole_lse).max()), rtol=0)


def test_unknown_mode_names_the_field():
  q, k, v, *_ = packed_inputs()
  with pytest.raises(ValueError, match="config.model.context_parallel='ringg'"):
    dot_product_attention(q, k, v, context_parallel="ringg")


@pytest.mark.parametrize("mode", ["ring", "all_gather"])
def test_backward_keeps_only_local_chunks(mode):
  """What the VJP keeps for the backward is the local q, K/V, output, lse,
  positions and segment ids (global shapes here, split over the mesh): no
  received or gathered K/V chunk and no [T, S] probabilities (autodiff
  through the ring kept every chunk that passed by and each switch branch's
  intermediates: 17x these bytes on this layout)."""
  q, k, v, pos, seg = packed_inputs()
  attention = lambda q, k, v: dot_product_attention(
      q, k, v, jnp.asarray(seg), positions_BT=jnp.asarray(pos), context_parallel=mode)
  with Layout.of(LAYOUTS["seq4_data2"], MODEL, jax.devices()[:8]):
    kept = jax.eval_shape(lambda q, k, v: jax.vjp(attention, q, k, v)[1], q, k, v)
  kept_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(kept))
  lse_bytes = B * T * N * 4
  assert kept_bytes == 2 * q.nbytes + k.nbytes + v.nbytes + lse_bytes + pos.nbytes + seg.nbytes


# ------------------------------------------------- the cuDNN block kernel --


def _kernel_blocks(pos, seg, n):
  """(i, j, plan, mask the block kernel gets) for device i's queries against
  device j's chunk, with ``chunk_attention``'s cut of the block."""
  S = pos.shape[1] // n
  blocks = []
  for i in range(n):
    for j in range(n):
      sl_q, sl_k = slice(i * S, (i + 1) * S), slice(j * S, (j + 1) * S)
      m = np.asarray(bw.visible(pos[:, sl_q], seg[:, sl_q], pos[:, sl_k], seg[:, sl_k]))
      p = int(bw.plan(jnp.asarray(m)))
      sub = {0: None, 1: m[:, S // 2:], 2: m[:, :, :S // 2], 3: m}[p]
      blocks.append((i, j, p, sub))
  return blocks


@pytest.mark.parametrize("order_name", ["zigzag", "contiguous"])
def test_mask_kind_of_unpacked_ring_blocks(order_name):
  """Unpacked rows: every block the kernel sees is all-visible, except the
  diagonal one, which is causal by index (cuDNN's two unbiased masks)."""
  n = 4
  order = zigzag_order(T, n) if order_name == "zigzag" else np.arange(T)
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))[:, order]
  seg = np.ones((B, T), np.int32)
  for i, j, p, m in _kernel_blocks(pos, seg, n):
    if m is None:
      assert order_name == "contiguous" and j > i  # Later keys: nothing visible.
      continue
    want = bw.CAUSAL if i == j else bw.ALL_VISIBLE
    # Independent check of the expectation on the mask itself.
    assert (np.array_equal(m, np.broadcast_to(np.tril(np.ones(m.shape[1:], bool)), m.shape))
            if i == j else m.all())
    assert int(bw.mask_kind(jnp.asarray(m))) == want, (i, j, p)
    if order_name == "zigzag":
      assert p == (3 if i == j else 1 if j > i else 2)  # Half a block off the diagonal.


def test_mask_kind_of_packed_and_odd_masks():
  """Packed rows: a block crossing a document boundary is OTHER (the biased
  call); so is a lower-triangular mask that is not square, and a causal
  square one with one entry flipped."""
  q, k, v, pos, seg = packed_inputs()
  blocks = _kernel_blocks(pos, seg, 2)
  kinds = {(i, j): int(bw.mask_kind(jnp.asarray(m))) for i, j, _, m in blocks if m is not None}
  assert kinds[(0, 0)] == kinds[(1, 1)] == bw.OTHER  # Documents end at 10 and 20.
  tril = np.tril(np.ones((8, 8), bool))[None]
  assert int(bw.mask_kind(jnp.asarray(tril))) == bw.CAUSAL
  assert int(bw.mask_kind(jnp.ones((2, 8, 4), bool))) == bw.ALL_VISIBLE
  assert int(bw.mask_kind(jnp.asarray(np.tril(np.ones((8, 4), bool))[None]))) == bw.OTHER
  flipped = tril.copy()
  flipped[0, 5, 2] = False
  assert int(bw.mask_kind(jnp.asarray(flipped))) == bw.OTHER


def test_unsplit_custom_vjp_equals_autodiff():
  """Mode ``none`` (the unsplit fallback) runs the block kernels' backward
  (chunk_attention_bwd with the final lse, D and O) in its own VJP: equal to
  autodiff of ``xla_attention`` (same float32 bound as the sharded modes)."""
  from qtrain.parallel.context_parallel import context_parallel_attention
  q, k, v, pos, seg = packed_inputs()
  w, ref_grads = reference_grads()
  attention = lambda q, k, v: context_parallel_attention(
      q, k, v, jnp.asarray(pos), jnp.asarray(seg), mode="none")
  out, grads = vjp_fn(attention)(q, k, v, w)
  want = reference(q, k, v, seg)
  assert np.abs(np.asarray(out) - want).max() <= TOL * np.abs(v).max()
  for name, g, r in zip("qkv", grads, ref_grads):
    err = np.abs(np.asarray(g) - r).max()
    assert err <= TOL * np.abs(r).max(), f"d{name}: max |diff| {err:.3g} of {np.abs(r).max():.3g}"


_CUDNN_PRIMS = ("dot_product_attention_fwd", "dot_product_attention_bwd")


@pytest.mark.parametrize("kernel", ["cudnn", "xla"])
def test_cudnn_kernel_has_no_float32_logits(kernel):
  """Traced on CPU (no cuDNN needed): forward and backward of a ring step
  with the ``cudnn`` kernel are fused calls only. Each mask-kind switch has
  three branches of exactly one cuDNN call each, and no float32 array as
  large as [B, T, S] exists anywhere (``lax.cond`` reserves the largest
  branch's memory). The ``xla`` kernel, run through the same check, must
  fail it: that is what the check is for."""
  from qtrain.analysis import jaxprs
  Tb, Nb, Hb = 128, 4, 16  # N * H < S: a float32 output row is smaller than a logits row.
  r = np.random.default_rng(0)
  q = jnp.asarray(r.normal(size=(B, Tb, Nb, Hb)), jnp.bfloat16)
  kv = jnp.asarray(r.normal(size=(B, Tb, 2, Hb)), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(Tb, dtype=jnp.int32), (B, Tb))
  seg = jnp.ones((B, Tb), jnp.int32)

  def step(q, k, v):
    out, lse = bw.chunk_attention(q, pos, seg, k, v, pos, seg, scale=0.25, kernel=kernel)
    delta = jnp.sum(out * out, -1)
    return bw.chunk_attention_bwd(q, pos, seg, k, v, pos, seg, lse_BTN=lse, delta_BTN=delta,
                                  out_BTNH=out, do_BTNH=out, scale=0.25, kernel=kernel)

  jaxpr = jax.make_jaxpr(step)(q, kv, kv)
  big_f32 = [v.aval.shape for e, _ in jaxprs.eqns(jaxpr) for v in e.outvars
             if v.aval.dtype == jnp.float32 and v.aval.size >= B * Tb * Tb]
  switches = [[jaxprs.count(b, p) for b in e.params["branches"] for p in _CUDNN_PRIMS]
              for e, _ in jaxprs.eqns(jaxpr) if e.primitive.name == "cond"
              and len(e.params["branches"]) == 3]
  if kernel == "xla":
    assert big_f32 and not switches
    return
  assert not big_f32, big_f32
  # Forward and backward: the late-queries, early-keys and whole-block cuts.
  assert sorted(switches) == sorted([[1, 0] * 3] * 3 + [[0, 1] * 3] * 3), switches


def test_cudnn_kernel_rejects_what_cudnn_cannot_run():
  """Before any compilation: float32 inputs, and odd block lengths (cuDNN's
  biased backward needs even ones; a chunk of 6 is cut into halves of 3)."""
  q, k, v, pos, seg = (jnp.asarray(x) for x in packed_inputs())
  with pytest.raises(ValueError, match=r"config\.model\.dtype"):
    bw.chunk_attention(q, pos, seg, k, v, pos, seg, scale=0.25, kernel="cudnn")
  q, k, v = (x[:, :6].astype(jnp.bfloat16) for x in (q, k, v))
  with pytest.raises(ValueError, match=r"config\.data\.seq_len"):
    bw.chunk_attention(q, pos[:, :6], seg[:, :6], k, v, pos[:, :6], seg[:, :6], scale=0.25,
                       kernel="cudnn")
