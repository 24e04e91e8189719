"""The one loss every step family uses.

``make_loss(...)`` returns ``loss_fn(params, batch, rng) -> (objective, aux)``:
a pure function of the params, so a first-order family differentiates it and
a zeroth-order family only evaluates it (at perturbed params, with ``rng`` for
stochastic rounding). The objective is token-mean cross-entropy in float32
over the scored tokens plus an optional z-loss
``z_loss * mean(log(Z)^2)`` (PaLM, Chowdhery et al. 2022).

Scored tokens: ``loss_mask`` (0 on SFT prompts and padding) when the batch has
it, else ``segment_ids > 0`` (padding excluded), else every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qtrain.train.sown import sown_metrics


def cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0):
  """Returns (objective, nll_sum, token_count, z_term), all float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A masked sum rather than a gather: with the vocabulary split over the
  # tensor axis each shard sums its own slice (the gather would need the full
  # row); exact, as one term is non-zero.
  vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype)
  target_logit_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), -1)
  mask = mask_BT.astype(jnp.float32)
  n_tokens = jnp.sum(mask)
  nll_sum = jnp.sum((log_z_BT - target_logit_BT) * mask)
  denom = jnp.maximum(n_tokens, 1.0)
  z_term = z_loss * jnp.sum(jnp.square(log_z_BT) * mask) / denom
  return nll_sum / denom + z_term, nll_sum, n_tokens, z_term


def loss_mask(batch):
  """Which targets are scored (see the module docstring)."""
  if "loss_mask" in batch:
    return batch["loss_mask"] > 0
  if "segment_ids" in batch:
    return batch["segment_ids"] > 0
  return jnp.ones(batch["targets"].shape, bool)


def forward(model, params, batch, rng, collect: tuple[str, ...] = ()):
  """(logits_BTV, {collection: values}) of one batch; ``rng`` feeds the
  model's ``quant`` stream (stochastic rounding)."""
  args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  variables, rngs = {"params": params}, {"quant": rng}
  if not collect:
    return model.apply(variables, *args, rngs=rngs), {}
  return model.apply(variables, *args, rngs=rngs, mutable=list(collect))


def make_loss(model, z_loss: float = 0.0, collect: tuple[str, ...] = ()):
  """``loss_fn(params, batch, rng) -> (objective, aux)``; aux holds ``loss``
  (mean NLL), ``tokens``, ``z_loss`` and ``sown`` (metrics of the collected
  collections)."""

  def loss_fn(params, batch, rng):
    logits_BTV, collected = forward(model, params, batch, rng, tuple(collect))
    objective, nll_sum, n_tokens, z_term = cross_entropy(
        logits_BTV, batch["targets"], loss_mask(batch), z_loss)
    aux = {"loss": nll_sum / jnp.maximum(n_tokens, 1.0), "tokens": n_tokens,
           "z_loss": z_term, "sown": sown_metrics(collected)}
    return objective, aux

  return loss_fn
