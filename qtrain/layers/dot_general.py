"""The one injected ``dot_general`` that every weight matmul calls.

Layers never branch on quantization. Each ``Linear`` asks the model's
``DotGeneralProvider`` for the dot-general *module* that serves its module path
(e.g. ``decoder/layers/attn/q_proj``) and calls it like ``jax.lax.dot_general``.
The dot is a linen submodule so that a quantized implementation can own state
(learned step sizes, calibration statistics) named by module path rather than by
call order. This module holds the contract and the high-precision
implementation; quantized providers live in ``qtrain.quant``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import flax.linen as nn
import jax


class DotGeneral(nn.Module):
  """High-precision dot: ``jax.lax.dot_general`` with a float32 accumulator
  cast back to the input dtype."""

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


class DotGeneralProvider(Protocol):
  """Chooses the dot-general module class for a module path."""

  def module_for(self, path: str) -> Callable[..., nn.Module]:
    ...


@dataclasses.dataclass(frozen=True)
class HighPrecision:
  """Every matmul unquantized."""

  def module_for(self, path: str) -> Callable[..., nn.Module]:
    del path
    return DotGeneral
