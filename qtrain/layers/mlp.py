"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)).

The SwiGLU hidden is the named hook site ``mlp_hidden``. ``cfg.fused_mlp``
runs gate/up as one matmul where nothing tells them apart
(``qtrain.layers.linear.projections``): the same function and params. With
``cfg.ffn_hadamard`` the down_proj input is that hidden rotated by the
normalised Walsh-Hadamard transform (``qtrain.layers.hadamard``; OSP's "FFN
Hadamard"), applied after the site and before down_proj: the site (telemetry,
a rotation provider) sees the model's own hidden, where the outliers live, and
down_proj's matmul hook, where the quantizer rounds the operands, sees the
rotated one. Without folding its inverse into down_proj (``fold_ffn_hadamard``)
the switch changes the function: train with it, or fold it into a model
trained without it.

``cfg.rotation.r4`` generalises it (SpinQuant's R4): any supported d_ff
(``qtrain.layers.rotation``), randomized signs, per block; its R^T is fused
into down_proj by ``qtrain.convert.rotate.fuse_rotations``. r4="hadamard" on
every block of a power-of-two d_ff is ``ffn_hadamard`` (validation refuses
both at once). down_proj gets it as its matmul's activation rotation
(``Hooks.lhs_rotation``: applied before the providers, which see h R; where
they allow, the backward applies R^T through the weight,
``rotation.Online``); a weight form of several products gets h R from
``Linear``. Its output is named
``r4_rotated`` for remat (``config.model.rotation.save`` keeps it, so the
backward does not rerun it).
"""

from __future__ import annotations


import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from qtrain.layers import rotation
from qtrain.layers.config import ModelConfig
from qtrain.layers.hadamard import fwht
from qtrain.layers.hooks import Hooks
from qtrain.layers.linear import Linear, projections
from qtrain.layers.sharding import MLP_HIDDEN


class MLP(nn.Module):
  cfg: ModelConfig
  hooks: Hooks = Hooks()

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    linear = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                  kernel_init=nn.initializers.normal(cfg.init_std), init_std=cfg.init_std)
    # Fused: one GEMM, the weight [D, F, 2] (linear.fused_dense).
    gate_BTF, up_BTF = projections(self, x_BTD, (("gate_proj", cfg.d_ff, ("embed", "mlp")),
                                                 ("up_proj", cfg.d_ff, ("embed", "mlp"))),
                                   fuse=cfg.fused_mlp, hooks=self.hooks, **linear)
    h_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, MLP_HIDDEN)
    h_BTF = checkpoint_name(h_BTF, "mlp_hidden")
    h_BTF = self.hooks.activation(self, "mlp_hidden", h_BTF)
    if cfg.ffn_hadamard:  # down_proj's input is h H (H orthonormal, self-inverse).
      h_BTF = nn.with_logical_constraint(fwht(h_BTF), MLP_HIDDEN)
    # R4: h R, with R^T fused into down_proj: down_proj's matmul takes it as its
    # activation rotation (Hooks.lhs_rotation; its backward may run through the weight).
    r4 = rotation.Online.at(cfg, "r4", self.hooks.layer)
    hooks = self.hooks if r4 is None else self.hooks.with_context(lhs_rotation=r4)
    return Linear(cfg.d_model, ("mlp", "embed"), hooks=hooks, name="down_proj", **linear)(h_BTF)
