"""The pipeline step family (``config.train.step="pipeline"``, with
``config.mesh.pipeline`` > 1): the first-order step with the decoder stack
run by a pipeline schedule (``qtrain/parallel/pipeline.py``).

The family does not rebuild the model: it runs the shared loss
(``ctx.loss_fn``) with the ``Decoder`` call intercepted
(``flax.linen.intercept_methods``), so the embedding, the final norm, the LM
head and the loss are exactly the model's. Placement rule: the embedding and
the head run outside the pipeline, on every device of the ``pipeline`` axis
(XLA shards them over the other axes as without pipelining); only the
scanned blocks are split into stages. Params keep their [L, ...] layout, so
a checkpoint restores on a mesh without pipelining.

* ``gpipe`` / ``circular``: the intercepted Decoder splits the batch into m
  microbatches (rows j, j+m, ... of every device, as gradient accumulation:
  nothing moves between devices), runs ``pipeline.forward`` and reassembles
  the rows; ``jax.value_and_grad`` of the loss differentiates through the
  tick scan.
* ``1f1b`` / ``interleaved_1f1b``: the gradients come from ``one_f_one_b``
  (explicit per-stage ``jax.vjp``; interleaved: v stages per device) through
  first_order's ``accum`` hook, so the update and the metrics are
  first_order's.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from qtrain.layers.decoder import Decoder
from qtrain.parallel import pipeline as pp
from qtrain.train import first_order
from qtrain.train.families import StepContext, register_step_family
from qtrain.train.loss import loss_mask


class _StageRoot(nn.Module):
  """A slice of the stack under the same module path as in the Transformer
  (``decoder/layers/...``), so path rules and quantizer state resolve alike."""
  cfg: Any
  hooks: Any

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, layers_K):
    return Decoder(self.cfg, self.hooks, name="decoder")(x_BTD, positions_BT, segment_ids_BT,
                                                         layers_K)


def stage_fn(decoder: Decoder, rng):
  """``(params_K, x_BTD, pos_BT, seg_BT, layers_K) -> x_BTD`` for ``decoder``'s
  blocks ``layers_K``, with the token mask of the microbatch's segments."""

  def run(params_K, x_BTD, pos_BT, seg_BT, layers_K):
    mask = None if seg_BT is None else seg_BT > 0
    hooks = decoder.hooks.with_context(token_mask=mask)
    root = _StageRoot(decoder.cfg, hooks)
    rngs = {} if rng is None else {"quant": rng}
    return root.apply({"params": {"decoder": {"layers": params_K}}}, x_BTD, pos_BT, seg_BT,
                      layers_K, rngs=rngs)

  return run


def _decoder_call(replace):
  """An interceptor that runs ``replace(decoder, x, pos, seg)`` instead of
  ``Decoder.__call__``."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, Decoder) and context.method_name == "__call__"
        and not isinstance(module.parent, _StageRoot)):  # A stage runs the real call.
      return replace(module, *args, **kwargs)
    return next_fun(*args, **kwargs)

  return interceptor


def _quant_key(decoder):
  return decoder.make_rng("quant") if decoder.has_rng("quant") else None


def split_rows(x, m: int, spec):
  """[B, ...] -> [m, B/m, ...], microbatch j = rows j, j+m, ... (first_order)."""
  return first_order.microbatches({"x": x}, m, spec)["x"]


def join_rows(x_M):
  """The inverse of ``split_rows``."""
  return x_M.swapaxes(0, 1).reshape(-1, *x_M.shape[2:])


def pipelined_loss(loss_fn, sched: pp.Schedule, mesh, row_spec):
  """``loss_fn`` with the decoder stack run by ``pipeline.forward``."""

  def replace(decoder, x_BTD, pos_BT, seg_BT, layers_K=None):
    del layers_K
    layers_L = decoder.variables["params"]["layers"]
    split = lambda a: None if a is None else split_rows(a, sched.m, row_spec)
    out = pp.forward(stage_fn(decoder, _quant_key(decoder)), layers_L, split(x_BTD),
                     split(pos_BT), split(seg_BT), sched, mesh)
    return join_rows(out)

  def fn(params, batch, rng):
    with nn.intercept_methods(_decoder_call(replace)):
      return loss_fn(params, batch, rng)

  return fn


def _without_layers(params):
  """(the stack's params [L, ...], every other param: embedding, head, norms)."""
  rest = dict(params)
  decoder = dict(rest.pop("decoder"))
  layers = decoder.pop("layers")
  if decoder:
    rest["decoder"] = decoder
  return layers, rest


def _with_layers(layers, rest):
  params = dict(rest)
  params["decoder"] = {**params.get("decoder", {}), "layers": layers}
  return params


def one_f_one_b_grads(loss_fn, params, batch, rng, *, sched: pp.Schedule, mesh, row_spec):
  """(objective, aux, grads) of ``loss_fn`` by the (interleaved) 1F1B
  schedule: first_order's ``accum`` contract. As in gradient accumulation,
  microbatch i contributes its token-mean objective times its scored tokens
  n_i, and the sum is divided by the whole batch's N (known before the
  pipeline runs: the loss mask), so the result is the whole batch's loss and
  gradient."""

  seen = {}

  def embed(p):  # The Decoder's input: embedding (+ EmbProj) of the whole batch.
    def capture(decoder, x_BTD, pos_BT, seg_BT, layers_K=None):
      del layers_K
      seen.update(x=x_BTD, extra=(pos_BT, seg_BT, _quant_key(decoder)), decoder=decoder)
      return x_BTD

    with nn.intercept_methods(_decoder_call(capture)):
      loss_fn(p, batch, rng)  # Only the captured input is used (the rest is dead code).
    return seen["x"], seen["extra"]

  def head(rest, y_BTD, micro, i):  # The loss with the Decoder's output replaced by y.
    with nn.intercept_methods(_decoder_call(lambda *a, **k: y_BTD)):
      objective, aux = loss_fn(rest, micro, jax.random.fold_in(rng, i))
    n = aux["tokens"]
    return objective * n, {"objective": objective * n, "loss": aux["loss"] * n,
                           "z_loss": aux["z_loss"] * n, "tokens": n}

  layers, rest = _without_layers(params)
  x_BTD, vjp_embed, (pos_BT, seg_BT, key) = jax.vjp(embed, params, has_aux=True)
  decoder = seen["decoder"]  # Static: its config and hooks.
  split = lambda a: None if a is None else split_rows(a, sched.m, row_spec)
  n_total = jnp.maximum(jnp.sum(loss_mask(batch).astype(jnp.float32)), 1.0)
  micro = first_order.microbatches(batch, sched.m, row_spec)
  g_layers, g_rest, dx_MBTD, sums = pp.one_f_one_b(
      stage_fn(decoder, key), head, layers, rest, split(x_BTD), split(pos_BT), split(seg_BT),
      micro, 1.0 / n_total, sched, mesh)
  (g_embed,) = vjp_embed(join_rows(dx_MBTD))
  grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32),
                       _with_layers(g_layers, g_rest), g_embed)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  aux = {"loss": sums["loss"] / n_total, "z_loss": sums["z_loss"] / n_total,
         "tokens": sums["tokens"], "sown": {}}
  return sums["objective"] / n_total, aux, grads


def gradients(sched: pp.Schedule, mesh, batch_sh):
  """``accum(loss_fn, params, batch, rng) -> (objective, aux, grads)`` under
  ``sched``: first_order's ``accum`` hook, batch rows sharded as ``batch_sh``."""
  row_spec = NamedSharding(mesh, PartitionSpec(None, batch_sh.spec[0]))
  if sched.name in pp.ONE_F_ONE_B:
    return functools.partial(one_f_one_b_grads, sched=sched, mesh=mesh, row_spec=row_spec)

  def accum(loss_fn, params, batch, rng):
    (objective, aux), grads = jax.value_and_grad(
        pipelined_loss(loss_fn, sched, mesh, row_spec), has_aux=True)(params, batch, rng)
    return objective, aux, grads

  return accum


def build(ctx: StepContext):
  mesh = ctx.batch_sh.mesh
  sched = pp.schedule_of(ctx.cfg, mesh.shape[pp.AXIS])
  accum = gradients(sched, mesh, ctx.batch_sh)
  return ctx.jit(functools.partial(first_order.train_step, loss_fn=ctx.loss_fn, tx=ctx.tx,
                                   schedule=ctx.schedule, accum=accum))


register_step_family("pipeline", build)
