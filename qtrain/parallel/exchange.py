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

With ``fsdp`` > 1 (a ``data`` x ``fsdp`` mesh) the forward and backward stay
XLA's: each layer's weights are gathered over ``fsdp`` inside the scan and the
gradients leave reduce-scattered over ``fsdp``, as in the ``first_order``
step. The exchange then runs per fsdp shard, in a ``shard_map`` manual over
``fsdp`` nested in the family's one over ``data`` (``specs``: each param's
spec, ``fsdp`` entries only), so no gradient is gathered over ``fsdp`` and the
``data`` collectives move only the shard's own share:

* ``dense``: ``pmean`` over ``data`` of each shard.
* ``dgc``: top-k per (matrix, fsdp shard), with k scaled by the shard's share
  of the matrix (``round(shard size x (1 - sparsity))``); values and shard-local
  indices are all-gathered over ``data`` and scattered into the shard. This is
  a per-shard top-k, not the tensor's: a shard whose entries are all small
  still sends its k (Lin et al. select per tensor). The residual keeps what
  was not sent, so error feedback still delivers the rest later.
* ``powersgd``: the matrix ``M`` [n, m] is split over ``fsdp`` along its rows
  (``embed`` first: q/k/v, gate/up), its columns (``embed`` last: down, o,
  the embedding) or its scanned batch axes. Rows: ``P = M Q`` has local rows;
  it is orthogonalised by gathering the small ``P`` [n, r] over ``fsdp`` and
  taking the same reduced QR as the unsplit path (Gram + Cholesky would square
  P's condition number in float32), then ``Q = M^T P`` is summed over
  ``fsdp``. Columns: ``Q``'s rows of the shard's columns give partial ``P``,
  summed over ``fsdp``; ``Q = M^T P`` has local rows, gathered over ``fsdp``
  afterwards so the stored ``Q`` stays whole. ``P`` and ``Q`` are all-reduced
  over ``data`` only, as without ``fsdp``.

Per-replica state leaves ``[D, *param shape]`` are split over ``data`` and,
on the param's dims, like the param (``state_shardings``): a device holds the
error / residual of its own replica and fsdp shard. ``Q`` [*batch, m, r] is
small and stays replicated. Bytes: ``Wire.sent`` counts only the ``data``
collectives (per device, from its shard's arrays), ``Wire.dense`` the ``data``
all-reduce of the same shards; the ``fsdp`` reduce-scatter of the gradient is
XLA's in every method (and in ``first_order``) and is not counted;
PowerSGD's extra ``fsdp`` collectives (P's gather, the partial-sum psums, Q's
gather) are counted apart in ``Wire.sent_fsdp``.
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
FSDP = "fsdp"  # Split inside the exchange (per shard), never gathered.
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


def fsdp_specs(param_shardings):
  """Each param's PartitionSpec with its ``fsdp`` entries only (the other axes
  are refused by ``validate_exchange``): the nested shard_map's specs of a
  replica's gradient."""

  def leaf(sh):
    spec = tuple(sh.spec) if isinstance(sh, NamedSharding) else ()
    has = lambda a: a == FSDP or (isinstance(a, tuple) and FSDP in a)
    return P(*(FSDP if has(a) else None for a in spec))

  return jax.tree.map(leaf, param_shardings)


def _split_dim(spec) -> int | None:
  """The dim of a leaf that ``spec`` splits over ``fsdp`` (None: whole)."""
  return next((i for i, a in enumerate(spec) if a == FSDP), None)


# ------------------------------------------------------------ the wire --


class Wire:
  """The gradient collectives over ``data``, counting the bytes each device
  sends (ring algorithms; see the module docstring) from their arrays."""

  def __init__(self, replicas: int, shards: int = 1):
    self.d = replicas
    self.f = shards  # The fsdp axis (1: none).
    self.sent = 0.0  # Bytes this device sends over `data` this step.
    self.dense = 0.0  # Bytes the dense all-reduce of the same leaves would send.
    self.sent_fsdp = 0.0  # Bytes of PowerSGD's own collectives over `fsdp`.

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

  def psum_fsdp(self, x):
    self.sent_fsdp += 2 * (self.f - 1) / self.f * x.size * x.dtype.itemsize
    return jax.lax.psum(x, FSDP)

  def gather_fsdp(self, x, axis: int):
    """The whole of ``x`` split over ``fsdp`` along ``axis`` (tiled)."""
    self.sent_fsdp += (self.f - 1) * x.size * x.dtype.itemsize
    return jax.lax.all_gather(x, FSDP, axis=axis, tiled=True)


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


def _q_axis(split: int, n_batch: int) -> int:
  """The axis of Q's leaf-shaped view ``[*batch, *shape[n_batch+1:], r]``
  that matches the leaf's ``split`` dim (a column or batch dim)."""
  return split if split < n_batch else split - 1


def _q_view(c, state: PowerSGD, n_batch: int, shards: int, split: int):
  """Q viewed like the leaf: [*batch, *columns' dims, r], whole over fsdp."""
  whole = list(c.shape)
  whole[split] *= shards
  return state.q.reshape(*whole[:n_batch], *whole[n_batch + 1:], state.q.shape[-1])


def powersgd_exchange(c, state: PowerSGD, n_batch: int, wire: Wire,
                      split: int | None = None):
  """(rank-r mean estimate, new PowerSGD state) of one leaf; ``split`` is the
  dim of ``c`` (this device's shard) split over ``fsdp`` (see the module)."""
  batch, n, m = matrix_dims(c.shape, n_batch)
  hi = jax.lax.Precision.HIGHEST  # r is small; TF32 would lose the estimate's digits.
  mm = lambda a, b: jnp.matmul(a, b, precision=hi)
  m_BNM = (c + _local(state.error)).reshape(batch, n, m)
  rows = split == n_batch  # P's rows (M's) are this shard's; else M's columns or batch.
  q_axis = None if split is None or rows else _q_axis(split, n_batch)
  if q_axis is None:
    q_BMr = state.q.reshape(batch, m, -1)
  else:  # This shard's columns (or matrices) of Q.
    view = _q_view(c, state, n_batch, wire.f, split)
    size = view.shape[q_axis] // wire.f
    local = jax.lax.dynamic_slice_in_dim(view, jax.lax.axis_index(FSDP) * size, size, q_axis)
    q_BMr = local.reshape(batch, m, -1)
  p_BNr = mm(m_BNM, q_BMr)
  if q_axis is not None and split >= n_batch:  # Partial sums over the columns.
    p_BNr = wire.psum_fsdp(p_BNr)
  p_BNr = wire.pmean(p_BNr)
  if rows:  # Orthogonalise the whole (small) P, keep this shard's rows.
    whole = _orthonormal(wire.gather_fsdp(p_BNr, axis=1))
    p_BNr = jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(FSDP) * n, n, 1)
  else:
    p_BNr = _orthonormal(p_BNr)
  q_BMr = mm(jnp.swapaxes(m_BNM, 1, 2), p_BNr)
  if rows:  # Partial sums over M's rows.
    q_BMr = wire.psum_fsdp(q_BMr)
  q_BMr = wire.pmean(q_BMr)
  est_BNM = mm(p_BNr, jnp.swapaxes(q_BMr, 1, 2))
  error = (m_BNM - est_BNM).reshape(c.shape)[None]
  if q_axis is not None:  # Stored whole: gather the shards' rows of Q.
    view = q_BMr.reshape(*c.shape[:n_batch], *c.shape[n_batch + 1:], -1)
    q_BMr = wire.gather_fsdp(view, axis=q_axis)
  return est_BNM.reshape(c.shape), PowerSGD(error, q_BMr.reshape(state.q.shape))


def _clip(tree, max_norm):
  """``tree`` scaled to global norm at most ``max_norm`` (DGC's local clipping)."""
  norm = optax.tree.norm(tree)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda x: x * scale.astype(x.dtype), tree)


def _exchange_leaves(contrib, states, splits, ex, wire: Wire, sparsity):
  """``exchange`` of every leaf as this device holds it (a whole leaf, or its
  fsdp shard with ``splits`` naming the split dim)."""
  leaves, treedef = jax.tree.flatten(contrib)
  out, new = [], []
  for c, state, split in zip(leaves, treedef.flatten_up_to(states),
                             treedef.flatten_up_to(splits)):
    wire.count_dense(c)
    if isinstance(state, DGC):  # k from the shard's size: per-shard top-k.
      est, state = dgc_exchange(c, state, sparsity, ex.dgc.momentum, wire)
    elif isinstance(state, PowerSGD):
      est, state = powersgd_exchange(c, state, state.q.ndim - 2, wire, split)
    else:
      est = wire.pmean(c)
    out.append(est)
    new.append(state)
  return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, new)


def _shard_specs(states, specs):
  """The nested shard_map's specs of the compressor state: per-replica leaves
  [1, *shape] split like their param, Q whole."""

  def leaf(state, spec):
    per_replica = P(None, *spec)
    if isinstance(state, DGC):
      return DGC(per_replica, per_replica, state.n_batch)
    if isinstance(state, PowerSGD):
      return PowerSGD(per_replica, P())
    return Dense()

  return jax.tree.map(leaf, states, specs, is_leaf=_is_state)


def exchange(contrib, states, ex, wire: Wire, *, sparsity: float | None = None,
             specs=None):
  """(mean estimate, new states) over ``data`` of every leaf of ``contrib``
  (inside a shard_map over ``data``); ``sparsity`` is DGC's current stage.
  ``specs`` (``fsdp_specs`` of the params; None: nothing split) runs the
  exchange per fsdp shard in a shard_map manual over ``fsdp``."""
  if ex.method == "dgc" and ex.dgc.clip > 0:  # The replica's whole gradient (fsdp auto).
    contrib = _clip(contrib, ex.dgc.clip / math.sqrt(wire.d))
  is_spec = lambda x: isinstance(x, P)
  if specs is None or all(_split_dim(s) is None
                          for s in jax.tree.leaves(specs, is_leaf=is_spec)):
    splits = jax.tree.map(lambda _: None, contrib)
    return _exchange_leaves(contrib, states, splits, ex, wire, sparsity)
  splits = jax.tree.map(_split_dim, specs, is_leaf=is_spec)
  state_specs = _shard_specs(states, specs)
  body = lambda c, s: _exchange_leaves(c, s, splits, ex, wire, sparsity)
  # check_vma=False as in the family: the data collectives' results are equal
  # over `data` but typed as varying; fsdp stays manual only here.
  return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), axis_names={FSDP},
                       in_specs=(specs, state_specs), out_specs=(specs, state_specs),
                       check_vma=False)(contrib, states)


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
    others = {a: cfg.mesh[a] for a in ("pipeline", "sequence", "tensor")
              if cfg.mesh[a] != 1}
    if others:
      raise ConfigError(
          f"config.train.step={FAMILY!r} runs on a data x fsdp mesh only: "
          + ", ".join(f"config.mesh.{a}={n}" for a, n in others.items())
          + " must be 1 (the exchange splits gradients per fsdp shard, not per "
          "tensor / sequence / pipeline shard); put the devices on config.mesh.data "
          "and config.mesh.fsdp")
