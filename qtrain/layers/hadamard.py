"""The normalised Walsh-Hadamard transform, online and folded into weights.

H_n = H_2^{(x)k} / sqrt(n) (Sylvester's construction, n = 2^k, the ordering of
``scipy.linalg.hadamard``) is symmetric and orthogonal, hence self-inverse:
H H = I. Rotating a matmul's input by it and its weight by the same H leaves
the product unchanged, (x H)(H W) = x W, while it spreads an outlier channel
of x over all n channels, so a per-token quantizer of x H loses less to it
(QuaRot, Ashkboos et al. 2024; OSP, Park et al. 2025, table 3: W4A4KV4
perplexity "with FFN Hadamard" rotates the down_proj input this way).

``fwht`` is the fast transform: log2(n) butterfly stages over the last axis,
each pairing entries whose indices differ in one bit, (a, b) -> (a + b, a - b):
O(n log n) adds instead of an n x n matmul, computed in float32 whatever the
input dtype (bf16 sums of up to n terms would lose the rotation's exactness).
Under tensor parallelism with the last axis split over ``tensor``, the last
log2(tensor) stages pair entries on different devices; XLA inserts the
exchange.

``fold_ffn_hadamard`` turns a model trained without the online FFN Hadamard
into the same function with it (down_proj W -> H W), so one trained model can
be quantized with and without it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax.core import meta

from qtrain.layers.config import ModelConfig
from qtrain.layers.param_tree import copy_tree, get, put


def is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def fwht(x):
  """x H_n over the last axis (n a power of two), H_n orthonormal; float32
  inside, the input's dtype out."""
  n = x.shape[-1]
  if not is_power_of_two(n):
    raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two size; the last "
                     f"axis has {n}")
  lead = x.shape[:-1]
  y = x.astype(jnp.float32)
  h = 1
  while h < n:  # Stage h: pair index i with i + h inside each block of 2h.
    y = y.reshape(*lead, n // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
    h *= 2
  return (y * (1.0 / n ** 0.5)).astype(x.dtype)


def rotate_rows(w):
  """H W for a kernel W [..., n, out] (H acting on its input rows)."""
  return jnp.swapaxes(fwht(jnp.swapaxes(w, -1, -2)), -1, -2)


def down_proj_paths(params: dict) -> list[tuple[str, ...]]:
  """Key paths of every block's ``down_proj`` node (one when scanned)."""
  decoder = params["decoder"]
  layers = ["layers"] if "layers" in decoder else sorted(
      (k for k in decoder if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  return [("decoder", k, "mlp", "down_proj") for k in layers]


def rotate_down_proj(params: dict, cfg: ModelConfig) -> dict:
  """Plain, unwrapped ``params`` with every dense down_proj kernel W replaced
  by H W (a new dict structure; untouched leaves shared)."""
  if not is_power_of_two(cfg.d_ff):
    raise ValueError(f"config.model.d_ff={cfg.d_ff} is not a power of two: the FFN Hadamard "
                     "needs one")
  params = copy_tree(params)
  for path in down_proj_paths(params):
    node = get(params, path)
    if set(node) != {"kernel"}:
      raise ValueError(f"{'/'.join(path)} holds {sorted(node)}, not a dense kernel: the FFN "
                       "Hadamard folds into dense down_proj kernels only "
                       "(config.model.weight_forms)")
    put(params, (*path, "kernel"), rotate_rows(node["kernel"]))
  return params


def fold_ffn_hadamard(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, cfg) of a model WITHOUT the online FFN Hadamard -> the same
  function WITH it: down_proj W -> H W, since (h H)(H W) = h W.

  ``params``: boxed or plain, with or without the ``{'params': ...}``
  wrapper; returned plain and unwrapped.
  """
  if cfg.ffn_hadamard:
    raise ValueError("config.model.ffn_hadamard is already True: the model rotates its "
                     "down_proj input; folding again would rotate twice")
  params = meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  return rotate_down_proj(params, cfg), dataclasses.replace(cfg, ffn_hadamard=True)
