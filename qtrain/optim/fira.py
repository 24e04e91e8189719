"""Fira (Chen et al. 2024, arXiv 2410.01623) on top of GaLore, registered as
``fira``: GaLore's low-rank Adam plus the gradient outside the subspace,
scaled by how Adam rescaled the part inside it.

For one matrix G with GaLore projector P (optax's orientation: R = P^T G when
m >= n, R = G P otherwise) and psi(R) the Adam update of R::

  W <- W - lr * scale * (P psi(R) + S),   S = limit(phi(R) * (G - P R))

phi is the channel-wise norm ratio ||psi(R)_c|| / (||R_c|| + 1e-8) over the
channels the projection keeps (columns of R = P^T G, rows of R = G P), applied
to the same channels of the residual. The norm-growth limiter: when
||S_t|| / ||S_{t-1}|| > gamma (1.01), S_t is scaled down to gamma ||S_{t-1}||;
the limited norm is what the next step compares against (Fira's reference
code). ``scale`` multiplies the whole update (Fira's formula has one lr for
both terms; its reference setup uses scale 1).

Built from ``optax.contrib.scale_by_galore`` (scale 1): psi(R) is recovered as
P^T u from GaLore's update u = P psi(R) (P has orthonormal columns), R from the
refreshed projector in GaLore's state. Scanned stacks are handled per matrix
(``galore.per_matrix``); the limiter's previous norm is one float per matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import scale_by_galore

from qtrain.optim.galore import stacked_or_flat, validate_projection
from qtrain.optim.registry import register_optimizer

EPS = 1e-8  # Fira's guard in the norm ratios.


class FiraState(NamedTuple):
  galore: optax.OptState  # optax.contrib GaLoreState (projector, Adam moments of R).
  residual_norm: optax.Updates  # ||S_{t-1}|| after limiting, a float32 scalar per leaf.


def fira_residual(g, p, psi_r, r, gamma: float, prev_norm, first):
  """S = limit(phi(R) * (G - back(R))) for one m x n matrix; returns (S, ||S||)."""
  if g.shape[0] >= g.shape[1]:  # R = P^T G: r x n, channels are the columns.
    resid = g - p @ r
    phi = jnp.linalg.norm(psi_r, axis=0) / (jnp.linalg.norm(r, axis=0) + EPS)
    s = resid * phi[None, :]
  else:  # R = G P: m x r, channels are the rows.
    resid = g - r @ p.T
    phi = jnp.linalg.norm(psi_r, axis=1) / (jnp.linalg.norm(r, axis=1) + EPS)
    s = resid * phi[:, None]
  norm = jnp.linalg.norm(s)
  if gamma > 0:  # Norm-growth limiter (off on the first step: nothing to compare with).
    limiter = jnp.where(first, 1.0, jnp.maximum(norm / (prev_norm + EPS), gamma) / gamma)
    s, norm = s / limiter, norm / limiter
  return s, norm


def scale_by_fira(rank: int, update_proj_gap: int, scale: float, gamma: float,
                  base_optimizer: optax.GradientTransformation,
                  weight_dimension_numbers) -> optax.GradientTransformation:
  """Fira's update direction for unstacked leaves (see the module docstring);
  ``weight_dimension_numbers(tree)`` marks the matrices (others: plain
  ``base_optimizer``, unscaled, as in GaLore)."""
  galore = scale_by_galore(rank=rank, update_proj_gap=update_proj_gap, scale=1.0,
                           base_optimizer=base_optimizer,
                           weight_dimension_numbers=weight_dimension_numbers)

  def init(params):
    return FiraState(galore.init(params),
                     jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params))

  def update(grads, state, params=None):
    del params
    first = state.galore.count == 0
    u, galore_state = galore.update(grads, state.galore)
    dims = weight_dimension_numbers(grads)

    def leaf(g, u, p, prev, dim):
      if dim is None:
        return u, prev
      g32, p32, u32 = (x.astype(jnp.float32) for x in (g, p, u))
      if g.shape[0] >= g.shape[1]:
        r, psi_r = p32.T @ g32, p32.T @ u32
      else:
        r, psi_r = g32 @ p32, u32 @ p32
      s, norm = fira_residual(g32, p32, psi_r, r, gamma, prev, first)
      return (scale * (u32 + s)).astype(g.dtype), norm

    out = jax.tree.map(leaf, grads, u, galore_state.projector, state.residual_norm, dims,
                       is_leaf=lambda x: x is None)
    treedef = jax.tree.structure(grads)
    updates, norms = jax.tree.transpose(treedef, jax.tree.structure((0, 0)), out)
    return updates, FiraState(galore_state, norms)

  return optax.GradientTransformation(init, update)


def build_fira(c, *, learning_rate, weight_decay, decay_mask, params):
  adam = optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)
  make = lambda dims: scale_by_fira(c.rank, c.update_proj_gap, c.scale, c.gamma, adam, dims)
  return optax.chain(stacked_or_flat(make, params, adam),
                     optax.add_decayed_weights(weight_decay, decay_mask),
                     optax.scale_by_learning_rate(learning_rate))


def validate_fira(c, where: str) -> None:
  validate_projection(c, where)
  if not (c.gamma == 0 or c.gamma >= 1.0):
    raise ValueError(f"{where}.gamma={c.gamma} must be >= 1 (Fira's 1.01), or 0 for no limiter")


register_optimizer("fira", build_fira, validate_fira)
