"""Which weights a recipe quantizes, and round-to-nearest (RTN) PTQ of them.

A *site* is one weight matmul of the Transformer that a recipe's rules give a
weight quantizer: its module path (``decoder/layers/mlp/down_proj``; one per
block, ``decoder/layers_3/...``, when unscanned), where its weight sits in the
params, the ``QuantSpec`` and whether the weight carries a leading layer axis
(scanned layers: ``[L, in, out]``, else ``[in, out]``). The matmuls come from
tracing the model (``qtrain.layers.trace_sites``: every matmul the model
issues, whatever its weight form, e.g. both factors of a low-rank layer) and
rules match them exactly as in QAT (first match, canonical path, block index).

RTN is ``qtrain.quant.quantize`` on each layer's ``[in, out]`` kernel with the
contraction axis 0, so PTQ and QAT share one set of numerics: a per-channel
scale is one scale per output column.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qtrain.layers import config_sites
from qtrain.layers.param_tree import get as get_param
from qtrain.quant import QTensor, QuantSpec, quantize
from qtrain.quant.provider import choice_per_layer
from qtrain.quantize.export import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class WeightSite:
  path: str  # Module path of the matmul, as the quant rules see it.
  param: tuple[str, ...]  # Key path of its kernel in the params tree.
  spec: QuantSpec  # The recipe's weight quantizer for this matmul.
  layered: bool  # Kernel is [L, in, out] (scanned layers) rather than [in, out].


def weight_sites(model_cfg, rules) -> tuple[list[WeightSite], list[str]]:
  """(sites the rules quantize, notes on matmuls left in high precision).

  A tied LM head multiplies by the embedding table, which the lookup also
  reads: quantizing it would quantize the embeddings, so it is left out with a
  note.
  """
  for i, rule in enumerate(model_cfg.weight_forms):
    if rule.form == "sparse_low_rank" and dict(rule.options).get("merged"):
      raise ValueError(f"config.model.weight_forms[{i}]: PTQ of sparse_low_rank with merged=True "
                       "is not supported (its kernel is built from A, B and the sparse values "
                       "each step, so there is no [in, out] kernel to quantize); merge the "
                       "weights into a dense run first or quantize during training (QAT)")
  sites, notes = [], []
  for m in config_sites(model_cfg).matmuls:
    choice = choice_per_layer(rules, m.path, m.layered, m.layer, model_cfg.n_layers)
    specs = {None if i is None else rules[i].weight
             for i in (choice if isinstance(choice, tuple) else (choice,))}
    if len(specs) > 1:
      raise ValueError(f"{m.path}: the recipe quantizes the blocks of this scanned stack "
                       "differently; PTQ of per-block recipes needs config.model.scan_layers="
                       "False")
    spec = specs.pop()
    if spec is None:
      continue
    if m.weight_axis != 0:
      notes.append(f"{m.path}: tied to the embedding table; left in high precision")
      continue
    sites.append(WeightSite(m.module_path, m.param, spec, m.stacked))
  return sites, notes


def per_layer(fn, kernel, layered: bool) -> QTensor:
  """Applies ``fn([in, out]) -> QTensor`` to each layer and stacks the results."""
  if not layered:
    return fn(kernel)
  parts = [fn(kernel[l]) for l in range(kernel.shape[0])]
  zero = None if parts[0].zero_point is None else jnp.stack([p.zero_point for p in parts])
  return QTensor(jnp.stack([p.q for p in parts]), jnp.stack([p.scale for p in parts]), zero)


# One compiled quantizer per (shape, spec), as QAT runs it inside its jitted step.
_quantize = jax.jit(quantize, static_argnames=("spec", "contract_axis"))


def quantize_rtn(kernel, spec: QuantSpec, layered: bool) -> QTensor:
  """Round-to-nearest codes of a kernel, per layer, contraction axis 0."""
  return per_layer(lambda k: _quantize(k, spec, contract_axis=0), kernel, layered)


def quantize_params_rtn(params, sites) -> dict:
  """{path: QuantizedWeight} for every site, by RTN."""
  return {s.path: QuantizedWeight(quantize_rtn(get_param(params, s.param), s.spec, s.layered))
          for s in weight_sites_checked(params, sites)}


def weight_sites_checked(params, sites):
  """The sites, each checked to exist in ``params`` with a 2-D/3-D kernel."""
  for s in sites:
    try:
      k = get_param(params, s.param)
    except (KeyError, TypeError):
      raise ValueError(f"{s.path}: no kernel at params/{'/'.join(s.param)}; was the "
                       "checkpoint made with this config.json?") from None
    if k.ndim != (3 if s.layered else 2):
      raise ValueError(f"{s.path}: kernel of shape {k.shape}, expected "
                       f"{'[L, in, out]' if s.layered else '[in, out]'}")
  return sites
