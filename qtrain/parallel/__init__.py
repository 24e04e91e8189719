"""The mesh from ``config.mesh``, the logical-axis rules that map model axes
onto it, and multi-host start-up."""

from qtrain.parallel.mesh import AXES, BATCH_AXES, MeshError, check_mesh, make_mesh, mesh_sizes
from qtrain.parallel.rules import (Layout, batch_sharding, data_shard, logical_rules,
                                   logical_sharding, replicated, sharding_context)
