"""Checks of ``config.optim`` before anything is built, and of a resume.

``validate_optim`` runs from ``qtrain.config.validate``; ``check_resume`` runs
from the loop with the config a run was started with (its ``config.json``).
"""

from __future__ import annotations

import re

from qtrain.config.validate import ConfigError
from qtrain.optim import adamw as _adamw  # noqa: F401  (registers adamw, frozen)
from qtrain.optim.groups import parse_groups
from qtrain.optim.registry import get_optimizer
from qtrain.optim.schedule import decay_horizon


def _require(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def _check_schedule(cfg) -> None:
  o = cfg.optim
  _require(o.lr > 0, f"config.optim.lr={o.lr} must be > 0")
  _require(o.decay_steps >= 0,
           f"config.optim.decay_steps={o.decay_steps} must be >= 0 (0 = config.train.steps)")
  horizon = decay_horizon(cfg)
  _require(0 <= o.warmup_steps < horizon,
           f"config.optim.warmup_steps={o.warmup_steps} must be in [0, {horizon}), the cosine "
           "horizon (config.optim.decay_steps, or config.train.steps when it is 0)")
  _require(0.0 <= o.min_lr_ratio <= 1.0, f"config.optim.min_lr_ratio={o.min_lr_ratio} "
           "must be in [0, 1]")
  _require(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
  _require(o.grad_clip >= 0, f"config.optim.grad_clip={o.grad_clip} must be >= 0 (0 = off)")


def validate_optim(cfg) -> None:
  """Raises ConfigError naming the first wrong ``config.optim`` field."""
  o = cfg.optim
  _check_schedule(cfg)
  for i, pattern in enumerate(o.no_decay):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(f"config.optim.no_decay[{i}]={pattern!r} is not a regex: {e}") from None
  try:
    get_optimizer(o.name, "config.optim.name")
    for i, group in enumerate(parse_groups(o)):
      definition = get_optimizer(group.optimizer, f"config.optim.groups[{i}].optimizer")
      if not definition.has_group:
        continue
      where = f"config.optim.{group.optimizer}"
      _require(group.optimizer in o, f"{where} is missing: add the optimizer's config group "
               "to qtrain/config/base.py")
      if definition.validate:
        definition.validate(o[group.optimizer], where)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  from qtrain.optim.wrappers import validate_wrappers  # pylint: disable=g-import-not-at-top
  validate_wrappers(o)


def _optimizer_layout(cfg) -> list[tuple[str, str]]:
  """(pattern, optimizer) per group: what the saved optimizer state holds."""
  if "groups" not in cfg.optim:  # A run saved before groups existed: one adamw group.
    return [(".*", cfg.optim.name)]
  # The restarts and refactor wrappers add their own state around the groups'.
  wrapped = [(f"{w}.every>0", "wrapper") for w in ("restarts", "refactor")
             if cfg.optim.get(w) is not None and cfg.optim[w].every > 0]
  return [(g.pattern, g.optimizer) for g in parse_groups(cfg.optim)] + wrapped


def check_resume(saved_cfg, cfg) -> None:
  """Raises ConfigError when resuming ``saved_cfg``'s checkpoints under ``cfg``
  would silently change the run: a different cosine horizon (raising
  ``train.steps`` with ``decay_steps=0`` rescales the whole schedule), or a
  different optimizer layout (the saved state would not fit)."""
  was, now = decay_horizon(saved_cfg), decay_horizon(cfg)
  _require(was == now, f"config.optim.decay_steps: this run's cosine schedule spans {was} "
           f"updates, the config now gives {now} (config.optim.decay_steps="
           f"{cfg.optim.decay_steps}, config.train.steps={cfg.train.steps}); resuming would "
           f"rescale the learning rate mid-run. To train on past the old horizon at the final "
           f"rate pass --config.optim.decay_steps={was}; for a new schedule use a new workdir "
           "with --config.train.init_from")
  old, new = _optimizer_layout(saved_cfg), _optimizer_layout(cfg)
  _require(old == new, f"config.optim.name/groups: the checkpoints hold optimizer state for "
           f"{old}, the config asks for {new}; restore the old values, or start a new workdir "
           "with --config.train.init_from to change optimizer")
