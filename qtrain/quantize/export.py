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
              quantized matmul its param path, spec, layout and dtypes, and
              ``"packing": "int4_halves"`` where the codes are packed;
  weights/    one orbax checkpoint of {"quantized": codes, scales (+ zero
              points, AWQ scales) nested by param path, "float": every other
              param (embeddings, norms with AWQ's 1/s folded in, unquantized
              matmuls)}.
Symmetric 4-bit int codes per channel or group (the w4a16 / w4a4 recipes'
weights) are stored packed, two per byte (``qtrain.kernels.packed``: int8
[in/2, out] or [L, in/2, out] in the W4A16 kernel's "halves" layout): half
the bytes of the int8 storage. Such an export is format 3; an export with no
packed weight is still written, and read, as format 2 (codes one per byte).

``load_quantized(out)`` reads both and returns float params (dequantized
kernels in their original dtype) that the unquantized model's param tree
accepts; it is bit-identical to ``dequantized_params`` on the in-memory
weights. ``ptq_providers(out, provider)`` puts the explicit AWQ input scales
(ptq.json ``"awq": "explicit"``) in front of the evaluation's quant provider;
without AWQ, or with every s folded, the params alone are the PTQ model.

``load_packed(out)`` keeps the 4-bit weights packed instead: params with
``codes`` / ``scales`` in place of each such kernel (packing int8-stored
4-bit codes of a format-2 export on load) and the ``int4_packed`` weight-form
rules that make the model read them (``qtrain.layers.weights.Int4Packed``):
the same function as ``load_quantized``'s params, a quarter of the float32
kernel bytes resident.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qtrain.kernels import packed as int4_packed
from qtrain.layers.weights import form_rules
from qtrain.quant import QTensor, QuantSpec, dequantize
from qtrain.quantize import awq_fold
from qtrain.layers.param_tree import copy_tree as _copy, get as _get, put as _set
from qtrain.layers.param_tree import without as _without

# 2: AWQ kernels are Q(diag(s) W), the input's 1/s folded or explicit (1 held
# Q(diag(s) W) / s, which fed the activation quantizer an unscaled x).
# 3: as 2, with symmetric 4-bit codes packed two per byte ("packing").
FORMAT_VERSION = 3
READS = (2, 3)
PACKING = "int4_halves"
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


def packable(spec, shape) -> bool:
  """Symmetric 4-bit int codes per channel or group, an even input dim: the
  layouts ``PackedInt4`` holds (a tensor-wide scale, asymmetric grids and
  other widths keep one code a byte)."""
  return (spec.format == "int" and spec.symmetric and spec.bits == 4
          and spec.granularity in ("channel", "group") and shape[-2] % 2 == 0)


def _weight_arrays(w: QuantizedWeight, pack: bool) -> dict:
  q = int4_packed.pack_host(w.qt.q) if pack else w.qt.q
  d = {"q": q, "scale": w.qt.scale}
  if w.qt.zero_point is not None:
    d["zero_point"] = w.qt.zero_point
  if w.awq_scale is not None:
    d["awq_scale"] = w.awq_scale
  return d


def save_quantized(out: str, params, qweights: dict, sites, meta: dict,
                   pack_int4: bool = True) -> str:
  """Writes ``out/ptq.json`` and ``out/weights``; returns ``out``.

  ``meta``: recipe, method, source, ... (JSON-serialisable), stored as is.
  ``pack_int4=False`` keeps 4-bit codes one a byte (format 2, as before 3).
  """
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  quantized: dict = {}
  entries = {}
  explicit = awq_fold.explicit_scales(qweights, sites)
  params = awq_fold.fold_into_norms(params, awq_fold.folded_norms(qweights, sites))
  for s in sites:
    w = qweights[s.path]
    pack = pack_int4 and packable(s.spec, w.qt.q.shape)
    arrays = _weight_arrays(w, pack)
    _set(quantized, s.param, arrays)
    entries[s.path] = {"param": list(s.param), "layered": s.layered,
                       "spec": _spec_dict(s.spec), "shape": list(w.qt.q.shape),
                       **({"packing": PACKING} if pack else {}),
                       "code_dtype": str(arrays["q"].dtype),
                       "dtype": str(_get(params, s.param).dtype),
                       "awq": (False if w.awq_scale is None else
                               "explicit" if s.path in explicit else "folded")}
  tree = {"quantized": quantized, "float": _without(params, [s.param for s in sites])}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out, WEIGHTS_DIR), tree, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  packed_any = any("packing" in e for e in entries.values())
  doc = {"format": FORMAT_VERSION if packed_any else 2, **meta, "weights": entries}
  if jax.process_index() == 0:
    with open(os.path.join(out, META_NAME), "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=2)
  return out


def read_meta(out: str) -> dict:
  with open(os.path.join(out, META_NAME), encoding="utf-8") as f:
    doc = json.load(f)
  if doc.get("format") not in READS:
    raise ValueError(f"{out}/{META_NAME}: format {doc.get('format')!r}, this reader "
                     f"knows {READS}")
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
    q = jnp.asarray(d["q"])
    if e.get("packing") is not None:
      q = _unpacked(out, path, e, q, d["scale"])
    qt = QTensor(q, jnp.asarray(d["scale"]),
                 None if "zero_point" not in d else jnp.asarray(d["zero_point"]))
    awq = None if "awq_scale" not in d else jnp.asarray(d["awq_scale"])
    qweights[path] = QuantizedWeight(qt, awq)
  return doc, qweights, tree.get("float", {})


def _unpacked(out, path, e, codes, scale):
  if e["packing"] != PACKING:
    raise ValueError(f"{out}: {path} has packing {e['packing']!r}; this reader knows {PACKING!r}")
  shape = tuple(e["shape"])
  if codes.shape != (*shape[:-2], shape[-2] // 2, shape[-1]):
    raise ValueError(f"{out}: {path} packed codes are {codes.shape}, ptq.json says the weight "
                     f"is {shape}")
  return jnp.asarray(int4_packed.unpack_host(codes))


def load_quantized(out: str) -> dict:
  """Float params with every quantized kernel dequantized, read from disk."""
  doc, qweights, params = load_export(out)
  params = _copy(params)
  for path, e in doc["weights"].items():
    _set(params, e["param"], dequantize_weight(qweights[path], np.dtype(e["dtype"])))
  return params


def load_packed(out: str) -> tuple[dict, tuple]:
  """(params, weight-form rules): every packable 4-bit kernel as ``codes`` and
  ``scales`` of an ``int4_packed`` form (packed here if the export stored its
  codes one a byte), the other quantized kernels dequantized as in
  ``load_quantized``. Rules go in front of the model config's weight_forms."""
  doc, qweights, params = load_export(out)
  return packed_params(params, qweights, doc["weights"], f"{out}/{META_NAME}")


def packed_params(params, qweights: dict, entries: dict, where: str = "packed_params"):
  """``load_packed``'s result from float params without the quantized kernels,
  {path: QuantizedWeight} and ptq.json's ``weights`` entries (``param``,
  ``spec``, ``dtype``; ``entries(sites, params)`` makes them in memory)."""
  params = _copy(params)
  groups: dict[str, int] = {}
  for path, e in entries.items():
    w, spec = qweights[path], e["spec"]
    if not (packable(_spec(spec), w.qt.q.shape) and w.qt.zero_point is None):
      _set(params, e["param"], dequantize_weight(w, np.dtype(e["dtype"])))
      continue
    _set(params, (*e["param"][:-1], "codes"), jnp.asarray(int4_packed.pack_host(w.qt.q)))
    _set(params, (*e["param"][:-1], "scales"), w.qt.scale)
    canonical = re.sub(r"^decoder/layers_\d+/", "decoder/layers/", path)
    group = spec["group_size"] if spec["granularity"] == "group" else 0
    if groups.setdefault(canonical, group) != group:
      raise ValueError(f"{where}: the blocks of {canonical} have different group sizes; one "
                       "int4_packed rule per path cannot hold them (use load_quantized)")
  rules = form_rules([dict(pattern=re.escape(p), form="int4_packed", group_size=g)
                      for p, g in groups.items()], where=where)
  return params, rules


def entries(sites, params) -> dict:
  """ptq.json's per-weight fields that ``packed_params`` reads, for in-memory sites."""
  return {s.path: {"param": list(s.param), "spec": _spec_dict(s.spec),
                   "dtype": str(_get(params, s.param).dtype)} for s in sites}


def _spec(d: dict) -> QuantSpec:
  return QuantSpec(**dict(d, mse_grid=tuple(d["mse_grid"])))


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
