"""RMS normalisation computed in float32: RMSNorm (Zhang & Sennrich 2019), as
Llama uses it, and Single-Scale RMSNorm (OSP, Park et al. 2025).

Both normalise by the root mean square over the model width,
y = x / sqrt(mean(x^2) + eps) * g, and differ only in the gain g:

* ``rmsnorm``: a learnable gain per channel, ``scale`` [D];
* ``ssnorm``: one learnable scalar, ``scale`` [] ([L] under the scanned stack).
  A per-channel gain lets training grow a few channels into the massive
  activations that break 4-bit quantization; a single scalar cannot single
  out channels (OSP's table 3: kurtosis 1575 -> 67 with Muon). It is a
  per-channel gain with all entries equal, so export broadcasts it to [D].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("rmsnorm", "ssnorm")


def _normalise(x_BTD, eps: float):
  x = x_BTD.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, scale [D]; the statistic in float32."""
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x_BTD.shape[-1],), self.param_dtype)
    return (_normalise(x_BTD, self.eps) * scale.astype(jnp.float32)).astype(self.dtype)


class SSNorm(nn.Module):
  """Single-Scale RMSNorm: y = x / sqrt(mean(x^2) + eps) * s, one scalar s."""
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ()),
                       (), self.param_dtype)
    return (_normalise(x_BTD, self.eps) * scale.astype(jnp.float32)).astype(self.dtype)


def norm_for(cfg, name: str) -> nn.Module:
  """The norm ``cfg.norm`` names (a ``ModelConfig``), as module ``name``."""
  if cfg.norm not in NORMS:
    raise ValueError(f"config.model.norm={cfg.norm!r}; use one of {NORMS}")
  cls = SSNorm if cfg.norm == "ssnorm" else RMSNorm
  return cls(cfg.norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name)
