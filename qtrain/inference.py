"""A trained run or a PTQ export, loaded for inference: params on one device
and the model that runs them (``python -m qtrain.generate``, the convert CLI's
check, tests). A library module: it defines no command-line flags, so any
process may import it beside the CLIs that do."""

from __future__ import annotations

import os


def load_run(workdir: str, kv_bits: int | None = None, step: int | None = None):
  """(config, model, params, step) of the latest (or given) checkpoint in ``workdir``."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config, restore_params  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import abstract_params  # pylint: disable=g-import-not-at-top
  cfg = load_config(workdir)
  if kv_bits is not None:
    from qtrain.quant.config import with_kv_bits  # pylint: disable=g-import-not-at-top
    with_kv_bits(cfg.quant, kv_bits)
  model = build_model(cfg)
  shapes = nn.unbox(abstract_params(model, cfg.data.seq_len))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          shapes)
  params, step = restore_params(workdir, abstract, step)  # The optimizer moments stay on disk.
  return cfg, model, params, step


def load_ptq(out: str, *, packed: bool = True, kv_bits: int | None = None):
  """(config, model, params, step) of the PTQ export at ``out``: the source
  run's config with the export's model, the recipe's activation / KV
  quantizers (``--kv_bits`` overrides KV), params on one device, the 4-bit
  weights packed (``packed``) or dequantized to float."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from qtrain.layers import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top
  from qtrain.quantize import evaluate as ev, export  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(out, export.META_NAME)):
    raise FileNotFoundError(f"--ptq={out}: no {export.META_NAME} there; give a directory that "
                            "python -m qtrain.quantize wrote (its --out)")
  doc = export.read_meta(out)
  cfg = load_config(doc["source"]["workdir"])
  recipe_quant = ml_collections.ConfigDict(doc["recipe_quant"])
  if kv_bits is not None:
    from qtrain.quant.config import with_kv_bits  # pylint: disable=g-import-not-at-top
    with_kv_bits(recipe_quant, kv_bits)
  model_cfg = ModelConfig.from_dict(doc["model"])  # Rotated / ffn_hadamard as quantized.
  if packed:
    params, rules = export.load_packed(out)
    model_cfg = dataclasses.replace(model_cfg, weight_forms=rules + model_cfg.weight_forms)
  else:
    params = export.load_quantized(out)
  provider = export.ptq_providers(out, ev.eval_provider(recipe_quant, doc["model"]))
  params = jax.device_put(params, jax.devices()[0])
  return cfg, Transformer(model_cfg, provider), params, doc["source"]["step"]
