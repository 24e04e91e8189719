"""Compressed data-parallel gradient exchange: ``dense``, ``dgc``, ``powersgd``.

Runs inside a ``shard_map`` over the ``data`` axis (``qtrain/train/compressed.py``):
each replica holds its own contribution ``c_r`` (its gradient, weighted by its
share of the scored tokens, so that the mean of the ``c_r`` is the global
gradient) and leaves with an estimate of that mean, identical on every replica.

* ``dense``: ``pmean`` of every leaf, the reference (what XLA's implicit
  all-reduce does).
* ``dgc``, Deep Gradient Compression (Lin et al., ICLR 2018), per matrix: local
  clipping of ``c_r`` at ``clip / sqrt(D)`` (Sec. 3.2), momentum correction
  ``u <- m u + c``, local accumulation ``v <- v + u`` (Sec. 3.1), the top-k of
  ``|v|`` sent as k values and k int32 indices (an ``all_gather`` of those, never
  a dense masked tensor), and momentum-factor masking: ``u`` and ``v`` are zeroed
  where sent. The sparsity warms up through fixed stages (75%, 93.75%, ...:
  Sec. 3.3); each stage is one branch of a ``lax.switch`` with its own static
  k, so one compiled step serves all stages and the host never reads the step.
* ``powersgd`` (Vogels et al., NeurIPS 2019, Alg. 1), per matrix ``M = c + e``:
  ``P = pmean(M Q)``, ``P <- orth(P)``, ``Q = pmean(M^T P)``, estimate ``P Q^T``,
  error feedback ``e <- M - P Q^T``; ``Q`` warm-starts the next step.
  The collectives move P and Q only.

Matrices: a leaf's leading ``layers`` axes (a scanned stack) are batch axes, so
``[L, in, out]`` is L matrices; the rest is ``[first dim, product of the
others]``. Vectors, matrices smaller than ``config.exchange.min_size`` elements,
and (PowerSGD) those whose rank-r factors are no smaller than the matrix go
dense.

The compressor state lives in the optimizer state (``with_exchange_state``):
per-replica leaves (DGC's ``u``, ``v``, PowerSGD's ``e``) carry a leading
``data`` axis ``[D, *param shape]`` sharded over ``data``; PowerSGD's ``Q``
is the same on every replica and replicated. The state of each leaf names its
method (``Dense``, ``DGC``, ``PowerSGD``), so the step reads the plan from it.

Bytes on the wire are counted at trace time from the arrays handed to the
collectives, as a ring moves them (sent per device): an all-reduce of B bytes
sends 2 (D-1)/D B, an all-gather of B bytes per device sends (D-1) B.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from qtrain.config.validate import ConfigError

AXIS = "data"
METHODS = ("dense", "dgc", "powersgd")
FAMILY = "compressed"  # config.train.step of the family that runs the exchange.


# ------------------------------------------------------------ the state --


class Dense(NamedTuple):
  """A leaf exchanged by a plain all-reduce: no state."""


@flax.struct.dataclass
class DGC:
  momentum: jax.Array  # u, [D, *shape]: velocity (momentum correction).
  residual: jax.Array  # v, [D, *shape]: accumulated, not yet sent.
  n_batch: int = flax.struct.field(pytree_node=False, default=0)  # Leading stack axes.


class PowerSGD(NamedTuple):
  error: jax.Array  # e, [D, *shape]: what the rank-r estimate missed.
  q: jax.Array  # [*batch, m, r]: the warm start, equal on every replica.


LEAF_STATES = (Dense, DGC, PowerSGD)
_is_state = lambda x: isinstance(x, LEAF_STATES)


class ExchangeState(NamedTuple):
  """The optimizer state with the compressor's next to it."""
  inner: optax.OptState
  exchange: Any  # A tree like the params with one Dense / DGC / PowerSGD per leaf.


def matrix_dims(shape, n_batch: int) -> tuple[int, int, int]:
  """(batch, n, m): a leaf as ``batch`` matrices of n x m (m = 1 for a vector)."""
  batch = math.prod(shape[:n_batch])
  rest = shape[n_batch:]
  if not rest:
    return batch, 1, 1
  return batch, rest[0], math.prod(rest[1:])


def _leaf_state(x, n_batch: int, ex, replicas: int, key):
  """The initial state of one param leaf: which method exchanges it."""
  batch, n, m = matrix_dims(x.shape, n_batch)
  per_replica = lambda: jnp.zeros((replicas, *x.shape), x.dtype)
  if ex.method == "dense" or len(x.shape) - n_batch < 2 or n * m < ex.min_size:
    return Dense()
  if ex.method == "dgc":
    return DGC(per_replica(), per_replica(), n_batch)
  r = min(ex.powersgd.rank, n, m)
  if r * (n + m) >= n * m:  # The factors would be no smaller than the matrix.
    return Dense()
  q = jax.random.normal(key, (*x.shape[:n_batch], m, r), x.dtype)
  return PowerSGD(per_replica(), q)


def _n_batch(boxed_leaf) -> int:
  """Leading ``layers`` axes of a boxed param (a scanned stack)."""
  names = boxed_leaf.names if isinstance(boxed_leaf, nn.Partitioned) else ()
  n = 0
  while n < len(names) and names[n] == "layers":
    n += 1
  return n


def data_size(cfg) -> int:
  """The ``data`` axis of the active mesh (or of ``config.mesh`` on every device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and AXIS in mesh.shape:
    return mesh.shape[AXIS]
  from qtrain.parallel.mesh import mesh_sizes  # pylint: disable=g-import-not-at-top
  return mesh_sizes(cfg.mesh, jax.device_count())[AXIS]


def with_exchange_state(cfg, tx: optax.GradientTransformation,
                        boxed_params) -> optax.GradientTransformation:
  """``tx`` whose state also holds the compressor state of ``config.exchange``
  (``ExchangeState``) when ``config.train.step`` is the compressed family;
  else ``tx`` itself. The update passes the compressor state through: the
  family sets it (only on finite steps)."""
  if cfg.train.step != FAMILY:
    return tx
  ex, replicas = cfg.exchange, data_size(cfg)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  n_batch = jax.tree.map(_n_batch, boxed_params, is_leaf=is_box)

  def init(params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(ex.powersgd.seed), max(len(leaves), 1))
    states = [_leaf_state(x, b, ex, replicas, k)
              for x, b, k in zip(leaves, jax.tree.leaves(n_batch), keys)]
    return ExchangeState(tx.init(params), jax.tree.unflatten(treedef, states))

  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state.inner, params)
    return updates, ExchangeState(inner, state.exchange)

  return optax.GradientTransformation(init, update)


def state_specs(states):
  """The compressor state's PartitionSpecs over ``data`` alone (a shard_map's
  specs): per-replica leaves split on their first axis, ``Q`` replicated."""

  def leaf(state):
    if isinstance(state, DGC):
      return DGC(P(AXIS), P(AXIS), state.n_batch)
    if isinstance(state, PowerSGD):
      return PowerSGD(P(AXIS), P())
    return Dense()

  return jax.tree.map(leaf, states, is_leaf=_is_state)


def state_shardings(exchange_abstract, param_shardings, mesh):
  """NamedShardings of the compressor state: per-replica leaves over ``data``
  on their first axis and like their param on the rest, ``Q`` replicated."""

  def leaf(state, param_sh):
    spec = tuple(param_sh.spec) if isinstance(param_sh, NamedSharding) else ()
    per_replica = NamedSharding(mesh, P(AXIS, *spec))
    if isinstance(state, DGC):
      return DGC(per_replica, per_replica, state.n_batch)
    if isinstance(state, PowerSGD):
      return PowerSGD(per_replica, NamedSharding(mesh, P()))
    return Dense()

  return jax.tree.map(leaf, exchange_abstract, param_shardings, is_leaf=_is_state)


def with_state_shardings(opt_shardings, abstract_opt_state, param_shardings, mesh):
  """``opt_shardings`` (``qtrain.optim.opt_state_shardings``) with the
  compressor part of an ``ExchangeState`` replaced by ``state_shardings``
  (which the generic rule cannot derive: it would replicate the per-replica
  leaves over ``data``)."""
  if not isinstance(abstract_opt_state, ExchangeState):
    return opt_shardings
  return ExchangeState(opt_shardings.inner, state_shardings(
      abstract_opt_state.exchange, param_shardings, mesh))


# ------------------------------------------------------------ the wire --


class Wire:
  """The gradient collectives over ``data``, counting the bytes each device
  sends (ring algorithms; see the module docstring) from their arrays."""

  def __init__(self, replicas: int):
    self.d = replicas
    self.sent = 0.0  # Bytes this device sends this step.
    self.dense = 0.0  # Bytes the dense all-reduce of the same leaves would send.

  def _allreduce_bytes(self, x) -> float:
    return 2 * (self.d - 1) / self.d * x.size * x.dtype.itemsize

  def count_dense(self, x) -> None:
    self.dense += self._allreduce_bytes(x)

  def pmean(self, x):
    self.sent += self._allreduce_bytes(x)
    return jax.lax.pmean(x, AXIS)

  def all_gather(self, x):
    self.sent += (self.d - 1) * x.size * x.dtype.itemsize
    return jax.lax.all_gather(x, AXIS)


# --------------------------------------------------------------- methods --


def _local(x):
  """This replica's slice of a per-replica leaf [1, *shape] -> [*shape]."""
  return x[0]


def dgc_exchange(c, state: DGC, sparsity: float, momentum: float, wire: Wire):
  """(mean estimate, new DGC state) of one leaf at a fixed sparsity."""
  n_batch = state.n_batch
  batch, n, m = matrix_dims(c.shape, n_batch)
  k = max(1, int(round(n * m * (1.0 - sparsity))))
  u = momentum * _local(state.momentum) + c if momentum else c
  v = _local(state.residual) + u
  v_BN = v.reshape(batch, n * m)
  _, idx_Bk = jax.lax.top_k(jnp.abs(v_BN), k)
  vals_Bk = jnp.take_along_axis(v_BN, idx_Bk, axis=1)
  vals_DBk, idx_DBk = wire.all_gather(vals_Bk), wire.all_gather(idx_Bk.astype(jnp.int32))
  rows_DBk = jnp.broadcast_to(jnp.arange(batch)[None, :, None], idx_DBk.shape)
  total_BN = jnp.zeros((batch, n * m), c.dtype).at[rows_DBk, idx_DBk].add(vals_DBk)
  sent_BN = jnp.zeros((batch, n * m), bool).at[jnp.arange(batch)[:, None], idx_Bk].set(True)
  keep = lambda a: jnp.where(sent_BN, 0, a.reshape(batch, n * m)).reshape(c.shape)[None]
  # Momentum-factor masking (Sec. 3.2): a sent coordinate restarts its velocity.
  new_u = keep(u) if momentum else state.momentum
  return (total_BN / wire.d).reshape(c.shape), DGC(new_u, keep(v), n_batch)


def _orthonormal(p_BNr):
  """Orthonormal columns spanning P's (reduced QR; batched)."""
  q, _ = jnp.linalg.qr(p_BNr)
  return q


def powersgd_exchange(c, state: PowerSGD, n_batch: int, wire: Wire):
  """(rank-r mean estimate, new PowerSGD state) of one leaf."""
  batch, n, m = matrix_dims(c.shape, n_batch)
  hi = jax.lax.Precision.HIGHEST  # r is small; TF32 would lose the estimate's digits.
  m_BNM = (c + _local(state.error)).reshape(batch, n, m)
  q_BMr = state.q.reshape(batch, m, -1)
  p_BNr = _orthonormal(wire.pmean(jnp.matmul(m_BNM, q_BMr, precision=hi)))
  q_BMr = wire.pmean(jnp.matmul(jnp.swapaxes(m_BNM, 1, 2), p_BNr, precision=hi))
  est_BNM = jnp.matmul(p_BNr, jnp.swapaxes(q_BMr, 1, 2), precision=hi)
  error = (m_BNM - est_BNM).reshape(c.shape)[None]
  return est_BNM.reshape(c.shape), PowerSGD(error, q_BMr.reshape(state.q.shape))


def _clip(tree, max_norm):
  """``tree`` scaled to global norm at most ``max_norm`` (DGC's local clipping)."""
  norm = optax.tree.norm(tree)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda x: x * scale.astype(x.dtype), tree)


def exchange(contrib, states, ex, wire: Wire, *, sparsity: float | None = None):
  """(mean estimate, new states) over ``data`` of every leaf of ``contrib``
  (inside a shard_map over ``data``); ``sparsity`` is DGC's current stage."""
  if ex.method == "dgc" and ex.dgc.clip > 0:
    contrib = _clip(contrib, ex.dgc.clip / math.sqrt(wire.d))
  leaves, treedef = jax.tree.flatten(contrib)
  out, new = [], []
  for c, state in zip(leaves, treedef.flatten_up_to(states)):
    wire.count_dense(c)
    if isinstance(state, DGC):
      est, state = dgc_exchange(c, state, sparsity, ex.dgc.momentum, wire)
    elif isinstance(state, PowerSGD):
      est, state = powersgd_exchange(c, state, state.q.ndim - 2, wire)
    else:
      est = wire.pmean(c)
    out.append(est)
    new.append(state)
  return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, new)


# ------------------------------------------------------------ warm-up --


def dgc_stages(dgc) -> tuple[float, ...]:
  """DGC's sparsity stages: the warm-up's, then the final one."""
  if dgc.warmup_steps <= 0:
    return (float(dgc.sparsity),)
  return tuple(float(s) for s in dgc.warmup_sparsity) + (float(dgc.sparsity),)


def dgc_stage(step, dgc):
  """Index into ``dgc_stages`` of the batch ``step`` (0-based): the warm-up
  stages each last ``warmup_steps / len(warmup_sparsity)`` steps."""
  n_warm = len(dgc_stages(dgc)) - 1
  if n_warm == 0:
    return jnp.zeros((), jnp.int32)
  return jnp.minimum(step * n_warm // dgc.warmup_steps, n_warm).astype(jnp.int32)


# ------------------------------------------------------------ validation --


def validate_exchange(cfg) -> None:
  """Raises ConfigError naming the wrong ``config.exchange`` field."""
  ex, step = cfg.get("exchange"), cfg.train.step
  if ex is None:  # A run saved before the group existed: the dense default.
    return
  if ex.method not in METHODS:
    raise ConfigError(f"config.exchange.method={ex.method!r}; use one of {list(METHODS)}")
  if ex.method != "dense" and step != FAMILY:
    raise ConfigError(f"config.exchange.method={ex.method!r} runs in the {FAMILY!r} step "
                      f"family; set --config.train.step={FAMILY} (config.train.step is "
                      f"{step!r}, whose all-reduce XLA inserts)")
  if ex.min_size < 0:
    raise ConfigError(f"config.exchange.min_size={ex.min_size} must be >= 0")
  if ex.powersgd.rank < 1:
    raise ConfigError(f"config.exchange.powersgd.rank={ex.powersgd.rank} must be >= 1")
  d = ex.dgc
  stages = (*d.warmup_sparsity, d.sparsity)
  if not all(0.0 <= s < 1.0 for s in stages):
    raise ConfigError(f"config.exchange.dgc.sparsity / warmup_sparsity {stages} must lie "
                      "in [0, 1) (0.999 sends 0.1% of each matrix)")
  if d.warmup_steps < 0 or (d.warmup_steps > 0 and not d.warmup_sparsity):
    raise ConfigError(f"config.exchange.dgc.warmup_steps={d.warmup_steps} needs >= 0, and "
                      "warmup_sparsity stages when > 0 (e.g. (0.75, 0.9375, 0.984375, 0.996))")
  if not 0.0 <= d.momentum < 1.0 or d.clip < 0:
    raise ConfigError(f"config.exchange.dgc.momentum={d.momentum} must lie in [0, 1) and "
                      f"config.exchange.dgc.clip={d.clip} be >= 0 (0 = off)")
  if step == FAMILY:
    others = {a: cfg.mesh[a] for a in ("fsdp", "pipeline", "sequence", "tensor")
              if cfg.mesh[a] != 1}
    if others:
      raise ConfigError(
          f"config.train.step={FAMILY!r} supports pure data parallelism for now: "
          + ", ".join(f"config.mesh.{a}={n}" for a, n in others.items())
          + " must be 1; put the devices on config.mesh.data")
