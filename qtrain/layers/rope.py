"""Rotary position embeddings (Su et al. 2021) in Llama's half-split layout.

The head vector is split into halves [x1, x2] and rotated as
``x * cos + [-x2, x1] * sin`` with frequency ``theta^(-2i/H)`` for pair i — the
layout Hugging Face's Llama uses, so converted q/k weights need no permutation.
Optional Llama-3 frequency scaling follows Meta's reference: wavelengths longer
than ``original_max_position / low_freq_factor`` are divided by ``factor``,
shorter than ``original_max_position / high_freq_factor`` are kept, and the
band between is interpolated linearly in ``original_max_position / wavelength``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qtrain.layers.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: RopeScaling | None = None) -> np.ndarray:
  """[H/2] float64 inverse frequencies, Llama-3 scaled when enabled."""
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None or scaling.factor == 1.0:
    return inv
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def apply_rope(x_BTNH, positions_BT, inv_freq):
  """Rotates x by angle positions * inv_freq; math in float32."""
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  sin = jnp.sin(angles_BTF)[:, :, None, :]
  cos = jnp.cos(angles_BTF)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)
