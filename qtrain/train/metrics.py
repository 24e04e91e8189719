"""Metric sinks (TensorBoard event files, ``metrics.jsonl``) and model FLOPs.

MFU follows the PaLM convention: model FLOPs per token = 6·N + 6·L·S·D, where
N counts the matmul params of the layers and the LM head (not the input
embedding) and 6·L·S·D is causal attention's QK^T and PV, forward and backward
(12·L·S·D halved by the causal mask).
"""

from __future__ import annotations

import json
import os

import jax

# Dense bf16 peak per device, FLOP/s.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12,
              "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}


def matmul_params(model_cfg) -> int:
  c = model_cfg
  attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
  mlp = 3 * c.d_model * c.d_ff
  return c.n_layers * (attn + mlp) + c.d_model * c.vocab_size


def flops_per_token(model_cfg, seq_len: int) -> float:
  return 6.0 * matmul_params(model_cfg) + 6.0 * model_cfg.n_layers * seq_len * model_cfg.d_model


def device_peak_flops(configured_tflops: float = 0.0) -> float | None:
  """Per-device peak FLOP/s: the config's, else looked up by device kind."""
  if configured_tflops > 0:
    return configured_tflops * 1e12
  return peak_for_kind(jax.devices()[0].device_kind)


def peak_for_kind(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


class MetricWriter:
  """Writes scalars to ``metrics.jsonl`` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
