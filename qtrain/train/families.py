"""Step families: ``config.train.step`` picks how a train step turns the one
shared loss into an update.

A family is ``build(ctx: StepContext) -> train_step``, a jitted
``(state, batch) -> (state, metrics)``. ``first_order`` (``first_order.py``)
differentiates the loss; a zeroth-order family would evaluate ``ctx.loss_fn``
at perturbed params with ``step_key(state)``, a compressed-exchange family
would transform the gradients before ``apply_if_finite``. Register with
``register_step_family("zeroth_order", build)`` from a new module here.

Metrics every family returns (float32): loss, objective, z_loss, grad_norm,
tokens, finite, lr, skipped; plus any scalars or per-layer vectors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from qtrain.config.validate import ConfigError
from qtrain.train.state import TrainState
from qtrain.train.zo_config import validate_zo

STEP_FAMILIES: dict[str, Callable[["StepContext"], Callable]] = {}


def register_step_family(name: str, build: Callable[["StepContext"], Callable]) -> None:
  STEP_FAMILIES[name] = build


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a family builds its step from."""
  cfg: Any  # The run config; a family reads its own options from it.
  loss_fn: Callable  # (params, batch, rng) -> (objective, aux), see qtrain.train.loss.
  tx: optax.GradientTransformation
  schedule: optax.Schedule  # lr of the n-th applied update, for the `lr` metric.
  state_sh: TrainState  # Shardings of the state.
  batch_sh: Any  # Sharding of every batch array.
  out_sh: Any  # Sharding of the metrics (replicated).

  def jit(self, step_fn) -> Callable:
    """``step_fn(state, batch)`` jitted with explicit shardings, the state donated."""
    return jax.jit(step_fn, in_shardings=(self.state_sh, self.batch_sh),
                   out_shardings=(self.state_sh, self.out_sh), donate_argnums=(0,))


def apply_if_finite(state: TrainState, grads, finite, tx) -> TrainState:
  """The next state: ``tx``'s update applied when ``finite``, else dropped
  (params and optimizer state unchanged, so the optimizer's count, which the
  schedule reads, counts applied updates only) and counted in ``skipped``."""

  def update(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A conditional rather than a select: a finite step pays nothing for the
  # guard (the select kernels took 8.8 ms of a 252 ms llama_1b step on H100).
  params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o),
                                   state.params, state.opt_state)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       skipped=state.skipped + (1 - finite.astype(jnp.int32)))


def step_metrics(state: TrainState, new_state: TrainState, objective, aux, grad_norm,
                 finite, schedule) -> dict:
  """The metrics every family returns. ``lr`` is the schedule at the number of
  updates applied before this step (the rate this step's update used or, when
  skipped, would have used); ``skipped`` counts skipped steps so far."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  metrics = {"loss": aux["loss"], "objective": objective, "z_loss": aux["z_loss"],
             "grad_norm": grad_norm, "tokens": aux["tokens"], "finite": finite,
             "lr": schedule(state.step - state.skipped), "skipped": new_state.skipped}
  metrics = {k: f32(v) for k, v in metrics.items()}
  return {**{k: f32(v) for k, v in aux.get("sown", {}).items()}, **metrics}


def validate_step(cfg) -> None:
  """Raises ConfigError for an unknown ``config.train.step`` or a bad
  ``config.train.collect``."""
  t = cfg.train
  if t.step not in STEP_FAMILIES:
    raise ConfigError(f"config.train.step={t.step!r} is not a step family; use one of "
                      f"{sorted(STEP_FAMILIES)}")
  collect = t.collect
  if isinstance(collect, str) or not all(isinstance(c, str) and c for c in collect):
    raise ConfigError(f"config.train.collect={collect!r} must be a tuple of collection "
                      "names, e.g. ('intermediates',)")
  if "params" in collect:
    raise ConfigError("config.train.collect names 'params': collect sown collections "
                      "such as 'intermediates', never the params")
  validate_zo(cfg)  # config.zo (qtrain/train/zo_config.py).
  from qtrain.parallel.exchange import validate_exchange  # pylint: disable=g-import-not-at-top
  validate_exchange(cfg)


def get_family(name: str):
  if name not in STEP_FAMILIES:
    raise ConfigError(f"config.train.step={name!r} is not a step family; use one of "
                      f"{sorted(STEP_FAMILIES)}")
  return STEP_FAMILIES[name]
