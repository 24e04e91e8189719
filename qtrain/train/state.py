"""The train state and its sharded initialisation.

Init in three moves (nanodo, maxtext): ``jax.eval_shape`` the init, turn the
params' logical axes into shardings, ``jax.jit(init, out_shardings=...)`` —
nothing is materialised on one device first.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from qtrain.parallel.rules import logical_sharding, replicated


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Batches consumed (skipped non-finite updates included).
  params: Any
  opt_state: Any
  skipped: jax.Array  # Updates dropped for a non-finite loss or gradient.


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.unbox(model.init(rng, tokens)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
  return init


def state_shardings(model, tx, mesh, seq_len: int):
  """Shardings of every TrainState leaf, from the params' logical axes."""
  boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, seq_len), jnp.int32)),
                         jax.random.key(0))["params"]
  param_sh = logical_sharding(boxed, mesh)
  abstract = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.key(0))
  # Optimizer moments mirror the params' tree; scalars (counts) are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: replicated(mesh))
  return TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh,
                    skipped=replicated(mesh))


def init_state(model, tx, mesh, seed: int, seq_len: int) -> TrainState:
  shardings = state_shardings(model, tx, mesh, seq_len)
  init = jax.jit(_init_fn(model, tx, seq_len), out_shardings=shardings)
  return init(jax.random.key(seed))


def abstract_state(model, tx, mesh, seq_len: int) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  shardings = state_shardings(model, tx, mesh, seq_len)
  abstract = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
