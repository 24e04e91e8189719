"""The zeroth-order step family ``zeroth_order``: fine-tuning from forward
passes only (MeZO, Malladi et al. 2023; the ZO-Bench family, Zhang et al. 2024;
ZeroQAT when only quantizer steps move). Options: ``config.zo``.

Each step draws Q directions z_q ~ N(0, I) over the perturbed params from the
step's key (``step_key(state)``: a resumed run replays them) and estimates

  spsa:    g_q = (L(p + eps z_q) - L(p - eps z_q)) / (2 eps)    two forwards
  forward: g_q = dL/dp . z_q, one ``jax.jvp`` (forward gradient) one forward-mode pass
  g_hat    = (1/Q) sum_q g_q z_q,   E[g_q z_q] = grad L (z_q isotropic, E[z z^T] = I)

exactly in expectation for ``forward`` and up to O(eps^2) for ``spsa`` (exact
on a quadratic, whose third derivative is 0). g_hat goes to the run's optimizer
(``config.optim``: ``sgd`` = MeZO / ZO-SGD-MMT / ZO-SGD-Sign, ``adamw`` =
ZO-Adam), so the schedule, groups, weight decay and skip-on-non-finite are
those of every other family. Params in a ``frozen`` group of
``config.optim.groups`` are not perturbed (ZeroQAT: the pre-quantized weights
frozen, the learned quantizer steps tuned). ``blockwise`` perturbs one block
per step, round robin: decoder layer i at step i mod (L + 1), the rest
(embedding, final norm, head) at the last.

What each piece materialises, and why (the point of MeZO is memory):

* z is never stored: each use (p + eps z, p - eps z, the update) regenerates
  it from its key (``zo_perturb.py``: per leaf, and per layer of a scanned
  stack). An ``optimization_barrier`` on the key before each use keeps XLA
  from merging identical generators into a buffer that would live across
  both forwards, and orders the forwards and the update.
* p is never changed in place. MeZO (PyTorch) adds eps z, subtracts 2 eps z,
  adds eps z back, which rounds (p + eps z - eps z != p in float). Here each
  forward reads p +/- eps z formed from the untouched p: for a Linear's
  weight in the matmul hook, right before its dot, one layer at a time inside
  the decoder's scan (at most one layer's perturbed weight and z live); for
  the other leaves (embedding, norms, quantizer steps) in the tree, a small
  perturbed copy. p is restored bit-identically by construction. The two
  SPSA forwards are one loop over +/-eps: the model compiles once.
* The update: for SGD without momentum (MeZO, ZO-SGD-Sign; element-wise and
  stateless) g_hat is regenerated one leaf, and one layer of a stacked leaf,
  at a time in a loop that writes each layer back into the donated params:
  no params-sized g_hat or update. Other rules (momentum, ZO-Adam,
  conservative) get the whole-tree g_hat inside the update's conditional,
  where it fuses with the element-wise update; momentum keeps one velocity,
  ``adamw`` two moments (ZO-Adam's memory is AdamW's minus the gradient).
* ``forward``: the jvp of t -> L(p + t z) at t = 0, so each weight's tangent
  is its z, made where the weight is used (per layer in the scan); the
  forward-mode pass carries a tangent per activation (about twice an
  inference forward's live activations).
* ``conservative`` (ZO-SGD-Cons): the update u is materialised and the loss
  is evaluated at p, p + u and p - u (three more forwards); the lowest wins.

Metrics: those of every family; ``grad_norm`` is the RMS over queries of the
projected gradient g_q (a scalar per query), not ||g_hat||; plus
``zo/projected_grad`` (mean g_q), ``zo/block`` (block-wise) and
``zo/choice`` (conservative: 0 = kept p, 1 = p + u, 2 = p - u).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from qtrain.optim import zo_sgd as _zo_sgd  # noqa: F401  (registers sgd)
from qtrain.optim.groups import parse_groups
from qtrain.train.families import StepContext, register_step_family, step_metrics
from qtrain.train.state import TrainState, step_key
from qtrain.train.zo_perturb import (Leaf, direction, directions, gate,  # noqa: F401
                                     leaf_direction, leaves_of, matmul_leaves, perturb,
                                     perturbed_loss)


def _fresh(key, after):
  """``key``, opaque to XLA and ordered after ``after``: a regenerated z is
  neither merged with an earlier one (which would keep it alive) nor drawn
  before ``after`` is computed."""
  key, _ = jax.lax.optimization_barrier((key, after))
  return key


def query_keys(zkey, rng: str):
  """q -> query q's key; ``rng='rbg'`` rewraps it for XLA's RngBitGenerator, one op
  that fuses into its consumer (threefry's expansion materialises u32
  temporaries of 2-4x each leaf on the CPU backend)."""
  def key(q):
    k = jax.random.fold_in(zkey, q)
    if rng == "rbg":
      k = jax.random.wrap_key_data(jax.random.bits(k, (4,), jnp.uint32), impl="rbg")
    return k
  return key


def _spsa(f, qkey, q, eps, after):
  """(g_q, mean objective, mean aux) of one query from two forwards;
  ``f(key, scale)`` is the loss at p + scale * z(key). The forwards are the
  two steps of a loop over scale = +eps, -eps: the model is traced and
  compiled once, and the second forward runs after the first."""
  key = _fresh(qkey(q), after)

  def forward(scale):  # The barrier ties z to the iteration: XLA cannot hoist it.
    return f(_fresh(key, scale), scale)

  (lp, lm), aux = jax.lax.map(forward, jnp.asarray([eps, -eps], jnp.float32))
  g = (lp - lm) / (2 * eps)
  return g, (lp + lm) / 2, jax.tree.map(lambda a: (a[0] + a[1]) / 2, aux)


def _forward_grad(f, qkey, q, after):
  """(g_q, objective, aux) of one query: the jvp of t -> L(p + t z) at t = 0
  along dt = 1, i.e. grad L . z. The tangent of each weight is its z, made
  where the weight is used (per layer in the scan), not a param-sized input."""
  key = _fresh(qkey(q), after)
  (objective, aux), (d_objective, _) = jax.jvp(lambda t: f(key, t), (jnp.float32(0),),
                                               (jnp.float32(1),))
  return d_objective.astype(jnp.float32), objective, aux


def estimate(cfg, loss_fn, params, batch, rng, qkey, leaves, block=None):
  """(g [Q] float32, objective, aux): the projected gradients of ``config.zo.queries``
  directions and the loss (mean over the forwards at p +/- eps z, or at p)."""
  z = cfg.zo
  in_matmul = matmul_leaves(loss_fn, params, batch, rng, leaves)

  def f(key, scale):
    return perturbed_loss(loss_fn, params, batch, rng, key, scale, leaves, in_matmul, block)

  if z.estimator == "spsa":
    one = functools.partial(_spsa, f, qkey, eps=z.eps)
  else:
    one = functools.partial(_forward_grad, f, qkey)
  if z.queries == 1:
    g, objective, aux = one(0, after=jnp.float32(0))
    return g[None], objective, aux

  # A loop, so the model is traced once and the queries' forwards run one after another.
  shape = jax.eval_shape(lambda: one(0, after=jnp.float32(0)))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape[1:])

  def body(q, carry):
    gs, sums, last = carry
    g, objective, aux = one(q, after=last)
    sums = jax.tree.map(lambda s, x: s + x / z.queries, sums, (objective, aux))
    return gs.at[q].set(g), sums, objective

  gs, (objective, aux), _ = jax.lax.fori_loop(
      0, z.queries, body, (jnp.zeros((z.queries,), jnp.float32), zeros, jnp.float32(0)))
  return gs, objective, aux


def _projected(keys, gs, leaf: Leaf, shape, block, layer=None):
  """(1/Q) sum_q g_q z_q of one leaf, or with ``layer`` of that layer's slice
  of a stacked leaf (``shape`` without the layer axis); float32."""
  total = 0
  for q, key in enumerate(keys):
    if layer is None:
      z = leaf_direction(key, leaf, shape, block)
    else:
      z = direction(key, leaf.path, shape, layer) * gate(block, leaf, layer)
    total = total + (gs[q] / len(keys)) * z
  return total


def estimated_gradient(params, qkey, gs, leaves, block=None):
  """g_hat = (1/Q) sum_q g_q z_q as a params-shaped tree (zeros where not
  perturbed); z regenerated from ``qkey(q)``."""
  flat, treedef = jax.tree.flatten(params)
  keys = [_fresh(qkey(q), gs) for q in range(gs.shape[0])]
  out = [_projected(keys, gs, leaf, p.shape, block).astype(p.dtype) if leaf.perturbed
         else jnp.zeros_like(p) for leaf, p in zip(leaves, flat)]
  return jax.tree.unflatten(treedef, out)


def _conservative(params, updates, loss_at):
  """ZO-SGD-Cons: of p, p + u, p - u, the params with the lowest loss, and which."""
  plus = optax.apply_updates(params, updates)
  minus = jax.tree.map(lambda p, u: p - u, params, updates)
  losses = jnp.stack([loss_at(params, 0.0), loss_at(plus, params), loss_at(minus, plus)])
  choice = jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf))
  new = jax.tree.map(lambda a, b, c: jnp.select([choice == 0, choice == 1], [a, b], c),
                     params, plus, minus)
  return new, choice


def layerwise_update(cfg, opt_state) -> bool:
  """Whether the update may run one leaf, and one layer of a stacked leaf, at a
  time: every moving group's rule is SGD without momentum (MeZO, ZO-SGD-Sign:
  element-wise, and stateless but for the schedule's count), with no
  refactorization (an SVD of whole factors) and not conservative (which
  compares whole updated trees)."""
  o = cfg.optim
  rules = {g.optimizer for g in parse_groups(o)} - {"frozen"}
  refactor = o.get("refactor")
  return (rules == {"sgd"} and o.sgd.momentum == 0 and not cfg.zo.conservative
          and (refactor is None or refactor.every == 0)
          and all(x.size <= 1 for x in jax.tree.leaves(opt_state)))


def _update_layerwise(params, opt_state, tx, keys, gs, leaves, block):
  """The update p <- p + tx(g_hat, p) (MeZO: p - lr (g_hat + wd p)) with g_hat
  regenerated per leaf, and per layer of a stacked leaf inside a loop that
  writes each layer back into the leaf: no params-sized g_hat or update, and
  with the state donated the loop updates the param's buffer in place.
  ``tx`` is element-wise and stateless (``layerwise_update``), so each call
  gives the leaves it does not update as empty arrays and returns the same state."""
  flat, treedef = jax.tree.flatten(params)

  def update(chosen):  # {leaf index: (p, g_hat)} -> ({leaf index: new p}, state)
    ps = [chosen[i][0] if i in chosen else jnp.zeros((0,), x.dtype) for i, x in enumerate(flat)]
    grads = [chosen[i][1].astype(x.dtype) if i in chosen else x for i, x in enumerate(ps)]
    updates, state = tx.update(jax.tree.unflatten(treedef, grads), opt_state,
                               jax.tree.unflatten(treedef, ps))
    u = jax.tree.leaves(updates)
    return {i: (ps[i] + u[i]).astype(ps[i].dtype) for i in chosen}, state

  moving = [i for i, l in enumerate(leaves) if l.perturbed]
  new, new_state = update({i: (flat[i], _projected(keys, gs, leaves[i], flat[i].shape, block))
                           for i in moving if not leaves[i].stacked})
  stacked = [i for i in moving if leaves[i].stacked]

  def layer(l, carry):
    sliced = {i: (jax.lax.dynamic_index_in_dim(p, l, keepdims=False),
                  _projected(keys, gs, leaves[i], p.shape[1:], block, l))
              for i, p in zip(stacked, carry)}
    out, _ = update(sliced)
    return tuple(jax.lax.dynamic_update_index_in_dim(p, out[i], l, 0)
                 for i, p in zip(stacked, carry))

  if stacked:
    carry = jax.lax.fori_loop(0, flat[stacked[0]].shape[0], layer,
                              tuple(flat[i] for i in stacked))
    new.update(zip(stacked, carry))
  return jax.tree.unflatten(treedef, [new.get(i, x) for i, x in enumerate(flat)]), new_state


def _apply(cfg, state, gs, qkey, leaves, block, finite, tx, loss_at):
  """The next params and optimizer state (unchanged when not ``finite``), g_hat
  built inside the conditional; and the conservative choice (or -1)."""
  layerwise = layerwise_update(cfg, state.opt_state)

  def update(params, opt_state):
    if layerwise:
      keys = [_fresh(qkey(q), gs) for q in range(gs.shape[0])]
      params, opt_state = _update_layerwise(params, opt_state, tx, keys, gs, leaves, block)
      return params, opt_state, jnp.int32(-1)
    grads = estimated_gradient(params, qkey, gs, leaves, block)
    updates, opt_state = tx.update(grads, opt_state, params)
    if cfg.zo.conservative:
      new, choice = _conservative(params, updates, loss_at)
      return new, opt_state, choice.astype(jnp.int32)
    return optax.apply_updates(params, updates), opt_state, jnp.int32(-1)

  return jax.lax.cond(finite, update, lambda p, o: (p, o, jnp.int32(-1)),
                      state.params, state.opt_state)


def train_step(state: TrainState, batch, *, cfg, loss_fn, tx, schedule):
  """(state, batch) -> (state, metrics); pure, jitted by ``build``."""
  leaves = leaves_of(cfg, state.params)
  rng, zkey = jax.random.split(step_key(state))  # One rng for every forward: common noise.
  qkey = query_keys(zkey, cfg.zo.rng)
  block = state.step % (cfg.model.n_layers + 1) if cfg.zo.blockwise else None
  gs, objective, aux = estimate(cfg, loss_fn, state.params, batch, rng, qkey, leaves, block)
  finite = jnp.isfinite(objective) & jnp.all(jnp.isfinite(gs))

  def loss_at(params, after):  # Conservative: a forward ordered after `after`.
    params, _ = jax.lax.optimization_barrier((params, after))
    return loss_fn(params, batch, rng)[0]

  params, opt_state, choice = _apply(cfg, state, gs, qkey, leaves, block, finite, tx, loss_at)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            skipped=state.skipped + (1 - finite.astype(jnp.int32)))
  grad_norm = jnp.sqrt(jnp.mean(jnp.square(gs)))
  metrics = step_metrics(state, new_state, objective, aux, grad_norm, finite, schedule)
  metrics["zo/projected_grad"] = jnp.mean(gs)
  if block is not None:
    metrics["zo/block"] = block.astype(jnp.float32)
  if cfg.zo.conservative:
    metrics["zo/choice"] = choice.astype(jnp.float32)
  return new_state, metrics


def build(ctx: StepContext):
  return ctx.jit(functools.partial(train_step, cfg=ctx.cfg, loss_fn=ctx.loss_fn, tx=ctx.tx,
                                   schedule=ctx.schedule))


register_step_family("zeroth_order", build)
