"""The logical axis names of the model's activations (params name theirs
where they are created: ``("embed", "q_heads")``, ...).

Activations have names of their own (``activation_*``), distinct from the
params', so ``qtrain.parallel.rules`` can split a weight's model width over
``fsdp`` while activations of that width stay whole, and split the residual
stream along the sequence (sequence parallelism) while attention sees it whole.
"""

import jax
from jax.sharding import PartitionSpec as P

# The residual stream [B, T, D] between blocks and around the norms.
RESIDUAL = ("activation_batch", "activation_norm_length", "activation_embed")
# Per-head activations [B, T, N|K, H]: queries, keys, values, attention output.
HEADS = {"q": ("activation_batch", "activation_length", "activation_heads", None),
         "kv": ("activation_batch", "activation_length", "activation_kv_heads", None)}
# The MLP hidden [B, T, F] (gate * up, the down projection's input).
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")
# Logits [B, T, V].
LOGITS = ("activation_batch", "activation_length", "activation_vocab")


def splits_evenly(shape, spec, mesh) -> bool:
  """Every dim of ``shape`` divides by the product of the mesh axes ``spec``
  gives it (``shard_map`` needs that; ``jit`` would pad)."""
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in axes:
      size *= mesh.shape[a]
    if dim % size:
      return False
  return True


def _local_kv_heads(k, v, q_heads_axis, n_q_local, group):
  """Inside a ``shard_map`` where the q heads are split over ``q_heads_axis``
  but the kv heads are not (fewer kv heads than ``tensor``): the kv head(s)
  of this shard's q heads, ``group`` q heads per kv head."""
  count = max(1, n_q_local // group)
  start = jax.lax.axis_index(q_heads_axis) * n_q_local // group
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, count, axis=2)
  return take(k), take(v)


def per_device_attention(fn, q_spec, kv_spec, q_BTNH, k_BSKH, v_BSKH, *tokens_BT):
  """``fn(q, k, v, *tokens)`` on each device's shard in a ``shard_map`` over
  the axes the specs name: q/k/v split by ``q_spec`` / ``kv_spec``, each
  [B, T] token array (positions, segment ids) as q's rows and length. Where
  the q heads are split but the kv heads are not (GQA with fewer kv heads
  than ``tensor``), ``fn`` gets the kv heads of its own q heads. The caller
  checks that the shapes split (``splits_evenly``)."""
  mesh = jax.sharding.get_abstract_mesh()
  N, K = q_BTNH.shape[2], k_BSKH.shape[2]
  q_heads_axis = q_spec[2] if q_spec[2] != kv_spec[2] else None
  n_q_local = N // (mesh.shape[q_heads_axis] if q_heads_axis else 1)

  def local(q, k, v, *tokens):
    if q_heads_axis is not None:
      k, v = _local_kv_heads(k, v, q_heads_axis, n_q_local, N // K)
    return fn(q, k, v, *tokens)

  specs = (q_spec, kv_spec, kv_spec) + (P(q_spec[0], q_spec[1]),) * len(tokens_BT)
  # check_vma off: context parallelism's skipped blocks make fresh zeros, which
  # the varying-axes check would ask to cast to each input's axes, and a
  # pipeline stage's own shard_map runs without it.
  return jax.shard_map(local, in_specs=specs, out_specs=q_spec, check_vma=False)(
      q_BTNH, k_BSKH, v_BSKH, *tokens_BT)
