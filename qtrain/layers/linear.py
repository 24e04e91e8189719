"""A bias-free dense layer whose weight form is chosen by path rules and whose
matmul(s) go through the one hook (see ``qtrain.layers.weights``)."""

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
  """y = x W, W [in, out] (or the form's factors), annotated with logical axes."""
  features: int
  kernel_axes: tuple[str, str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  hooks: Any = None  # Hooks, a Provider, a tuple of them, or None (plain dots).
  init_std: float = 0.02  # Scale of factorised forms' init (see weights.LowRank).

  @nn.compact
  def __call__(self, x):
    hooks = as_hooks(self.hooks)
    return form_for(hooks.forms, module_path(self), self.init_std)(self, hooks, x)
