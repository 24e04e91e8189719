"""The train state and its sharded initialisation; the one home of the
model's abstract params.

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

from qtrain.optim.sharding import opt_state_shardings
from qtrain.parallel import exchange
from qtrain.parallel.rules import logical_sharding, replicated
from qtrain.quant.dot_general import AMAX


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Batches consumed (skipped non-finite updates included).
  params: Any
  opt_state: Any
  skipped: jax.Array  # Updates dropped for a non-finite loss or gradient.
  # Raw key data (``jax.random.key_data``, uint32) so orbax can save it; each
  # step draws ``fold_in(wrap_key_data(rng), step)`` (see ``step_key``).
  rng: jax.Array
  # Delayed fp8 scaling's absmax histories (the linen collection
  # ``qtrain.quant.delayed.AMAX``, replicated); {} without delayed scaling.
  amax: Any = flax.struct.field(default_factory=dict)


def step_key(state: TrainState) -> jax.Array:
  """A fresh key per step (stochastic rounding, ZO perturbations), the same
  for a step whether the run was resumed or not."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _tokens(seq_len: int):
  return jnp.zeros((1, seq_len), jnp.int32)


def _abstract_variables(model: nn.Module, seq_len: int) -> dict:
  return jax.eval_shape(lambda r: model.init(r, _tokens(seq_len)), jax.random.key(0))


def abstract_params(model: nn.Module, seq_len: int):
  """The model's params as ShapeDtypeStructs, boxed (``nn.LogicallyPartitioned``
  carrying logical axis names), without allocating anything."""
  return _abstract_variables(model, seq_len)["params"]


def _values(boxed):
  """The ShapeDtypeStructs inside the boxes (``nn.unbox`` would apply the
  logical sharding constraint, which needs a trace)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(model: nn.Module, mesh, seq_len: int):
  """NamedShardings of the (unboxed) params, from their logical axes."""
  return logical_sharding(abstract_params(model, seq_len), mesh)


def params_target(model: nn.Module, mesh, seq_len: int):
  """The params' ShapeDtypeStructs with their shardings: what a checkpoint's
  params are restored into (evaluation, PTQ, init_from)."""
  boxed = abstract_params(model, seq_len)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      _values(boxed), logical_sharding(boxed, mesh))


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  def init(rng):
    variables = model.init(rng, _tokens(seq_len))
    params = nn.unbox(variables["params"])
    # The step stream is independent of the params init (which uses rng itself).
    step_rng = jax.random.key_data(jax.random.fold_in(rng, 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32),
                      rng=step_rng, amax=nn.unbox(dict(variables.get(AMAX, {}))))
  return init


def state_shardings(model, tx, mesh, seq_len: int) -> TrainState:
  """Shardings of every TrainState leaf: params from their logical axes,
  optimizer state by ``qtrain.optim.opt_state_shardings`` (any state shape)."""
  variables = _abstract_variables(model, seq_len)
  boxed = variables["params"]
  params = _values(boxed)
  param_sh = logical_sharding(boxed, mesh)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_sh = opt_state_shardings(abstract_opt, params, param_sh, mesh)
  # Per-replica compressor state (the compressed exchange) is split over
  # `data`, which the generic rule cannot tell from the state's shapes.
  opt_sh = exchange.with_state_shardings(opt_sh, abstract_opt, param_sh, mesh)
  rep = replicated(mesh)
  amax = jax.tree.map(lambda _: rep, _values(dict(variables.get(AMAX, {}))))
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh, skipped=rep, rng=rep,
                    amax=amax)


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
