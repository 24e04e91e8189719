"""The device mesh.

For now a data-parallel mesh over every device (``data`` axis); the
parallelism issue adds fsdp/tensor/sequence/pipeline axes from the config.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  # Auto axes: shardings come from jit in/out shardings and logical constraints.
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,),
                       devices=devices)
