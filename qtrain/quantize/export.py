"""The quantized-weights format: in memory, on disk, and back to float params.

A PTQ method returns ``{path: QuantizedWeight}``: per quantized matmul the
integer codes and scales of ``qtrain.quant`` (``QTensor``: codes in the
kernel's layout ``[in, out]`` or ``[L, in, out]``; int8 for symmetric int
grids, int4 values included; uint8 with an integer zero point for asymmetric
ones; float8 for fp8) and, for AWQ, the per-input-channel scale ``s`` that was
multiplied into the weight before quantization: the kernel is
W^ = dequantize(q) = Q(diag(s) W) and the matmul's input must be x / s, which
``awq_fold`` folds into the preceding RMSNorm (q/k/v, gate/up, lm_head) or
applies as an explicit per-channel 1/s (``InputScale``; o_proj, down_proj).

On disk, ``<out>/`` holds
  ptq.json    recipe, method, source run and step, the model config, and per
              quantized matmul its param path, spec, layout and dtypes;
  weights/    one orbax checkpoint of {"quantized": codes, scales (+ zero
              points, AWQ scales) nested by param path, "float": every other
              param (embeddings, norms with AWQ's 1/s folded in, unquantized
              matmuls)}.
``load_quantized(out)`` reads both and returns float params (dequantized
kernels in their original dtype) that the unquantized model's param tree
accepts; it is bit-identical to ``dequantized_params`` on the in-memory
weights. ``ptq_providers(out, provider)`` puts the explicit AWQ input scales
(ptq.json ``"awq": "explicit"``) in front of the evaluation's quant provider;
without AWQ, or with every s folded, the params alone are the PTQ model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qtrain.quant import QTensor, dequantize
from qtrain.quantize import awq_fold
from qtrain.layers.param_tree import copy_tree as _copy, get as _get, put as _set
from qtrain.layers.param_tree import without as _without

# 2: AWQ kernels are Q(diag(s) W), the input's 1/s folded or explicit (1 held
# Q(diag(s) W) / s, which fed the activation quantizer an unscaled x).
FORMAT_VERSION = 2
META_NAME = "ptq.json"
WEIGHTS_DIR = "weights"


class QuantizedWeight(NamedTuple):
  """W^ = dequantize(qt); AWQ: qt = Q(diag(s) W) with s = awq_scale ([in, 1] or
  [L, in, 1]), and the matmul's input is to be divided by s (see awq_fold)."""
  qt: QTensor
  awq_scale: jax.Array | None = None


def dequantize_weight(w: QuantizedWeight, dtype) -> jax.Array:
  return dequantize(w.qt, dtype)


def dequantized_params(params, qweights: dict, sites) -> dict:
  """``params`` with each site's kernel replaced by its dequantized weight and
  the AWQ scales of folded groups divided out of their norms."""
  out = awq_fold.fold_into_norms(params, awq_fold.folded_norms(qweights, sites))
  for s in sites:
    _set(out, s.param, dequantize_weight(qweights[s.path], _get(params, s.param).dtype))
  return out


def _spec_dict(spec) -> dict:
  d = dataclasses.asdict(spec)
  d["mse_grid"] = list(d["mse_grid"])
  return d


def _weight_arrays(w: QuantizedWeight) -> dict:
  d = {"q": w.qt.q, "scale": w.qt.scale}
  if w.qt.zero_point is not None:
    d["zero_point"] = w.qt.zero_point
  if w.awq_scale is not None:
    d["awq_scale"] = w.awq_scale
  return d


def save_quantized(out: str, params, qweights: dict, sites, meta: dict) -> str:
  """Writes ``out/ptq.json`` and ``out/weights``; returns ``out``.

  ``meta``: recipe, method, source, ... (JSON-serialisable), stored as is.
  """
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  quantized: dict = {}
  entries = {}
  explicit = awq_fold.explicit_scales(qweights, sites)
  params = awq_fold.fold_into_norms(params, awq_fold.folded_norms(qweights, sites))
  for s in sites:
    w = qweights[s.path]
    _set(quantized, s.param, _weight_arrays(w))
    entries[s.path] = {"param": list(s.param), "layered": s.layered,
                       "spec": _spec_dict(s.spec), "shape": list(w.qt.q.shape),
                       "code_dtype": str(w.qt.q.dtype),
                       "dtype": str(_get(params, s.param).dtype),
                       "awq": (False if w.awq_scale is None else
                               "explicit" if s.path in explicit else "folded")}
  tree = {"quantized": quantized, "float": _without(params, [s.param for s in sites])}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out, WEIGHTS_DIR), tree, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  doc = {"format": FORMAT_VERSION, **meta, "weights": entries}
  if jax.process_index() == 0:
    with open(os.path.join(out, META_NAME), "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=2)
  return out


def read_meta(out: str) -> dict:
  with open(os.path.join(out, META_NAME), encoding="utf-8") as f:
    doc = json.load(f)
  if doc.get("format") != FORMAT_VERSION:
    raise ValueError(f"{out}/{META_NAME}: format {doc.get('format')!r}, this reader "
                     f"knows {FORMAT_VERSION}")
  return doc


def load_export(out: str) -> tuple[dict, dict[str, QuantizedWeight], Any]:
  """(ptq.json, {path: QuantizedWeight}, float params) as saved under ``out``."""
  doc = read_meta(out)
  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.restore(os.path.join(os.path.abspath(out), WEIGHTS_DIR))
  ckptr.close()
  qweights = {}
  for path, e in doc["weights"].items():
    d = _get(tree["quantized"], e["param"])
    if str(d["q"].dtype) != e["code_dtype"]:
      raise ValueError(f"{out}: {path} codes are {d['q'].dtype}, ptq.json says "
                       f"{e['code_dtype']}")
    qt = QTensor(jnp.asarray(d["q"]), jnp.asarray(d["scale"]),
                 None if "zero_point" not in d else jnp.asarray(d["zero_point"]))
    awq = None if "awq_scale" not in d else jnp.asarray(d["awq_scale"])
    qweights[path] = QuantizedWeight(qt, awq)
  return doc, qweights, tree.get("float", {})


def load_quantized(out: str) -> dict:
  """Float params with every quantized kernel dequantized, read from disk."""
  doc, qweights, params = load_export(out)
  params = _copy(params)
  for path, e in doc["weights"].items():
    _set(params, e["param"], dequantize_weight(qweights[path], np.dtype(e["dtype"])))
  return params


def ptq_providers(out: str, provider):
  """``provider`` (the evaluation's activation/KV quantizer), preceded by the
  explicit AWQ input scales of the export at ``out`` when it has any."""
  doc = read_meta(out)
  if not any(e.get("awq") == "explicit" for e in doc["weights"].values()):
    return provider
  _, qweights, _ = load_export(out)
  inv = {path: 1.0 / np.asarray(qweights[path].awq_scale, np.float32)[..., 0]
         for path, e in doc["weights"].items() if e.get("awq") == "explicit"}
  return (awq_fold.InputScale(inv),) + (() if provider is None else (provider,))
