"""Compiled-step measurements shared by the memory tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qtrain.config import validate
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout
from qtrain.train import make_measured_step, make_steps
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params, abstract_state, state_shardings


def train_temp_bytes(cfg, measured: bool = False) -> int:
  """XLA's temp bytes of ``cfg``'s compiled first-order train step on one
  device (compile only, batches of [global_batch_size, seq_len] tokens);
  ``measured``: the telemetry step instead."""
  validate(cfg, n_devices=1)
  model, seq, rows = build_model(cfg), cfg.data.seq_len, cfg.data.global_batch_size
  layout = Layout.from_config(cfg, jax.devices()[:1])
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, seq))
    sh = state_shardings(model, tx, layout.mesh, seq)
    keys = ("inputs", "targets")
    train = (make_measured_step(cfg, model, tx, layout.mesh, sh, batch_keys=keys) if measured
             else make_steps(cfg, model, tx, layout.mesh, sh, batch_keys=keys)[0])
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
    compiled = train.lower(abstract_state(model, tx, layout.mesh, seq),
                           {"inputs": tokens, "targets": tokens}).compile()
  return compiled.memory_analysis().temp_size_in_bytes
