"""Meshes and the logical-axis rules that map model axes onto them."""

from qtrain.parallel.mesh import make_mesh
from qtrain.parallel.rules import DATA_PARALLEL_RULES, batch_sharding, logical_sharding, replicated
