"""The one matmul hook that every weight matmul calls.

A weight form (``qtrain.layers.weights``) creates its params and calls one
``Matmul`` module per product it needs. The module is named by module path
(``decoder/layers/attn/q_proj/dot_general``), so a provider that owns state
(learned step sizes, rotations, calibration statistics) keeps it there rather
than by call order; it performs the product by the function the model's
``Hooks`` compose for its ``MatmulSite``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from qtrain.layers.hooks import Hooks, MatmulSite, Provider


class DotGeneral(nn.Module):
  """High-precision dot: ``jax.lax.dot_general`` as asked, i.e. the input dtype
  out unless ``preferred_element_type`` is given (XLA accumulates bf16 dots in
  float32 on GPU/TPU)."""

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


class Matmul(nn.Module):
  """``lax.dot_general(lhs, rhs, ...)`` with lhs the activations and rhs the
  weight, through the providers of ``hooks``."""
  site: MatmulSite
  hooks: Hooks

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    fn = self.hooks.dot_fn(self.site)
    return fn(self, lhs, rhs, dimension_numbers, precision, preferred_element_type)


@dataclasses.dataclass(frozen=True)
class HighPrecision(Provider):
  """Every matmul unquantized (the pass-through provider)."""
