"""Logical axis names -> mesh axes: the one table that decides sharding.

Params carry logical names (``("embed", "mlp")``); activations are constrained
with ``("batch", "length", "embed")``. Changing the parallelism edits this
table, never the model.
"""

from __future__ import annotations

import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec

# Pure data parallelism: the batch is split over `data`, params replicated.
DATA_PARALLEL_RULES = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("vocab", None),
    ("q_heads", None),
    ("kv_heads", None),
    ("mlp", None),
    ("norm", None),
    ("layers", None),
)


def logical_sharding(abstract_tree, mesh, rules=DATA_PARALLEL_RULES):
  """NamedShardings for a tree of (possibly LogicallyPartitioned) leaves."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh) -> NamedSharding:
  """[B, T] arrays split over the data axis."""
  return NamedSharding(mesh, PartitionSpec("data", None))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


