"""``make_steps``: the jitted ``train_step`` of the configured step family and
``eval_step``, over the one shared loss (``qtrain.train.loss``);
``make_measured_step``: the same train step with the activation telemetry
sown (``config.telemetry``), which the loop runs every N steps.

Families live in ``families.py`` (registry) and one module each
(``first_order.py``); ``config.train.step`` picks one.
"""

from __future__ import annotations

import jax

from qtrain.analysis import telemetry
from qtrain.optim.schedule import learning_rate_schedule
from qtrain.parallel.rules import batch_sharding, replicated
from qtrain.quant import delayed
from qtrain.train import first_order
from qtrain.train import zeroth_order  # noqa: F401  (registers zeroth_order)
from qtrain.train import compressed as _compressed  # noqa: F401  (registers compressed)
from qtrain.train import pipeline as _pipeline  # noqa: F401  (registers pipeline)
from qtrain.train.families import StepContext, get_family
from qtrain.train.loss import make_loss, nll

train_step = first_order.train_step  # The default family's pure step.
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# Evaluation is deterministic: a stochastic quantizer draws from a fixed key.
EVAL_SEED = 0


def eval_step(params, batch, *, model):
  """Sum of token NLL and the token count of one held-out batch (by the
  chunked head when ``config.model.loss_chunks`` says so, as in training)."""
  _, nll_sum, n_tokens, _, _ = nll(model, params, batch, jax.random.key(EVAL_SEED))
  return {"nll_sum": nll_sum, "tokens": n_tokens}


def _select(batch, keys):
  """The batch arrays named in ``keys`` (others a loader yields are ignored)."""
  return {k: v for k, v in batch.items() if k in keys}


def _loss_fn(cfg, model, keys, measured: bool):
  """The shared loss over the batch arrays in ``keys``; ``measured`` also
  applies the telemetry collection as mutable and turns its values into
  ``telemetry/...`` metrics (``qtrain.analysis.telemetry.summarize``)."""
  collect = tuple(cfg.train.collect) + ((telemetry.COLLECTION,) if measured else ())
  loss_fn = make_loss(model, float(cfg.optim.z_loss), collect)

  def fn(params, batch, rng, amax=None):
    objective, aux = loss_fn(params, _select(batch, keys), rng, amax)
    if measured:
      aux = {**aux, "sown": telemetry.summarize(aux["sown"])}
    return objective, aux

  return fn


def _family_step(cfg, model, tx, mesh, state_sh, keys, measured: bool):
  ctx = StepContext(cfg=cfg, loss_fn=_loss_fn(cfg, model, keys, measured), tx=tx,
                    schedule=learning_rate_schedule(cfg), state_sh=state_sh,
                    batch_sh=batch_sharding(mesh), out_sh=replicated(mesh))
  return get_family(cfg.train.step)(ctx)


def make_steps(cfg, model, tx, mesh, state_sh, batch_keys=BATCH_KEYS):
  """(train_step, eval_step) jitted with explicit shardings; the state is donated.

  The step family is ``config.train.step``; ``config.optim.z_loss`` weights the
  z-loss, ``config.train.collect`` names the collections returned as metrics.
  A batch may hold any subset of ``batch_keys`` (unpacked batches may omit
  segment_ids and positions; pretraining batches loss_mask); one sharding
  (rows over data x fsdp) applies to each of its arrays.
  """
  keys = frozenset(batch_keys)
  train = _family_step(cfg, model, tx, mesh, state_sh, keys, measured=False)
  evaluate = jax.jit(lambda p, b: eval_step(p, _select(b, keys), model=model),
                     in_shardings=(state_sh.params, batch_sharding(mesh)),
                     out_shardings=replicated(mesh))
  return train, evaluate


def make_seed_step(cfg, model, tx, mesh, state_sh, batch_keys=BATCH_KEYS):
  """The seeding pass of delayed fp8 scaling (``config.quant.amax_history``;
  ``qtrain.quant.delayed``), ``(state, batch) -> state`` with the amax
  histories filled from the batch and nothing trained; None without delayed
  scaling. The loop runs it once, before the first step of a fresh run."""
  seeding = delayed.seeding_model(model)
  if seeding is None:
    return None
  ctx = StepContext(cfg=cfg, loss_fn=_loss_fn(cfg, seeding, frozenset(batch_keys), False),
                    tx=tx, schedule=learning_rate_schedule(cfg), state_sh=state_sh,
                    batch_sh=batch_sharding(mesh), out_sh=replicated(mesh))
  return first_order.build_seed(ctx)


def make_measured_step(cfg, model, tx, mesh, state_sh, batch_keys=BATCH_KEYS):
  """The train step of ``make_steps`` that also returns the telemetry metrics
  (``config.telemetry``; ``model`` must hold its provider, see
  ``qtrain.train.build``), or None when telemetry is off. The same family,
  loss and update: only the ``telemetry`` collection is mutable, so the
  statistics are computed in this step alone. The loop runs it on the steps
  ``qtrain.analysis.telemetry.is_due`` names."""
  if not telemetry.every(cfg):
    return None
  return _family_step(cfg, model, tx, mesh, state_sh, frozenset(batch_keys), measured=True)
