"""A PTQ export (``python -m qtrain.quantize``'s ``--out``) as a Hugging Face
directory that ``transformers.AutoModelForCausalLM`` loads with no package
beyond transformers and torch.

Two weight forms (``weights``):

  int    transformers' own packed-integer checkpoint, ``quantization_config``
         ``{"quant_method": "gemma"}`` (transformers/integrations/gemma_quant.py,
         transformers 5: no extra dependency, runs on CPU). Each quantized
         Linear becomes a ``QuantizedLinear`` holding the integer codes
         ``[out, in]`` (4-bit: two a byte as unsigned nibbles c + 8, the
         even input index in the low nibble; 2-bit: four a byte, c + 2; 8-bit:
         int8 as is) and one float32 ``weight_scale`` per output channel, and
         computes ``x @ (codes * weight_scale)^T`` at every forward: in
         float32 the very grid values ``qtrain.quant.dequantize`` gives
         qtrain's PTQ model (in bf16 it rounds the scale to bf16 first, so a
         weight may sit one bf16 ulp from qtrain's bf16(code * scale)). Despite its name the quantizer replaces the ``nn.Linear``s of
         any architecture (Llama and Qwen2 included). It holds symmetric
         int grids with one scale per output channel (or per tensor,
         repeated): 2-bit codes four a byte, 3- and 4-bit two, 5..8-bit one.
  float  the dequantized kernels (codes times scales) in the params' dtype (or
         ``dtype``) as a plain Llama / Qwen2 checkpoint, for everything the
         int form cannot hold: group scales, asymmetric grids, fp8, AWQ's
         explicit 1/s (multiplied into the kernel's input rows: the function
         of qtrain's ``InputScale`` up to float rounding), a down_proj behind
         an online R4 and OSP models (folded into the weights by
         ``plain_params``, which moves those kernels off the grid but keeps
         the function; R3 cancels in Q K^T and moves no weight).
  auto   int for every quantized weight that fits it, float for the others
         (their Linears stay plain ``nn.Linear``s of the same checkpoint);
         all float for an OSP model.

Activation and KV quantizers (w4a4, w8a8, kv4 recipes) have no built-in
counterpart: transformers' packed-int form has one static per-tensor
activation scale, qtrain's activation quantizers are dynamic per token. No HF
checkpoint computes such a PTQ model, so its export is refused, unless
``weights_only``: then its quantized weights are exported with activations
and KV in float, a weight-only model whose logits differ from qtrain's PTQ
model by the activation quantizers' error (not a round trip).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from qtrain.convert.hf import (_LAYER_KEYS, cast_state, config_to_hf, hf_model_type,
                               params_to_hf_state_dict, plain_params, save_hf_checkpoint,
                               write_hf_dir)
from qtrain.convert.osp import is_plain

INT_METHOD = "gemma"  # transformers' QuantizationMethod of its packed-integer Linears.
_STORAGE_BITS = (2, 4, 8)  # The code widths its QuantizedLinear stores.
_MODULE_OF = {path[:-1]: suffix[:-len(".weight")] for suffix, (path, _) in _LAYER_KEYS.items()
              if path[-1] == "kernel"}  # ("attn", "q_proj") -> "self_attn.q_proj"


def find_export(path: str) -> str:
  """The PTQ export at ``path``: the directory itself when it holds
  ``ptq.json``, else the run's one ``ptq_*`` export."""
  from qtrain.quantize.export import META_NAME  # pylint: disable=g-import-not-at-top
  if os.path.isfile(os.path.join(path, META_NAME)):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--ptq={path} does not exist")
  found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", META_NAME)))
  if len(found) != 1:
    raise ValueError(f"--ptq={path}: no {META_NAME} there and "
                     + (f"{len(found)} PTQ exports under it ({', '.join(found)}): name one"
                        if found else "no PTQ export under it: run python -m qtrain.quantize "
                        f"--workdir={path} first"))
  return found[0]


def activation_quantizers(doc: dict) -> list[str]:
  """The recipe's rules that quantize activations or KV (``name: act|kv``)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from qtrain.quant.config import named_rules  # pylint: disable=g-import-not-at-top
  # As qtrain.quantize.evaluate.eval_provider builds the PTQ model: every
  # rule's act and kv, whatever the recipe's mode.
  quant = ml_collections.ConfigDict(doc["recipe_quant"])
  return [f"{name}: {what}" for name, rule in named_rules(quant)
          for what in ("act", "kv") if rule.get(what) is not None]


def int_reason(path: str, entry: dict, cfg) -> str | None:
  """Why a quantized weight (a ptq.json ``weights`` entry) cannot be stored in
  the int form, or None when it can."""
  spec = entry["spec"]
  if cfg.rotation.r4 != "none" and path.endswith("mlp/down_proj"):
    # drop_online folds R4 back (W' = R4 W^): off the grid. R3 cancels in Q K^T
    # and moves no weight, fused R1/R2 are the quantized weights themselves.
    return "online R4 on its input, folded into it for transformers"
  if spec["format"] != "int" or not spec["symmetric"]:
    return f"{spec['format']} {'symmetric' if spec['symmetric'] else 'asymmetric'} codes"
  if spec["granularity"] not in ("channel", "tensor"):  # One scale repeats per channel.
    return f"scales per {spec['granularity']} (the int form has one per output channel or tensor)"
  if entry.get("awq") == "explicit":
    return "AWQ's explicit input scale 1/s"
  if spec["bits"] > 8:
    return f"{spec['bits']}-bit codes"
  return None


def _model_reason(cfg) -> str | None:
  if not is_plain(cfg):
    return "OSP pieces (ssnorm, embproj, ffn_hadamard), merged into the weights"
  return None


def _hf_modules(param: tuple[str, ...], n_layers: int) -> list[str]:
  """HF module names, one per layer, of a kernel at ``param``."""
  if param == ("lm_head", "kernel"):
    return ["lm_head"]
  block, *rest = param[1:]
  suffix = _MODULE_OF[tuple(rest[:-1])]
  if block == "layers":
    return [f"model.layers.{i}.{suffix}" for i in range(n_layers)]
  return [f"model.layers.{block[len('layers_'):]}.{suffix}"]


def pack_codes(codes_OI: np.ndarray, bits: int) -> np.ndarray:
  """transformers' storage of signed codes [out, in] (gemma_quant._unpack_int*):
  8 bits as int8; 4 and 2 bits as uint8, code + 2^(bits-1), 8/bits codes a
  byte along ``in`` (the first in the lowest bits), ``in`` padded with zero
  codes to a whole byte."""
  lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  if codes_OI.min() < lo or codes_OI.max() > hi:
    raise ValueError(f"codes outside [{lo}, {hi}] cannot be stored in {bits} bits")
  if bits == 8:
    return codes_OI.astype(np.int8)
  per_byte = 8 // bits
  u = codes_OI.astype(np.int16) - lo
  u = np.pad(u, ((0, 0), (0, -u.shape[1] % per_byte)), constant_values=-lo)
  byte = sum(u[:, j::per_byte] << (bits * j) for j in range(per_byte))
  return byte.astype(np.uint8)


def _int_state(state: dict, doc: dict, qweights: dict, n_layers: int,
               paths) -> tuple[dict, dict]:
  """(state with the kernels of ``paths`` as codes + scales, quantization_config)."""
  bits_of = {}
  for path in paths:
    e = doc["weights"][path]
    bits = min(b for b in _STORAGE_BITS if b >= e["spec"]["bits"])
    q, scale = np.asarray(qweights[path].qt.q), np.asarray(qweights[path].qt.scale, np.float32)
    if not e["layered"]:
      q, scale = q[None], scale[None]
    for i, module in enumerate(_hf_modules(tuple(e["param"]), n_layers)):
      state[f"{module}.weight"] = pack_codes(q[i].T, bits)  # [in, out] -> [out, in].
      n_out = q.shape[-1]  # A per-tensor scale [1, 1] repeats over the output channels.
      state[f"{module}.weight_scale"] = np.ascontiguousarray(
          np.broadcast_to(scale[i], (1, n_out)).reshape(n_out, 1))
      # 0: no static activation rounding (gemma_quant.apply_srq is then the identity).
      state[f"{module}.input_activation_scale"] = np.zeros((), np.float32)
      state[f"{module}.output_activation_scale"] = np.zeros((), np.float32)
      bits_of[module] = bits
  linears = ["lm_head"] + [f"model.layers.{i}.{m}" for i in range(n_layers)
                           for m in _MODULE_OF.values()]  # A tied lm_head is a Linear too.
  default = max(set(bits_of.values()), key=list(bits_of.values()).count)
  config = {"quant_method": INT_METHOD, "num_bits": default, "quantize_embeddings": False,
            "module_quant_configs": {re.escape(m) + "$": {"num_bits": b}
                                     for m, b in bits_of.items() if b != default},
            "modules_to_not_convert": [re.escape(m) for m in linears if m not in bits_of]}
  return state, config


def _float_params(params, doc: dict, qweights: dict):
  """``params`` (``load_quantized``'s) with AWQ's explicit 1/s multiplied into
  the input rows of its kernels: x (1/s) W^ = x (diag(1/s) W^)."""
  from qtrain.layers.param_tree import copy_tree, get, put  # pylint: disable=g-import-not-at-top
  params = copy_tree(params)
  for path, e in doc["weights"].items():
    if e.get("awq") != "explicit":
      continue
    kernel = np.asarray(get(params, e["param"]))
    inv_in1 = 1.0 / np.asarray(qweights[path].awq_scale, np.float32)  # [(L,) in, 1]
    put(params, tuple(e["param"]), (kernel.astype(np.float32) * inv_in1).astype(kernel.dtype))
  return params


def export_ptq_hf(ptq: str, out: str, *, weights: str = "auto", dtype: str | None = None,
                  weights_only: bool = False, max_shard_bytes: int = 5 * 2**30) -> dict:
  """Writes the HF directory of the PTQ export at ``ptq`` (an export or a run
  with one) into ``out``; returns what it wrote: model_type, form (int |
  float), why not int, the export's recipe and method, its directory."""
  from qtrain.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  from qtrain.quantize import export  # pylint: disable=g-import-not-at-top
  if weights not in ("auto", "int", "float"):
    raise ValueError(f"--weights={weights!r}; use auto, int or float")
  ptq = find_export(ptq)
  doc = export.read_meta(ptq)
  acts = activation_quantizers(doc)
  if acts and not weights_only:
    raise ValueError(
        f"--ptq={ptq}: recipe {doc.get('recipe')!r} quantizes activations or KV "
        f"({'; '.join(acts)}), "
        "which transformers cannot do without extra packages, so no HF checkpoint computes this "
        "PTQ model; pass --weights_only to export its weights with float activations (a "
        "weight-only model: its logits differ from qtrain's PTQ model), or run it in qtrain: "
        f"python -m qtrain.generate --ptq={ptq}")
  cfg = ModelConfig.from_dict(doc["model"])
  reasons = {p: r for p, e in doc["weights"].items() if (r := int_reason(p, e, cfg))}
  if _model_reason(cfg):
    reasons = {"model": _model_reason(cfg)}
  if weights == "int" and reasons:
    raise ValueError(f"--weights=int: transformers' packed-int form cannot hold "
                     f"{'; '.join(f'{p}: {r}' for p, r in reasons.items())}; use --weights=auto "
                     "(those weights dequantized) or float (all dequantized)")
  as_int = [] if weights == "float" or "model" in reasons else [
      p for p in doc["weights"] if p not in reasons]
  _, qweights, _ = export.load_export(ptq)
  params = _float_params(export.load_quantized(ptq), doc, qweights)
  if not as_int:
    plain_cfg = save_hf_checkpoint(out, params, cfg, dtype=dtype, max_shard_bytes=max_shard_bytes)
  else:  # Plain already (no OSP); drop_online's R4 moves only down_proj, float here.
    plain, plain_cfg = plain_params(params, cfg)
    state = params_to_hf_state_dict(plain, plain_cfg)
    if plain_cfg.tie_embeddings:
      del state["lm_head.weight"]
    state, dtype = cast_state(state, dtype)
    state, quant_config = _int_state(state, doc, qweights, plain_cfg.n_layers, as_int)
    write_hf_dir(out, state, dict(config_to_hf(plain_cfg, dtype),
                                  quantization_config=quant_config), max_shard_bytes)
  form = "float" if not as_int else "int" if len(as_int) == len(doc["weights"]) else "int+float"
  return {"model_type": hf_model_type(plain_cfg), "form": form, "ptq": ptq,
          "not_int": {} if weights == "float" else reasons, "recipe": doc.get("recipe"),
          "method": doc.get("method"), "weights_only": bool(acts),
          "source": doc.get("source", {}).get("workdir")}
