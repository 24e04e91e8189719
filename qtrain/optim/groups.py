"""Ordered path rules over params: optimizer groups and the weight-decay mask.

``config.optim.groups`` is an ordered tuple of dicts; the first rule whose
``pattern`` fullmatches a param's path ("decoder/layers/attn/q_proj/kernel")
puts it in that group::

  groups = (dict(pattern=r"embedding|lm_head/kernel", optimizer="adamw", lr_mult=0.5),
            dict(pattern=r".*"))   # optimizer defaults to config.optim.name

Every param must be matched (a per-param policy that silently skips a param
is a bug), and a rule that matched nothing is reported.
"""

from __future__ import annotations

import dataclasses
import re

import jax

GROUP_KEYS = ("pattern", "optimizer", "lr_mult", "wd_mult")


@dataclasses.dataclass(frozen=True)
class Group:
  pattern: str
  optimizer: str  # A name in qtrain.optim.registry.OPTIMIZERS.
  lr_mult: float = 1.0  # Scales the schedule for this group.
  wd_mult: float = 1.0  # Scales config.optim.weight_decay for this group.

  @property
  def label(self) -> str:
    return f"{self.optimizer}:{self.pattern}"


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_keys(path) -> tuple[str, ...]:
  return tuple(_key(k) for k in path)


def param_path(path) -> str:
  """A pytree key path as "decoder/layers/attn/q_proj/kernel"."""
  return "/".join(path_keys(path))


def decay_mask(params, no_decay_patterns) -> object:
  """True where weight decay applies: paths matching no pattern."""
  compiled = [re.compile(p) for p in no_decay_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.fullmatch(param_path(path)) for p in compiled), params)


def parse_groups(optim_cfg) -> list[Group]:
  """Groups of ``config.optim.groups``; ValueError naming a bad rule."""
  groups = []
  for i, rule in enumerate(optim_cfg.groups):
    where = f"config.optim.groups[{i}]"
    rule = rule.to_dict() if hasattr(rule, "to_dict") else dict(rule)
    for key in rule:
      if key not in GROUP_KEYS:
        raise ValueError(f"{where}.{key} is not a group field; use {GROUP_KEYS}")
    try:
      re.compile(rule.get("pattern"))
    except (re.error, TypeError) as e:
      raise ValueError(f"{where}.pattern={rule.get('pattern')!r} is not a regex: {e}") from None
    group = Group(pattern=rule["pattern"], optimizer=rule.get("optimizer") or optim_cfg.name,
                  lr_mult=float(rule.get("lr_mult", 1.0)), wd_mult=float(rule.get("wd_mult", 1.0)))
    for field in ("lr_mult", "wd_mult"):
      if not getattr(group, field) >= 0:
        raise ValueError(f"{where}.{field}={getattr(group, field)} must be >= 0")
    groups.append(group)
  if not groups:
    raise ValueError("config.optim.groups is empty; use e.g. (dict(pattern=r'.*'),)")
  return groups


def assign_groups(groups: list[Group], paths: list[str]) -> tuple[dict[str, int], list[int]]:
  """({path: index of the first matching group}, indices of unused groups).

  Raises ValueError listing the params no rule matched.
  """
  compiled = [re.compile(g.pattern) for g in groups]
  index, unmatched = {}, []
  for path in paths:
    i = next((i for i, p in enumerate(compiled) if p.fullmatch(path)), None)
    if i is None:
      unmatched.append(path)
    else:
      index[path] = i
  if unmatched:
    shown = ", ".join(unmatched[:20]) + (f" (+{len(unmatched) - 20} more)"
                                          if len(unmatched) > 20 else "")
    raise ValueError(f"config.optim.groups matches no rule for {len(unmatched)} params: "
                     f"{shown}; add a rule for them (a last dict(pattern=r'.*') catches all)")
  unused = [i for i in range(len(groups)) if i not in set(index.values())]
  return index, unused
