"""qtrain.layers against independent float64 NumPy references and invariants.

Every tolerance is stated with its reason next to the assertion; measured
errors are quoted so a future change that moves them is noticed, not absorbed.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.layers import (REMAT_POLICIES, ModelConfig, RMSNorm, RopeScaling, Transformer,
                           apply_rope, inverse_frequencies)
from qtrain.layers.attention import segment_offsets, xla_attention

# init_std well above 0.02 so that every sublayer moves the logits by O(1).
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, d_ff=64, init_std=0.2)


@functools.lru_cache
def init_params(cfg, seed=0):
  tokens_BT = jnp.zeros((1, 16), jnp.int32)
  return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(seed), tokens_BT))["params"]


@functools.partial(jax.jit, static_argnums=0)
def logits(cfg, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
  # Jitted: op-by-op (eager) linen is ~10x slower on CPU.
  return Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)


def random_tokens(shape, seed=0):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape, dtype=np.int32)


def test_rmsnorm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32) * 3
  x[0, 0] *= 1e-3  # mean(x^2) ~ eps: a row where eps matters.
  scale = rng.normal(size=(32,)).astype(np.float32)
  got = RMSNorm(eps=1e-5).apply({"params": {"scale": scale}}, x)
  x64 = x.astype(np.float64)
  want = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-5) * scale
  # float32 statistic, rsqrt and products: a few ulps of each output, so a
  # relative bound of ~8 ulps (measured 9.5e-7 absolute on |max| 4.8, 2 ulps).
  np.testing.assert_allclose(got, want, rtol=1e-6)


def numpy_rope(x, positions, inv_freq):
  """Rotate-half RoPE as HF writes it: x * cos + rotate_half(x) * sin."""
  angles = positions[..., None].astype(np.float64) * inv_freq
  cos = np.cos(np.concatenate([angles, angles], -1))[:, :, None, :]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, :, None, :]
  x1, x2 = np.split(x.astype(np.float64), 2, axis=-1)
  return x * cos + np.concatenate([-x2, x1], -1) * sin


def test_apply_rope_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
  positions = rng.integers(0, 64, (2, 7))
  inv_freq = inverse_frequencies(16, 10000.0)
  got = apply_rope(x, positions, inv_freq)
  # Angles are float32 (as in HF): |pos * inv_freq| < 64 carries ~4e-6 rad of
  # rounding, times |x| <= 3.9 (measured 1.2e-6).
  np.testing.assert_allclose(got, numpy_rope(x, positions, inv_freq), rtol=0, atol=2e-5)


def numpy_llama3_inv_freq(head_dim, theta, factor, low, high, original):
  """Llama 3.1 ``apply_scaling`` (Meta's reference), written frequency by frequency."""
  out = []
  for i in range(0, head_dim, 2):
    freq = theta ** (-i / head_dim)
    wavelen = 2 * math.pi / freq
    if wavelen < original / high:  # High frequencies: untouched.
      out.append(freq)
    elif wavelen > original / low:  # Low frequencies: interpolated by factor.
      out.append(freq / factor)
    else:  # In between: blend of the two, linear in original / wavelen.
      smooth = (original / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


@pytest.mark.parametrize("head_dim,theta,original", [(128, 500000.0, 8192), (16, 10000.0, 64)])
def test_llama3_inverse_frequencies(head_dim, theta, original):
  scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position=original)
  want = numpy_llama3_inv_freq(head_dim, theta, 8.0, 1.0, 4.0, original)
  plain = theta ** (-np.arange(0, head_dim, 2) / head_dim)
  # Every band must be populated, or a wrong branch could go unnoticed.
  assert (want == plain).any() and (want == plain / 8).any()
  assert ((want != plain) & (want != plain / 8)).any()
  # Both float64; only the order of a handful of operations differs (measured 2.2e-16).
  np.testing.assert_allclose(inverse_frequencies(head_dim, theta, scaling), want, rtol=1e-12)
  np.testing.assert_allclose(inverse_frequencies(head_dim, theta), plain, rtol=1e-12)


def numpy_attention(q, k, v, segment_ids):
  """float64 causal GQA attention; query head n reads kv head n // (N / K),
  as HF's repeat_kv does."""
  B, T, N, H = q.shape
  G = N // k.shape[2]
  mask = np.tril(np.ones((T, T), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None])
  out = np.zeros((B, T, N, H))
  for n in range(N):
    logits = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // G]) / np.sqrt(H)
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out[:, :, n] = np.einsum("bts,bsh->bth", p / p.sum(-1, keepdims=True), v[:, :, n // G])
  return out


def test_xla_attention_matches_numpy():
  rng = np.random.default_rng(0)
  B, T, N, K, H = 3, 12, 4, 2, 8
  q, k, v = (rng.normal(size=(B, T, n, H)).astype(np.float32) for n in (N, K, K))
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0],  # Packed, padded.
                          [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],  # Packed, full.
                          [1] * T], np.int32)  # One document.
  got = np.asarray(xla_attention(q, k, v, segment_ids))
  want = numpy_attention(q, k, v, segment_ids)
  valid = segment_ids > 0  # Padding outputs are unused; they only must be finite.
  assert np.isfinite(got).all()
  # float32 logits/softmax over <= 12 keys of O(1) values (measured 3.5e-7).
  np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-5)
  causal = numpy_attention(q, k, v, np.ones((B, T), np.int32))
  np.testing.assert_allclose(xla_attention(q, k, v), causal, rtol=0, atol=1e-5)


def test_segment_offsets_hand_examples():
  segment_ids = np.array([[1, 1, 1, 2, 2, 0, 0, 0],  # Padding at the end.
                          [1, 2, 2, 3, 3, 3, 3, 3],  # Several segments, no padding.
                          [7, 7, 7, 7, 7, 7, 7, 7],  # One segment (any id).
                          [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)  # All padding.
  offsets, lengths = segment_offsets(jnp.asarray(segment_ids), max_segments=3)
  np.testing.assert_array_equal(offsets, [[0, 3, -1, -1], [0, 1, 3, -1],
                                          [0, -1, -1, -1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[3, 2, -1], [1, 2, 5], [8, -1, -1], [-1, -1, -1]])


def unscan(params, n_layers):
  """Scanned params -> unscanned, by slicing the leading L axis."""
  params = dict(params)
  layers = params["decoder"]["layers"]
  params["decoder"] = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], layers)
                       for i in range(n_layers)}
  return params


def test_scan_equals_unscanned():
  params = init_params(CFG)
  tokens_BT = random_tokens((2, 16))
  scanned = logits(CFG, params, tokens_BT)
  unscanned_cfg = dataclasses.replace(CFG, scan_layers=False)
  abstract = jax.eval_shape(Transformer(unscanned_cfg).init, jax.random.key(0), tokens_BT)
  assert (jax.tree.structure(nn.meta.unbox(abstract)["params"])
          == jax.tree.structure(unscan(params, CFG.n_layers)))
  unscanned = logits(unscanned_cfg, unscan(params, CFG.n_layers), tokens_BT)
  # Same float32 math, compiled as a loop vs unrolled: XLA fuses and orders
  # reductions differently (measured 1.4e-6 on logits of |max| ~4).
  np.testing.assert_allclose(scanned, unscanned, rtol=0, atol=1e-5)


def test_scan_unroll_equals_loop():
  """``scan_unroll`` 0 (or >= n_layers): the same [L, ...] params, no loop in the
  program (each block's saved activations are their own buffers, not slices
  XLA copies into a stack: +3.9% tokens/s unrolled on llama_1b, H100), and
  the loss and gradients of the loop: same float32 ops, only fused and
  ordered differently (measured bit-identical on CPU; a few ulps allowed)."""
  tokens_BT = random_tokens((2, 17))
  params = init_params(CFG)
  grad_fn = jax.jit(jax.value_and_grad(next_token_loss), static_argnums=1)
  loop_cfg = dataclasses.replace(CFG, remat_policy="dots_no_batch")
  unrolled_cfg = dataclasses.replace(loop_cfg, scan_unroll=0)  # 0: every block.
  abstract = jax.eval_shape(Transformer(unrolled_cfg).init, jax.random.key(0), tokens_BT)
  assert jax.tree.structure(nn.meta.unbox(abstract)["params"]) == jax.tree.structure(params)
  loops = lambda cfg: grad_fn.lower(params, cfg, tokens_BT).as_text().count("stablehlo.while")
  assert loops(loop_cfg) >= 1 and loops(unrolled_cfg) == 0
  (loss0, grads0), (loss, grads) = grad_fn(params, loop_cfg, tokens_BT), grad_fn(
      params, unrolled_cfg, tokens_BT)
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  jax.tree.map(lambda g, g0: np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6),
               grads, grads0)


def next_token_loss(params, cfg, tokens_BT):
  logits_BTV = Transformer(cfg).apply({"params": params}, tokens_BT[:, :-1])
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], -1))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscanned"])
def test_remat_policies_same_loss_and_grads(scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  params = init_params(CFG)
  params = params if scan else unscan(params, CFG.n_layers)
  tokens_BT = random_tokens((2, 17))
  grad_fn = jax.jit(jax.value_and_grad(next_token_loss), static_argnums=1)
  loss0, grads0 = grad_fn(params, cfg, tokens_BT)
  residual_sizes, residual_shapes = {}, {}
  for policy in REMAT_POLICIES:
    policy_cfg = dataclasses.replace(cfg, remat_policy=policy)
    loss, grads = grad_fn(params, policy_cfg, tokens_BT)
    # Remat recomputes the same float32 ops; only fusion could differ (measured
    # bit-identical on CPU), so allow a few ulps.
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    jax.tree.map(lambda g, g0: np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6),
                 grads, grads0)
    # What the backward pass keeps: the residuals held by the VJP closure.
    vjp_fn = jax.eval_shape(
        lambda p: jax.vjp(lambda p: next_token_loss(p, policy_cfg, tokens_BT), p)[1], params)
    residual_sizes[policy] = sum(x.size for x in jax.tree.leaves(vjp_fn))
    residual_shapes[policy] = sorted((x.shape, str(x.dtype)) for x in jax.tree.leaves(vjp_fn))
  # Each policy must really change what is saved, or the test above is vacuous.
  # Compared by the saved shapes: totals can tie (on the XLA path
  # dots_no_batch_attn and dots_attn both add one [B, T, N, H] per layer).
  assert len({str(s) for s in residual_shapes.values()}) == len(REMAT_POLICIES), residual_shapes
  assert min(residual_sizes, key=residual_sizes.get) == "full"
  assert max(residual_sizes, key=residual_sizes.get) == "none"


def test_packed_row_equals_documents_alone():
  params = init_params(CFG)
  doc_a, doc_b = random_tokens((1, 11), seed=1), random_tokens((1, 15), seed=2)
  pad = 6
  tokens_BT = np.concatenate([doc_a, doc_b, np.zeros((1, pad), np.int32)], 1)
  segment_ids_BT = np.array([[1] * 11 + [2] * 15 + [0] * pad], np.int32)
  positions_BT = np.array([list(range(11)) + list(range(15)) + list(range(pad))], np.int32)
  packed = logits(CFG, params, tokens_BT, positions_BT, segment_ids_BT)
  alone_a, alone_b = logits(CFG, params, doc_a), logits(CFG, params, doc_b)
  # Masked keys get exactly zero weight, so only float32 reduction order over
  # different lengths differs (measured 2.1e-6 on logits of |max| ~4).
  np.testing.assert_allclose(packed[:, :11], alone_a, rtol=0, atol=1e-5)
  np.testing.assert_allclose(packed[:, 11:26], alone_b, rtol=0, atol=1e-5)


def test_tied_embeddings_have_no_lm_head():
  tied_cfg = dataclasses.replace(CFG, tie_embeddings=True)
  tied = init_params(tied_cfg)
  assert "lm_head" not in tied
  assert init_params(CFG)["lm_head"]["kernel"].shape == (CFG.d_model, CFG.vocab_size)
  # The tied head is the embedding: same logits as an untied head holding E^T.
  untied = dict(tied, lm_head={"kernel": tied["embedding"].T})
  tokens_BT = random_tokens((2, 16))
  np.testing.assert_allclose(logits(tied_cfg, tied, tokens_BT), logits(CFG, untied, tokens_BT),
                             rtol=0, atol=1e-6)  # Same dot, one operand transposed (measured 0).
