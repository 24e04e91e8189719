"""The Llama decoder stack: pre-norm blocks, scanned and rematerialised.

``nn.scan`` stacks the L blocks' params on a leading ``layers`` axis (one
compiled block, compile time independent of depth); ``nn.remat`` with a named
policy chooses which activations the backward pass keeps. The same variable
axes stack the ``cache`` collection of decoding (``decode=True``, no remat).

Each block gets its index as a scanned input (``jnp.arange(L)``) and hands
its submodules ``hooks.with_context(layer=index)``: providers resolve
per-layer choices (rules naming layer indices) as tables indexed by it, so
the stack stays one scanned block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtrain.layers import rotation
from qtrain.layers.attention import Attention, save_attention_residuals
from qtrain.layers.config import ModelConfig
from qtrain.layers.hooks import Hooks
from qtrain.layers.mlp import MLP
from qtrain.layers.norms import norm_for
from qtrain.layers.sharding import RESIDUAL
from qtrain.quant.dot_general import QUANT_CODES, SAVED_OUT

_cp = jax.checkpoint_policies
# A quantized matmul is a matmul: the int8/fp8 dots (XLA's or a Pallas kernel,
# which remat policies cannot see as a dot) name their bf16 output SAVED_OUT,
# and every policy that keeps weight-matmul outputs keeps it too. Without it
# the backward re-ran 6 of a block's 7 forward int8 kernels (issue 16; the
# w8a8 step with the Mosaic kernel 0.915x -> 0.951x bf16 on an H100).
_quant_out = _cp.save_only_these_names(SAVED_OUT)
_dots = _cp.save_from_both_policies(_cp.checkpoint_dots, _quant_out)
_dots_no_batch = _cp.save_from_both_policies(_cp.dots_with_no_batch_dims_saveable, _quant_out)
REMAT_POLICIES = {
    "none": None,  # No rematerialisation: keep every activation.
    "full": _cp.nothing_saveable,  # Recompute the whole block.
    "dots": _dots,  # Keep matmul outputs.
    "dots_no_batch": _dots_no_batch,  # Weight matmuls only.
    "qkv_attn": _cp.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_out"),
    # Weight matmuls plus the attention inputs/output.
    "dots_attn": _cp.save_from_both_policies(
        _dots_no_batch,
        _cp.save_only_these_names("query_proj", "key_proj", "value_proj", "attention_out")),
    # Weight matmuls plus the attention kernel's forward results (cuDNN: output
    # and softmax statistics), so the backward does not re-run attention's
    # forward (qtrain.layers.attention's docstring): +2.3% tokens/s for
    # llama_1b at 8 x 2048 on an H100, +1.4 GiB (docs/benchmarks.md).
    "dots_no_batch_attn": _cp.save_from_both_policies(_dots_no_batch, save_attention_residuals),
}
# ``config.model.save_quant_codes`` adds the int8/fp8 matmuls' operand codes
# (QUANT_CODES) to the policies that keep weight-matmul outputs: dots*.
_codes = _cp.save_only_these_names(QUANT_CODES)


def remat_policy(cfg: ModelConfig):
  """The block's remat policy: ``cfg.remat_policy``'s, plus the quantized
  matmuls' codes where it keeps matmul outputs and ``cfg.save_quant_codes``,
  plus the online rotations' outputs where ``cfg.rotation.save``."""
  policy = REMAT_POLICIES[cfg.remat_policy]
  if cfg.save_quant_codes and cfg.remat_policy.startswith("dots"):
    policy = _cp.save_from_both_policies(policy, _codes)
  return rotation.remat_policy(cfg.rotation, policy)


class Block(nn.Module):
  """x + attn(norm(x)), then h + mlp(norm(h)); the norm is ``cfg.norm``'s."""
  cfg: ModelConfig
  hooks: Hooks = Hooks()
  decode: bool = False  # Attention reads and writes the KV cache (see Attention).

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, layer=None):
    cfg = self.cfg
    hooks = self.hooks.with_context(layer=layer)
    x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL)
    h_BTD = x_BTD + Attention(cfg, hooks, self.decode, name="attn")(
        norm_for(cfg, "attn_norm")(x_BTD), positions_BT, segment_ids_BT)
    out_BTD = h_BTD + MLP(cfg, hooks, name="mlp")(norm_for(cfg, "mlp_norm")(h_BTD))
    out_BTD = hooks.activation(self, "block_out", out_BTD)
    return nn.with_logical_constraint(out_BTD, RESIDUAL), None


class Decoder(nn.Module):
  cfg: ModelConfig
  hooks: Hooks = Hooks()
  decode: bool = False  # Inference with the KV cache; the cache is stacked like params.

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, layers_K=None):
    """``layers_K``: the global indices of the blocks to run (a pipeline
    stage's slice of the stack, ``qtrain/parallel/pipeline.py``; its params
    are then [K, ...]); None runs all ``cfg.n_layers``."""
    cfg = self.cfg
    if cfg.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={cfg.remat_policy!r}; use one of {sorted(REMAT_POLICIES)}")
    block = Block
    if self.decode:
      # A checkpoint that recomputes nothing (decoding has no backward). On
      # jax 0.11.2 / flax 0.12.10, nn.scan's check that its broadcast values do
      # not depend on the body fails for a block holding a Pallas call (the
      # packed int4 decode kernel: "broadcasted variable has a data dependency
      # on the scan body"), and passes when the block is a checkpoint (H100,
      # 2026-11-24; benchmarks/KERNEL_NOTES.md). Same ops, same numbers.
      block = nn.remat(Block, policy=jax.checkpoint_policies.everything_saveable,
                       prevent_cse=False)
    elif cfg.remat_policy != "none":  # Remat serves a backward pass only.
      block = nn.remat(Block, policy=remat_policy(cfg), prevent_cse=not cfg.scan_layers)
    if layers_K is not None and not cfg.scan_layers:
      raise ValueError("a slice of the stack (layers_K) needs config.model.scan_layers=True")
    if cfg.scan_layers:
      if layers_K is None:
        layers_K = jnp.arange(cfg.n_layers, dtype=jnp.int32)
      n = layers_K.shape[0]
      stack = nn.scan(block, variable_axes={True: 0}, split_rngs={True: True},
                      in_axes=(nn.broadcast, nn.broadcast, 0), length=n,
                      unroll=cfg.scan_unroll if 0 < cfg.scan_unroll < n else True,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, _ = stack(cfg, self.hooks, self.decode, name="layers")(
          x_BTD, positions_BT, segment_ids_BT, layers_K)
      return x_BTD
    for i in range(cfg.n_layers):
      x_BTD, _ = block(cfg, self.hooks, self.decode, name=f"layers_{i}")(
          x_BTD, positions_BT, segment_ids_BT, i)
    return x_BTD
