"""``build_optimizer(cfg, boxed_abstract_params)``: the run's optax transform.

global-norm clip (all params together) -> one transform per group of
``config.optim.groups`` (``optax.partition`` over labels from path rules),
each built by its registry entry with the shared schedule (times the group's
``lr_mult``), decoupled weight decay (times ``wd_mult``) masked by
``config.optim.no_decay``.
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import optax

from qtrain.config.validate import ConfigError
from qtrain.optim import adamw as _adamw  # noqa: F401  (registers adamw, frozen)
from qtrain.optim import apollo as _apollo  # noqa: F401  (registers apollo)
from qtrain.optim import fira as _fira  # noqa: F401  (registers fira)
from qtrain.optim import galore as _galore  # noqa: F401  (registers galore)
from qtrain.optim import muon as _muon  # noqa: F401  (registers muon)
from qtrain.optim import zo_sgd as _zo_sgd  # noqa: F401  (registers sgd)
from qtrain.optim.groups import assign_groups, decay_mask, param_path, parse_groups
from qtrain.optim.registry import get_optimizer
from qtrain.optim.schedule import learning_rate_schedule
from qtrain.optim.wrappers import wrap


def _scaled(schedule, mult: float):
  return schedule if mult == 1.0 else (lambda count: mult * schedule(count))


def _group_transform(cfg, group, schedule, params_by_path):
  o = cfg.optim
  definition = get_optimizer(group.optimizer, "config.optim.groups[].optimizer")
  no_decay = tuple(o.no_decay)
  tx = definition.build(
      o.get(group.optimizer) if definition.has_group else None,
      learning_rate=_scaled(schedule, group.lr_mult),
      weight_decay=o.weight_decay * group.wd_mult,
      decay_mask=lambda params: decay_mask(params, no_decay),
      params=params_by_path)
  # Momentum reset and low-rank refactorization (config.optim.restarts/refactor)
  # wrap any group's transform; off by default.
  return wrap(tx, o, params_by_path)


def build_optimizer(cfg, boxed_abstract_params) -> optax.GradientTransformation:
  """The transform for params shaped like ``nn.unbox(boxed_abstract_params)``.

  Raises ConfigError listing params no group rule matches; prints the rules
  that matched nothing.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      boxed_abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  paths = [param_path(p) for p, _ in flat]
  try:
    groups = parse_groups(cfg.optim)
    index, unused = assign_groups(groups, paths)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for i in unused:
    print(f"config.optim.groups[{i}] (pattern {groups[i].pattern!r}) matched no param",
          file=sys.stderr, flush=True)
  schedule = learning_rate_schedule(cfg)
  used = sorted(set(index.values()))
  transforms = {}
  for i in used:
    members = {p: leaf for p, (_, leaf) in zip(paths, flat) if index[p] == i}
    transforms[groups[i].label + f"#{i}"] = _group_transform(cfg, groups[i], schedule, members)
  if len(used) == 1:  # One group: the plain transform (no partition state).
    tx = next(iter(transforms.values()))
  else:
    labels = [groups[index[p]].label + f"#{index[p]}" for p in paths]
    tx = optax.partition(transforms, jax.tree_util.tree_unflatten(treedef, labels))
  if cfg.optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip), tx)
  # The compressed exchange keeps its compressor state (residuals, momenta,
  # PowerSGD's Q) beside the optimizer's, so it is checkpointed with it.
  from qtrain.parallel.exchange import with_exchange_state  # pylint: disable=g-import-not-at-top
  return with_exchange_state(cfg, tx, boxed_abstract_params)
