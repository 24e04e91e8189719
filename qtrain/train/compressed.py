"""The ``compressed`` step family: data-parallel gradients exchanged by hand
(``config.exchange``: dense, DGC or PowerSGD; ``qtrain/parallel/exchange.py``).

Inside a ``shard_map`` over the ``data`` axis each replica differentiates the
shared loss over its own rows, weights its gradient by its share of the
scored tokens (so the mean over replicas is exactly the global token-mean
gradient of the ``first_order`` family), and the exchange turns those
contributions into one estimate, equal on every replica. Outside it the step
is ``first_order``'s: ``apply_if_finite`` with the run's optimizer, and the
compressor state (in the optimizer state: ``ExchangeState``) advances only on
a finite step, so a skipped step leaves residuals and Q untouched.

Composition with ``fsdp`` (a ``data`` x ``fsdp`` mesh): only ``data`` is
manual in the shard_map, so the forward and backward inside it are the
``first_order`` step's FSDP, left to XLA: each scanned layer's weights are
gathered over ``fsdp`` and its gradients reduce-scattered, and a replica's
gradient leaves the backward split over ``fsdp`` like its params. Writing
that FSDP by hand would buy nothing the exchange needs. The exchange then
makes ``fsdp`` manual for itself alone (a nested shard_map, with the params'
specs: ``exchange.fsdp_specs``), so it compresses each fsdp shard where it
lies and no gradient is gathered (``qtrain/parallel/exchange.py`` says how
DGC and PowerSGD act per shard). ``sequence``, ``tensor`` and ``pipeline``
must be 1 (validated). Inside the shard_map the logical rules lose ``data``
(the rows are local); ``activation_batch`` keeps ``fsdp``.

DGC's sparsity warm-up is one compiled step: each stage is a ``lax.switch``
branch with its own static k, picked by the step counter on device.

Metrics beside ``step_metrics``'s: ``exchange/bytes_sent`` (bytes a device
sends for the gradient per step, from the arrays the collectives move),
``exchange/bytes_dense`` (what the dense all-reduce of the same gradient
sends), ``exchange/ratio`` (their quotient) and, for DGC, ``exchange/sparsity``;
with ``fsdp`` > 1, ``exchange/bytes_fsdp`` (PowerSGD's own collectives over
``fsdp``; the gradient's reduce-scatter over ``fsdp`` is XLA's in every method
and uncounted).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from qtrain.config.validate import ConfigError
from qtrain.parallel import exchange as ex_lib
from qtrain.train.families import (StepContext, apply_if_finite, register_step_family,
                                   step_metrics)
from qtrain.train.state import TrainState, step_key

AXIS = ex_lib.AXIS


def _without_data(rules):
  """The logical rules with ``data`` removed (inside the shard_map it is manual)."""
  def strip(axes):
    if isinstance(axes, (tuple, list)):
      kept = tuple(a for a in axes if a != AXIS)
      return kept or None
    return None if axes == AXIS else axes
  return tuple((name, strip(axes)) for name, axes in rules)


def _exchange_stages(cfg, contrib, states, replicas, step, specs):
  """(estimate, new states, bytes sent, bytes dense, bytes over fsdp, sparsity)
  of this step; DGC's stages are branches of one ``lax.switch``."""
  ex = cfg.exchange
  stages = ex_lib.dgc_stages(ex.dgc) if ex.method == "dgc" else (None,)
  shards = jax.sharding.get_abstract_mesh().shape.get(ex_lib.FSDP, 1)

  def branch(sparsity):
    wire = ex_lib.Wire(replicas, shards)
    est, new = ex_lib.exchange(contrib, states, ex, wire, sparsity=sparsity, specs=specs)
    return (est, new, jnp.float32(wire.sent), jnp.float32(wire.dense),
            jnp.float32(wire.sent_fsdp))

  if len(stages) == 1:
    out = branch(stages[0])
    index = jnp.zeros((), jnp.int32)
  else:
    index = ex_lib.dgc_stage(step, ex.dgc)
    out = jax.lax.switch(index, [functools.partial(branch, s) for s in stages])
  sparsity = jnp.asarray([0.0 if s is None else s for s in stages], jnp.float32)[index]
  return (*out, sparsity)


def _replica_step(params, states, batch, rng, step, *, loss_fn, cfg, replicas, rules,
                  specs):
  """One replica's part, inside the shard_map: its loss and gradient, the
  exchange, and the metrics reduced over ``data``."""
  # Each replica draws its own stochastic-rounding bits.
  rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
  with nn.logical_axis_rules(rules):
    (objective, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
  total = jax.lax.psum(aux["tokens"], AXIS)
  share = aux["tokens"] / jnp.maximum(total, 1.0)  # Of the global token mean.
  contrib = jax.tree.map(lambda g: g * (share * replicas).astype(g.dtype), grads)
  est, states, sent, dense, sent_fsdp, sparsity = _exchange_stages(
      cfg, contrib, states, replicas, step, specs)
  weighted = lambda x: jax.lax.psum(share * x, AXIS)
  aux = {"loss": weighted(aux["loss"]), "z_loss": weighted(aux["z_loss"]), "tokens": total,
         "sown": jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux["sown"])}
  metrics = {"exchange/bytes_sent": sent, "exchange/bytes_dense": dense,
             "exchange/ratio": dense / jnp.maximum(sent, 1.0)}
  if cfg.exchange.method == "dgc":
    metrics["exchange/sparsity"] = sparsity
  if jax.sharding.get_abstract_mesh().shape.get(ex_lib.FSDP, 1) > 1:
    metrics["exchange/bytes_fsdp"] = sent_fsdp
  return est, states, weighted(objective), aux, metrics


def train_step(state: TrainState, batch, *, loss_fn, tx, schedule, cfg, mesh, specs=None):
  """(state, batch) -> (state, metrics); pure, jitted by ``build``. ``specs``:
  the params' fsdp specs (``exchange.fsdp_specs``; None: nothing split)."""
  opt = state.opt_state
  if not isinstance(opt, ex_lib.ExchangeState):
    raise TypeError(
        f"config.train.step={ex_lib.FAMILY!r} needs the compressor state in the optimizer "
        "state: build the optimizer with qtrain.parallel.exchange.with_exchange_state")
  replicas = mesh.shape[AXIS]
  state_specs = ex_lib.state_specs(opt.exchange)
  local = functools.partial(_replica_step, loss_fn=loss_fn, cfg=cfg, replicas=replicas,
                            rules=_without_data(nn.get_logical_axis_rules()), specs=specs)
  # check_vma=False: with it, differentiating the replicated params inside the
  # body sums their gradient over `data` implicitly (a dense all-reduce before
  # any compression: the dense test saw 8x the gradient), and DGC's all_gather
  # result, equal on every replica, is typed as varying.
  est, new_exchange, objective, aux, extra = jax.shard_map(
      local, mesh=mesh, axis_names={AXIS}, check_vma=False,
      in_specs=(P(), state_specs, P(AXIS), P(), P()),
      out_specs=(P(), state_specs, P(), P(), P()))(
          state.params, opt.exchange, batch, step_key(state), state.step)
  grad_norm = optax.tree.norm(est).astype(jnp.float32)
  finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
  new_state = apply_if_finite(state, est, finite, tx)
  exchange = jax.lax.cond(finite, lambda: new_exchange, lambda: opt.exchange)
  new_state = new_state.replace(opt_state=new_state.opt_state._replace(exchange=exchange))
  metrics = step_metrics(state, new_state, objective, aux, grad_norm, finite, schedule)
  return new_state, {**metrics, **extra}


def state_shardings(ctx: StepContext) -> TrainState:
  """``ctx.state_sh`` with the compressor state sharded per replica over ``data``."""
  sh, mesh = ctx.state_sh, ctx.batch_sh.mesh
  if not isinstance(sh.opt_state, ex_lib.ExchangeState):
    return sh
  exchange = ex_lib.state_shardings(sh.opt_state.exchange, sh.params, mesh)
  return sh.replace(opt_state=sh.opt_state._replace(exchange=exchange))


def build(ctx: StepContext):
  if not isinstance(ctx.state_sh.opt_state, ex_lib.ExchangeState):
    raise ConfigError(
        f"config.train.step={ex_lib.FAMILY!r} keeps its compressor state in the optimizer "
        "state, but this optimizer was built without it: wrap it with "
        "qtrain.parallel.exchange.with_exchange_state(cfg, tx, boxed_params)")
  mesh = ctx.batch_sh.mesh
  state_sh = state_shardings(ctx)
  step = functools.partial(train_step, loss_fn=ctx.loss_fn, tx=ctx.tx, schedule=ctx.schedule,
                           cfg=ctx.cfg, mesh=mesh,
                           specs=ex_lib.fsdp_specs(ctx.state_sh.params))
  return jax.jit(step, in_shardings=(state_sh, ctx.batch_sh),
                 out_shardings=(state_sh, ctx.out_sh), donate_argnums=(0,))


register_step_family(ex_lib.FAMILY, build)
