"""Metric sinks (TensorBoard event files, ``metrics.jsonl``) and model FLOPs.

MFU follows the PaLM convention: model FLOPs per token = 6·N + 6·L·S·D, where
N counts the weights of every matmul the model issues (the layers and the LM
head, not the input embedding lookup; read off the traced model) and 6·L·S·D is causal attention's QK^T and PV, forward and backward
(12·L·S·D halved by the causal mask).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

# Dense bf16 peak per device, FLOP/s.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12,
              "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}


def matmul_params(model_cfg) -> int:
  """Weights the model multiplies per token: the sum of in x out over every
  matmul the traced model issues (``qtrain.layers.trace_sites``; stacked
  blocks counted L times), so weight forms (low-rank factors) count as run."""
  from qtrain.layers import ModelConfig, config_sites  # pylint: disable=g-import-not-at-top
  c = ModelConfig.of(model_cfg)
  return sum(s.in_features * s.out_features * (c.n_layers if s.stacked else 1)
             for s in config_sites(c).matmuls)


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


class MetricsFileError(ValueError):
  """``metrics.jsonl`` has a row that is not JSON before its last line."""


def _parse_rows(path: str) -> tuple[list[dict], bool]:
  """(rows of ``path``, whether a torn last row was dropped). A last line
  without its newline, or a last line that is not JSON, is what a kill
  mid-write leaves: dropped. A bad earlier line is an error naming it."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  body, tail = lines[:-1], lines[-1]  # tail == "" iff the file ends with a newline.
  rows, torn = [], bool(tail)
  for i, line in enumerate(body, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(body) and not tail:
        torn = True
        break
      raise MetricsFileError(f"{path} line {i} is not JSON ({e.msg}): repair or delete that "
                             "line (or the file) and rerun") from None
  return rows, torn


def read_rows(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl`` ([] when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  return _parse_rows(path)[0] if os.path.exists(path) else []


def truncate_rows(workdir: str, last_step: int) -> None:
  """Keeps the rows with step <= ``last_step`` (a resumed run logs the later
  steps again; ``-1`` keeps none) and drops a torn last row. The file is
  replaced atomically, so a kill here loses nothing."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  rows, torn = _parse_rows(path)
  kept = [r for r in rows if r.get("step", -1) <= last_step]
  if torn:
    print(f"warning: {path}: dropped a torn last row (a run killed mid-write)", flush=True)
  if len(kept) == len(rows) and not torn:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _jsonable(v):
  """A float for a scalar, a list of floats for a per-layer vector."""
  a = np.asarray(v, np.float64)
  if a.ndim == 0:
    return float(a)
  if a.ndim == 1:
    return [float(x) for x in a]
  raise ValueError(f"metric of shape {a.shape}: only scalars and per-layer vectors are logged")


class MetricWriter:
  """Writes metrics to ``metrics.jsonl`` and TensorBoard (process 0 only).

  A value is a scalar or a 1-D per-layer vector: a list in the jsonl row,
  ``name/<i>`` (one scalar per layer) in TensorBoard.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k == "step":
        continue
      for name, x in ([(f"{k}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list)
                      else [(k, v)]):
        self._tb.add_scalar(name, x, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
