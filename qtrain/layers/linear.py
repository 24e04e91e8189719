"""A bias-free dense layer whose matmul is the injected dot-general."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qtrain.layers.dot_general import DotGeneralProvider, HighPrecision


def module_path(module: nn.Module) -> str:
  """The module's path without the scan/remat wrappers' names, e.g.
  ``decoder/layers/attn/q_proj``."""
  return "/".join(module.scope.path)


class Linear(nn.Module):
  """y = x @ W with W of shape [in, out], annotated with logical axes."""
  features: int
  kernel_axes: tuple[str, str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)
  dot: DotGeneralProvider = HighPrecision()

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (x.shape[-1], self.features), self.param_dtype)
    dot = self.dot.module_for(module_path(self))(name="dot_general")
    x = x.astype(self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    return dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
