"""The optimizer registry: ``config.optim.name`` and each group's ``optimizer``
name an entry here.

An entry is a builder plus a validator of its own config group
``config.optim.<name>`` (defaults in ``qtrain/config/base.py``, the one source
of truth for defaults). A new optimizer (Muon, GaLore, zeroth-order) is a new
module in this package that calls ``register_optimizer`` and a new group in
base.py; nothing else changes::

  def build(group_cfg, *, learning_rate, weight_decay, decay_mask, params):
    return optax.contrib.muon(learning_rate, beta=group_cfg.beta, ...)
  register_optimizer("muon", build, validate=lambda c, where: ...)

``build`` receives the schedule (already scaled by the group's ``lr_mult``),
the group's decoupled weight decay and decay-mask callable, and ``params``:
{path: boxed abstract param} of the params in its group, so it can read shapes
and logical axis names (e.g. the scanned ``layers`` axis Muon must treat as a
batch axis).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerDef:
  name: str
  # (group_cfg, *, learning_rate, weight_decay, decay_mask, params) -> transform.
  build: Callable[..., optax.GradientTransformation]
  # (group_cfg, where) -> None; raises ValueError naming ``where.<field>``.
  validate: Callable[..., None] | None = None
  # Whether the optimizer reads a config group ``config.optim.<name>``.
  has_group: bool = True


OPTIMIZERS: dict[str, OptimizerDef] = {}


def register_optimizer(name: str, build, validate=None, has_group: bool = True) -> None:
  """Adds (or replaces) the optimizer ``name``."""
  OPTIMIZERS[name] = OptimizerDef(name, build, validate, has_group)


def get_optimizer(name: str, where: str) -> OptimizerDef:
  if name not in OPTIMIZERS:
    raise ValueError(f"{where}={name!r} is not a registered optimizer; use one of "
                     f"{sorted(OPTIMIZERS)} (or register_optimizer in qtrain/optim)")
  return OPTIMIZERS[name]
