"""APOLLO and APOLLO-Mini (Zhu et al., MLSys 2025, arXiv 2412.05270),
registered as ``apollo`` (``config.optim.apollo.mode`` picks the variant).

AdamW's update is the gradient times an element-wise scaling; APOLLO keeps
that scaling only per channel (APOLLO) or per tensor (APOLLO-Mini), and
estimates it from Adam moments of a random projection of the gradient, so no
SVD is needed and the state is two r x n moments per m x n matrix. For one
matrix G (m >= n; otherwise transposed roles, channels being the rows)::

  R = P G                            P [r, m], entries N(0, 1/r), redrawn from a
                                     seed every update_proj_gap updates (not stored)
  M, V = Adam moments of R           bias-corrected: R~ = M^ / (sqrt(V^) + eps)
  s_c = ||R~_c|| / (||R_c|| + 1e-8)  per column c (channel), or one ratio of
                                     whole-tensor norms (mini, rank 1)
  S = limit(G * s)                   Fira's norm-growth limiter, gamma = 1.01
  W <- W - lr * scale * S            (decoupled, masked weight decay besides)

``scale`` is the paper's alpha: 1 for APOLLO, sqrt(128) for APOLLO-Mini (its
reference setting: with P norm-preserving, ||R~|| of Adam-normalised entries
grows with sqrt(r), so a rank-1 ratio is far below AdamW's update norm). The moments
are kept across projection refreshes, as in the reference code. Params that
are not matrices get AdamW (the paper's setting). Scanned stacks [L, m, n]
are batched natively: each layer draws its own P from the same seed folded
with the layer, and has its own norms and limiter state.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qtrain.optim.galore import layouts, validate_projection
from qtrain.optim.groups import param_path
from qtrain.optim.registry import register_optimizer

EPS = 1e-8  # APOLLO's (and Fira's) guard in the norm ratios.
MODES = ("apollo", "mini")


class ApolloState(NamedTuple):
  count: jax.Array  # Updates applied (int32).
  mu: optax.Updates  # First moment: of R [..., r, n] for matrices, of G otherwise.
  nu: optax.Updates  # Second moment, same shapes.
  scaled_norm: optax.Updates  # ||S_{t-1}|| after limiting, one float32 per matrix.


def _as_mn(x, axis):
  """The leaf as [..., m, n] with m >= n (the stack axis first), and how to undo it."""
  if axis not in (None, 0):
    x = jnp.moveaxis(x, axis, 0)
  tall = x.shape[-2] >= x.shape[-1]
  x = x if tall else jnp.swapaxes(x, -1, -2)

  def back(y):
    y = y if tall else jnp.swapaxes(y, -1, -2)
    return y if axis in (None, 0) else jnp.moveaxis(y, 0, axis)

  return x, back


def projection(key, batch: tuple[int, ...], rank: int, m: int):
  """P [..., r, m] with entries N(0, 1/r): each matrix of a stack its own."""
  return jax.random.normal(key, (*batch, rank, m), jnp.float32) / jnp.sqrt(rank)


def channel_scale(r_tilde, r, tensor_wise: bool):
  """s over the kept channels (columns of R), [..., 1, n]; one ratio per matrix
  [..., 1, 1] when ``tensor_wise``."""
  axes = (-2, -1) if tensor_wise else (-2,)
  return (jnp.sqrt(jnp.sum(r_tilde ** 2, axis=axes, keepdims=True))
          / (jnp.sqrt(jnp.sum(r ** 2, axis=axes, keepdims=True)) + EPS))


def limit(s, prev_norm, gamma: float, first):
  """Fira's norm-growth limiter per matrix: S scaled so ||S_t|| <= gamma ||S_{t-1}||."""
  norm = jnp.sqrt(jnp.sum(s ** 2, axis=(-2, -1)))
  if gamma <= 0:
    return s, norm
  limiter = jnp.where(first, 1.0, jnp.maximum(norm / (prev_norm + EPS), gamma) / gamma)
  return s / limiter[..., None, None], norm / limiter


def _moment_shape(lay, shape, rank: int) -> tuple[int, ...]:
  """Adam moments: of R [..., min(r, m), n] for a matrix (as [..., m, n], m >= n)."""
  if not lay.is_matrix:
    return shape
  dims = [d for i, d in enumerate(shape) if i != lay.batch_axis]
  batch = () if lay.batch_axis is None else (shape[lay.batch_axis],)
  m, n = max(dims), min(dims)
  return (*batch, min(rank, m), n)


def _matrices(lay, shape) -> tuple[int, ...]:
  """Shape of one float per matrix: [L] for a stack, [] otherwise."""
  return (shape[lay.batch_axis],) if lay.is_matrix and lay.batch_axis is not None else ()


def scale_by_apollo(layout: dict, *, rank: int, update_proj_gap: int, tensor_wise: bool,
                    scale: float, gamma: float, b1: float, b2: float, eps: float,
                    seed: int = 0) -> optax.GradientTransformation:
  """APOLLO's scaled gradient for the params of ``layout`` ({path: Layout})."""

  def init(params):
    zeros = lambda shape: jnp.zeros(shape, jnp.float32)
    mu = jax.tree_util.tree_map_with_path(
        lambda p, x: zeros(_moment_shape(layout[param_path(p)], x.shape, rank)), params)
    norms = jax.tree_util.tree_map_with_path(
        lambda p, x: zeros(_matrices(layout[param_path(p)], x.shape)), params)
    return ApolloState(jnp.zeros((), jnp.int32), mu, jax.tree.map(jnp.zeros_like, mu), norms)

  def update(grads, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    first = state.count == 0
    # One key per projection period: P is redrawn, never stored.
    key = jax.random.fold_in(jax.random.key(seed), state.count // update_proj_gap)
    bc1, bc2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)

    def leaf(path, g, m, v, prev):
      path = param_path(path)
      lay = layout[path]
      g32 = g.astype(jnp.float32)
      if not lay.is_matrix:  # Adam.
        m, v = b1 * m + (1 - b1) * g32, b2 * v + (1 - b2) * g32 ** 2
        return (m / bc1) / (jnp.sqrt(v / bc2) + eps), m, v, prev
      x, back = _as_mn(g32, lay.batch_axis)
      p = projection(jax.random.fold_in(key, zlib.crc32(path.encode())), x.shape[:-2],
                     m.shape[-2], x.shape[-2])
      r = p @ x
      m, v = b1 * m + (1 - b1) * r, b2 * v + (1 - b2) * r ** 2
      r_tilde = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
      s, norm = limit(x * channel_scale(r_tilde, r, tensor_wise), prev, gamma, first)
      return scale * back(s), m, v, norm

    out = jax.tree_util.tree_map_with_path(leaf, grads, state.mu, state.nu, state.scaled_norm)
    u, mu, nu, norms = jax.tree.transpose(jax.tree.structure(grads),
                                          jax.tree.structure((0,) * 4), out)
    u = jax.tree.map(lambda x, g: x.astype(g.dtype), u, grads)
    return u, ApolloState(count, mu, nu, norms)

  return optax.GradientTransformation(init, update)


def build_apollo(c, *, learning_rate, weight_decay, decay_mask, params):
  mini = c.mode == "mini"
  return optax.chain(
      scale_by_apollo(layouts(params), rank=1 if mini else c.rank,
                      update_proj_gap=c.update_proj_gap, tensor_wise=mini, scale=c.scale,
                      gamma=c.gamma, b1=c.b1, b2=c.b2, eps=c.eps, seed=c.seed),
      optax.add_decayed_weights(weight_decay, decay_mask),
      optax.scale_by_learning_rate(learning_rate))


def validate_apollo(c, where: str) -> None:
  validate_projection(c, where)
  if c.mode not in MODES:
    raise ValueError(f"{where}.mode={c.mode!r}; use one of {MODES} (mini: rank 1, tensor-wise)")
  if not (c.gamma == 0 or c.gamma >= 1.0):
    raise ValueError(f"{where}.gamma={c.gamma} must be >= 1 (Fira's 1.01), or 0 for no limiter")


register_optimizer("apollo", build_apollo, validate_apollo)
