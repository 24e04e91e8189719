"""Helpers shared by the optimizer tests (test_memopt, test_optim_recipes)."""

from __future__ import annotations


def namedtuples(tree) -> list:
  """Every namedtuple inside ``tree`` (optax states nest them in tuples,
  lists and dicts), outer before inner."""
  out = []

  def visit(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      out.append(x)
    if isinstance(x, (tuple, list)):
      for y in x:
        visit(y)
    elif isinstance(x, dict):
      for y in x.values():
        visit(y)

  visit(tree)
  return out
