"""Walking a jaxpr with its sub-jaxprs: what a traced program runs.

Structural tests and benchmarks count primitives in the jaxpr of a train
step or a gradient (the cuDNN attention forward per layer, the rotation
gemms remat runs again): there, not in compiled HLO, JAX's remat has already
decided what runs twice, and the ops do not depend on the backend.
"""

from __future__ import annotations

from collections.abc import Iterator


def eqns(jaxpr, enclosing: tuple = ()) -> Iterator[tuple]:
  """(eqn, enclosing eqns) for every equation of ``jaxpr`` (a Jaxpr or
  ClosedJaxpr) and of the sub-jaxprs in its params (pjit, scan and while
  bodies once, each cond branch, checkpoint and custom-VJP bodies), outermost
  first; ``enclosing`` is the chain of equations whose params hold it."""
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    yield eqn, enclosing
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          yield from eqns(sub, (*enclosing, eqn))


def count(jaxpr, primitive: str) -> int:
  """Equations of ``primitive`` (its name) in ``jaxpr``, sub-jaxprs included."""
  return sum(eqn.primitive.name == primitive for eqn, _ in eqns(jaxpr))
