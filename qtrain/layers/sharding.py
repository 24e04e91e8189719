"""The logical axis names of the model's activations (params name theirs
where they are created: ``("embed", "q_heads")``, ...).

Activations have names of their own (``activation_*``), distinct from the
params', so ``qtrain.parallel.rules`` can split a weight's model width over
``fsdp`` while activations of that width stay whole, and split the residual
stream along the sequence (sequence parallelism) while attention sees it whole.
"""

import jax

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


def local_kv_heads(k, v, q_heads_axis, n_q_local, group):
  """Inside a ``shard_map`` where the q heads are split over ``q_heads_axis``
  but the kv heads are not (fewer kv heads than ``tensor``): the kv head(s)
  of this shard's q heads, ``group`` q heads per kv head."""
  count = max(1, n_q_local // group)
  start = jax.lax.axis_index(q_heads_axis) * n_q_local // group
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, count, axis=2)
  return take(k), take(v)
