"""GaLore (Zhao et al. 2024, arXiv 2403.03507) through ``optax.contrib.galore``,
registered as ``galore``; the per-matrix view of scanned weights that GaLore,
Fira and APOLLO share.

GaLore projects each matrix's gradient G onto its top-r singular subspace
(P from an SVD of G every ``update_proj_gap`` updates), runs Adam on the r-row
(or r-column) projection R and maps the result back, times ``scale``:
update = scale * P adam(P^T G). The state is Adam's two moments of R plus P:
for an m x n matrix r * (2 min(m, n) + max(m, n)) floats instead of 2 m n.

What ``optax.contrib.galore`` (optax 0.2.8, the CPU and the GPU image) cannot
do, and what this module adds:

* Scanned weights [L, in, out]: its ``GaLoreDimensionNumbers`` must name every
  axis as reduction or output, so a layer axis would fold L matrices into one
  (L*in) x out matrix with one shared subspace. ``per_matrix`` vmaps the
  transform over the axis whose logical name is ``layers`` (from the builder's
  ``params`` {path: nn.Partitioned}): each layer gets its own SVD, projector
  and moments, stored stacked ([L, m, r], [L, r, n]) so the state keeps the
  layer axis first like the params. Step counts (integer scalars) stay shared
  (unbatched), so the projection refresh remains a ``lax.cond`` on one
  predicate: the SVD runs only on refresh steps.
* FSDP-sharded params: it runs as is (tests/test_optim.py's contract runs it
  on 8 devices). The SVD has no SPMD partitioning rule, so XLA gathers each
  matrix to every device of its sharding for the refresh step, and every
  device computes the same SVD; between refreshes P^T G and P R are ordinary
  sharded matmuls. Spreading the SVDs over devices (whole matrices per device,
  as ``muon.py``'s stacked Newton-Schulz does) is what a large-mesh run would
  add. Projector and moments are sharded like their param on the dimension
  they share with it (``optim/sharding.py``).

Non-matrix params of a galore group (norm scales, LSQ steps) get plain Adam
on the full gradient, as in optax (here outside its transform: optax keeps a
zero-size projector for them, which orbax cannot checkpoint). Weight decay is decoupled and masked, after
the projection (optax's ``galore`` does the same).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreDimensionNumbers, scale_by_galore

from qtrain.config.validate import ConfigError
from qtrain.optim.groups import param_path
from qtrain.optim.registry import register_optimizer

# Logical names of axes that stack matrices (the nn.scan layer axis).
BATCH_NAMES = ("layers",)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a param is seen by the projecting optimizers: a matrix (its last two
  non-batch axes are (in, out)) with at most one stacking axis, or not a
  matrix (norm scales, steps, biases)."""
  shape: tuple[int, ...]
  batch_axis: int | None  # The layer axis of a scanned stack.
  is_matrix: bool


def layout_of(path: str, leaf) -> Layout:
  """The ``Layout`` of a boxed (``nn.Partitioned``) or plain abstract param.
  Without logical names a 3-D param is a [L, in, out] stack."""
  names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None
  shape = tuple((leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape)
  if names is None:
    batch = (0,) if len(shape) == 3 else ()
  else:
    batch = tuple(i for i, n in enumerate(names) if n in BATCH_NAMES)
  if len(batch) > 1:
    raise ConfigError(f"config.optim.groups: param {path!r} (shape {shape}, axes {names}) has "
                      f"{len(batch)} stacking axes; the projecting optimizers handle one")
  rest = [shape[i] for i in range(len(shape)) if i not in batch]
  is_matrix = len(rest) == 2 and min(rest) >= 2 and not (names and "norm" in names)
  return Layout(shape, batch[0] if batch else None, is_matrix)


def layouts(params: dict) -> dict[str, Layout]:
  """{path: Layout} of the builder's {path: boxed abstract param}."""
  return {path: layout_of(path, leaf) for path, leaf in params.items()}


def by_path(tree, fn):
  """``fn(path)`` at every leaf of ``tree`` (MaskedNode subtrees stay empty)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), tree)


def _state_axes(state):
  """vmap axes of a per-matrix state: integer scalars are step counts shared
  by every matrix of the stack (None); every other leaf is per matrix (0)."""
  return jax.tree.map(
      lambda x: None if (jnp.ndim(x) == 0 and jnp.issubdtype(x.dtype, jnp.integer)) else 0,
      state)


def per_matrix(inner: optax.GradientTransformation, batch_axes) -> optax.GradientTransformation:
  """``inner`` (written for unstacked leaves) applied to each matrix of
  stacked leaves: ``batch_axes(tree)`` gives each leaf's stacking axis. The
  state's per-matrix leaves are stacked on axis 0; its step counts are not."""

  def init(params):
    if not jax.tree.leaves(params):  # A group with no stacks (all MaskedNode).
      return inner.init(params)
    axes = batch_axes(params)
    one = jax.tree.map(lambda p, a: jax.ShapeDtypeStruct(p.shape[:a] + p.shape[a + 1:], p.dtype),
                       params, axes)
    out_axes = _state_axes(jax.eval_shape(inner.init, one))
    return jax.vmap(inner.init, in_axes=(axes,), out_axes=out_axes)(params)

  def update(updates, state, params=None):
    del params  # The projecting transforms read gradients only.
    if not jax.tree.leaves(updates):
      return updates, state
    axes, s_axes = batch_axes(updates), _state_axes(state)
    return jax.vmap(lambda u, s: inner.update(u, s, None), in_axes=(axes, s_axes),
                    out_axes=(axes, s_axes))(updates, state)

  return optax.GradientTransformation(init, update)


def stacked_or_flat(make, params: dict, other: optax.GradientTransformation
                    ) -> optax.GradientTransformation:
  """``make(dims)`` for the group's unstacked matrices and, vmapped per
  matrix, for its scanned stacks; ``other`` for params that are not matrices
  (optax's galore would keep a zero-size projector for them, which orbax
  refuses to save). ``dims(tree)`` marks every leaf it sees as a matrix."""
  lay = layouts(params)
  dims = lambda tree: by_path(tree, lambda p: GaLoreDimensionNumbers(0, 1))
  labels = lambda tree: by_path(tree, lambda p: "other" if not lay[p].is_matrix else (
      "stacked" if lay[p].batch_axis is not None else "flat"))
  axes = lambda tree: by_path(tree, lambda p: lay[p].batch_axis)
  return optax.partition({"flat": _empty_ok(make(dims)), "stacked": per_matrix(make(dims), axes),
                          "other": other}, labels)


def _empty_ok(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` that passes a tree with no leaves through (optax's galore update
  fails on one: a group's label that no param of a partition has)."""

  def update(updates, state, params=None):
    if not jax.tree.leaves(updates):
      return updates, state
    return tx.update(updates, state, params)

  return optax.GradientTransformation(tx.init, update)


# ------------------------------------------------------------- the registry --


def build_galore(c, *, learning_rate, weight_decay, decay_mask, params):
  """optax.contrib.scale_by_galore per matrix (see the module docstring)."""
  adam = optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)
  make = lambda dims: scale_by_galore(rank=c.rank, update_proj_gap=c.update_proj_gap,
                                      scale=c.scale, base_optimizer=adam,
                                      weight_dimension_numbers=dims)
  return optax.chain(stacked_or_flat(make, params, adam),
                     optax.add_decayed_weights(weight_decay, decay_mask),
                     optax.scale_by_learning_rate(learning_rate))


def validate_projection(c, where: str) -> None:
  """Fields GaLore, Fira and APOLLO share."""
  if not (isinstance(c.rank, int) and c.rank >= 1):
    raise ValueError(f"{where}.rank={c.rank!r} must be an int >= 1")
  if not (isinstance(c.update_proj_gap, int) and c.update_proj_gap >= 1):
    raise ValueError(f"{where}.update_proj_gap={c.update_proj_gap!r} must be an int >= 1 "
                     "(updates between projection refreshes)")
  if not c.scale > 0:
    raise ValueError(f"{where}.scale={c.scale} must be > 0")
  for field in ("b1", "b2"):
    if not 0.0 <= c[field] < 1.0:
      raise ValueError(f"{where}.{field}={c[field]} must be in [0, 1)")
  if not c.eps > 0:
    raise ValueError(f"{where}.eps={c.eps} must be > 0")


register_optimizer("galore", build_galore, validate_projection)
