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
(forward, backward). ``xla`` is plain einsums with float32 accumulation (CPU,
tests, float32), which materialise [B, K, G, T, S] float32 logits per block.
``cudnn`` is cuDNN's fused flash attention (GPU, bf16/fp16) through JAX's
primitives: the forward returns the softmax statistics, which are the
natural-log log-sum-exp of the scaled logits per (row, head) (FlashAttention-2,
Dao 2023, sec. 3.1.1), and the backward takes them with the output O and
computes D = rowsum(dO * O) itself; given the *final* lse and O it returns the
block's exact share of the gradient. cuDNN masks by index only (none, causal,
or an additive bias), so the block's mask picks one of three fused calls
(``mask_kind``): all visible (no mask), causal (square, lower-triangular by
index: the diagonal block of unpacked rows in contiguous or zig-zag order),
or anything else (packed rows) through a [B, 1, T, S] bias in the compute dtype.

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


def xla_block_bwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, lse_BTN, delta_BTN, out_BTNH, do_BTNH,
                  scale):
  """(dq, dk, dv) in float32 of one block, given the whole attention's lse
  and D = rowsum(dO * O) (module docstring); the output O is not needed."""
  del out_BTNH
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


# ---------------------------------------------------------------- cuDNN --

ALL_VISIBLE, CAUSAL, OTHER = 0, 1, 2  # mask_kind's answers.


def mask_kind(mask_BTS):
  """Which cuDNN mask a [B, T, S] block mask is, for the whole batch:
  ALL_VISIBLE, CAUSAL (T == S and lower-triangular by index) or OTHER."""
  T, S = mask_BTS.shape[1:]
  causal = jnp.all(mask_BTS == jnp.tril(jnp.ones((T, S), bool))) if T == S else False
  return jnp.where(jnp.all(mask_BTS), ALL_VISIBLE, jnp.where(causal, CAUSAL, OTHER))


# A masked logit's bias: JAX's own values for cuDNN masks
# (fused_attention_stablehlo.get_large_negative_number: not the dtype's min,
# which trips a cuDNN bug subtracting two large negatives). exp(bias + s - l)
# is 0 in float32 for any real row's l.
_MASKED_BIAS = {jnp.dtype(jnp.bfloat16): -2.0 ** 41, jnp.dtype(jnp.float16): -2.0 ** 15}
# Whether the backward asks cuDNN for the bias gradient (unused: the bias is
# a constant of the mask). jax >= 0.11.x skips it for boolean masks too.
_BIAS_GRAD = False


def _cudnn(q_BTNH, k_BSKH, v_BSKH):
  """JAX's cuDNN attention module, after checking what cuDNN takes."""
  dtypes = {jnp.dtype(x.dtype) for x in (q_BTNH, k_BSKH, v_BSKH)}
  if len(dtypes) > 1 or not dtypes <= set(_MASKED_BIAS):
    raise ValueError(
        f"the cudnn attention block kernel takes bfloat16 or float16 q/k/v, got "
        f"{q_BTNH.dtype}/{k_BSKH.dtype}/{v_BSKH.dtype}: set config.model.dtype='bfloat16' "
        "or config.model.attention_impl='xla'")
  T, S, H = q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[-1]
  if H % 8 or H > 256:
    raise ValueError(f"cuDNN flash attention needs head_dim a multiple of 8 and <= 256, got "
                     f"{H} (config.model.head_dim); use config.model.attention_impl='xla'")
  if T % 2 or S % 2:  # cuDNN's biased backward (JAX checks the same).
    raise ValueError(f"the cudnn attention block kernel needs even block lengths, got T={T}, "
                     f"S={S}: make config.data.seq_len a multiple of 4 x config.mesh.sequence, "
                     "or use config.model.attention_impl='xla'")
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  return fa


def _cudnn_params(fa, mask_type, has_bias, scale):
  # The primitives without JAX's custom_partitioning wrapper: a plain custom
  # call on the shapes it is given, so it runs inside shard_map (the wrapper's
  # partitioner rejects manual axes) and needs no cuDNN at trace time.
  return dict(scale=float(scale), seed=0, dropout_rate=0.0,
              variadic_args=(has_bias, has_bias and _BIAS_GRAD), mask_type=mask_type,
              layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)


def _cudnn_calls(q_BTNH, k_BSKH, v_BSKH, mask_BTS, call):
  """``call(fa, mask_type, bias_B1TS, q, k, v, mask)`` for the block's mask
  kind, in one ``lax.switch`` whose three branches are all fused kernels
  (``lax.switch`` reserves the largest branch's memory: here the bf16 bias)."""
  fa = _cudnn(q_BTNH, k_BSKH, v_BSKH)
  dtype = q_BTNH.dtype

  def biased(q, k, v, m):
    bias_B1TS = jnp.where(m, jnp.zeros((), dtype),
                          jnp.asarray(_MASKED_BIAS[jnp.dtype(dtype)], dtype))[:, None]
    return call(fa, fa.MaskType.NO_MASK, bias_B1TS, q, k, v, m)

  return jax.lax.switch(mask_kind(mask_BTS),
                        (lambda *a: call(fa, fa.MaskType.NO_MASK, None, *a),
                         lambda *a: call(fa, fa.MaskType.CAUSAL, None, *a), biased),
                        q_BTNH, k_BSKH, v_BSKH, mask_BTS)


def cudnn_block(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale):
  """``xla_block`` by cuDNN: (out_BTNH, lse_BTN) in float32, out rounded to
  the input dtype. Rows with nothing visible (biased branch only) get out 0
  and lse _EMPTY as in ``xla_block`` (cuDNN would give the mean of V at an
  lse near the bias)."""

  def call(fa, mask_type, bias_B1TS, q, k, v, m):
    none = jnp.zeros(0, q.dtype)
    bias = none if bias_B1TS is None else bias_B1TS
    out_BTNH, stat_BNT = fa._dot_product_attention_fwd_p.bind(  # pylint: disable=protected-access
        q, k, v, bias, none, none, none, none, none, none, is_training=True,
        **_cudnn_params(fa, mask_type, bias_B1TS is not None, scale))
    out_BTNH, lse_BTN = out_BTNH.astype(jnp.float32), jnp.swapaxes(stat_BNT, 1, 2)
    if bias_B1TS is None:
      return out_BTNH, lse_BTN
    any_BT1 = jnp.any(m, axis=-1)[..., None]
    return jnp.where(any_BT1[..., None], out_BTNH, 0.0), jnp.where(any_BT1, lse_BTN, _EMPTY)

  return _cudnn_calls(q_BTNH, k_BSKH, v_BSKH, mask_BTS, call)


def cudnn_block_bwd(q_BTNH, k_BSKH, v_BSKH, mask_BTS, lse_BTN, delta_BTN, out_BTNH, do_BTNH,
                    scale):
  """``xla_block_bwd`` by cuDNN: (dq, dk, dv), computed in the input dtype
  and returned in float32. cuDNN forms D = rowsum(dO * O) from the final
  output itself, so ``delta_BTN`` is unused."""
  del delta_BTN
  dtype = q_BTNH.dtype
  out_BTNH, do_BTNH = out_BTNH.astype(dtype), do_BTNH.astype(dtype)

  def call(fa, mask_type, bias_B1TS, q, k, v, m):
    none = jnp.zeros(0, q.dtype)
    lse = lse_BTN
    if bias_B1TS is not None:
      # A row that sees nothing in this block gets P = exp(bias + s - lse) = 0
      # unless lse is _EMPTY itself (a row that sees nothing anywhere): then 0.
      lse = jnp.where(jnp.any(m, axis=-1)[..., None], lse, 0.0)
    grads = fa._dot_product_attention_bwd_p.bind(  # pylint: disable=protected-access
        q, k, v, none if bias_B1TS is None else bias_B1TS, none, none, none, none, none, none,
        jnp.swapaxes(lse, 1, 2), out_BTNH, do_BTNH,
        **_cudnn_params(fa, mask_type, bias_B1TS is not None, scale))
    return tuple(g.astype(jnp.float32) for g in grads[:3])

  return _cudnn_calls(q_BTNH, k_BSKH, v_BSKH, mask_BTS, call)


# The fused-kernel point: name -> (forward(q, k, v, mask_BTS, scale) -> (out,
# lse), backward(q, k, v, mask_BTS, lse, delta, out, do, scale) -> (dq, dk, dv)):
# lse and D = rowsum(dO * O) of the whole attention, O its output.
BLOCK_KERNELS = {"xla": (xla_block, xla_block_bwd), "cudnn": (cudnn_block, cudnn_block_bwd)}


def row_delta(out_BTNH, do_BTNH):
  """D = rowsum(dO * O) [B, T, N] in float32: the whole attention's, once per
  backward, for every block's ``backward`` (module docstring)."""
  return jnp.sum(do_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32), axis=-1)


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
                        lse_BTN, delta_BTN, out_BTNH, do_BTNH, scale, kernel="xla"):
  """(dq, dk, dv) in float32 of ``chunk_attention``'s block, the same
  computation picked from the mask; lse, D = rowsum(dO * O) and O of the
  whole attention."""
  bwd = functools.partial(BLOCK_KERNELS[kernel][1], scale=scale)
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  mask_BTS = visible(pos_q_BT, seg_q_BT, pos_k_BS, seg_k_BS)
  args = (q_BTNH, k_BSKH, v_BSKH, mask_BTS, lse_BTN, delta_BTN, out_BTNH, do_BTNH)
  if T % 2 or S % 2:
    return bwd(*args)
  tq, sk = T // 2, S // 2
  f32 = lambda x: x.astype(jnp.float32)

  def nothing(q, k, v, *_):
    return jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(
        v.shape, jnp.float32)

  def late_queries(q, k, v, m, lse, delta, out, do):
    dq, dk, dv = bwd(q[:, tq:], k, v, m[:, tq:], lse[:, tq:], delta[:, tq:], out[:, tq:],
                     do[:, tq:])
    return jnp.concatenate([jnp.zeros_like(f32(q[:, :tq])), dq], 1), dk, dv

  def early_keys(q, k, v, m, lse, delta, out, do):
    dq, dk, dv = bwd(q, k[:, :sk], v[:, :sk], m[:, :, :sk], lse, delta, out, do)
    pad = lambda d, x: jnp.concatenate([d, jnp.zeros_like(f32(x[:, sk:]))], 1)
    return dq, pad(dk, k), pad(dv, v)

  return jax.lax.switch(plan(mask_BTS), (nothing, late_queries, early_keys, bwd), *args)
