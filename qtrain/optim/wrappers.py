"""Restarts (Glentis et al. 2025, arXiv 2505.22922): momentum reset and weight
refactorization, each a wrapper around any inner optax transform.

* ``momentum_reset(inner, every, moments)``: before the update whose count is
  a positive multiple of ``every``, the inner state's leaves under a field
  named in ``moments`` (Adam's ``mu``/``nu``, Muon's ``mu``, APOLLO's, those
  of GaLore's inner Adam) are zeroed; counts, projectors and every other leaf
  are kept. With ``every`` equal to GaLore's ``update_proj_gap`` the reset
  falls on the update that refreshes the projection (both count applied
  updates from 0).
* ``refactorize(inner, every, pairs)``: after the inner update of every
  ``every``-th update, each low-rank pair (``.../a`` [in, r], ``.../b``
  [r, out]; y = x A B) of the updated params is re-split from the SVD of its
  product, A B = U S V^T: A <- U sqrt(S), B <- sqrt(S) V^T (the paper's
  alpha = 1/2, best Hessian conditioning). The product, so the layer's
  function, is unchanged; the factors are balanced (A^T A = B B^T = S). It is a
  params transform, so the wrapper emits it as part of the update:
  u' = refactor(p + u) - p. The SVD costs two thin QRs and one r x r SVD per
  pair (A = Q_a R_a, B^T = Q_b R_b, R_a R_b^T = U' S V'^T, U = Q_a U'),
  batched over a scanned stack, only on those steps (``lax.cond``).

``wrap(tx, optim_cfg, params)`` applies both from ``config.optim.restarts``
and ``config.optim.refactor`` (``every=0``: off) to a group's transform.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qtrain.config.validate import ConfigError
from qtrain.optim.groups import param_path


class WrapperState(NamedTuple):
  count: jax.Array  # Updates applied (int32).
  inner: optax.OptState


def _due(count, every: int):
  return (count > 0) & (count % every == 0)


def zero_moments(state, moments: tuple[str, ...]):
  """``state`` with every leaf under a NamedTuple field in ``moments`` zeroed."""

  def leaf(path, x):
    names = {k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)}
    return jnp.zeros_like(x) if names & set(moments) else x

  return jax.tree_util.tree_map_with_path(leaf, state)


def momentum_reset(inner: optax.GradientTransformation, every: int,
                   moments: tuple[str, ...] = ("mu", "nu")) -> optax.GradientTransformation:
  """``inner`` whose moments restart from zero every ``every`` updates."""
  moments = tuple(moments)

  def init(params):
    return WrapperState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    inner_state = jax.lax.cond(_due(state.count, every),
                               lambda s: zero_moments(s, moments), lambda s: s, state.inner)
    updates, inner_state = inner.update(updates, inner_state, params)
    return updates, WrapperState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformation(init, update)


def balanced_factors(a, b):
  """(U sqrt(S), sqrt(S) V^T) of A B = U S V^T, for A [..., in, r], B [..., r, out].

  A scanned stack is re-split one matrix at a time (``lax.map`` over the
  leading axes), not by batched QR/SVD: on CPU, jaxlib 0.10's batched QR runs
  on the intra-op thread pool and deadlocked on a 2-core machine when the
  refactorization step issued several at once (every pool thread waiting in a
  QR for work only a pool thread could run). It runs once every
  ``refactor.every`` steps, so the serial loop costs nothing measurable.
  """
  if a.ndim > 2:
    return jax.lax.map(lambda ab: balanced_factors(*ab), (a, b))
  dtype = a.dtype
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  q_a, r_a = jnp.linalg.qr(a)
  q_b, r_b = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))
  u, s, vt = jnp.linalg.svd(r_a @ jnp.swapaxes(r_b, -1, -2), full_matrices=False)
  root = jnp.sqrt(s)
  new_a = (q_a @ u) * root[..., None, :]
  new_b = root[..., :, None] * (vt @ jnp.swapaxes(q_b, -1, -2))
  return new_a.astype(dtype), new_b.astype(dtype)


def low_rank_pairs(paths) -> list[tuple[str, str]]:
  """(a, b) paths of the low-rank factors among ``paths``; ConfigError for a
  factor whose partner is not among them (both must be in one group)."""
  paths = set(paths)
  pairs = []
  for p in sorted(paths):
    stem, leaf = p.rpartition("/")[0], p.rpartition("/")[2]
    partner = {"a": f"{stem}/b", "b": f"{stem}/a"}.get(leaf)
    if partner is None:
      continue
    if partner not in paths:
      raise ConfigError(f"config.optim.groups: {p!r} is a low-rank factor whose partner "
                        f"{partner!r} is in another group; config.optim.refactor re-splits "
                        "both together: put them in one group")
    if leaf == "a":
      pairs.append((p, partner))
  return pairs


def check_ranks(pairs, params: dict) -> None:
  """ConfigError for a pair whose rank r is not below both of its dims: A B then
  has rank < r, and its SVD leaves factor directions at zero, where they get
  no gradient again (keep such a layer dense, or lower the rank)."""
  for a, b in pairs:
    shape_a, shape_b = (tuple(getattr(params[k], "value", params[k]).shape) for k in (a, b))
    fan_in, r, fan_out = shape_a[-2], shape_a[-1], shape_b[-1]
    if r >= min(fan_in, fan_out):
      raise ConfigError(f"config.model.weight_forms: {a[:-2]} has rank {r} >= min(in, out) = "
                        f"{min(fan_in, fan_out)}; config.optim.refactor would zero factor "
                        "directions for good: lower the rank or keep this layer dense")


def refactorize(inner: optax.GradientTransformation, every: int,
                pairs: list[tuple[str, str]]) -> optax.GradientTransformation:
  """``inner``, then every ``every`` updates the pairs re-split (see module)."""
  pairs_by_a = dict(pairs)

  def rebalance(new_params):
    flat = {param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(new_params)[0]}
    out = dict(flat)
    for a, b in pairs_by_a.items():
      out[a], out[b] = balanced_factors(flat[a], flat[b])
    return jax.tree_util.tree_map_with_path(lambda p, _: out[param_path(p)], new_params)

  def init(params):
    return WrapperState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("refactorize needs params (tx.update(grads, state, params))")
    updates, inner_state = inner.update(updates, state.inner, params)
    count = optax.safe_increment(state.count)

    def refactored(u):
      new = optax.apply_updates(params, u)
      return jax.tree.map(lambda n, p: (n - p).astype(p.dtype), rebalance(new), params)

    updates = jax.lax.cond(_due(count, every), refactored, lambda u: u, updates)
    return updates, WrapperState(count, inner_state)

  return optax.GradientTransformation(init, update)


def wrap(tx: optax.GradientTransformation, optim_cfg, params: dict) -> optax.GradientTransformation:
  """A group's transform with ``config.optim.refactor`` (outer) and
  ``config.optim.restarts`` (inner) applied; ``params`` {path: abstract param}."""
  restarts, refactor = optim_cfg.get("restarts"), optim_cfg.get("refactor")
  if restarts is not None and restarts.every > 0:
    tx = momentum_reset(tx, restarts.every, tuple(restarts.moments))
  if refactor is not None and refactor.every > 0:
    pairs = low_rank_pairs(params)
    check_ranks(pairs, params)
    if pairs:
      tx = refactorize(tx, refactor.every, pairs)
  return tx


def validate_wrappers(optim_cfg) -> None:
  """ConfigError naming a bad ``config.optim.restarts`` / ``refactor`` field."""
  for group in ("restarts", "refactor"):
    c = optim_cfg.get(group)
    if c is not None and not (isinstance(c.every, int) and c.every >= 0):
      raise ConfigError(f"config.optim.{group}.every={c.every!r} must be an int >= 0 "
                        "(updates between restarts; 0 = off)")
  restarts = optim_cfg.get("restarts")
  if restarts is not None and not (restarts.moments and all(isinstance(m, str) and m
                                                            for m in restarts.moments)):
    raise ConfigError(f"config.optim.restarts.moments={tuple(restarts.moments)!r} must name "
                      "state fields, e.g. ('mu', 'nu') (Adam's moments)")

