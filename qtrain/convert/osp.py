"""Outlier-safe pretraining's training-time pieces folded away: a plain Llama.

OSP (Park et al. 2025) trains with Single-Scale RMSNorm and EmbProj, and may
rotate the down_proj input online (the FFN Hadamard). Each is exactly a plain
Llama's weights in disguise, so ``merge_osp`` returns the params and
``ModelConfig`` of the same function with ``norm="rmsnorm"``,
``embproj=False``, ``ffn_hadamard=False`` (what HF export writes, and what PTQ
or an evaluation may take):

* SSNorm's scalar s is the per-channel gain (s, ..., s): broadcast to [D]
  ([L, D] scanned).
* EmbProj: the embedding output is E[t] P_in, so the table becomes E' = E P_in;
  the logits are norm(x) P_out W, so the head becomes W' = P_out W. With tied
  embeddings the head reads E^T, and one table cannot be both E P_in (lookup)
  and (P_out E^T)^T = E P_out^T (head) unless P_in = P_out^T: the merged model
  is *untied* (``tie_embeddings=False``, ``lm_head`` = P_out E^T), which is
  exact; an exact tied export does not exist in general.
* FFN Hadamard: down_proj reads h H, so (h H) W = h (H W): W' = H W (H is
  symmetric and self-inverse; ``qtrain.layers.hadamard``).

Products are taken in float32 at HIGHEST precision (no TF32/bf16 passes on
GPU) and stored in each param's dtype. Only dense kernels fold; a weight form
with factors (``low_rank``) on embed_proj, head_proj, lm_head or down_proj is
refused, naming it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax.core import meta

from qtrain.layers.config import ModelConfig
from qtrain.layers.hadamard import rotate_down_proj
from qtrain.layers.param_tree import copy_tree, get, put


def unwrap(params) -> dict:
  """Plain params from boxed or plain ones, with or without ``{'params': ...}``."""
  params = meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  return params


def _matmul(a, b, dtype):
  return jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(dtype)


def _dense_kernel(params, name: str):
  node = params[name]
  if set(node) != {"kernel"}:
    raise ValueError(f"{name} holds {sorted(node)}, not a dense kernel: merge_osp folds "
                     "EmbProj into dense weights only (config.model.weight_forms)")
  return node["kernel"]


def norm_scale_paths(params: dict) -> list[tuple[str, ...]]:
  """Key paths of every norm's ``scale`` (final, and per block or stacked)."""
  decoder = params["decoder"]
  blocks = [k for k in decoder if k == "layers" or k.startswith("layers_")]
  return [("final_norm", "scale")] + [("decoder", b, n, "scale") for b in blocks
                                      for n in ("attn_norm", "mlp_norm")]


def _broadcast_norms(params: dict, d_model: int) -> None:
  for path in norm_scale_paths(params):
    s = jnp.asarray(get(params, path))
    put(params, path, jnp.broadcast_to(s[..., None], (*s.shape, d_model)))


def _merge_embproj(params: dict, cfg: ModelConfig) -> None:
  p_in, p_out = _dense_kernel(params, "embed_proj"), _dense_kernel(params, "head_proj")
  table = params["embedding"]
  if cfg.tie_embeddings:  # The head reads E^T: untie (see the module docstring).
    head = _matmul(p_out, jnp.asarray(table).T, table.dtype)
  else:
    w = _dense_kernel(params, "lm_head")
    head = _matmul(p_out, w, w.dtype)
  params["embedding"] = _matmul(table, p_in, table.dtype)
  params["lm_head"] = {"kernel": head}
  del params["embed_proj"], params["head_proj"]


def merge_osp(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, cfg) of the plain dense Llama computing the same function as
  the OSP model (``params`` boxed or plain, wrapped or not; returned plain,
  unwrapped; untouched leaves shared)."""
  params = copy_tree(unwrap(params))
  if cfg.norm == "ssnorm":
    _broadcast_norms(params, cfg.d_model)
  elif cfg.norm != "rmsnorm":
    raise ValueError(f"config.model.norm={cfg.norm!r}; merge_osp knows rmsnorm and ssnorm")
  if cfg.embproj:
    _merge_embproj(params, cfg)
  if cfg.ffn_hadamard:  # H W undoes the online H: H H = I.
    params = rotate_down_proj(params, cfg)
  return params, dataclasses.replace(
      cfg, norm="rmsnorm", embproj=False, ffn_hadamard=False,
      tie_embeddings=cfg.tie_embeddings and not cfg.embproj)


def is_plain(cfg: ModelConfig) -> bool:
  """No OSP piece left to merge."""
  return cfg.norm == "rmsnorm" and not cfg.embproj and not cfg.ffn_hadamard
