"""A dense layer whose weight form is chosen by path rules and whose matmul(s)
go through the one hook (see ``qtrain.layers.weights``).

An optional bias (``use_bias``: Qwen2's q/k/v projections) is added after the
form's product(s), outside the hook: quantizers, rotations and calibration see
the weight alone, as in a quantized kernel whose epilogue adds the bias in
high precision."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qtrain.layers.hooks import as_hooks, canonical_path
from qtrain.layers.weights import form_for


def module_path(module: nn.Module) -> str:
  """The module's canonical path, e.g. ``decoder/layers/attn/q_proj`` (no
  scan/remat wrapper names, no layer index)."""
  return canonical_path(module)[0]


class Linear(nn.Module):
  """y = x W (+ b), W [in, out] (or the form's factors), b [out], annotated with
  logical axes (b's is W's output axis)."""
  features: int
  kernel_axes: tuple[str, str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  hooks: Any = None  # Hooks, a Provider, a tuple of them, or None (plain dots).
  init_std: float = 0.02  # Scale of factorised forms' init (see weights.LowRank).
  use_bias: bool = False  # No param at all when off (bias-free checkpoints unchanged).

  @nn.compact
  def __call__(self, x):
    hooks = as_hooks(self.hooks)
    form = form_for(hooks.forms, module_path(self), self.init_std)
    if hooks.lhs_rotation is not None and not form.one_product:
      # Several products of x: rotate it once here, for all of them.
      x = hooks.lhs_rotation.apply(x)
      hooks = hooks.with_context(lhs_rotation=None)
    y = form(self, hooks, x)
    if not self.use_bias:
      return y
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (self.kernel_axes[1],)),
                      (self.features,), self.param_dtype)
    return y + bias.astype(y.dtype)
