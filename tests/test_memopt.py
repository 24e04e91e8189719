"""Memory-efficient optimizers and forms (issue 11) against independent
references: GaLore at full rank vs optax's Adam and at rank r vs float64
NumPy; Fira's and APOLLO's updates vs float64 NumPy of their formulas; the
SLTrain form vs float64 NumPy; refactorization keeps every layer's function;
momentum reset zeroes exactly the moments it names; every configs/optim file
validates and builds. (The shared optimizer contract, sharded included, runs
them from tests/test_optim.py's CASES.)

Tolerances: float32 against float64 with SVDs and norm ratios in between;
1e-5 relative where the computation is a few float32 ops deep, 1e-4 where
an SVD or an Adam division by sqrt(v) of small entries amplifies rounding.
"""

from __future__ import annotations

import glob
import os
import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from optax.contrib import GaLoreState, scale_by_galore

from configs import default
from optim_util import namedtuples
from qtrain.config import ConfigError, validate
from qtrain.config.variants import config_module
from qtrain.layers.hooks import Hooks
from qtrain.layers.linear import Linear
from qtrain.layers.registry import trace_sites
from qtrain.layers.weights import form_rules, sparse_support
from qtrain.optim import build_optimizer
from qtrain.optim.apollo import build_apollo
from qtrain.optim.fira import build_fira
from qtrain.optim.galore import build_galore
from qtrain.optim.groups import param_path
from qtrain.optim.wrappers import low_rank_pairs, momentum_reset, refactorize, wrap
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params

B1, B2, EPS = 0.9, 0.95, 1e-8
# A scanned stack (tall matrices: left projection), a wide 2-D matrix (right
# projection) and a norm scale (not a matrix), with their logical names.
LAYOUT = {"decoder/layers/mlp/up_proj/kernel": ((2, 8, 5), ("layers", "embed", "mlp")),
          "lm_head/kernel": ((5, 8), ("embed", "vocab")),
          "final_norm/scale": ((5,), ("norm",))}


def _nest(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    *head, last = path.split("/")
    d = out
    for k in head:
      d = d.setdefault(k, {})
    d[last] = value
  return out


def _flat(tree) -> dict:
  return {param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _boxed(layout):
  return {p: nn.Partitioned(jax.ShapeDtypeStruct(s, jnp.float32), names)
          for p, (s, names) in layout.items()}


def _grads(layout, steps, seed=0, growth=1.0):
  """Gradients for ``steps`` updates, step t scaled by growth**t (a growing
  norm makes the limiters act)."""
  rng = np.random.default_rng(seed)
  return [{p: rng.normal(size=s) * growth ** t for p, (s, _) in layout.items()}
          for t in range(steps)]


def _run(tx, grads64):
  """Updates of ``tx`` (float32) for the float64 gradient dicts, as float64 dicts."""
  params = _nest({p: jnp.zeros(g.shape, jnp.float32) for p, g in grads64[0].items()})
  state, out = tx.init(params), []
  step = jax.jit(tx.update)
  for g in grads64:
    u, state = step(_nest({p: jnp.asarray(x, jnp.float32) for p, x in g.items()}), state, params)
    out.append({p: np.asarray(x, np.float64) for p, x in _flat(u).items()})
  return out


def _cfg(**fields):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(fields)


def _np_adam_step(m, v, g, t):
  m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g ** 2
  return m, v, (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)


def _matrices(path, x, fn):
  """fn on each matrix of a leaf (each layer of a stack)."""
  return np.stack([fn(f"{path}#{i}", m) for i, m in enumerate(x)]) if x.ndim == 3 else fn(path, x)


# ------------------------------------------------------------------- GaLore --


def test_galore_at_full_rank_without_refresh_equals_adam():
  # Square matrices whose first gradient is diagonal with distinct decreasing
  # entries: the SVD's U is the identity up to signs, and Adam in a basis of
  # signed unit vectors is Adam. (For any other basis it is not: Adam is not
  # rotation-equivariant, so "full rank = Adam" holds exactly only here.)
  layout = {"decoder/layers/attn/q_proj/kernel": ((2, 6, 6), ("layers", "embed", "q_heads")),
            "lm_head/kernel": ((6, 6), ("embed", "vocab")), "final_norm/scale": ((6,), ("norm",))}
  grads = _grads(layout, 4, seed=1)
  diag = np.diag(np.linspace(3.0, 1.0, 6))
  grads[0]["decoder/layers/attn/q_proj/kernel"] = np.stack([diag, 2 * diag])
  grads[0]["lm_head/kernel"] = diag
  c = _cfg(rank=6, update_proj_gap=10**6, scale=1.0, b1=B1, b2=B2, eps=EPS)
  galore = build_galore(c, learning_rate=1.0, weight_decay=0.0, decay_mask=None,
                        params=_boxed(layout))
  adam = optax.chain(optax.scale_by_adam(B1, B2, EPS), optax.scale(-1.0))
  for got, want in zip(_run(galore, grads), _run(adam, grads)):
    for p in want:  # float32 SVD of a diagonal matrix: P = +-I to rounding.
      np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=p)


def _np_galore(gs, rank, scale):
  """GaLore on one matrix, projector from the first gradient (no refresh)."""
  rows, cols = gs[0].shape
  left = rows >= cols  # optax's orientation: R = P^T G (tall), R = G Q (wide).
  u, _, vt = np.linalg.svd(gs[0], full_matrices=False)
  p = u[:, :rank] if left else vt[:rank].T
  m = v = 0.0
  out = []
  for t, g in enumerate(gs, 1):
    r = p.T @ g if left else g @ p
    m, v, psi = _np_adam_step(m, v, r, t)
    out.append(scale * (p @ psi if left else psi @ p.T))
  return out


def test_galore_rank_r_per_layer_matches_float64_numpy():
  grads = _grads(LAYOUT, 3, seed=2)
  c = _cfg(rank=2, update_proj_gap=100, scale=0.25, b1=B1, b2=B2, eps=EPS)
  got = _run(build_galore(c, learning_rate=1.0, weight_decay=0.0, decay_mask=None,
                          params=_boxed(LAYOUT)), grads)
  for path, (shape, _) in LAYOUT.items():
    if len(shape) == 1:
      continue
    seq = np.stack([g[path] for g in grads])  # [T, ...]
    if len(shape) == 3:  # Each layer its own SVD and moments.
      want = np.stack([_np_galore(list(seq[:, i]), 2, 0.25) for i in range(shape[0])], axis=1)
    else:
      want = np.stack(_np_galore(list(seq), 2, 0.25))
    np.testing.assert_allclose(np.stack([-g[path] for g in got]), want, rtol=1e-4, atol=1e-6,
                               err_msg=path)


def test_galore_stacked_refreshes_under_one_cond_with_one_shared_count():
  """Per-layer vmap keeps the step count unbatched, so the SVD sits in a
  lax.cond taken on refresh steps only (a batched count would turn it into a
  select that runs the SVD every step)."""
  c = _cfg(rank=2, update_proj_gap=10, scale=1.0, b1=B1, b2=B2, eps=EPS)
  tx = build_galore(c, learning_rate=1.0, weight_decay=0.0, decay_mask=None,
                    params=_boxed(LAYOUT))
  params = _nest({p: jnp.zeros(s, jnp.float32) for p, (s, _) in LAYOUT.items()})
  state = tx.init(params)
  counts = [x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
            if param_path(p).endswith("count")]
  assert counts and all(x.shape == () for x in counts)
  jaxpr = str(jax.make_jaxpr(tx.update)(params, state, params))
  assert jaxpr.count("cond[") == 2 and "svd" in jaxpr  # The stacked and the flat leaves'.


# --------------------------------------------------------------------- Fira --


def _np_fira(gs, rank, scale, gamma, acted):
  rows, cols = gs[0].shape
  left = rows >= cols
  u, _, vt = np.linalg.svd(gs[0], full_matrices=False)
  p = u[:, :rank] if left else vt[:rank].T
  m = v = 0.0
  prev, out = None, []
  for t, g in enumerate(gs, 1):
    r = p.T @ g if left else g @ p
    m, v, psi = _np_adam_step(m, v, r, t)
    axis = 0 if left else 1  # Norms over the projected dim: one per kept channel.
    phi = np.linalg.norm(psi, axis=axis) / (np.linalg.norm(r, axis=axis) + 1e-8)
    resid = g - (p @ r if left else r @ p.T)
    s = resid * (phi[None, :] if left else phi[:, None])
    norm = np.linalg.norm(s)
    if prev is not None:
      acted.append(norm / prev > gamma)
      limiter = max(norm / (prev + 1e-8), gamma) / gamma
      s, norm = s / limiter, norm / limiter
    prev = norm
    out.append(scale * ((p @ psi if left else psi @ p.T) + s))
  return out


def test_fira_matches_float64_numpy_of_its_formula():
  grads = _grads(LAYOUT, 4, seed=3, growth=1.5)  # Growing: the limiter must act.
  c = _cfg(rank=2, update_proj_gap=100, scale=1.0, gamma=1.01, b1=B1, b2=B2, eps=EPS)
  got = _run(build_fira(c, learning_rate=1.0, weight_decay=0.0, decay_mask=None,
                        params=_boxed(LAYOUT)), grads)
  acted = []
  for path, (shape, _) in LAYOUT.items():
    seq = np.stack([g[path] for g in grads])
    if len(shape) == 1:  # Not a matrix: Adam, unscaled.
      m = v = 0.0
      for t, g in enumerate(seq, 1):
        m, v, want = _np_adam_step(m, v, g, t)
        np.testing.assert_allclose(-got[t - 1][path], want, rtol=1e-5)
      continue
    if len(shape) == 3:
      want = np.stack([_np_fira(list(seq[:, i]), 2, 1.0, 1.01, acted)
                       for i in range(shape[0])], axis=1)
    else:
      want = np.stack(_np_fira(list(seq), 2, 1.0, 1.01, acted))
    np.testing.assert_allclose(np.stack([-g[path] for g in got]), want, rtol=1e-4, atol=1e-6,
                               err_msg=path)
  assert any(acted), "the limiter never acted: the test would not see it"


# ------------------------------------------------------------------- APOLLO --


def _np_apollo(gs, path, rank, gap, tensor_wise, scale, gamma, seed, acted):
  """APOLLO on one matrix or stack [..., m, n]; P drawn as the paper says
  (N(0, 1/r)) from the key the optimizer derives, as float64."""
  stack = gs[0].ndim == 3
  wide = gs[0].shape[-2] < gs[0].shape[-1]
  m = v = 0.0
  prev, out = None, []
  for t, g in enumerate(gs, 1):
    x = np.swapaxes(g, -1, -2) if wide else g
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), (t - 1) // gap),
                             zlib.crc32(path.encode()))
    shape = (*x.shape[:-2], rank, x.shape[-2])
    p = np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64) / np.sqrt(rank)
    r = p @ x
    m, v, r_tilde = _np_adam_step(m, v, r, t)
    axes = (-2, -1) if tensor_wise else (-2,)
    s = x * (np.sqrt((r_tilde ** 2).sum(axes, keepdims=True))
             / (np.sqrt((r ** 2).sum(axes, keepdims=True)) + 1e-8))
    norm = np.sqrt((s ** 2).sum((-2, -1)))
    if prev is not None:
      acted.append(np.any(norm / prev > gamma))
      limiter = np.maximum(norm / (prev + 1e-8), gamma) / gamma
      s, norm = s / limiter[..., None, None], norm / limiter
    prev = norm
    s = np.swapaxes(s, -1, -2) if wide else s
    out.append(scale * s)
  del stack
  return out


@pytest.mark.parametrize("mode, rank, scale", [("apollo", 2, 1.0), ("mini", 1, 128 ** 0.5)])
def test_apollo_matches_float64_numpy_of_its_formula(mode, rank, scale):
  grads = _grads(LAYOUT, 4, seed=4, growth=1.5)
  c = _cfg(mode=mode, rank=rank, update_proj_gap=2, scale=scale, gamma=1.01, b1=B1, b2=B2,
           eps=EPS, seed=7)
  got = _run(build_apollo(c, learning_rate=1.0, weight_decay=0.0, decay_mask=None,
                          params=_boxed(LAYOUT)), grads)
  acted = []
  for path, (shape, _) in LAYOUT.items():
    seq = [g[path] for g in grads]
    if len(shape) == 1:
      m = v = 0.0
      for t, g in enumerate(seq, 1):
        m, v, want = _np_adam_step(m, v, g, t)
        np.testing.assert_allclose(-got[t - 1][path], want, rtol=1e-5)
      continue
    want = _np_apollo(seq, path, rank, 2, mode == "mini", scale, 1.01, 7, acted)
    for t in range(len(seq)):
      np.testing.assert_allclose(-got[t][path], want[t], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{path} step {t}")
  assert any(acted), "the limiter never acted: the test would not see it"


# ------------------------------------------------------------------ SLTrain --


def test_sltrain_form_matches_float64_numpy_and_issues_three_sites():
  fan_in, fan_out, rank, density = 12, 10, 3, 0.25
  rules = form_rules((dict(pattern=".*", form="sparse_low_rank", rank=rank, density=density,
                           seed=5),))
  layer = Linear(fan_out, ("embed", "mlp"), hooks=Hooks(forms=rules, layer=1))
  x = np.random.default_rng(0).normal(size=(2, 3, fan_in))
  params = nn.unbox(layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))["params"])
  y = np.asarray(layer.apply({"params": params}, jnp.asarray(x, jnp.float32)), np.float64)
  a, b, s = (np.asarray(params[k], np.float64) for k in ("a", "b", "s"))
  nnz = round(density * fan_in * fan_out)
  assert a.shape == (fan_in, rank) and b.shape == (rank, fan_out) and s.shape == (nnz,)
  rows, cols = (np.asarray(i) for i in sparse_support(5, "", 1, fan_in, fan_out, nnz))
  dense_s = np.zeros((fan_in, fan_out))
  np.add.at(dense_s, (rows, cols), s)  # Duplicates add, as the form's scatter does.
  np.testing.assert_allclose(y, x @ a @ b + x @ dense_s, rtol=1e-5, atol=1e-6)
  # The support is fixed per (path, layer) and differs between layers.
  again = sparse_support(5, "", 1, fan_in, fan_out, nnz)
  assert all(np.array_equal(u, w) for u, w in zip(again, (rows, cols)))
  other = sparse_support(5, "", 0, fan_in, fan_out, nnz)
  assert not np.array_equal(np.asarray(other[0]) * fan_out + np.asarray(other[1]),
                            rows * fan_out + cols)

  # In a model every product is a MatmulSite: a, b and s of each projection.
  c = default.get_config("smoke")
  c.model.weight_forms = (dict(pattern=r"decoder/layers/mlp/.*", form="sparse_low_rank",
                               rank=8),)
  sites = trace_sites(build_model(c)).paths()
  for part in ("a", "b", "s"):
    assert f"decoder/layers/mlp/up_proj/{part}" in sites


# ------------------------------------------------------------------ restarts --


def _low_rank_model():
  c = default.get_config("smoke")
  c.model.vocab_size = 128  # The factors are per layer; the head's size is not the point.
  c.model.weight_forms = (
      dict(pattern=r"decoder/layers/attn/.*", form="low_rank", rank=8),
      dict(pattern=r"decoder/layers/mlp/.*", form="sparse_low_rank", rank=8, density=0.05))
  return build_model(c)


def test_refactorization_keeps_every_layer_function_and_balances_factors():
  model = _low_rank_model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, size=(2, 16)), jnp.int32)
  # Compiled: op by op, the model's init and apply and the QR/SVDs run ~10x slower.
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  pairs = low_rank_pairs(_flat(params))
  assert len(pairs) == 7  # q, k, v, o, gate, up, down.
  tx = refactorize(optax.set_to_zero(), every=2, pairs=pairs)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(tx.update)  # One program for both updates: the cond on the count decides.
  u1, state = update(zeros, state, params)  # Update 1: not due, the inner's zeros.
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u1))
  u2, state = update(zeros, state, params)  # Update 2: refactored.
  new = optax.apply_updates(params, u2)
  old_f, new_f = _flat(params), _flat(new)
  for a, b in pairs:
    w = np.asarray(old_f[a], np.float64) @ np.asarray(old_f[b], np.float64)
    a2, b2 = np.asarray(new_f[a], np.float64), np.asarray(new_f[b], np.float64)
    # Each layer's function (its A B) is unchanged, to float32 QR/SVD rounding.
    np.testing.assert_allclose(a2 @ b2, w, atol=1e-5 * np.abs(w).max(), err_msg=a)
    # ... and the factors are balanced: A^T A = B B^T = S (diagonal).
    ata, bbt = np.swapaxes(a2, -1, -2) @ a2, b2 @ np.swapaxes(b2, -1, -2)
    np.testing.assert_allclose(ata, bbt, atol=1e-4 * np.abs(ata).max(), err_msg=a)
    off = ata - np.einsum("...ii->...i", ata)[..., None] * np.eye(ata.shape[-1])
    assert np.abs(off).max() < 1e-4 * np.abs(ata).max(), a
    assert not np.allclose(a2, old_f[a], atol=1e-3), f"{a} was not refactored"
  for path in old_f:  # Everything else, sparse values included, untouched.
    if all(path not in pair for pair in pairs):
      np.testing.assert_array_equal(np.asarray(new_f[path]), np.asarray(old_f[path]))
  logits = jax.jit(lambda p: model.apply({"params": p}, tokens))
  np.testing.assert_allclose(logits(new), logits(params), rtol=1e-4, atol=1e-5)


def test_refactorization_refuses_a_rank_not_below_the_dims():
  # A B of rank < r: its SVD would zero factor directions, which then get no gradient.
  params = {"decoder/layers/attn/k_proj/a": jax.ShapeDtypeStruct((2, 64, 32), jnp.float32),
            "decoder/layers/attn/k_proj/b": jax.ShapeDtypeStruct((2, 32, 16), jnp.float32)}
  c = default.get_config()
  c.optim.refactor.every = 10
  with pytest.raises(ConfigError, match=r"config\.model\.weight_forms: .*k_proj has rank 32"):
    wrap(optax.adamw(1e-3), c.optim, params)


@pytest.mark.parametrize("moments", [("mu", "nu"), ("nu",)])
def test_momentum_reset_zeroes_exactly_the_named_moments(moments):
  inner = scale_by_galore(rank=2, update_proj_gap=100, base_optimizer=optax.scale_by_adam())
  tx = momentum_reset(inner, every=2, moments=moments)
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((3,))}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(3)]
  state, ref = tx.init(params), inner.init(params)
  for g in grads[:2]:  # Updates 1 and 2: no reset, exactly the inner transform.
    u, state = tx.update(g, state, params)
    u_ref, ref = inner.update(g, ref, params)
    jax.tree.map(np.testing.assert_array_equal, (u, state.inner), (u_ref, ref))
  # Update 3 (count 2): the named moments zeroed by hand, nothing else.
  adam = ref.base_optimizer_state
  zeroed = adam._replace(**{m: jax.tree.map(jnp.zeros_like, getattr(adam, m)) for m in moments})
  u_ref, ref = inner.update(grads[2], ref._replace(base_optimizer_state=zeroed), params)
  u, state = tx.update(grads[2], state, params)
  jax.tree.map(np.testing.assert_array_equal, (u, state.inner), (u_ref, ref))
  assert isinstance(state.inner, GaLoreState)
  assert int(state.inner.count) == 3 and int(state.inner.base_optimizer_state.count) == 3


def test_restarts_wrapper_sharded_equals_single_device_one_trace():
  """Reset + refactorization around AdamW on low-rank factors, FSDP-split
  over 8 devices, against one device (float32, reduction order only)."""
  shapes = {"decoder/layers/attn/q_proj/a": (2, 16, 4),
            "decoder/layers/attn/q_proj/b": (2, 4, 16), "final_norm/scale": (16,)}
  specs = {"decoder/layers/attn/q_proj/a": P(None, "data", None),
           "decoder/layers/attn/q_proj/b": P(None, None, "data"), "final_norm/scale": P()}
  rng = np.random.default_rng(0)
  params = _nest({p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()})
  grads = [_nest({p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()})
           for _ in range(4)]
  tx = refactorize(momentum_reset(optax.adamw(1e-2), 2), 2, low_rank_pairs(shapes))
  traces = []

  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  ref_p, ref_s = params, tx.init(params)
  single = jax.jit(step)
  for g in grads:  # Updates 2 and 4 reset and refactor: inside the one program.
    ref_p, ref_s = single(ref_p, ref_s, g)
  assert len(traces) == 1, "the second step recompiled"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sh = _nest({p: NamedSharding(mesh, s) for p, s in specs.items()})
  p = jax.device_put(params, sh)
  s = tx.init(p)
  sharded = jax.jit(step, in_shardings=(sh, None, sh), out_shardings=(sh, None))
  for g in grads:
    p, s = sharded(p, s, jax.device_put(g, sh))
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["galore", "fira", "apollo", "restarts"])
def test_checkpoint_round_trip_is_bit_identical(name, tmp_path):
  """The optimizer state through the run's orbax Checkpointer and back, then
  one more update from each: every leaf equal bit for bit."""
  from qtrain.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  layout = dict(LAYOUT)
  if name == "restarts":
    layout = {"decoder/layers/attn/q_proj/a": ((2, 8, 3), ("layers", "embed", "rank")),
              "decoder/layers/attn/q_proj/b": ((2, 3, 8), ("layers", "rank", "q_heads"))}
    tx = refactorize(momentum_reset(optax.adamw(1e-2), 2), 2, low_rank_pairs(layout))
  else:
    c = default.get_config().optim[name]
    c.update(rank=2, update_proj_gap=2)
    build = {"galore": build_galore, "fira": build_fira, "apollo": build_apollo}[name]
    tx = build(c, learning_rate=1e-2, weight_decay=0.1, decay_mask=None, params=_boxed(layout))
  grads = [_nest({p: jnp.asarray(x, jnp.float32) for p, x in g.items()})
           for g in _grads(layout, 3, seed=5)]
  params = jax.tree.map(lambda g: 0.5 * g, grads[0])
  state, step = tx.init(params), jax.jit(tx.update)
  for g in grads[:2]:
    _, state = step(g, state, params)
  ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(2, state, {}, force=True)
  ckpt.wait()
  restored, _ = ckpt.restore(2, jax.eval_shape(lambda: state))
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  jax.tree.map(np.testing.assert_array_equal, step(grads[2], restored, params),
               step(grads[2], state, params))


# ------------------------------------------------------------------- configs --

CONFIGS = sorted(os.path.basename(f)[:-3] for f in glob.glob(
    os.path.join(os.path.dirname(__file__), "..", "configs", "optim", "*.py"))
                 if not os.path.basename(f).startswith("_"))


def test_every_comparison_point_has_a_config():
  assert CONFIGS == ["adamw", "apollo", "apollo_mini", "fira", "galore", "low_rank",
                     "low_rank_refactor", "low_rank_reset", "low_rank_restarts",
                     "sltrain_restarts"]


@pytest.mark.parametrize("name", CONFIGS)
def test_optim_configs_validate_and_build_over_every_param(name):
  module = config_module(f"optim.{name}")
  for variant in ("", "125m"):
    validate(module.get_config(variant), n_devices=8)
  c = module.get_config("smoke")
  validate(c, n_devices=8)
  boxed = abstract_params(build_model(c), c.data.seq_len)
  tx = build_optimizer(c, boxed)  # ConfigError if a param matched no group.
  flat = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  tx = wrap(tx, c.optim, {param_path(p): leaf for p, leaf in flat})
  state = jax.eval_shape(tx.init, nn.unbox(boxed))
  names = {type(x).__name__ for x in namedtuples(state)}
  expect = {"galore": "GaLoreState", "fira": "FiraState", "apollo": "ApolloState",
            "apollo_mini": "ApolloState"}.get(name)
  if expect:
    assert expect in names, names
  if name.endswith("restarts"):
    assert "WrapperState" in names and (c.optim.restarts.every == c.optim.refactor.every > 0)




@pytest.mark.parametrize("edit, message", [
    (lambda c: setattr(c.optim.restarts, "every", -1), "config.optim.restarts.every=-1"),
    (lambda c: setattr(c.optim.refactor, "every", -3), "config.optim.refactor.every=-3"),
    (lambda c: setattr(c.optim.restarts, "moments", ()), "config.optim.restarts.moments=()"),
    (lambda c: setattr(c.optim.galore, "rank", 0), "config.optim.galore.rank=0"),
    (lambda c: setattr(c.optim.fira, "gamma", 0.5), "config.optim.fira.gamma=0.5"),
    (lambda c: setattr(c.optim.apollo, "mode", "maxi"), "config.optim.apollo.mode='maxi'"),
    (lambda c: setattr(c.model, "weight_forms", (dict(pattern=".*", form="sparse_low_rank",
                                                      rank=4, density=0.0),)),
     "config.model.weight_forms[0].density=0.0"),
])
def test_bad_fields_name_the_field(edit, message):
  c = default.get_config()
  c.optim.groups = (dict(pattern=".*", optimizer="galore"), dict(pattern="x", optimizer="fira"),
                    dict(pattern="y", optimizer="apollo"))
  edit(c)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c, n_devices=8)


def test_build_optimizer_applies_restarts_from_the_config():
  c = config_module("optim.low_rank_restarts").get_config("smoke")
  boxed = abstract_params(build_model(c), c.data.seq_len)
  state = jax.eval_shape(build_optimizer(c, boxed).init, nn.unbox(boxed))
  assert "WrapperState" in {type(x).__name__ for x in namedtuples(state)}
