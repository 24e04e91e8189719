"""The model a config describes: the Transformer with its injected dot-general
(unquantized, or the quantization rules of ``config.quant``)."""

from __future__ import annotations

from qtrain.layers import ModelConfig, Transformer
from qtrain.quant.config import provider_from_config


def build_model(cfg) -> Transformer:
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  return Transformer(model_cfg, provider_from_config(cfg.quant, cfg.model))


def quant_report(model: Transformer) -> str | None:
  """Which matmuls run quantized and which rules matched nothing (after an
  init or trace has asked the provider for every path)."""
  report = getattr(model.dot, "report", None)
  return report() if report else None
