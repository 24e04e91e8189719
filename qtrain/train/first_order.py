"""The first-order step family: gradients of the shared loss, one optax update.

A non-finite objective or gradient norm is detected inside the step: the
update is dropped (``apply_if_finite``), ``skipped`` counts it, and the
metrics carry ``finite=0`` so the loop can stop if the config says so.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from qtrain.train.families import (StepContext, apply_if_finite, register_step_family,
                                   step_metrics)
from qtrain.train.state import TrainState, step_key


def train_step(state: TrainState, batch, *, loss_fn, tx, schedule):
  """(state, batch) -> (state, metrics); pure, jitted by ``build``."""
  (objective, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, step_key(state))
  grad_norm = optax.tree.norm(grads).astype(jnp.float32)
  finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
  new_state = apply_if_finite(state, grads, finite, tx)
  return new_state, step_metrics(state, new_state, objective, aux, grad_norm, finite, schedule)


def build(ctx: StepContext):
  return ctx.jit(functools.partial(train_step, loss_fn=ctx.loss_fn, tx=ctx.tx,
                                   schedule=ctx.schedule))


register_step_family("first_order", build)
