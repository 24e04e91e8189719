"""Token embedding lookup, vocab-parallel when the table is split over a mesh axis.

With the table's rows split over ``tensor`` (the ``vocab`` rule), a plain
``jnp.take`` leaves XLA no local way to gather: it all-gathers the token ids
and moves activations of the whole global batch onto every device. Megatron's
lookup instead runs per shard (``jax.shard_map``): each device looks up the
ids that fall in its rows (zero for the others), and a reduce-scatter over
``tensor`` sums the shards' partial rows and splits the result along the
sequence, which is the sequence-parallel residual layout the blocks expect.
The table's model width, split over ``fsdp``, is gathered first (its
transpose reduce-scatters the gradient, as everywhere under FSDP).

Without a mesh, or with an unsplit vocabulary, it is ``jnp.take``: the same
function (each output row is one table row, exactly).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def _axes(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


def lookup(table_VD, tokens_BT):
  """``table_VD[tokens_BT]`` ([B, T, D]), vocab-parallel under a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return jnp.take(table_VD, tokens_BT, axis=0)
  vocab, width = (_axes(a) for a in nn.logical_to_mesh_axes(("vocab", "embed")))
  batch = _axes(nn.logical_to_mesh_axes(("activation_batch",))[0])
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  (B, T), V = tokens_BT.shape, table_VD.shape[0]
  if size(vocab) == 1 or V % size(vocab) or T % size(vocab) or B % size(batch):
    # Unsplit vocabulary, or a shape the shards cannot split evenly (the
    # one-row init trace, decoding one token): XLA's general lookup.
    return jnp.take(table_VD, tokens_BT, axis=0)

  def local(table_vd, tokens_bt):
    for a in width:  # The model width, split over fsdp: whole rows first.
      table_vd = jax.lax.all_gather(table_vd, a, axis=1, tiled=True)
    shard = 0
    for a in vocab:  # This device's first row (row-major over the vocab axes).
      shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
    ids_bt = tokens_bt - shard * table_vd.shape[0]
    mine_bt = (ids_bt >= 0) & (ids_bt < table_vd.shape[0])
    x_btd = jnp.take(table_vd, jnp.where(mine_bt, ids_bt, 0), axis=0)
    x_btd = jnp.where(mine_bt[..., None], x_btd, jnp.zeros((), x_btd.dtype))
    return jax.lax.psum_scatter(x_btd, vocab, scatter_dimension=1, tiled=True)

  batch_spec = batch or None
  return jax.shard_map(
      local, in_specs=(P(vocab, width or None), P(batch_spec, None)),
      out_specs=P(batch_spec, vocab, None))(table_VD, tokens_BT)
