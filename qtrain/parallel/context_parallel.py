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
  transfer can overlap the compute. The ring has its own VJP: the forward
  keeps only the local q, K/V, output and log-sum-exp (autodiff would keep
  every chunk that passed by: all of K/V), and the backward runs a second
  ring in which each K/V chunk travels with its dK/dV accumulator and comes
  home after a last hop. No device ever holds all of K/V.
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

The block kernels (``qtrain.parallel.blockwise.BLOCK_KERNELS``, chosen by
``kernel``: a forward returning (out, lse) and a backward taking the final
lse, D = rowsum(dO * O) and O) are the one point where a fused kernel plugs
in. ``xla`` is plain einsums with float32 accumulation (CPU, float32, tests);
it materialises [B, K, G, T, S] float32 logits per block, tens of GiB at the
long sequences context parallelism is for. ``cudnn`` (GPU, bf16/fp16) calls
the cuDNN flash-attention primitives that ``jax.nn.dot_product_attention``
is built on (``jax._src.cudnn.fused_attention_stablehlo``, the same in jax
0.10.2 and 0.11): the forward does return the log-sum-exp (its softmax
statistics, natural log of the scaled logits), and the backward takes it
with O; each block is one fused call, its mask being all visible, causal by
index, or (packed rows) an additive bias (``blockwise`` docstring). Not
used: ``jax.experimental.pallas.ops.gpu.attention`` (``mha(...,
return_residuals=True)`` gives a base-2 lse; its mask is by index with one
segment-id array shared by q and k, while a block needs separate q/k
positions and segment ids), and tokamax (not surveyed).

Mode ``none`` (no split length, or shapes that do not split) runs the same
blocks on the global arrays with the same custom VJP (the cuDNN primitives
have no autodiff rule of their own).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qtrain.layers.sharding import HEADS, per_device_attention, splits_evenly
from qtrain.parallel.blockwise import (chunk_attention, chunk_attention_bwd, empty, merge,
                                       row_delta)

MODES = ("none", "ring", "all_gather")
# Checkpoint names of the forward's residuals (``_with_vjp``): the output and
# its log-sum-exp, what the backward's blocks take besides q, K/V.
OUT, LSE = "context_parallel_out", "context_parallel_lse"


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"config.model.context_parallel={mode!r}; use one of {MODES}")


# ------------------------------------------------------ per-device bodies --


def _ring_forward(q, pos, seg, k, v, *, axis, n, scale, kernel):
  """(out, lse) in float32 of the local queries against every chunk."""
  attend = functools.partial(chunk_attention, q, pos, seg, scale=scale, kernel=kernel)
  perm = [(i, (i + 1) % n) for i in range(n)]  # Chunk of device i moves to i + 1.
  out, lse = attend(k, v, pos, seg)  # Step 0: the local chunk.

  def step(carry, _):
    out, lse, kv = carry
    kv_next = jax.lax.ppermute(kv, axis, perm)
    out, lse = merge(out, lse, *attend(*kv))
    return (out, lse, kv_next), None

  kv = jax.lax.ppermute((k, v, pos, seg), axis, perm)
  if n > 2:  # Steps 1 .. n-2 send the next chunk while attending the current one.
    (out, lse, kv), _ = jax.lax.scan(step, (out, lse, kv), length=n - 2)
  return merge(out, lse, *attend(*kv))  # Step n-1: nothing left to send.


def _ring_backward(res, do, *, axis, n, scale, kernel):
  """The ring again, each K/V chunk followed by its dK/dV accumulator: a
  device adds its queries' share to the chunk passing by, and after n - 1
  hops one more hop brings every accumulator home. As in the forward, the
  next chunk is sent while the current one is differentiated; the
  accumulator's hop overlaps that compute too (it is added after)."""
  q, pos, seg, k, v, out, lse = res
  delta = row_delta(out, do)
  grad = functools.partial(chunk_attention_bwd, q, pos, seg, lse_BTN=lse, delta_BTN=delta,
                           out_BTNH=out, do_BTNH=do, scale=scale, kernel=kernel)
  perm = [(i, (i + 1) % n) for i in range(n)]
  hop = lambda x: jax.lax.ppermute(x, axis, perm)

  def visit(dq, kv, acc):
    """The accumulator of chunk ``kv`` arrives; this device's share is added."""
    acc = hop(acc)
    dq_b, dk_b, dv_b = grad(*kv)
    return dq + dq_b, (acc[0] + dk_b, acc[1] + dv_b)

  def step(carry, _):
    dq, kv, acc = carry
    kv_next = hop(kv)
    dq, acc = visit(dq, kv, acc)
    return (dq, kv_next, acc), None

  kv = hop((k, v, pos, seg))
  dq, dk, dv = grad(k, v, pos, seg)  # Step 0: the local chunk.
  carry = (dq, kv, (dk, dv))
  if n > 2:
    carry, _ = jax.lax.scan(step, carry, length=n - 2)
  dq, kv, acc = carry
  dq, acc = visit(dq, kv, acc)  # Step n-1: nothing left to send.
  dk, dv = hop(acc)  # Home.
  return dq.astype(q.dtype), None, None, dk.astype(k.dtype), dv.astype(v.dtype)


def _gathered_chunks(x, axis, n):
  """``x`` all-gathered along the sequence, cut back into the n devices' chunks."""
  full = jax.lax.all_gather(x, axis, axis=1, tiled=True)
  S = x.shape[1]
  return [full[:, j * S:(j + 1) * S] for j in range(n)]


def _all_gather_forward(q, pos, seg, k, v, *, axis, n, scale, kernel):
  """(out, lse) in float32: the gathered K/V attended chunk by chunk, each
  chunk's empty halves skipped as on a ring step."""
  out, lse = empty(q)
  for kv in zip(*(_gathered_chunks(x, axis, n) for x in (k, v, pos, seg))):
    out, lse = merge(out, lse, *chunk_attention(q, pos, seg, *kv, scale=scale, kernel=kernel))
  return out, lse


def _all_gather_backward(res, do, *, axis, n, scale, kernel):
  """K/V gathered again (not kept from the forward); each chunk's dK/dV
  reduce-scattered back to the device that holds it."""
  q, pos, seg, k, v, out, lse = res
  delta = row_delta(out, do)
  dq, dks, dvs = jnp.zeros(q.shape, jnp.float32), [], []
  for kv in zip(*(_gathered_chunks(x, axis, n) for x in (k, v, pos, seg))):
    dq_j, dk_j, dv_j = chunk_attention_bwd(q, pos, seg, *kv, lse_BTN=lse, delta_BTN=delta,
                                           out_BTNH=out, do_BTNH=do, scale=scale,
                                           kernel=kernel)
    dq, dks, dvs = dq + dq_j, dks + [dk_j], dvs + [dv_j]
  scatter = lambda ds: jax.lax.psum_scatter(jnp.concatenate(ds, 1), axis, scatter_dimension=1,
                                            tiled=True)
  return dq.astype(q.dtype), None, None, scatter(dks).astype(k.dtype), scatter(dvs).astype(
      v.dtype)


def _local_forward(q, pos, seg, k, v, *, axis, n, scale, kernel):
  """(out, lse) in float32 of unsplit attention (mode ``none``)."""
  del axis, n
  return chunk_attention(q, pos, seg, k, v, pos, seg, scale=scale, kernel=kernel)


def _local_backward(res, do, *, axis, n, scale, kernel):
  del axis, n
  q, pos, seg, k, v, out, lse = res
  delta = row_delta(out, do)
  dq, dk, dv = chunk_attention_bwd(q, pos, seg, k, v, pos, seg, lse_BTN=lse, delta_BTN=delta,
                                   out_BTNH=out, do_BTNH=do, scale=scale, kernel=kernel)
  return dq.astype(q.dtype), None, None, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.lru_cache(maxsize=None)
def _with_vjp(mode, axis, n, scale, kernel):
  """One device's attention of ``mode`` with its own VJP: the forward keeps
  only the local q, K/V, output and lse (autodiff would keep every K/V chunk
  and each skipped-or-not branch's intermediates), the backward exchanges
  K/V again: a second ring, or a second gather and a reduce-scatter."""
  forward, backward = {"none": (_local_forward, _local_backward),
                       "ring": (_ring_forward, _ring_backward),
                       "all_gather": (_all_gather_forward, _all_gather_backward)}[mode]
  opts = dict(axis=axis, n=n, scale=scale, kernel=kernel)

  @jax.custom_vjp
  def attention(q, pos, seg, k, v):
    return forward(q, pos, seg, k, v, **opts)[0].astype(q.dtype)

  def fwd(q, pos, seg, k, v):
    out, lse = forward(q, pos, seg, k, v, **opts)
    # Named for remat policies (attention.save_attention_residuals): kept,
    # the backward does not run the forward ring again for them.
    out, lse = checkpoint_name(out.astype(q.dtype), OUT), checkpoint_name(lse, LSE)
    return out, (q, pos, seg, k, v, out, lse)

  attention.defvjp(fwd, functools.partial(backward, **opts))
  return attention


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


def context_parallel_attention(q_BTNH, k_BSKH, v_BSKH, positions_BT=None, segment_ids_BT=None,
                               *, mode="ring", scale=None, kernel="xla"):
  """Causal GQA attention with the length split over the ``sequence`` axis.

  Call inside ``jit`` under the run's mesh and rules (``Layout``); the
  in/out specs are the rules' ``HEADS`` names, so batch and heads stay split
  as the rest of the model has them. Without a mesh, or with the length not
  split, this is single-device attention with the same mask.
  """
  check_mode(mode)
  B, T, _, H = q_BTNH.shape
  scale = H ** -0.5 if scale is None else scale
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  axis, n = sequence_axis()
  mesh = jax.sharding.get_abstract_mesh()
  q_spec, kv_spec = nn.logical_to_mesh_axes(HEADS["q"]), nn.logical_to_mesh_axes(HEADS["kv"])
  if mode == "none" or n == 1 or not (splits_evenly(q_BTNH.shape, q_spec, mesh)
                                      and splits_evenly(k_BSKH.shape, kv_spec, mesh)):
    # Same mask on global arrays, XLA partitions it: no mesh, or shapes that
    # do not split (model.init traces one row). The block kernels' own
    # backward, as on the ring (cuDNN's primitives have no autodiff rule).
    return _with_vjp("none", None, 1, float(scale), kernel)(
        q_BTNH, positions_BT.astype(jnp.int32), segment_ids_BT.astype(jnp.int32), k_BSKH, v_BSKH)
  body = _with_vjp(mode, axis, n, float(scale), kernel)
  return per_device_attention(lambda q, k, v, pos, seg: body(q, pos, seg, k, v), q_spec,
                              kv_spec, q_BTNH, k_BSKH, v_BSKH, positions_BT.astype(jnp.int32),
                              segment_ids_BT.astype(jnp.int32))
