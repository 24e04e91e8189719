"""Hugging Face Llama and Qwen2 <-> qtrain ``Transformer`` params.

What maps to what (HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` state dict
on the left; HF Linear weights are [out, in], qtrain kernels are [in, out],
hence the transposes):

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

Qwen2 (``model_type="qwen2"``) is this Llama plus biases on q/k/v (o_proj
and the MLP have none), i.e. ``ModelConfig.qkv_bias``:

  model.layers.{i}.self_attn.{q,k,v}_proj.bias [N*H | K*H] -> decoder/layers/attn/{q,k,v}_proj/bias

Its other differences are settings the config carries (RoPE theta 1e6, norm
eps 1e-6, tied embeddings in the small ones). A qtrain model exports as Qwen2
when it has ``qkv_bias``, else as Llama.

With ``scan_layers`` the per-layer arrays are stacked on a leading L axis under
``decoder/layers``; without it they live under ``decoder/layers_{i}``. With tied
embeddings there is no ``lm_head`` param; HF's ``lm_head.weight`` (present in a
torch state dict, absent from saved safetensors) must then equal the embedding.

Export of an outlier-safe (OSP) model merges Single-Scale RMSNorm, EmbProj
and the FFN Hadamard into plain Llama weights first (``qtrain.convert.osp``).

RoPE needs no q/k permutation: both sides use the half-split (rotate_half)
layout. Checkpoints are read and written with the safetensors numpy API
(``ml_dtypes`` makes bfloat16 readable) and HF configs as plain JSON:
nothing here imports transformers or torch (neither is a runtime dependency).
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
_BIAS_KEYS = {  # Qwen2 (cfg.qkv_bias): the q/k/v projections' biases.
    f"self_attn.{n}_proj.bias": (("attn", f"{n}_proj", "bias"), False) for n in "qkv"}
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # model_type -> class.
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
  """A ``ModelConfig`` from an HF ``LlamaConfig`` / ``Qwen2Config`` or its
  ``config.json`` dict (no ``model_type``: Llama); ``overrides`` replace any
  resulting field (e.g. ``dtype="bfloat16"``)."""
  model_type = _get(hf_config, "model_type") or "llama"
  if model_type not in FAMILIES:
    raise ValueError(f"HF config has model_type={model_type!r}; qtrain converts "
                     f"{' and '.join(repr(t) for t in FAMILIES)} only")
  if model_type == "llama":
    for flag in ("attention_bias", "mlp_bias"):
      if _get(hf_config, flag, False):
        raise ValueError(f"HF config has {flag}=True; qtrain's Llama layers have no biases "
                         "(only Qwen2's q/k/v biases)")
  else:  # Qwen2: sliding-window layers attend to a band qtrain's attention does not mask.
    layer_types = _get(hf_config, "layer_types") or ()
    if "sliding_attention" in layer_types or (_get(hf_config, "use_sliding_window", False)
                                              and not layer_types):
      raise ValueError("HF config has use_sliding_window=True; qtrain's attention is full "
                       "causal only (set use_sliding_window=false if the window exceeds "
                       "every length you use)")
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
      qkv_bias=model_type == "qwen2",
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def hf_model_type(cfg: ModelConfig) -> str:
  """The HF family a plain qtrain model exports as: Qwen2 iff q/k/v biases."""
  return "qwen2" if cfg.qkv_bias else "llama"


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict:
  """The HF ``config.json`` dict of a plain model (``LlamaConfig`` /
  ``Qwen2Config`` fields; ``transformers.AutoConfig`` reads it). RoPE goes
  in transformers-5 ``rope_parameters`` and, for older readers, the
  ``rope_theta`` / ``rope_scaling`` they used."""
  if not is_plain(cfg) or cfg.rotation.r3 != "none" or cfg.rotation.r4 != "none":
    raise ValueError("config_to_hf takes a plain model: pass the config that "
                     "plain_params returns")
  model_type = hf_model_type(cfg)
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  s = cfg.rope_scaling
  if s.factor != 1.0:
    rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position)
  out = {
      "architectures": [FAMILIES[model_type]], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}
                      if s.factor != 1.0 else None,
      "dtype": dtype or cfg.param_dtype, "use_cache": True,
  }
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False, max_window_layers=cfg.n_layers,
               layer_types=["full_attention"] * cfg.n_layers)
  return out


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
  if cfg.qkv_bias:
    per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,)})
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for i in range(cfg.n_layers):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
  return shapes


def _layer_keys(cfg: ModelConfig) -> dict:
  return {**_LAYER_KEYS, **(_BIAS_KEYS if cfg.qkv_bias else {})}


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
  or Qwen2 state dict; ``scan_layers`` defaults to ``cfg.scan_layers``."""
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
  for suffix, (path, transpose) in _layer_keys(cfg).items():
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
  """Params from a torch ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (any
  torch dtype); ``cfg``
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


def plain_params(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, cfg) of the plain Llama / Qwen2 computing the same function:
  online rotations removed, OSP merged (see ``params_to_hf_state_dict``);
  plain, unwrapped params."""
  params = unwrap(params)
  factored = [r.pattern for r in cfg.weight_forms if r.form != "dense"]
  if factored:
    raise ValueError(f"config.model.weight_forms puts {factored} in factored forms; HF export "
                     "takes dense kernels: multiply the factors out into a dense model first")
  if cfg.rotation.r3 != "none" or cfg.rotation.r4 != "none":
    params, cfg = drop_online(params, cfg)
  if not is_plain(cfg):
    params, cfg = merge_osp(params, cfg)
  return params, cfg


def params_to_hf_state_dict(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The HF Llama (Qwen2 with ``cfg.qkv_bias``) state dict (numpy, params'
  dtype) of qtrain params, boxed or plain, with or without the ``{'params':
  ...}`` wrapper, scanned or not. For tied embeddings ``lm_head.weight`` is
  the embedding, as in torch's ``state_dict()``.

  An OSP model (``cfg.norm="ssnorm"``, ``embproj``, ``ffn_hadamard``) is
  first merged into the plain Llama computing the same function
  (``qtrain.convert.osp.merge_osp``); with EmbProj and tied embeddings that
  Llama is untied (``plain_params(params, cfg)[1]`` is its config, which
  ``config_to_hf`` writes).

  A model with online rotations (``cfg.rotation``: R3 on Q/K, R4 on the
  down_proj input) has them removed first (``qtrain.convert.rotate.drop_online``:
  R3 cancels in Q K^T, R4 folds back into down_proj); fused R1/R2 are plain
  weights and export as they are.
  """
  params, cfg = plain_params(params, cfg)
  to_np = np.asarray
  out = {"model.embed_tokens.weight": to_np(params["embedding"]),
         "model.norm.weight": to_np(params["final_norm"]["scale"])}
  out["lm_head.weight"] = (out["model.embed_tokens.weight"] if cfg.tie_embeddings
                           else np.ascontiguousarray(to_np(params["lm_head"]["kernel"]).T))
  decoder = params["decoder"]
  for suffix, (path, transpose) in _layer_keys(cfg).items():
    for i in range(cfg.n_layers):
      node = decoder["layers"] if "layers" in decoder else decoder[f"layers_{i}"]
      for name in path:
        node = node[name]
      x = to_np(node[i] if "layers" in decoder else node)
      out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(x.T if transpose else x)
  return out


def save_hf_checkpoint(directory: str, params, cfg: ModelConfig, *, dtype: str | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> ModelConfig:
  """Writes ``config.json`` and ``model.safetensors`` (or shards of at most
  ``max_shard_bytes`` plus ``model.safetensors.index.json``, as
  ``save_pretrained`` names them) of the plain model computing what
  ``params`` do; returns that model's config. ``dtype`` (float32 | bfloat16)
  casts the arrays; default the params'. Tied embeddings store no
  ``lm_head.weight`` (transformers ties it on load)."""
  plain, plain_cfg = plain_params(params, cfg)
  state = params_to_hf_state_dict(plain, plain_cfg)
  if plain_cfg.tie_embeddings:
    del state["lm_head.weight"]
  state, dtype = cast_state(state, dtype)
  write_hf_dir(directory, state, config_to_hf(plain_cfg, dtype), max_shard_bytes)
  return plain_cfg


def cast_state(state: dict, dtype: str | None, keep=()) -> tuple[dict, str]:
  """(state with its floating arrays cast to ``dtype``, the dtype's name);
  ``dtype`` None keeps them (the name is then the first array's dtype).
  Integer arrays and the keys in ``keep`` stay as they are."""
  if dtype is None:
    return state, str(next(iter(state.values())).dtype)
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
  if np_dtype is None:
    raise ValueError(f"dtype={dtype!r}; export float32 or bfloat16")
  floating = lambda a: np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16
  return {k: v.astype(np_dtype) if floating(v) and k not in keep else v
          for k, v in state.items()}, dtype


def write_hf_dir(directory: str, state: dict, hf_config: dict,
                 max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes ``state`` as safetensors (shards of at most ``max_shard_bytes``,
  named and indexed as ``save_pretrained`` does) and ``hf_config`` as
  ``config.json`` into ``directory``."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  shards, size = [[]], 0
  for key in state:  # Greedy in key order: layers stay together, as HF's do.
    if shards[-1] and size + state[key].nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += state[key].nbytes
  os.makedirs(directory, exist_ok=True)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, keys in zip(names, shards):  # "pt": transformers reads torch-format files.
    # np.require, not ascontiguousarray: that makes 0-d arrays (scalars) 1-d.
    save_file({k: np.require(state[k], requirements="C") for k in keys},
              os.path.join(directory, name), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
             "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
