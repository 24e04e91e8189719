"""Hugging Face Llama <-> qtrain ``Transformer`` params.

What maps to what (HF ``LlamaForCausalLM`` state dict on the left; HF Linear
weights are [out, in], qtrain kernels are [in, out], hence the transposes):

  model.embed_tokens.weight                 [V, D]   -> embedding                       [V, D]
  model.layers.{i}.self_attn.q_proj.weight  [N*H, D] -> decoder/layers/attn/q_proj/kernel [D, N*H]
  model.layers.{i}.self_attn.k_proj.weight  [K*H, D] -> decoder/layers/attn/k_proj/kernel [D, K*H]
  model.layers.{i}.self_attn.v_proj.weight  [K*H, D] -> decoder/layers/attn/v_proj/kernel [D, K*H]
  model.layers.{i}.self_attn.o_proj.weight  [D, N*H] -> decoder/layers/attn/o_proj/kernel [N*H, D]
  model.layers.{i}.mlp.gate_proj.weight     [F, D]   -> decoder/layers/mlp/gate_proj/kernel [D, F]
  model.layers.{i}.mlp.up_proj.weight       [F, D]   -> decoder/layers/mlp/up_proj/kernel   [D, F]
  model.layers.{i}.mlp.down_proj.weight     [D, F]   -> decoder/layers/mlp/down_proj/kernel [F, D]
  model.layers.{i}.input_layernorm.weight   [D]      -> decoder/layers/attn_norm/scale  [D]
  model.layers.{i}.post_attention_layernorm.weight [D] -> decoder/layers/mlp_norm/scale [D]
  model.norm.weight                         [D]      -> final_norm/scale                [D]
  lm_head.weight                            [V, D]   -> lm_head/kernel                  [D, V]

With ``scan_layers`` the per-layer arrays are stacked on a leading L axis under
``decoder/layers``; without it they live under ``decoder/layers_{i}``. With tied
embeddings there is no ``lm_head`` param; HF's ``lm_head.weight`` (present in a
torch state dict, absent from saved safetensors) must then equal the embedding.

Export of an outlier-safe (OSP) model merges Single-Scale RMSNorm, EmbProj
and the FFN Hadamard into plain Llama weights first (``qtrain.convert.osp``).

RoPE needs no q/k permutation: both sides use the half-split (rotate_half)
layout. Checkpoints are read with the safetensors numpy API (``ml_dtypes``
makes bfloat16 readable); nothing here imports transformers or torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # noqa: F401  Registers bfloat16 with numpy for safetensors.
import numpy as np

from qtrain.convert.osp import is_plain, merge_osp, unwrap
from qtrain.convert.rotate import drop_online
from qtrain.layers.config import ModelConfig, RopeScaling
from qtrain.layers.param_tree import put as _set

_LAYER_KEYS = {  # HF suffix under model.layers.{i}. -> (qtrain path in a block, transpose)
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
}
# Non-persistent RoPE buffers that some older checkpoints still carry.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _get(hf, key, default=None):
  if isinstance(hf, Mapping):
    return hf.get(key, default)
  return getattr(hf, key, default)


def _rope_from_hf(hf) -> tuple[float, RopeScaling]:
  """(theta, scaling) from transformers-5 ``rope_parameters`` or older
  ``rope_theta`` + ``rope_scaling``."""
  rope = dict(_get(hf, "rope_parameters") or _get(hf, "rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  theta = float(rope.get("rope_theta", _get(hf, "rope_theta", 10000.0)))
  if rope.get("partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not supported: qtrain rotates whole heads")
  if rope_type == "default":
    return theta, RopeScaling()
  if rope_type != "llama3":
    raise ValueError(f"rope_type={rope_type!r} is not supported; qtrain implements "
                     "'default' and 'llama3' RoPE only")
  original = rope.get("original_max_position_embeddings", _get(hf, "max_position_embeddings"))
  return theta, RopeScaling(factor=float(rope["factor"]),
                            low_freq_factor=float(rope["low_freq_factor"]),
                            high_freq_factor=float(rope["high_freq_factor"]),
                            original_max_position=int(original))


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """A ``ModelConfig`` from an HF ``LlamaConfig`` or its ``config.json`` dict;
  ``overrides`` replace any resulting field (e.g. ``dtype="bfloat16"``)."""
  for flag in ("attention_bias", "mlp_bias"):
    if _get(hf_config, flag, False):
      raise ValueError(f"HF config has {flag}=True; qtrain's Llama layers have no biases")
  act = _get(hf_config, "hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"hidden_act={act!r}; qtrain's MLP is SwiGLU (silu)")
  d_model = _get(hf_config, "hidden_size")
  n_heads = _get(hf_config, "num_attention_heads")
  theta, scaling = _rope_from_hf(hf_config)
  fields = dict(
      vocab_size=_get(hf_config, "vocab_size"),
      d_model=d_model,
      n_layers=_get(hf_config, "num_hidden_layers"),
      n_heads=n_heads,
      n_kv_heads=_get(hf_config, "num_key_value_heads") or n_heads,
      head_dim=_get(hf_config, "head_dim") or d_model // n_heads,
      d_ff=_get(hf_config, "intermediate_size"),
      max_seq_len=_get(hf_config, "max_position_embeddings", 2048),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
      norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-5)),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF key this config needs, with its HF ([out, in]) shape."""
  D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  per_layer = {
      "self_attn.q_proj.weight": (q, D), "self_attn.k_proj.weight": (kv, D),
      "self_attn.v_proj.weight": (kv, D), "self_attn.o_proj.weight": (D, q),
      "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
      "mlp.down_proj.weight": (D, F),
      "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
  }
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for i in range(cfg.n_layers):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
  return shapes


def _check_keys(given, expected, optional=()):
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(k for k in set(given) - set(expected) - set(optional)
                      if not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected:
    raise ValueError(f"HF state dict does not match the config: missing keys {missing}, "
                     f"unexpected keys {unexpected}")


def params_from_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig,
                              scan_layers: bool | None = None, dtype=np.float32) -> dict:
  """Plain (unboxed) qtrain params of numpy ``dtype`` arrays from an HF Llama
  state dict; ``scan_layers`` defaults to ``cfg.scan_layers``."""
  scan_layers = cfg.scan_layers if scan_layers is None else scan_layers
  shapes = _hf_shapes(cfg)
  _check_keys(state_dict, shapes, optional=("lm_head.weight",))

  def get(key):
    x = np.asarray(state_dict[key])
    if x.shape != shapes[key]:
      raise ValueError(f"{key}: expected shape {shapes[key]} from the config, got {x.shape}")
    return x.astype(dtype)

  embedding = get("model.embed_tokens.weight")
  params = {"embedding": embedding, "final_norm": {"scale": get("model.norm.weight")}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  elif "lm_head.weight" in state_dict:
    if not np.array_equal(np.asarray(state_dict["lm_head.weight"]).astype(dtype), embedding):
      raise ValueError("tie_embeddings=True but lm_head.weight differs from "
                       "model.embed_tokens.weight")
  decoder = {}
  for suffix, (path, transpose) in _LAYER_KEYS.items():
    per_layer = [get(f"model.layers.{i}.{suffix}") for i in range(cfg.n_layers)]
    per_layer = [x.T if transpose else x for x in per_layer]
    if scan_layers:
      _set(decoder, ("layers", *path), np.stack(per_layer))
    else:
      for i, x in enumerate(per_layer):
        _set(decoder, (f"layers_{i}", *path), x)
  params["decoder"] = decoder
  return params


def params_from_hf_model(model, cfg: ModelConfig | None = None,
                         scan_layers: bool | None = None, dtype=np.float32) -> dict:
  """Params from a torch ``LlamaForCausalLM`` (any torch dtype); ``cfg``
  defaults to ``config_from_hf(model.config)``."""
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = {k: v.detach().to(device="cpu", dtype=torch.float32).numpy()
                for k, v in model.state_dict().items()}
  cfg = config_from_hf(model.config) if cfg is None else cfg
  return params_from_hf_state_dict(state_dict, cfg, scan_layers, dtype)


def _safetensors_files(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  else:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  if not names:
    raise FileNotFoundError(f"no *.safetensors files in {directory}")
  return [os.path.join(directory, n) for n in names]


def load_hf_checkpoint(path_or_dir: str, dtype=np.float32, scan_layers: bool | None = None,
                       **overrides) -> tuple[ModelConfig, dict]:
  """(cfg, params) from an HF checkpoint directory (``config.json`` plus one
  ``*.safetensors`` file or a sharded index) or from one safetensors file
  whose directory holds ``config.json``."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path_or_dir = os.fspath(path_or_dir)
  if os.path.isdir(path_or_dir):
    directory, files = path_or_dir, _safetensors_files(path_or_dir)
  else:
    directory, files = os.path.dirname(path_or_dir), [path_or_dir]
  with open(os.path.join(directory, "config.json")) as f:
    cfg = config_from_hf(json.load(f), **overrides)
  state_dict = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      state_dict.update({k: f.get_tensor(k) for k in f.keys()})
  return cfg, params_from_hf_state_dict(state_dict, cfg, scan_layers, dtype)


def params_to_hf_state_dict(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The HF Llama state dict (numpy, params' dtype) of qtrain params, boxed or
  plain, with or without the ``{'params': ...}`` wrapper, scanned or not. For
  tied embeddings ``lm_head.weight`` is the embedding, as in torch's
  ``state_dict()``.

  An OSP model (``cfg.norm="ssnorm"``, ``embproj``, ``ffn_hadamard``) is
  first merged into the plain Llama computing the same function
  (``qtrain.convert.osp.merge_osp``); with EmbProj and tied embeddings that
  Llama is untied (``merge_osp(params, cfg)[1]`` is its config: write its HF
  config with ``tie_word_embeddings=False``).

  A model with online rotations (``cfg.rotation``: R3 on Q/K, R4 on the
  down_proj input) has them removed first (``qtrain.convert.rotate.drop_online``:
  R3 cancels in Q K^T, R4 folds back into down_proj); fused R1/R2 are plain
  weights and export as they are.
  """
  params = unwrap(params)
  if cfg.rotation.r3 != "none" or cfg.rotation.r4 != "none":
    params, cfg = drop_online(params, cfg)
  if not is_plain(cfg):
    params, cfg = merge_osp(params, cfg)
  to_np = np.asarray
  out = {"model.embed_tokens.weight": to_np(params["embedding"]),
         "model.norm.weight": to_np(params["final_norm"]["scale"])}
  out["lm_head.weight"] = (out["model.embed_tokens.weight"] if cfg.tie_embeddings
                           else np.ascontiguousarray(to_np(params["lm_head"]["kernel"]).T))
  decoder = params["decoder"]
  for suffix, (path, transpose) in _LAYER_KEYS.items():
    for i in range(cfg.n_layers):
      node = decoder["layers"] if "layers" in decoder else decoder[f"layers_{i}"]
      for name in path:
        node = node[name]
      x = to_np(node[i] if "layers" in decoder else node)
      out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(x.T if transpose else x)
  return out
