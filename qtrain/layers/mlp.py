"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import functools

import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from qtrain.layers.config import ModelConfig
from qtrain.layers.dot_general import DotGeneralProvider, HighPrecision
from qtrain.layers.linear import Linear


class MLP(nn.Module):
  cfg: ModelConfig
  dot: DotGeneralProvider = HighPrecision()

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    dense = functools.partial(Linear, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                              kernel_init=nn.initializers.normal(cfg.init_std), dot=self.dot)
    gate_BTF = dense(cfg.d_ff, ("embed", "mlp"), name="gate_proj")(x_BTD)
    up_BTF = dense(cfg.d_ff, ("embed", "mlp"), name="up_proj")(x_BTD)
    h_BTF = checkpoint_name(nn.silu(gate_BTF) * up_BTF, "mlp_hidden")
    return dense(cfg.d_model, ("mlp", "embed"), name="down_proj")(h_BTF)
