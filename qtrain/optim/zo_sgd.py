"""SGD with optional momentum, sign and decoupled weight decay, registered as
``sgd`` (options in ``config.optim.sgd``): the update rules of the
zeroth-order family (``qtrain/train/zeroth_order.py``) that need no Adam state.

  theta <- theta - lr * (d + wd * theta),   d = sign?(trace(g))

* MeZO (Malladi et al. 2023, Alg. 1): ``momentum=0, sign=False``; g is the
  SPSA estimate g_hat * z; wd is decayed with the learning rate, as MeZO's
  ``theta -= lr * (g z + wd * theta)``. No optimizer state but the schedule's
  count.
* ZO-SGD-MMT (ZO-Bench, Zhang et al. 2024): ``momentum=beta``; one
  param-sized velocity, the only state the rule needs.
* ZO-SGD-Sign (ZO-Bench): ``sign=True``: the step is lr * sign(d) per element
  (after the momentum when both are on: signum).

It is an ordinary optax chain, so it also serves first-order groups.
"""

from __future__ import annotations

import optax

from qtrain.optim.registry import register_optimizer


def build_sgd(c, *, learning_rate, weight_decay, decay_mask, params):
  del params  # Element-wise.
  parts = []
  if c.momentum > 0:
    parts.append(optax.trace(decay=c.momentum, nesterov=c.nesterov))
  if c.sign:
    parts.append(optax.scale_by_sign())
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay, decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def validate_sgd(c, where: str) -> None:
  if not 0.0 <= c.momentum < 1.0:
    raise ValueError(f"{where}.momentum={c.momentum} must be in [0, 1) (0 = plain SGD)")
  for field in ("nesterov", "sign"):
    if not isinstance(c[field], bool):
      raise ValueError(f"{where}.{field}={c[field]!r}: use True or False")
  if c.nesterov and c.momentum == 0:
    raise ValueError(f"{where}.nesterov=True needs {where}.momentum > 0")


register_optimizer("sgd", build_sgd, validate_sgd)
