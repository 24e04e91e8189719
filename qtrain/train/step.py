"""``make_steps``: the jitted ``train_step`` of the configured step family and
``eval_step``, over the one shared loss (``qtrain.train.loss``).

Families live in ``families.py`` (registry) and one module each
(``first_order.py``); ``config.train.step`` picks one.
"""

from __future__ import annotations

import jax

from qtrain.optim.schedule import learning_rate_schedule
from qtrain.parallel.rules import batch_sharding, replicated
from qtrain.train import first_order
from qtrain.train.families import StepContext, get_family
from qtrain.train.loss import cross_entropy, forward, loss_mask, make_loss

train_step = first_order.train_step  # The default family's pure step.
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# Evaluation is deterministic: a stochastic quantizer draws from a fixed key.
EVAL_SEED = 0


def eval_step(params, batch, *, model):
  """Sum of token NLL and the token count of one held-out batch."""
  logits_BTV, _ = forward(model, params, batch, jax.random.key(EVAL_SEED))
  _, nll_sum, n_tokens, _ = cross_entropy(logits_BTV, batch["targets"], loss_mask(batch))
  return {"nll_sum": nll_sum, "tokens": n_tokens}


def _select(batch, keys):
  """The batch arrays named in ``keys`` (others a loader yields are ignored)."""
  return {k: v for k, v in batch.items() if k in keys}


def make_steps(cfg, model, tx, mesh, state_sh, batch_keys=BATCH_KEYS):
  """(train_step, eval_step) jitted with explicit shardings; the state is donated.

  The step family is ``config.train.step``; ``config.optim.z_loss`` weights the
  z-loss, ``config.train.collect`` names the collections returned as metrics.
  A batch may hold any subset of ``batch_keys`` (unpacked batches may omit
  segment_ids and positions; pretraining batches loss_mask); one sharding
  (rows over data x fsdp) applies to each of its arrays.
  """
  keys = frozenset(batch_keys)
  loss_fn = make_loss(model, float(cfg.optim.z_loss), tuple(cfg.train.collect))
  batch_sh, rep = batch_sharding(mesh), replicated(mesh)
  ctx = StepContext(cfg=cfg, loss_fn=lambda p, b, r: loss_fn(p, _select(b, keys), r),
                    tx=tx, schedule=learning_rate_schedule(cfg), state_sh=state_sh,
                    batch_sh=batch_sh, out_sh=rep)
  train = get_family(cfg.train.step)(ctx)
  evaluate = jax.jit(lambda p, b: eval_step(p, _select(b, keys), model=model),
                     in_shardings=(state_sh.params, batch_sh), out_shardings=rep)
  return train, evaluate
