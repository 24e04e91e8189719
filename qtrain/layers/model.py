"""The Llama-family language model: embed -> decoder -> norm -> LM head."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qtrain.layers.config import ModelConfig
from qtrain.layers.decoder import Decoder
from qtrain.layers.dot_general import DotGeneralProvider, HighPrecision
from qtrain.layers.linear import Linear
from qtrain.layers.norms import RMSNorm


class Transformer(nn.Module):
  """Returns logits_BTV in the compute dtype (the loss upcasts to float32).

  ``decode=True`` runs autoregressive inference against the ``cache``
  collection (``qtrain.layers.kv_cache``): apply with ``{"params": p,
  "cache": c}`` and ``mutable=["cache"]``; positions_BT[b] are the consecutive
  slots the tokens take (default 0..T-1, a prefill).
  """
  cfg: ModelConfig
  dot: DotGeneralProvider = HighPrecision()

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, decode: bool = False):
    cfg = self.cfg
    if decode and segment_ids_BT is not None:
      raise ValueError("decode=True runs one sequence per row: pass no segment_ids_BT")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embedding_VD = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(cfg.compute_dtype)
    x_BTD = Decoder(cfg, self.dot, decode, name="decoder")(x_BTD, positions_BT, segment_ids_BT)
    x_BTD = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="final_norm")(x_BTD)
    if cfg.tie_embeddings:
      dot = self.dot.module_for("/".join([*self.scope.path, "lm_head"]))(name="lm_head")
      return dot(x_BTD, embedding_VD.astype(cfg.compute_dtype), (((2,), (1,)), ((), ())))
    return Linear(cfg.vocab_size, ("embed", "vocab"), cfg.compute_dtype, cfg.weight_dtype,
                  nn.initializers.normal(cfg.init_std), self.dot, name="lm_head")(x_BTD)
