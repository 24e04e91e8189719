"""Activation analysis: OSP's excess kurtosis and outlier statistics
(``kurtosis``), the in-training telemetry provider (``telemetry``) and the
checkpoint report (``report``; ``python -m qtrain.analysis.kurtosis``).

Names are re-exported lazily: ``python -m qtrain.analysis.kurtosis`` runs
that module as ``__main__``, and an eager import here would load it twice.
"""

import importlib

_EXPORTS = {
    "excess_kurtosis": "kurtosis", "token_kurtosis": "kurtosis", "max_abs": "kurtosis",
    "channel_mean_abs": "kurtosis", "abs_histogram": "kurtosis", "HIST_EDGES": "kurtosis",
    "TelemetryProvider": "telemetry", "summarize": "telemetry",
    "validate_telemetry": "telemetry", "analyze": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'qtrain.analysis' has no attribute {name!r}")
  return getattr(importlib.import_module(f"qtrain.analysis.{_EXPORTS[name]}"), name)
