"""The contract every registered optimizer meets (after optax's
contrib/_common_test.py), and optimizer-state shardings for state leaves of
any shape on an 8-device mesh."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import default
from qtrain.optim import OPTIMIZERS, build_optimizer, opt_state_shardings

# Param paths like the model's, so no_decay and group rules apply as in a run.
SHAPES = {"embedding": (16, 8), "decoder": {"layers": {"attn_norm": {"scale": (2, 8)},
                                                       "q_proj": {"kernel": (2, 8, 16)}}},
          "lm_head": {"kernel": (8, 16)}}
# An FSDP-like layout: dims of size 16 split over the 8 devices.
SPECS = {"embedding": P("data", None), "decoder": {"layers": {"attn_norm": {"scale": P()},
                                                              "q_proj": {"kernel": P(None, None, "data")}}},
         "lm_head": {"kernel": P(None, "data")}}


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
                      is_leaf=_is_shape)


def _config(name: str, **optim):
  c = default.get_config()
  c.train.steps = 20
  c.optim.update(lr=1e-2, warmup_steps=2, **optim)
  c.optim.groups = (dict(pattern="lm_head/.*", optimizer=name, lr_mult=0.5),
                    dict(pattern=".*", optimizer=name))
  return c


CASES = [(name, {}) for name in sorted(OPTIMIZERS)] + [("adamw", {"grad_clip": 0.0})] + [
    # The projecting optimizers below full rank, refreshing within the 3 steps.
    ("galore", {"galore": {"rank": 2, "update_proj_gap": 2}}),
    ("fira", {"fira": {"rank": 2, "update_proj_gap": 2}}),
    ("apollo", {"apollo": {"rank": 2, "update_proj_gap": 2}}),
    ("apollo", {"apollo": {"mode": "mini", "scale": 128 ** 0.5}}),
]


def _tx(name, optim, multi_steps):
  params = _params()
  tx = build_optimizer(_config(name, **optim), jax.eval_shape(lambda: params))
  return optax.MultiSteps(tx, every_k_schedule=2).gradient_transformation() if multi_steps else tx


def _signature(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("multi_steps", [False, True])
@pytest.mark.parametrize("name, optim", CASES)
def test_contract_one_trace_stable_state_and_sharded_equals_single_device(name, optim,
                                                                          multi_steps):
  tx = _tx(name, optim, multi_steps)
  params = _params()
  grads = [_params(seed) for seed in (1, 2, 3)]
  traces = []

  def update(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  # Single device, plain jit.
  ref_p, ref_s = params, tx.init(params)
  init_sig = _signature(ref_s)
  step = jax.jit(update)
  for g in grads:
    ref_p, ref_s = step(ref_p, ref_s, g)
  assert len(traces) == 1, "the second step recompiled"
  assert _signature(ref_s) == init_sig, "optimizer state changed structure or dtype"
  assert _signature(ref_p) == _signature(params)

  # 8 devices, params FSDP-sharded, state shardings derived from them.
  mesh = _mesh()
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS,
                          is_leaf=lambda x: isinstance(x, P))
  state_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, param_sh, mesh)
  p = jax.device_put(params, param_sh)
  s = jax.jit(tx.init, out_shardings=state_sh)(p)
  sharded = jax.jit(update, in_shardings=(param_sh, state_sh, param_sh),
                    out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
  for g in grads:
    p, s = sharded(p, s, jax.device_put(g, param_sh))
  assert p["embedding"].sharding.spec == P("data", None)
  # Same float32 math; only the global norm's reduction order differs.
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


class ToyProjectedState(NamedTuple):
  count: jax.Array
  moment: dict  # Param-shaped.
  proj: dict  # [first dim, RANK] per param, like a GaLore projector [m, r].


RANK = 2


def toy_projected_momentum() -> optax.GradientTransformation:
  """Momentum in a random rank-2 column space per param: a state with leaves
  that are not param-shaped (what GaLore keeps)."""

  def init(params):
    proj = jax.tree.map(lambda p: jnp.ones((p.shape[0], RANK), p.dtype) / p.shape[0], params)
    return ToyProjectedState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params), proj)

  def update(grads, state, params=None):
    del params

    def project(g, q):  # q q^T g along the first dim, any trailing dims.
      return jnp.tensordot(q @ q.T, g, axes=1)

    moment = jax.tree.map(lambda m, g, q: 0.9 * m + project(g, q), state.moment, grads, state.proj)
    return (jax.tree.map(lambda m: -0.1 * m, moment),
            ToyProjectedState(state.count + 1, moment, state.proj))

  return optax.GradientTransformation(init, update)


def test_state_shardings_for_leaves_of_any_shape():
  mesh = _mesh()
  params = _params()
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS,
                          is_leaf=lambda x: isinstance(x, P))
  tx = optax.chain(optax.clip_by_global_norm(1.0), toy_projected_momentum())
  abstract = jax.eval_shape(tx.init, params)
  sh = opt_state_shardings(abstract, params, param_sh, mesh)
  toy = sh[1]
  assert toy.count.spec == P()
  assert jax.tree.map(lambda s: s.spec, toy.moment) == jax.tree.map(lambda s: s.spec, param_sh)
  # A projector keeps its param's axes only where the dims agree:
  assert toy.proj["embedding"].spec == P("data", None)  # [16, 2] of a [16, 8] param.
  assert toy.proj["lm_head"]["kernel"].spec == P(None, None)  # [8, 2] of [8, 16] split on dim 1.
  assert toy.proj["decoder"]["layers"]["q_proj"]["kernel"].spec == P(None, None)
  # ...and the sharded state initialises and updates under jit.
  p = jax.device_put(params, param_sh)
  state = jax.jit(tx.init, out_shardings=sh)(p)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p), in_shardings=(param_sh, sh, param_sh),
                 out_shardings=(param_sh, sh))
  updates, state = step(p, state, p)
  ref, _ = tx.update(params, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
