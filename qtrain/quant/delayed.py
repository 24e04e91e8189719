"""Delayed scaling for per-tensor fp8 training (``config.quant.amax_history``).

Current scaling reads every quantized tensor twice: once for its absmax,
which sets the scale, then again to cast it. In the llama_1b fp8 step on an
H100 those absmax passes are most of what fp8 spends outside its GEMMs
(docs/benchmarks.md). Delayed scaling (TransformerEngine's default recipe,
Micikevicius et al. 2022, "FP8 Formats for Deep Learning") casts each tensor
with the scale of the largest absmax it had over the last H steps and records
this step's absmax in the same pass that casts it (the cast+transpose
kernel's third output, ``qtrain.kernels.cast_transpose.cast_transpose(..., amax=True)``),
so nothing reads a tensor only for its scale. A value beyond the recorded
range saturates at the format's largest code (448 for e4m3, 57344 for e5m2).

Where the history lives. Each per-tensor fp8 matmul site keeps one float32
[3, H] variable in the linen collection ``AMAX`` (rows X, W, dY; column 0 the
newest; stacked [L, 3, H] under nn.scan), carried as ``TrainState.amax``
beside the params, saved in checkpoints with them, replicated. The forward
reads it; nothing mutates it inside the model. Instead the matmul's custom
VJP (``qtrain.quant.dot_general.lowp_matmul``) returns this step's three
absmaxes (X's and W's from the forward's casts, dY's from the backward's) as
the history's cotangent in column 0, so the one ``jax.grad`` of the step
yields them, dY's included, which no forward-side mutation could; ``advance``
then shifts them into the history. A site the loss does not reach gets a
zero cotangent and shifts in a zero, which the max over the history ignores.
Under gradient accumulation the microbatches' absmaxes combine by maximum
(``qtrain.train.first_order.accumulate``). On a mesh, each absmax is of the
global tensor (jit's global view): the per-shard cast kernel reduces each
device's block and all-reduces the scalar (``dispatch.fp8_both_layouts``);
through XLA, XLA all-reduces the max.

The first step. A fresh history is all zeros (scale 1, which would flush
dY's small values to zero), so before the first update of a run that starts
from step 0 the loop runs the seeding pass once (``seed_step``): the same
forward and backward on the first batch with every scale from the tensor's
own absmax (current scaling, ``DotSpec.amax_seed``), recording the absmaxes
and applying no update. Its history equals what the first step's own
tensors give, so the first delayed step computes exactly the current-scaling
step (tests/test_delayed_scaling.py). A resumed run restores its history.

Everything that is not the train step (evaluation, PTQ, export, generation)
applies the model without the collection and scales currently, as before.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qtrain.layers.hooks import as_hooks
from qtrain.quant.dot_general import AMAX

__all__ = ["AMAX", "advance", "combine", "seeding_model", "variables"]


def advance(history, cotangent, finite=True):
  """Each history [..., 3, H] with this step's absmaxes (the cotangent's
  column 0) shifted in at column 0 and its oldest column dropped; unchanged
  where ``finite`` is False (a skipped step records nothing)."""

  def one(h, c):
    new = jnp.concatenate([c[..., :1], h[..., :-1]], axis=-1)
    return jnp.where(finite & jnp.all(jnp.isfinite(c[..., :1])), new, h)

  return jax.tree.map(one, history, cotangent)


def combine(a, b):
  """Absmax cotangents of two microbatches: the larger."""
  return jax.tree.map(jnp.maximum, a, b)


def variables(params, amax) -> dict:
  """The ``model.apply`` variables: the params, and the histories when any."""
  return {"params": params, AMAX: amax} if amax else {"params": params}


def seeding_model(model):
  """``model`` whose quantizers scale from each tensor's own absmax while
  recording it (the seeding pass); None when no provider keeps histories."""
  hooks = as_hooks(model.provider)
  if not any(getattr(p, "amax_history", 0) for p in hooks.providers):
    return None
  seeded = tuple(dataclasses.replace(p, amax_seed=True) if getattr(p, "amax_history", 0)
                 else p for p in hooks.providers)
  return model.clone(provider=dataclasses.replace(hooks, providers=seeded))
