"""The one loss every step family uses.

``make_loss(...)`` returns ``loss_fn(params, batch, rng) -> (objective, aux)``:
a pure function of the params, so a first-order family differentiates it and
a zeroth-order family only evaluates it (at perturbed params, with ``rng`` for
stochastic rounding). The objective is token-mean cross-entropy in float32
over the scored tokens plus an optional z-loss
``z_loss * mean(log(Z)^2)`` (PaLM, Chowdhery et al. 2022).

Scored tokens: ``loss_mask`` (0 on SFT prompts and padding) when the batch has
it, else ``segment_ids > 0`` (padding excluded), else every token.

Chunked head (``config.model.loss_chunks`` = n > 0): the linear +
cross-entropy that Liger Kernel (Hsu et al. 2024) and Cut Cross-Entropy
(Wijmans et al. 2024) fuse into GPU kernels, here as XLA ops per chunk.
The model returns the LM head's input x_BTD; each row's tokens are split into
n strided chunks (chunk j: positions j, j+n, ...), and per chunk the head
(the model's own ``lm_head``, through its matmul hook: quantizers, tied
embedding, perturbations apply as in the full call) gives float32 logits
[B, T/n, V], reduced at once to the NLL and log(Z)^2 sums. The chunk runs under
``jax.checkpoint`` inside a ``lax.scan``, so the backward recomputes one
chunk's logits at a time: the step holds [B, T/n, V] logits, never [B, T, V].
Strided chunks keep the batch and sequence shardings of x_BTD on their
own dims (a sequence shard's tokens spread over every chunk), and the
vocabulary stays split over ``tensor`` as in the full call. Same sums in
another order: equal to the unchunked loss within float32 rounding (a
stochastic-rounding head draws chunk j's bits from fold_in(rng, j): other
draws than the full call's). A quantizer of the head whose scale reduces over
tokens would see a chunk, which config validation refuses. Logits themselves (generation, calibration,
analysis) come from the full call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qtrain.quant import delayed
from qtrain.train.sown import sown_metrics


def _log_z_and_target(logits_BTV, targets_BT):
  """(log Z, the target's logit) per token, float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  # A masked sum rather than a gather: with the vocabulary split over the
  # tensor axis each shard sums its own slice (the gather would need the full
  # row); exact, as one term is non-zero.
  vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype)
  target_logit_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), -1)
  return log_z_BT, target_logit_BT


def _finish(nll_sum, z_sq_sum, n_tokens, z_loss: float):
  denom = jnp.maximum(n_tokens, 1.0)
  z_term = z_loss * z_sq_sum / denom
  return nll_sum / denom + z_term, nll_sum, n_tokens, z_term


def cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0):
  """Returns (objective, nll_sum, token_count, z_term), all float32."""
  log_z_BT, target_logit_BT = _log_z_and_target(logits_BTV, targets_BT)
  mask = mask_BT.astype(jnp.float32)
  n_tokens = jnp.sum(mask)
  nll_sum = jnp.sum((log_z_BT - target_logit_BT) * mask)
  return _finish(nll_sum, jnp.sum(jnp.square(log_z_BT) * mask), n_tokens, z_loss)


def _strided_chunks(a_BT, n: int):
  """[B, T, ...] -> [n, B, T/n, ...]: chunk j holds positions j, j+n, ..."""
  b, t = a_BT.shape[:2]
  return jnp.moveaxis(a_BT.reshape(b, t // n, n, *a_BT.shape[2:]), 2, 0)


def chunked_cross_entropy(head, params, hidden_BTD, targets_BT, mask_BT, n: int,
                          z_loss: float = 0.0, segment_ids_BT=None):
  """``cross_entropy(head(params, hidden_BTD, ...), ...)`` over ``n`` strided
  chunks of the tokens, each chunk's logits recomputed in the backward (see
  the module docstring). ``head(params, x_BCD, segment_ids_BC, j)`` gives
  chunk j's logits [B, C, V]."""
  t = hidden_BTD.shape[1]
  if t % n:
    raise ValueError(f"config.model.loss_chunks={n} does not divide the sequence length {t}; "
                     "choose a divisor of config.data.seq_len")
  mask_BT = mask_BT.astype(jnp.float32)

  # No CSE barrier: inside a scan the recomputation cannot merge with the
  # forward's (JAX's advice for checkpoint under scan).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def sums(params, x_BCD, targets_BC, mask_BC, seg_BC, j):
    log_z_BC, target_BC = _log_z_and_target(head(params, x_BCD, seg_BC, j), targets_BC)
    return jnp.sum((log_z_BC - target_BC) * mask_BC), jnp.sum(jnp.square(log_z_BC) * mask_BC)

  def body(carry, xs):
    nll, z_sq = sums(params, *xs)
    return (carry[0] + nll, carry[1] + z_sq), None

  seg = None if segment_ids_BT is None else _strided_chunks(segment_ids_BT, n)
  xs = (_strided_chunks(hidden_BTD, n), _strided_chunks(targets_BT, n),
        _strided_chunks(mask_BT, n), seg, jnp.arange(n))
  zero = jnp.zeros((), jnp.float32)
  (nll_sum, z_sq_sum), _ = jax.lax.scan(body, (zero, zero), xs)
  return _finish(nll_sum, z_sq_sum, jnp.sum(mask_BT), z_loss)


def loss_mask(batch):
  """Which targets are scored (see the module docstring)."""
  if "loss_mask" in batch:
    return batch["loss_mask"] > 0
  if "segment_ids" in batch:
    return batch["segment_ids"] > 0
  return jnp.ones(batch["targets"].shape, bool)


def forward(model, params, batch, rng, collect: tuple[str, ...] = (), output: str = "logits",
            amax=None):
  """(logits_BTV, {collection: values}) of one batch; ``rng`` feeds the
  model's ``quant`` stream (stochastic rounding). ``output="hidden"``: the
  LM head's input x_BTD instead of the logits. ``amax``: delayed fp8
  scaling's histories (``qtrain.quant.delayed``); None scales currently."""
  args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  variables, rngs = delayed.variables(params, amax), {"quant": rng}
  kw = {} if output == "logits" else {"output": output}  # Any model returning logits works.
  if not collect:
    return model.apply(variables, *args, rngs=rngs, **kw), {}
  return model.apply(variables, *args, rngs=rngs, mutable=list(collect), **kw)


def _head_fn(model, rng):
  """``head(params, x_BCD, segment_ids_BC, j)`` of ``chunked_cross_entropy``:
  the model's LM head alone; chunk j's stochastic rounding draws from its own key."""

  def head(params, x_BCD, seg_BC, j):
    return model.apply({"params": params}, x_BCD, seg_BC, method=type(model).head,
                       rngs={"quant": jax.random.fold_in(rng, j)})

  return head


def nll(model, params, batch, rng, z_loss: float = 0.0, collect: tuple[str, ...] = (),
        amax=None):
  """(objective, nll_sum, token_count, z_term, collected) of one batch, by the
  full head or in ``model.cfg.loss_chunks`` chunks (whose head scales fp8
  currently: one history would see every chunk)."""
  n = getattr(getattr(model, "cfg", None), "loss_chunks", 0)
  if not n:
    logits_BTV, collected = forward(model, params, batch, rng, collect, amax=amax)
    return (*cross_entropy(logits_BTV, batch["targets"], loss_mask(batch), z_loss), collected)
  hidden_BTD, collected = forward(model, params, batch, rng, collect, output="hidden",
                                 amax=amax)
  return (*chunked_cross_entropy(_head_fn(model, rng), params, hidden_BTD, batch["targets"],
                                 loss_mask(batch), n, z_loss, batch.get("segment_ids")),
          collected)


def make_loss(model, z_loss: float = 0.0, collect: tuple[str, ...] = ()):
  """``loss_fn(params, batch, rng, amax=None) -> (objective, aux)``; aux
  holds ``loss`` (mean NLL), ``tokens``, ``z_loss`` and ``sown`` (metrics of
  the collected collections). ``model.cfg.loss_chunks`` > 0 runs the chunked
  head. ``amax``: delayed fp8 scaling's histories, differentiated by the
  first-order step for this step's absmaxes (``qtrain.quant.delayed``)."""

  def loss_fn(params, batch, rng, amax=None):
    objective, nll_sum, n_tokens, z_term, collected = nll(model, params, batch, rng, z_loss,
                                                          tuple(collect), amax)
    aux = {"loss": nll_sum / jnp.maximum(n_tokens, 1.0), "tokens": n_tokens,
           "z_loss": z_term, "sown": sown_metrics(collected)}
    return objective, aux

  return loss_fn
