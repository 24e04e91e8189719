"""Blockwise attention with log-sum-exp: the pieces context-parallel attention
(``qtrain.parallel.context_parallel``) is built from.

A block is (queries, a chunk of keys/values, their mask). Its forward returns
the block-normalised output and the log-sum-exp of each query row; two
blocks over disjoint keys merge exactly by their log-sum-exps (the online
softmax of Milakov & Gimelshein 2018, as in flash attention, Dao et al. 2022):
l = logaddexp(l_a, l_b), o = o_a exp(l_a - l) + o_b exp(l_b - l). Its
backward takes the *final* log-sum-exp and D = rowsum(dO * O) of the whole
attention (flash attention's backward, Dao et al. 2022, Alg. 2):
P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - D), dQ = scale dS K,
dK = scale dS^T Q, so a block's gradient needs nothing of the other blocks.

``BLOCK_KERNELS`` is the one point where a fused kernel plugs in: name ->
(forward, backward); ``xla`` is plain einsums with float32 accumulation (CPU,
tests; see ``context_parallel``'s docstring for what exists on GPU).

The mask comes from positions and segment ids (``visible``), and decides what
each (queries, chunk) pair computes (``plan``), so the caller may hold the
tokens in any order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Log-sum-exp of a row whose mask is empty: finite, so merges never form
# inf - inf; exp(_EMPTY - l) is 0 against any real row's l.
_EMPTY = -1e30


def visible(pos_q_BT, seg_q_BT, pos_k_BS, seg_k_BS):
  """[B, T, S]: key s visible to query t (same segment, pos_t >= pos_s)."""
  return ((seg_q_BT[:, :, None] == seg_k_BS[:, None, :])
          & (pos_q_BT[:, :, None] >= pos_k_BS[:, None, :]))


def xla_block(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale):
  """Attention of one (query block, key block): (out_BTNH, lse_BTN), float32.

  ``out`` is normalised within the block; rows with nothing visible get
  out = 0 and lse = _EMPTY, so merging them changes nothing.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  mask_B11TS = mask_BTS[:, None, None]
  logits_BKGTS = jnp.where(mask_B11TS, logits_BKGTS, _EMPTY)
  # The max only keeps exp in range: lse's gradient does not depend on it.
  max_BKGT = jax.lax.stop_gradient(jnp.max(logits_BKGTS, axis=-1))
  p_BKGTS = jnp.where(mask_B11TS, jnp.exp(logits_BKGTS - max_BKGT[..., None]), 0.0)
  sum_BKGT = jnp.sum(p_BKGTS, axis=-1)
  any_BKGT = sum_BKGT > 0
  safe_BKGT = jnp.where(any_BKGT, sum_BKGT, 1.0)
  lse_BKGT = jnp.where(any_BKGT, max_BKGT + jnp.log(safe_BKGT), _EMPTY)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
  out_BTKGH = out_BTKGH / jnp.moveaxis(safe_BKGT, -1, 1)[..., None]
  return out_BTKGH.reshape(B, T, N, H), jnp.moveaxis(lse_BKGT, -1, 1).reshape(B, T, N)


def xla_block_bwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, lse_BTN, delta_BTN, do_BTNH, scale):
  """(dq, dk, dv) in float32 of one block, given the whole attention's lse
  and D = rowsum(dO * O) (module docstring)."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  rows = lambda x_BTN: jnp.moveaxis(x_BTN.reshape(B, T, K, G), 1, -1)[..., None]
  q_BTKGH, do_BTKGH = q_BTNH.reshape(B, T, K, G, H), do_BTNH.reshape(B, T, K, G, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  mask_B11TS = mask_BTS[:, None, None]
  p_BKGTS = jnp.where(mask_B11TS, jnp.exp(jnp.where(mask_B11TS, logits_BKGTS, 0.0)
                                          - rows(lse_BTN)), 0.0)
  dv_BSKH = jnp.einsum("bkgts,btkgh->bskh", p_BKGTS, do_BTKGH.astype(jnp.float32))
  dp_BKGTS = jnp.einsum("btkgh,bskh->bkgts", do_BTKGH, v_BSKH,
                        preferred_element_type=jnp.float32)
  ds_BKGTS = p_BKGTS * (dp_BKGTS - rows(delta_BTN))
  dq_BTKGH = jnp.einsum("bkgts,bskh->btkgh", ds_BKGTS, k_BSKH.astype(jnp.float32)) * scale
  dk_BSKH = jnp.einsum("bkgts,btkgh->bskh", ds_BKGTS, q_BTKGH.astype(jnp.float32)) * scale
  return dq_BTKGH.reshape(B, T, N, H), dk_BSKH, dv_BSKH


# The fused-kernel point: name -> (forward(q, k, v, mask_BTS, scale) -> (out,
# lse), backward(q, k, v, mask_BTS, lse, delta, do, scale) -> (dq, dk, dv)).
BLOCK_KERNELS = {"xla": (xla_block, xla_block_bwd)}


def merge(out_a, lse_a, out_b, lse_b):
  """Two partial attentions over disjoint key sets -> the attention over both."""
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a, w_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  return out_a * w_a + out_b * w_b, lse


def empty(q_BTNH):
  return (jnp.zeros(q_BTNH.shape, jnp.float32),
          jnp.full(q_BTNH.shape[:3], _EMPTY, jnp.float32))


def chunk_attention(q_BTNH, pos_q_BT, seg_q_BT, k_BSKH, v_BSKH, pos_k_BS, seg_k_BS, *,
                    scale, kernel="xla"):
  """Local queries against one K/V chunk: (out, lse) in float32.

  The mask picks one of four computations (one ``lax.switch``): nothing
  (no key visible), the late half of the queries against all keys (the early
  half sees nothing), all queries against the early half of the keys (the
  late half is seen by none), or the whole block. In zig-zag order every
  off-diagonal ring step is one of the two halves on every device.
  """
  block = functools.partial(BLOCK_KERNELS[kernel][0], scale=scale)
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  mask_BTS = visible(pos_q_BT, seg_q_BT, pos_k_BS, seg_k_BS)
  if T % 2 or S % 2:
    return block(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  tq, sk = T // 2, S // 2

  def late_queries(q, k, v, m):
    out, lse = block(q[:, tq:], k, v, m[:, tq:])
    empty_out, empty_lse = empty(q[:, :tq])
    return jnp.concatenate([empty_out, out], 1), jnp.concatenate([empty_lse, lse], 1)

  def early_keys(q, k, v, m):
    return block(q, k[:, :sk], v[:, :sk], m[:, :, :sk])

  return jax.lax.switch(plan(mask_BTS), (lambda q, k, v, m: empty(q), late_queries,
                                         early_keys, block),
                        q_BTNH, k_BSKH, v_BSKH, mask_BTS)


# The work of each of chunk_attention's computations, in blocks.
PLAN_WORK = (0.0, 0.5, 0.5, 1.0)


def plan(mask_BTS):
  """Which computation of ``chunk_attention`` a [B, T, S] mask needs: 0
  nothing, 1 late queries, 2 early keys, 3 the whole block."""
  tq, sk = mask_BTS.shape[1] // 2, mask_BTS.shape[2] // 2
  return jnp.where(~jnp.any(mask_BTS), 0,
                   jnp.where(~jnp.any(mask_BTS[:, :tq]), 1,
                             jnp.where(~jnp.any(mask_BTS[:, :, sk:]), 2, 3)))


def chunk_attention_bwd(q_BTNH, pos_q_BT, seg_q_BT, k_BSKH, v_BSKH, pos_k_BS, seg_k_BS, *,
                        lse_BTN, delta_BTN, do_BTNH, scale, kernel="xla"):
  """(dq, dk, dv) in float32 of ``chunk_attention``'s block, the same
  computation picked from the mask."""
  bwd = functools.partial(BLOCK_KERNELS[kernel][1], scale=scale)
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  mask_BTS = visible(pos_q_BT, seg_q_BT, pos_k_BS, seg_k_BS)
  args = (q_BTNH, k_BSKH, v_BSKH, mask_BTS, lse_BTN, delta_BTN, do_BTNH)
  if T % 2 or S % 2:
    return bwd(*args)
  tq, sk = T // 2, S // 2
  f32 = lambda x: x.astype(jnp.float32)

  def nothing(q, k, v, *_):
    return jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(
        v.shape, jnp.float32)

  def late_queries(q, k, v, m, lse, delta, do):
    dq, dk, dv = bwd(q[:, tq:], k, v, m[:, tq:], lse[:, tq:], delta[:, tq:], do[:, tq:])
    return jnp.concatenate([jnp.zeros_like(f32(q[:, :tq])), dq], 1), dk, dv

  def early_keys(q, k, v, m, lse, delta, do):
    dq, dk, dv = bwd(q, k[:, :sk], v[:, :sk], m[:, :, :sk], lse, delta, do)
    pad = lambda d, x: jnp.concatenate([d, jnp.zeros_like(f32(x[:, sk:]))], 1)
    return dq, pad(dk, k), pad(dv, v)

  return jax.lax.switch(plan(mask_BTS), (nothing, late_queries, early_keys, bwd), *args)
