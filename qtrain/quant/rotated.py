"""Rotated matmuls: (X R)(R^T W) with R a randomized Hadamard, so that the
quantizer below sees rotated operands (RoSTE, Wei et al., ICML 2025).

At each matmul whose canonical path ``pattern`` fullmatches, and in each block
the ``table`` turns on, the provider multiplies both operands along the
contraction dim by R = diag(s) H_n / sqrt(n) (s seeded random signs, H_n the
Hadamard matrix of order n of ``qtrain.layers.rotation``, Sylvester x Paley):

    LIN(X) = Q_x(X R) . Q_w(R^T W)                  (RoSTE eq. 2)

Unquantized this is X R R^T W = X W, the same function. Quantized, the
rounding happens in the rotated basis, where an outlier channel of X is spread
over all n channels. Autodiff through R^T W gives the *rotated STE* with no
rule of its own: with the STE's identity Jacobian for Q_w,

    dL/dW = R . dL/dQ_w(R^T W)                      (RoSTE: dQ(R w)/dw ~ R)

The rotation is *online* on both operands (a transform per matmul and per
step), not fused into the weights: the trained W stays in the unrotated basis,
so a per-block choice changes nothing in the params, and the model with any
table is the same function in high precision. Fusing R^T into stored weights
for deployment is qtrain/convert's business.

Sites are matmul paths, not the residual stream: q/k/v each rotate their own
copy of the shared input, which is what lets RoSTE choose per matmul. The
signs depend on (seed, path, block), so every block of a scanned stack has its
own R; they sit in an [L, n] table indexed by the traced block index. A block
whose table entry is off takes a ``lax.cond`` branch with no transform: one
compiled block, no unscanning.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from qtrain.layers.hooks import Provider
from qtrain.layers.rotation import hadamard_transform, random_signs

def site_signs(seed: int, path: str, n: int, blocks: int) -> np.ndarray:
  """[blocks, n] float32 random signs of the matmul at ``path``, one row per
  block: a function of (seed, path, block) only, so the lower level and the
  training provider draw the same R."""
  return np.stack([random_signs(n, zlib.crc32(f"{seed}/{path}/{b}".encode()))
                   for b in range(blocks)]).astype(np.float32)


def rotate(x, signs, axis: int = -1):
  """x R along ``axis``, R = diag(s) H / sqrt(n) (``hadamard_transform``:
  the fast transform, float32 inside, x's dtype out).

  For a weight W [n, out] with axis 0 this is R^T W (each column w -> R^T w,
  i.e. w^T R as a row), for activations [..., n] with axis -1 it is X R."""
  return jnp.moveaxis(hadamard_transform(jnp.moveaxis(x, axis, -1), signs), -1, axis)


@dataclasses.dataclass(frozen=True)
class RotationProvider(Provider):
  """(X R)(R^T W) at the matmuls ``pattern`` names, per block from ``table``."""
  pattern: str = ""  # Regex fullmatching canonical matmul paths; "" rotates none.
  # ((path, (on per block, ...)), ...); a path absent from it (or table None):
  # every block on. Outside the stack: a 1-tuple.
  table: tuple[tuple[str, tuple[bool, ...]], ...] | None = None
  seed: int = 0

  def blocks_on(self, site, n_layers: int) -> tuple[bool, ...]:
    """On/off of ``site`` per block (1-tuple outside the stack)."""
    if not (self.pattern and re.fullmatch(self.pattern, site.path)):
      return (False,)
    blocks = n_layers if site.layered else 1
    on = dict(self.table or ()).get(site.path)
    if on is None:
      return (True,) * blocks
    if len(on) != blocks:
      raise ValueError(f"config.quant.rotation.table[{site.path!r}] has {len(on)} entries; "
                       f"the model has {blocks} there")
    return tuple(on)

  def lhs_grad_passes(self, site, hooks) -> bool:
    return not any(self.blocks_on(site, hooks.n_layers))  # Rotated: R^T on the cotangent.

  def dot(self, site, hooks, inner):
    on = self.blocks_on(site, hooks.n_layers)
    if not any(on):
      return inner
    signs = site_signs(self.seed, site.path, site.in_features, len(on))

    def rotated(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      (lc, rc), _ = dims
      layer = site.layer if site.layer is not None else hooks.layer
      index = layer if site.layered else 0
      both = lambda l, r, s: (rotate(l, s, lc[0]), rotate(r, s, rc[0]))
      if isinstance(index, int):  # Unscanned, or outside the stack: static.
        if on[index]:
          lhs, rhs = both(lhs, rhs, jnp.asarray(signs[index]))
      else:
        s = jnp.asarray(signs)[index]
        if all(on):
          lhs, rhs = both(lhs, rhs, s)
        else:
          lhs, rhs = jax.lax.cond(jnp.asarray(on)[index], both, lambda l, r, _: (l, r),
                                  lhs, rhs, s)
      return inner(module, lhs, rhs, dims, precision, preferred_element_type)

    return rotated
