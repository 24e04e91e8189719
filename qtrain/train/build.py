"""The model a config describes: the Transformer with its providers (the
quantization rules of ``config.quant``; rotation, telemetry and calibration
providers compose in the same tuple) and its weight forms
(``config.model.weight_forms``)."""

from __future__ import annotations

from qtrain.analysis.telemetry import provider_from_config as telemetry_provider
from qtrain.layers import HighPrecision, ModelConfig, Transformer, trace_sites
from qtrain.quant.config import provider_from_config


def model_config(cfg) -> ModelConfig:
  return ModelConfig.of(cfg.model)


def providers(cfg) -> tuple:
  """The providers of ``cfg``, outermost first. Telemetry (``config.telemetry``)
  is outermost, so it measures the raw activations and matmul inputs, before
  any rotation or quantizer changes them."""
  quant = provider_from_config(cfg.quant, cfg.model)
  telemetry = telemetry_provider(cfg)
  return (((telemetry,) if telemetry else ())
          + (() if isinstance(quant, HighPrecision) else (quant,)))


def build_model(cfg) -> Transformer:
  return Transformer(model_config(cfg), providers(cfg))


def quant_report(model: Transformer) -> str | None:
  """Every matmul of the traced model with the rule that quantizes it (or
  "high precision"), and rules that matched nothing."""
  quant = [p for p in model.provider or () if hasattr(p, "report")]
  if not quant:
    return None
  trace_sites(model)  # Asks the provider for every path once.
  return quant[0].report()
