"""Held-out evaluation: the mean token NLL of a model over fixed batches.

Used by the training loop, ``python -m qtrain.eval`` and PTQ. Every batch goes
through ``to_global`` with the model's config, so evaluation gets the same
cuDNN segment check as training.
"""

from __future__ import annotations

import functools

import jax

from qtrain.data.global_batch import to_global
from qtrain.parallel import batch_sharding, replicated


def evaluate(eval_step, params, batches, mesh, model_cfg=None) -> float:
  """Mean NLL per scored token over ``batches`` (host-local rows).

  ``eval_step(params, batch) -> {"nll_sum", "tokens"}``; sums are taken over
  all batches first, so batches with more tokens weigh more.
  """
  nll, tokens = 0.0, 0.0
  for batch in batches:
    out = jax.device_get(eval_step(params, to_global(batch, mesh, model_cfg)))
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
  return nll / max(tokens, 1.0)


def jit_eval_step(model, mesh, param_sh, batch_keys):
  """``qtrain.train.step.eval_step`` for ``model``, jitted with explicit
  shardings (for callers without a train state, e.g. ``qtrain.eval``)."""
  from qtrain.train.step import eval_step  # pylint: disable=g-import-not-at-top
  batch_sh = {k: batch_sharding(mesh) for k in batch_keys}
  return jax.jit(functools.partial(eval_step, model=model), in_shardings=(param_sh, batch_sh),
                 out_shardings=replicated(mesh))
