"""Context-parallel attention over the ``sequence`` mesh axis: ring and all-gather-KV.

Each device of the ``sequence`` axis holds a chunk of every row's queries,
keys and values (``activation_length`` -> ``sequence`` in the rules table).
Attention needs every query to meet every key it may see; two ways, chosen by
``config.model.context_parallel``:

* ``ring`` (Liu et al. 2023, "Ring Attention with Blockwise Transformers"):
  the K/V chunks travel around the ring with ``jax.lax.ppermute``, one hop per
  step, at their own (GQA) head count; each step attends the local queries to
  the chunk that just arrived, and the partial results are merged by their
  log-sum-exp (the online softmax of Milakov & Gimelshein 2018, as in flash
  attention): with o_a, o_b the normalised outputs of two key blocks and
  l_a, l_b their log-sum-exps, l = logaddexp(l_a, l_b) and
  o = o_a exp(l_a - l) + o_b exp(l_b - l), exact and stable in float32. The
  send of the next chunk is issued before the current one is attended, so the
  transfer can overlap the compute. No device ever holds all of K/V in the
  forward pass (autodiff's residuals keep the received chunks for the backward).
* ``all_gather``: K/V (and their positions and segment ids) are all-gathered
  over ``sequence`` and the local queries attend to all of them; one collective,
  more memory (the full K/V per device).

Which key a query sees is decided by positions and segment ids, never by the
index in the local chunk: key s is visible to query t iff they are in the same
packed segment and pos_t >= pos_s (positions restart at 0 per document, so
this is the causal mask of packed rows). So the attention is right for any
order of the tokens along the sequence, in particular the zig-zag order of
``qtrain.parallel.zigzag`` that balances the causal work. The mask also
decides what each (local queries, K/V chunk) pair computes, in one
``lax.switch`` (testing the mask costs 1/(N H) of the block's matmuls):
nothing, the late half of the queries, the early half of the keys, or the
whole block. In zig-zag order every device then does the same work on every
ring step (the whole block on the first, one half on the others); in
contiguous order device 0 would idle while the last one works.

The block kernel: ``attention_block(q, k, v, mask, scale) -> (out, lse)`` is
the one point where a fused kernel plugs in (``BLOCK_KERNELS``); ``xla`` here
is plain einsums in float32 (CPU, tests). What exists on GPU (surveyed for
jax 0.10-0.11): cuDNN through ``jax.nn.dot_product_attention`` returns no
log-sum-exp, so it cannot be merged; ``jax.experimental.pallas.ops.gpu.
attention.mha(..., return_residuals=True)`` returns (out, lse), with lse in
base 2 (m + log2 l: multiply by ln 2), a causal mask by index within the call
and one segment-id array shared by q and k (a ring step needs separate q and
k segment ids and positions, so it needs a small change to the kernel), and its
custom VJP ignores the lse cotangent, so a fused ring needs a ring-level
``custom_vjp`` whose backward re-runs the ring with the final (out, lse) and
calls the flash backward per block (the standard ring-attention backward);
tokamax's flash attention exposes the residuals the same way. Until one is
wired here, ring steps use the XLA block on every backend.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qtrain.layers.sharding import HEADS

MODES = ("none", "ring", "all_gather")
# Log-sum-exp of a block whose mask is empty: finite, so merges never form
# inf - inf; exp(_EMPTY - l) is 0 against any real row's l.
_EMPTY = -1e30


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"config.model.context_parallel={mode!r}; use one of {MODES}")


# ------------------------------------------------------------ block kernel --


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


# The fused-kernel point: name -> fn(q, k, v, mask_BTS, scale) -> (out, lse).
BLOCK_KERNELS = {"xla": xla_block}


def merge(out_a, lse_a, out_b, lse_b):
  """Two partial attentions over disjoint key sets -> the attention over both."""
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a, w_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  return out_a * w_a + out_b * w_b, lse


def _empty(q_BTNH):
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
  block = functools.partial(BLOCK_KERNELS[kernel], scale=scale)
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  mask_BTS = visible(pos_q_BT, seg_q_BT, pos_k_BS, seg_k_BS)
  if T % 2 or S % 2:
    return block(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  tq, sk = T // 2, S // 2

  def late_queries(q, k, v, m):
    out, lse = block(q[:, tq:], k, v, m[:, tq:])
    empty_out, empty_lse = _empty(q[:, :tq])
    return jnp.concatenate([empty_out, out], 1), jnp.concatenate([empty_lse, lse], 1)

  def early_keys(q, k, v, m):
    return block(q, k[:, :sk], v[:, :sk], m[:, :, :sk])

  return jax.lax.switch(plan(mask_BTS), (lambda q, k, v, m: _empty(q), late_queries,
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


# ------------------------------------------------------ per-device bodies --


def ring_body(q, pos_q, seg_q, k, v, pos_k, seg_k, *, axis, n, scale, kernel="xla"):
  """One device's share of ring attention (inside ``shard_map`` over ``axis``)."""
  attend = functools.partial(chunk_attention, q, pos_q, seg_q, scale=scale, kernel=kernel)
  perm = [(i, (i + 1) % n) for i in range(n)]  # Chunk of device i moves to i + 1.
  out, lse = attend(k, v, pos_k, seg_k)  # Step 0: the local chunk.

  def step(carry, _):
    out, lse, kv = carry
    kv_next = jax.lax.ppermute(kv, axis, perm)
    out, lse = merge(out, lse, *attend(*kv))
    return (out, lse, kv_next), None

  kv = jax.lax.ppermute((k, v, pos_k, seg_k), axis, perm)
  if n > 2:  # Steps 1 .. n-2 send the next chunk while attending the current one.
    (out, lse, kv), _ = jax.lax.scan(step, (out, lse, kv), length=n - 2)
  out, _ = merge(out, lse, *attend(*kv))  # Step n-1: nothing left to send.
  return out.astype(q.dtype)


def all_gather_body(q, pos_q, seg_q, k, v, pos_k, seg_k, *, axis, n, scale, kernel="xla"):
  """One device's share of all-gather-KV attention (inside ``shard_map``):
  the gathered K/V attended chunk by chunk, each chunk's empty halves skipped
  as on a ring step."""
  gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
  k, v, pos_k, seg_k = gather(k), gather(v), gather(pos_k), gather(seg_k)
  S = k.shape[1] // n
  chunk = lambda x, j: x[:, j * S:(j + 1) * S]
  out, lse = _empty(q)
  for j in range(n):
    out, lse = merge(out, lse, *chunk_attention(
        q, pos_q, seg_q, chunk(k, j), chunk(v, j), chunk(pos_k, j), chunk(seg_k, j),
        scale=scale, kernel=kernel))
  return out.astype(q.dtype)


BODIES = {"ring": ring_body, "all_gather": all_gather_body}


# ----------------------------------------------------------- entry point --


def sequence_axis():
  """(mesh axis of the attention's length dim, its size) under the active
  mesh and rules, or (None, 1) when the length is not split."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, 1
  axis = nn.logical_to_mesh_axes(HEADS["q"])[1]
  if axis is None:
    return None, 1
  if not isinstance(axis, str):
    raise ValueError(f"context-parallel attention needs the length split over one mesh "
                     f"axis; the rules map activation_length to {axis}")
  return axis, mesh.shape[axis]


def _splits_evenly(shape, spec, mesh) -> bool:
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if dim % max(1, int(np.prod([mesh.shape[a] for a in axes]))):
      return False
  return True


def _local_kv_heads(k, v, q_heads_axis, n_q_local, group):
  """When the q heads are split over ``q_heads_axis`` but the kv heads are not
  (fewer kv heads than ``tensor``), the kv head(s) of this shard's q heads."""
  count = max(1, n_q_local // group)
  start = jax.lax.axis_index(q_heads_axis) * n_q_local // group
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, count, axis=2)
  return take(k), take(v)


def context_parallel_attention(q_BTNH, k_BSKH, v_BSKH, positions_BT=None, segment_ids_BT=None,
                               *, mode="ring", scale=None, kernel="xla"):
  """Causal GQA attention with the length split over the ``sequence`` axis.

  Call inside ``jit`` under the run's mesh and rules (``Layout``); the
  in/out specs are the rules' ``HEADS`` names, so batch and heads stay split
  as the rest of the model has them. Without a mesh, or with the length not
  split, this is single-device attention with the same mask.
  """
  check_mode(mode)
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  scale = H ** -0.5 if scale is None else scale
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  axis, n = sequence_axis()
  mesh = jax.sharding.get_abstract_mesh()
  q_spec, kv_spec = nn.logical_to_mesh_axes(HEADS["q"]), nn.logical_to_mesh_axes(HEADS["kv"])
  if mode == "none" or n == 1 or not (_splits_evenly(q_BTNH.shape, q_spec, mesh)
                                      and _splits_evenly(k_BSKH.shape, kv_spec, mesh)):
    # Same mask on global arrays, XLA partitions it: no mesh, or shapes that
    # do not split (model.init traces one row).
    out, _ = chunk_attention(q_BTNH, positions_BT, segment_ids_BT, k_BSKH, v_BSKH,
                             positions_BT, segment_ids_BT, scale=scale, kernel=kernel)
    return out.astype(q_BTNH.dtype)
  tok_spec = P(q_spec[0], q_spec[1])
  q_heads_axis = q_spec[2] if q_spec[2] != kv_spec[2] else None
  n_q_local = N // (mesh.shape[q_heads_axis] if q_heads_axis else 1)
  body = functools.partial(BODIES[mode], axis=axis, n=n, scale=scale, kernel=kernel)

  def local(q, pos, seg, k, v):
    if q_heads_axis is not None:
      k, v = _local_kv_heads(k, v, q_heads_axis, n_q_local, N // K)
    return body(q, pos, seg, k, v, pos, seg)

  # check_vma off: the skipped-block branch of chunk_attention makes fresh
  # zeros, which the varying-axes check would ask to cast to each input's axes.
  return jax.shard_map(local, in_specs=(q_spec, tok_spec, tok_spec, kv_spec, kv_spec),
                       out_specs=q_spec, check_vma=False)(q_BTNH, positions_BT.astype(jnp.int32),
                                         segment_ids_BT.astype(jnp.int32), k_BSKH, v_BSKH)
