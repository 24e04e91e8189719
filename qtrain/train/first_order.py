"""The first-order step family: gradients of the shared loss, one optax update.

A non-finite objective or gradient norm is detected inside the step: the
update is dropped (``apply_if_finite``), ``skipped`` counts it, and the
metrics carry ``finite=0`` so the loop can stop if the config says so.

Gradient accumulation (``config.train.grad_accum_steps`` = k; MaxText's
``gradient_accumulation_steps``) reaches a large batch per optimizer step on
few devices: the global batch is split into k microbatches, a ``lax.scan``
sums their gradients in float32, and one update follows. The loss is a mean
over the scored tokens of the *whole* batch, so each microbatch contributes
its token-mean objective times its token count n_j, and the sum is divided
by N = sum_j n_j at the end:

  grad = (1/N) sum_j n_j grad(L_j) = grad(sum_j nll_j / N),

the full-batch gradient up to float32 reassociation, even when loss masks
give microbatches very different n_j (a mean of microbatch means would not
be). Metrics are those of the whole batch. Microbatch j holds rows j, j+k,
j+2k, ... of every device's block of rows (the batch axis reshaped to
[B/k, k] with the sharded axis first), so every microbatch stays split over
data x fsdp and the split moves no data between devices. Each microbatch
draws its quantizer randomness from the step key folded with j.

Activation telemetry (``config.telemetry``) is combined exactly: every value
is a mean over real tokens (weighted here by each microbatch's real-token
count) except ``max_abs``, a maximum. Other sown collections
(``config.train.collect``) are refused with accumulation by validation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from qtrain.analysis import telemetry
from qtrain.quant import delayed
from qtrain.train.families import (StepContext, apply_if_finite, register_step_family,
                                   step_metrics)
from qtrain.train.state import TrainState, step_key


def gradients(loss_fn, state: TrainState, batch, accum=None):
  """(objective, aux, grads, absmaxes) of ``batch`` at ``state``: ``accum``
  (a ``functools.partial`` of ``accumulate``) splits it into microbatches,
  None differentiates it whole. With delayed fp8 scaling (``state.amax``)
  the histories are differentiated too: their cotangents are this step's
  absmaxes (``qtrain.quant.delayed``); else absmaxes is None."""
  amax = state.amax or None
  if accum is not None:  # (objective, aux, grads), and absmaxes when asked (amax=).
    if amax is None:
      return (*accum(loss_fn, state.params, batch, step_key(state)), None)
    return accum(loss_fn, state.params, batch, step_key(state), amax=amax)
  # amax None differentiates to None: no absmaxes without delayed scaling.
  (objective, aux), (grads, absmaxes) = jax.value_and_grad(loss_fn, (0, 3), has_aux=True)(
      state.params, batch, step_key(state), amax)
  return objective, aux, grads, absmaxes


def train_step(state: TrainState, batch, *, loss_fn, tx, schedule, accum=None):
  """(state, batch) -> (state, metrics); pure, jitted by ``build``. ``accum``
  (a ``functools.partial`` of ``accumulate``) splits the batch into
  microbatches; None differentiates it whole."""
  objective, aux, grads, absmaxes = gradients(loss_fn, state, batch, accum)
  grad_norm = optax.tree.norm(grads).astype(jnp.float32)
  finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
  new_state = apply_if_finite(state, grads, finite, tx)
  if absmaxes is not None:
    new_state = new_state.replace(amax=delayed.advance(state.amax, absmaxes, finite))
  return new_state, step_metrics(state, new_state, objective, aux, grad_norm, finite, schedule)


def seed_step(state: TrainState, batch, *, seed_loss_fn, accum=None):
  """The state with its amax histories filled from ``batch`` by the seeding
  pass (every tensor scaled by its own absmax, no update; see
  ``qtrain.quant.delayed``): what the first step of a fresh delayed-scaling
  run computes before it trains."""
  _, _, _, absmaxes = gradients(seed_loss_fn, state, batch, accum)
  return state.replace(amax=delayed.advance(state.amax, absmaxes))


def microbatches(batch, k: int, spec: NamedSharding | None = None):
  """{name: [B, ...]} -> {name: [k, B/k, ...]}; microbatch j = rows j, j+k, ...
  so each device's rows split into k local microbatches (see the module)."""

  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)

  return {name: split(x) for name, x in batch.items()}


def _devices_of(spec: NamedSharding) -> int:
  """How many devices split the rows (dim 1) of the microbatch stack."""
  axes = spec.spec[1]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(spec.mesh.shape[a] for a in axes)


def _real_tokens(batch):
  """Tokens the model treats as real (its telemetry mask: segment_ids > 0)."""
  if "segment_ids" in batch:
    return jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
  return jnp.asarray(batch["inputs"].size, jnp.float32)


def _combine_sown(sown_K: dict, real_K):
  """Telemetry of the whole batch from its k microbatches' values: max_abs is
  a maximum, every other value a mean over real tokens (real-token-weighted)."""
  w_K = real_K / jnp.maximum(jnp.sum(real_K), 1.0)
  max_prefix = f"{telemetry.PREFIX}/max_abs"
  out = {}
  for name, v_K in sown_K.items():
    if name == max_prefix or name.startswith(max_prefix + "/"):
      out[name] = jnp.max(v_K, axis=0)
    else:
      out[name] = jnp.tensordot(w_K, v_K.astype(jnp.float32), axes=1)
  return out


def accumulate(loss_fn, params, batch, rng, *, k: int, spec=None, grad_sharding=None,
               amax=None):
  """(objective, aux, grads) of ``batch`` from k microbatches, equal to
  ``value_and_grad(loss_fn)`` on the whole batch (see the module
  docstring). ``spec`` shards the [k, B/k, ...] microbatch stack,
  ``grad_sharding`` the float32 gradient sum (the params' shardings).
  ``amax``: delayed fp8 scaling's histories; then also their cotangents,
  each microbatch's absmaxes combined by maximum, as a fourth value."""
  rows = next(iter(batch.values())).shape[0]
  shards = 1 if spec is None else _devices_of(spec)
  if rows % (k * shards):
    raise ValueError(f"a batch of {rows} rows over {shards} row shards does not split into "
                     f"config.train.grad_accum_steps={k} microbatches per shard; make "
                     "config.data.global_batch_size a multiple of grad_accum_steps x "
                     "config.mesh.data x fsdp")
  grad_sum = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  if grad_sharding is not None:
    grad_sum = jax.lax.with_sharding_constraint(grad_sum, grad_sharding)

  def token_sum(p, micro, key, h):  # n_j L_j = nll_j (+ z-loss sum), differentiable.
    objective, aux = loss_fn(p, micro, key, h)
    return objective * aux["tokens"], (objective, aux)

  def body(carry, xs):
    grad_sum, absmax = carry
    micro, j = xs
    (_, (objective, aux)), (g, a) = jax.value_and_grad(token_sum, (0, 3), has_aux=True)(
        params, micro, jax.random.fold_in(rng, j), amax)
    grad_sum = jax.tree.map(lambda s, x: s + x.astype(jnp.float32), grad_sum, g)
    absmax = None if amax is None else delayed.combine(absmax, a)
    per_micro = {"objective": objective, "loss": aux["loss"], "z_loss": aux["z_loss"],
                 "tokens": aux["tokens"], "real": _real_tokens(micro), "sown": aux["sown"]}
    return (grad_sum, absmax), per_micro

  zeros = None if amax is None else jax.tree.map(jnp.zeros_like, amax)
  (grad_sum, absmax), m = jax.lax.scan(body, (grad_sum, zeros),
                                       (microbatches(batch, k, spec), jnp.arange(k)))
  n_K = m["tokens"]
  denom = jnp.maximum(jnp.sum(n_K), 1.0)  # As the whole-batch loss: no scored token, no loss.
  grads = jax.tree.map(lambda s, p: (s / denom).astype(p.dtype), grad_sum, params)
  mean = lambda v_K: jnp.sum(v_K * n_K) / denom
  aux = {"loss": mean(m["loss"]), "z_loss": mean(m["z_loss"]), "tokens": jnp.sum(n_K),
         "sown": _combine_sown(m["sown"], m["real"])}
  if amax is None:
    return mean(m["objective"]), aux, grads
  return mean(m["objective"]), aux, grads, absmax


def _accum(ctx: StepContext):
  """``accumulate`` for ``config.train.grad_accum_steps`` > 1, else None."""
  k = int(ctx.cfg.train.get("grad_accum_steps", 1))  # Configs saved before the field: 1.
  if k == 1:
    return None
  batch_axes = ctx.batch_sh.spec[0]  # The rows' mesh axes (data x fsdp).
  return functools.partial(
      accumulate, k=k, spec=NamedSharding(ctx.batch_sh.mesh, PartitionSpec(None, batch_axes)),
      grad_sharding=ctx.state_sh.params)


def build(ctx: StepContext):
  return ctx.jit(functools.partial(train_step, loss_fn=ctx.loss_fn, tx=ctx.tx,
                                   schedule=ctx.schedule, accum=_accum(ctx)))


def build_seed(ctx: StepContext):
  """``seed_step`` jitted like the train step (state donated), with
  ``ctx.loss_fn`` the seeding model's loss (``qtrain.quant.delayed``)."""
  return jax.jit(functools.partial(seed_step, seed_loss_fn=ctx.loss_fn, accum=_accum(ctx)),
                 in_shardings=(ctx.state_sh, ctx.batch_sh), out_shardings=ctx.state_sh,
                 donate_argnums=(0,))


register_step_family("first_order", build)
