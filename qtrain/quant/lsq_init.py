"""Learned step sizes (LSQ, LSQ+) initialised from real data and the weights in use.

``model.init`` creates every param from the init batch it is traced with;
for LSQ that batch is placeholder tokens, and a run started from another
run's weights (``train.init_from``) would keep weight steps fitted to random
init, or have no step params at all when the source run was unquantized.
``calibrate_learned_steps`` fixes both: it drops the learned step/offset
leaves from ``params`` and runs one forward of a real batch with the params
collection mutable, so each missing step is created by its own initializer
(Esser et al. 2020: s0 = 2 mean|x| / sqrt(Q_P); LSQ+: min/max) on the
activations that batch produces and on the weights being trained. Everything
else in ``params`` is returned unchanged.
"""

from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax

_LEARNED = re.compile(r"(weight|act)_(step|offset)")


def learned_step_paths(params) -> list[tuple[str, ...]]:
  """Key paths of every learned quantizer step/offset in ``params``."""
  flat = flax.traverse_util.flatten_dict(nn.unbox(params))
  return [k for k in flat if _LEARNED.fullmatch(k[-1])]


def _strip(params):
  flat = flax.traverse_util.flatten_dict(nn.unbox(params))
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not _LEARNED.fullmatch(k[-1])})


def calibrate_learned_steps(model: nn.Module, params, batch: dict, rng=None):
  """``params`` with every learned step re-initialised from ``batch`` (a dict
  with ``inputs`` and optionally ``positions`` / ``segment_ids``). Returns
  ``params`` itself when the model learns no step."""
  rng = jax.random.key(0) if rng is None else rng

  @jax.jit
  def run(stripped, batch):
    _, out = model.apply({"params": stripped}, batch["inputs"], batch.get("positions"),
                         batch.get("segment_ids"), rngs={"params": rng, "quant": rng},
                         mutable=["params"])
    return nn.unbox(out["params"])

  stripped = _strip(params)
  shapes = jax.eval_shape(run, stripped, batch)
  if not learned_step_paths(shapes):
    return params
  return run(stripped, batch)
