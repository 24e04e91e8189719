"""Shardings of an optimizer state of any shape.

A state leaf belongs to the param whose tree path is the longest suffix of
the leaf's path (optax states nest the params' tree: ``mu/decoder/...``;
a GaLore-style projector ``[m, r]`` kept per param too). The leaf takes the
param's mesh axes on each dimension whose size equals the param's at that
index (and divides by the mesh axes); other dimensions, and leaves of no
param (counts, scalars), are replicated. So param-shaped moments are sharded
like their params, and a state of another shape still gets a valid sharding
(the optax placeholder trick, ``tree_map_params``, would give a projector its
param's full spec).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from qtrain.optim.groups import path_keys


def _axes_size(mesh, axes) -> int:
  names = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[n] for n in names)


def derived_spec(shape, param_shape, param_spec, mesh) -> PartitionSpec:
  """The param's spec kept on the dimensions where the leaf matches it."""
  spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
  out = []
  for i, n in enumerate(shape):
    axes = spec[i] if i < len(param_shape) and param_shape[i] == n else None
    if axes is not None and n % _axes_size(mesh, axes):
      axes = None
    out.append(axes)
  return PartitionSpec(*out)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """NamedShardings for every leaf of ``abstract_opt_state`` (e.g.
  ``jax.eval_shape(tx.init, params)``); ``param_shardings`` mirrors
  ``abstract_params`` (unboxed)."""
  params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  shardings = jax.tree.leaves(param_shardings)
  by_path = {path_keys(p): (leaf.shape, sh) for (p, leaf), sh in zip(params, shardings)}

  def leaf_sharding(path, leaf):
    keys = path_keys(path)
    for start in range(len(keys)):  # Longest suffix first.
      if keys[start:] in by_path:
        shape, sharding = by_path[keys[start:]]
        if tuple(leaf.shape) == tuple(shape):  # A moment: exactly its param's sharding.
          return sharding
        return NamedSharding(mesh, derived_spec(leaf.shape, shape, sharding.spec, mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)
