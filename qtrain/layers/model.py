"""The Llama-family language model: embed -> decoder -> norm -> LM head.

With ``cfg.embproj`` (EmbProj, OSP: Park et al. 2025) two d x d projections,
orthogonally initialised, sit after the embedding lookup (``embed_proj``) and
between the final norm and the LM head (``head_proj``). Both are ``Linear``s,
so they are matmul sites like any other (trace_sites lists them; the quant
presets' rules name neither, so they stay in high precision). After training
``qtrain.convert.merge_osp`` folds them into the embedding table and the LM
head: E' = E P_in, W' = P_out W, a plain Llama.

The chunked loss (``config.model.loss_chunks``, ``qtrain.train.loss``) splits
the model at the LM head: ``output="hidden"`` returns the head's input and
``Transformer.head`` runs the head alone on some of its tokens, the same
``lm_head`` module (params, matmul hook, providers) as the full call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qtrain.layers import embedding
from qtrain.layers.config import ModelConfig
from qtrain.layers.decoder import Decoder
from qtrain.layers.dot_general import Matmul
from qtrain.layers.hooks import MatmulSite, as_hooks
from qtrain.layers.linear import Linear
from qtrain.layers.norms import norm_for
from qtrain.layers.sharding import LOGITS, RESIDUAL


def _embproj(cfg: ModelConfig, hooks, name: str) -> Linear:
  """An EmbProj d x d matrix, orthogonal at init. Its second dim has a
  logical name of its own (``embed_proj``): a dim cannot be named ``embed``
  twice."""
  return Linear(cfg.d_model, ("embed", "embed_proj"), cfg.compute_dtype, cfg.weight_dtype,
                nn.initializers.orthogonal(), hooks, cfg.init_std, name=name)


def _lm_head(module: nn.Module, cfg: ModelConfig, hooks, embedding_VD, x_BTD):
  """logits_BTV of the LM head (``lm_head``: a Linear, or the tied embedding
  [V, D] contracted on D) through the matmul hook; created inside ``module``'s
  compact call, so every caller shares one module path and one set of params."""
  if cfg.tie_embeddings:
    site = MatmulSite(path="lm_head", param=(*module.scope.path, "embedding"),
                      in_features=cfg.d_model, out_features=cfg.vocab_size, weight_axis=1)
    logits_BTV = Matmul(site, hooks, name="lm_head")(
        x_BTD, embedding_VD.astype(cfg.compute_dtype), (((2,), (1,)), ((), ())))
  else:
    logits_BTV = Linear(cfg.vocab_size, ("embed", "vocab"), cfg.compute_dtype,
                        cfg.weight_dtype, nn.initializers.normal(cfg.init_std), hooks,
                        cfg.init_std, name="lm_head")(x_BTD)
  # Vocab-parallel: each tensor shard keeps its slice of the logits (the loss
  # reduces over the vocabulary across shards; nothing gathers them).
  return nn.with_logical_constraint(logits_BTV, LOGITS)


OUTPUTS = ("logits", "hidden")


class Transformer(nn.Module):
  """Returns logits_BTV in the compute dtype (the loss upcasts to float32).

  ``decode=True`` runs autoregressive inference against the ``cache``
  collection (``qtrain.layers.kv_cache``): apply with ``{"params": p,
  "cache": c}`` and ``mutable=["cache"]``; positions_BT[b] are the consecutive
  slots the tokens take (default 0..T-1, a prefill).

  ``output="hidden"`` returns the LM head's input x_BTD instead (after the
  final norm and ``head_proj``); ``head`` maps it (or any [B, C] subset of its
  tokens) to logits. When a collection is mutable the hidden call still runs
  the head on x_BTD and drops the logits, so providers that observe its input
  (telemetry) sow what they sow in the full call; XLA removes the unused
  product.

  ``provider``: a ``qtrain.layers.hooks.Provider``, a tuple of them (outermost
  first) or None; with ``cfg.weight_forms`` they make the model's ``Hooks``.
  ``embed_out`` (the embedding output, after ``embed_proj`` when
  ``cfg.embproj``: the residual stream entering the first block) is a named
  hook site, like each block's ``block_out``.
  """
  cfg: ModelConfig
  provider: Any = None

  def _hooks(self, segment_ids_BT):
    mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
    return as_hooks(self.provider).with_context(
        forms=self.cfg.weight_forms, n_layers=self.cfg.n_layers, token_mask=mask_BT)

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, decode: bool = False,
               *, output: str = "logits", hidden_BTD=None):
    cfg = self.cfg
    if output not in OUTPUTS:
      raise ValueError(f"output={output!r}; use one of {OUTPUTS}")
    if decode and segment_ids_BT is not None:
      raise ValueError("decode=True runs one sequence per row: pass no segment_ids_BT")
    embedding_VD = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    hooks = self._hooks(segment_ids_BT)
    if hidden_BTD is not None:  # ``head``: the LM head alone.
      return _lm_head(self, cfg, hooks, embedding_VD, hidden_BTD)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x_BTD = embedding.lookup(embedding_VD, tokens_BT).astype(cfg.compute_dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL)
    if cfg.embproj:
      x_BTD = nn.with_logical_constraint(_embproj(cfg, hooks, "embed_proj")(x_BTD), RESIDUAL)
    x_BTD = hooks.activation(self, "embed_out", x_BTD)
    x_BTD = Decoder(cfg, hooks, decode, name="decoder")(x_BTD, positions_BT, segment_ids_BT)
    x_BTD = norm_for(cfg, "final_norm")(x_BTD)
    if cfg.embproj:
      x_BTD = nn.with_logical_constraint(_embproj(cfg, hooks, "head_proj")(x_BTD), RESIDUAL)
    if output == "logits":
      return _lm_head(self, cfg, hooks, embedding_VD, x_BTD)
    if self.scope.mutable:  # Init creates the head; observers sow its input.
      _lm_head(self, cfg, hooks, embedding_VD, x_BTD)
    return x_BTD

  def head(self, hidden_BTD, segment_ids_BT=None):
    """logits_BTV of the LM head on ``hidden_BTD`` (what ``output="hidden"``
    returned, or some of its tokens: [B, C, D]); apply with
    ``method=Transformer.head``. ``segment_ids_BT`` give the hooks' token mask."""
    return self(None, segment_ids_BT=segment_ids_BT, hidden_BTD=hidden_BTD)
