"""Grouped-query attention with causal and segment (packing) masks.

One function, two paths with the same semantics: token t of row b attends to
token s iff s <= t and both belong to the same packed segment.

* ``cudnn``: the fused flash kernel (GPU, bf16/fp16). Unpacked rows go through
  ``jax.nn.dot_product_attention(implementation="cudnn")``; packed rows go to
  cuDNN's packed ("THD") layout with per-segment offsets and lengths derived
  from the segment ids, so packed training never falls back to the unfused path.
  Inside a pipeline stage (a ``shard_map`` manual over ``pipeline`` only) the
  kernel runs in a nested ``shard_map`` over the other axes
  (``_all_axes_manual``): JAX's partitioning callback for it cannot read
  partly manual shardings.
* ``xla``: the unfused reference (CPU, tests, float32). On an H100 it ran at a
  third of cuDNN's speed, so ``auto`` only picks it off-GPU.

With the sequence split over the mesh's ``sequence`` axis and
``context_parallel`` set (``ring`` | ``all_gather``), attention runs in
``qtrain.parallel.context_parallel`` (explicit K/V exchange in ``shard_map``;
the mask from positions and segment ids, so any token order is right);
``none`` leaves the gathering of K/V to XLA.

Named hook sites (``qtrain.layers.hooks``): ``query`` and ``key`` (after
RoPE, and after the online R3 rotation when ``cfg.rotation.r3`` is on:
``qtrain.layers.rotation``, which names its outputs ``r3_rotated`` for remat)
and ``value``; the KV quantizer attaches there.

Remat (``save_attention_residuals``, the extra of the ``dots_no_batch_attn``
policy in ``qtrain.layers.decoder``): cuDNN's backward kernel reads the
forward's output and its softmax statistics (the per-row logsumexp,
FlashAttention-2 sec. 3.1.1; [B*M, N, T] float32, M the packed segments per
row). Name policies cannot keep them: the statistics never leave JAX's
``custom_vjp`` around the kernel, so under ``dots_no_batch`` (or with the
output saved by name) the backward runs the cuDNN forward again (8.6 ms of a
252 ms llama_1b step on an H100). The policy instead keeps every output of
the cuDNN forward primitive (a policy sees each primitive; JAX's fwd rule binds
``dot_product_attention_fwd_wrapper`` once with ``is_training=True``, returning
exactly (output, statistics), the residuals its bwd rule reads). This needs no
wrapper of our own around cuDNN's backward, only the primitive's identity,
looked up once and checked with a clear error (the same primitive and fwd
rule in jax 0.10.2, 0.11.0 and main of 2026-08). On the XLA path, whose
backward needs the probabilities (T^2 per head) rather than a logsumexp, the
analogous saving is the output alone (named ``attention_xla_out``; the
backward then skips the probabilities-times-V product). The name is
deliberately not ``attention_out``, which the cuDNN path also carries: the
policy would then keep the same tensor twice.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from qtrain.layers import kv_cache, rotation
from qtrain.layers.config import ModelConfig
from qtrain.layers.hooks import Hooks
from qtrain.layers.linear import Linear, projections
from qtrain.layers.rope import apply_rope, inverse_frequencies
from qtrain.layers.sharding import HEADS, per_device_attention, splits_evenly
from qtrain.parallel import context_parallel as cp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
XLA_OUT = "attention_xla_out"  # The XLA path's output, for save_attention_residuals.
# The XLA path's output, and the context-parallel attention's output and lse
# (named inside its custom VJP's forward), which the backward needs.
_save_named = jax.checkpoint_policies.save_only_these_names(XLA_OUT, cp.OUT, cp.LSE)
_CUDNN_FWD = "dot_product_attention_fwd_wrapper"


@functools.cache
def _cudnn_forward_primitive():
  """JAX's cuDNN attention forward primitive (private: checked here, once)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # pylint: disable=g-import-not-at-top
  prim = getattr(cudnn_fa, "_dot_product_attention_fwd_p_wrapper", None)
  if getattr(prim, "name", None) != _CUDNN_FWD:
    raise RuntimeError(
        f"jax {jax.__version__} has no cuDNN attention primitive {_CUDNN_FWD!r} in "
        "jax._src.cudnn.fused_attention_stablehlo, so config.model.remat_policy="
        "'dots_no_batch_attn' cannot keep its outputs: use 'dots_no_batch', or update "
        "_cudnn_forward_primitive in qtrain/layers/attention.py to this jax")
  return prim


def save_attention_residuals(prim, *avals, **params) -> bool:
  """Remat policy: keep the attention kernel's forward results for the
  backward (cuDNN: output and softmax statistics; XLA: the output;
  context-parallel ring / all-gather: output and lse), so the backward does
  not run attention's forward again (module docstring)."""
  return prim is _cudnn_forward_primitive() or _save_named(prim, *avals, **params)


def resolve_impl(impl: str, dtype) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={impl!r}; use one of {IMPLEMENTATIONS}")
  if impl != "auto":
    return impl
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, scale=None, mask_BTS=None):
  """Reference path: softmax in float32 over an explicit mask.

  ``mask_BTS`` (query t of row b sees key s iff True) replaces the causal and
  segment mask, e.g. when decoding against a KV cache of S slots.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  scale = H ** -0.5 if scale is None else scale
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  if mask_BTS is None:
    mask_BTS = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids_BT is not None:
      mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = checkpoint_name(jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH), XLA_OUT)
  return out_BTKGH.reshape(B, T, N, H)


def segment_offsets(segment_ids_BT, max_segments: int):
  """cuDNN packed-layout descriptors from contiguous segment ids.

  Returns (offsets [B, M+1], lengths [B, M]) with -1 filling unused slots;
  padding (segment id 0) belongs to no segment.
  """
  B, T = segment_ids_BT.shape
  prev = jnp.concatenate([jnp.full((B, 1), -1, segment_ids_BT.dtype), segment_ids_BT[:, :-1]], 1)
  is_start = (segment_ids_BT > 0) & (segment_ids_BT != prev)
  starts = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=-1)[0])(is_start)
  n_valid = jnp.sum(segment_ids_BT > 0, axis=1, keepdims=True)
  nxt = jnp.concatenate([starts[:, 1:], jnp.full((B, 1), -1, starts.dtype)], 1)
  ends = jnp.where(nxt >= 0, nxt, n_valid)
  lengths = jnp.where(starts >= 0, ends - starts, -1)[:, :max_segments]
  return starts.astype(jnp.int32), lengths.astype(jnp.int32)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, scale=None,
                    max_segments: int = 16):
  """cuDNN flash attention; packed rows through the THD layout.

  ``max_segments`` bounds the segments per row (0 = T, which always holds);
  segments beyond it would be silently dropped, so only lower it when the data
  guarantees the bound.
  """
  H = q_BTNH.shape[-1]
  scale = H ** -0.5 if scale is None else scale
  if segment_ids_BT is None:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, scale=scale,
                                        is_causal=True, implementation="cudnn")
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # pylint: disable=g-import-not-at-top
  offsets, lengths = segment_offsets(segment_ids_BT, max_segments or q_BTNH.shape[1])
  return cudnn_fa.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths, kv_seqlen=lengths,
      q_offsets=offsets, kv_offsets=offsets, scale=scale,
      mask_type=cudnn_fa.MaskType.CAUSAL, qkv_layout="BTNH")


def _partly_manual() -> bool:
  """Inside a ``shard_map`` manual over some mesh axes but not all (a
  pipeline stage: manual over ``pipeline``, data/fsdp/tensor left to XLA)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and bool(mesh.manual_axes) and not mesh.are_all_axes_manual


def _all_axes_manual(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
  """``kernel`` on this device's shard, in a ``shard_map`` over the mesh axes
  still left to XLA.

  JAX's cuDNN attention is a ``custom_partitioning`` op: XLA's partitioner
  calls back into Python with the operands' shardings, and the callback
  cannot read a sharding that is manual over some axes (XLA compile error
  ``custom_partitioner: AssertionError``, seen on 2 H200s with pipeline=2).
  Under every axis manual, JAX lowers the op straight to the kernel at the
  local shapes, which is what the partitioner would have produced: rows split
  as the rules split the batch, heads as they split the heads, the length
  whole (sequence splits go through ``context_parallel``, or are gathered
  here as XLA would gather K/V).
  """
  mesh = jax.sharding.get_abstract_mesh()

  def spec(name):  # The rules' axes less the manual ones; the length whole.
    axes = [tuple(a for a in ((x,) if isinstance(x, str) else x or ())
                  if a not in mesh.manual_axes) for x in nn.logical_to_mesh_axes(HEADS[name])]
    axes[1] = ()
    return P(*(None if not a else a[0] if len(a) == 1 else a for a in axes))

  q_spec, kv_spec = spec("q"), spec("kv")
  if not (splits_evenly(q_BTNH.shape, q_spec, mesh)
          and splits_evenly(k_BSKH.shape, kv_spec, mesh)):
    q_spec = kv_spec = P(None, None, None, None)  # Rows or heads that do not divide.
  segment_ids = () if segment_ids_BT is None else (segment_ids_BT,)
  return per_device_attention(kernel, q_spec, kv_spec, q_BTNH, k_BSKH, v_BSKH, *segment_ids)


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *,
                          impl: str = "auto", scale=None, max_segments: int = 16,
                          positions_BT=None, context_parallel: str = "none"):
  """Causal GQA attention; ``segment_ids_BT`` (0 = padding) masks packing.

  ``context_parallel`` (see the module docstring) applies when the active
  mesh splits the length; it reads ``positions_BT`` for the causal mask.
  """
  N, K = q_BTNH.shape[2], k_BSKH.shape[2]
  if N % K:
    raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
  cp.check_mode(context_parallel)
  if context_parallel != "none" and cp.sequence_axis()[1] > 1:
    # Each ring block through cuDNN where the full attention would be.
    kernel = "cudnn" if resolve_impl(impl, q_BTNH.dtype) == "cudnn" else "xla"
    return cp.context_parallel_attention(q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT,
                                         mode=context_parallel, scale=scale, kernel=kernel)
  if resolve_impl(impl, q_BTNH.dtype) == "cudnn":
    kernel = functools.partial(cudnn_attention, scale=scale, max_segments=max_segments)
    if _partly_manual():
      return _all_axes_manual(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    return kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale)


def _heads_split_alike() -> bool:
  """The sharding rules in force split q heads and kv heads over the same mesh
  axes (both over ``tensor``, or neither: kv heads are replicated where there
  are fewer than ``tensor``), so q/k/v joined kv head by kv head keep their
  layout (``fused_dense``'s ``groups``)."""
  rules = dict(nn.get_logical_axis_rules())
  return rules.get("q_heads") == rules.get("kv_heads")


class Attention(nn.Module):
  """Llama attention block: q/k/v projections, RoPE, GQA, output projection.
  ``cfg.qkv_bias`` gives q/k/v a bias each (Qwen2), added before RoPE.
  ``cfg.fused_qkv`` runs q/k/v as one matmul where nothing tells them apart
  (``qtrain.layers.linear.projections``): the same function and params.

  ``decode=True``: autoregressive inference. K/V of the new tokens go into the
  ``cache`` collection (in the format ``hooks.kv_spec`` gives, see
  ``qtrain.layers.kv_cache``) and the queries attend to the cached buffer;
  positions_BT[b] must be consecutive and segment ids are ignored.
  """
  cfg: ModelConfig
  hooks: Hooks = Hooks()
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT=None):
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    linear = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                  kernel_init=nn.initializers.normal(cfg.init_std), hooks=self.hooks,
                  init_std=cfg.init_std)
    heads = lambda y, n, axis: nn.with_logical_constraint(y.reshape(B, T, n, H), HEADS[axis])
    # Fused: one GEMM, the weight joined kv head by kv head (linear.fused_dense).
    q, k, v = projections(self, x_BTD, (("q_proj", N * H, ("embed", "q_heads")),
                                        ("k_proj", K * H, ("embed", "kv_heads")),
                                        ("v_proj", K * H, ("embed", "kv_heads"))),
                          fuse=cfg.fused_qkv and _heads_split_alike(), groups=K,
                          use_bias=cfg.qkv_bias, **linear)
    q_BTNH, k_BTKH, v_BTKH = heads(q, N, "q"), heads(k, K, "kv"), heads(v, K, "kv")
    inv_freq = inverse_frequencies(H, cfg.rope_theta, cfg.rope_scaling)
    hooks = self.hooks
    # R3 (online, both or neither; Q K^T unchanged) rotates Q and K before
    # their sites and the cache, so KV quantizers see and store rotated K.
    r3 = functools.partial(rotation.online, cfg, "r3", hooks.layer)
    q_BTNH = hooks.activation(self, "query", r3(apply_rope(q_BTNH, positions_BT, inv_freq)))
    q_BTNH = checkpoint_name(q_BTNH, "query_proj")
    k_BTKH = checkpoint_name(r3(apply_rope(k_BTKH, positions_BT, inv_freq)), "key_proj")
    v_BTKH = checkpoint_name(v_BTKH, "value_proj")
    if self.decode:  # Inference: write the new K/V to the cache, attend to all of it.
      kv_spec = hooks.kv_spec(self)
      k_BSKH = kv_cache.update(self, "k", k_BTKH, positions_BT, kv_spec)
      v_BSKH = kv_cache.update(self, "v", v_BTKH, positions_BT, kv_spec)
      mask_BTS = kv_cache.visible(positions_BT, k_BSKH.shape[1])
      out_BTNH = xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS=mask_BTS)
    else:  # The cache's storage numerics, applied in training at the named sites.
      k_BTKH = hooks.activation(self, "key", k_BTKH)
      v_BTKH = hooks.activation(self, "value", v_BTKH)
      out_BTNH = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT,
                                       impl=cfg.attention_impl,
                                       max_segments=cfg.attention_max_segments,
                                       positions_BT=positions_BT,
                                       context_parallel=cfg.context_parallel)
    out_BTNH = checkpoint_name(nn.with_logical_constraint(out_BTNH, HEADS["q"]), "attention_out")
    return Linear(cfg.d_model, ("q_heads", "embed"), name="o_proj", **linear)(
        out_BTNH.reshape(B, T, N * H))
