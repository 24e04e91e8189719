"""Per-step metrics: the NaN policy, throughput and the log rows.

Throughput counts from the first step this process completed, so the first
logged tokens/s and MFU do not include compilation. Every metric the step
returns is logged (scalars, and per-layer vectors as ``name/<i>``), plus
``tokens_per_s``, ``step_time_s`` and ``mfu`` (or TFLOP/s without a known peak),
every ``config.train.log_every`` steps and at every step that measured the
activation telemetry (``telemetry/...`` metrics, ``config.telemetry.every``).
"""

from __future__ import annotations

import time

import jax

from qtrain.train import metrics as metrics_lib

TELEMETRY = "telemetry/"  # Metrics of a measured step (qtrain.analysis.telemetry).


class NonFiniteError(FloatingPointError):
  """Loss or gradient became NaN/Inf and ``config.train.nan_policy='stop'``."""


class Reporter:
  """Reads a finished step's metrics, applies the NaN policy, logs."""

  def __init__(self, cfg, writer, progress, n_devices):
    self.cfg, self.writer, self.progress = cfg, writer, progress
    seq, batch = cfg.data.seq_len, cfg.data.global_batch_size
    self.tokens_per_step = seq * batch
    self.flops_per_step = metrics_lib.flops_per_token(cfg.model, seq) * self.tokens_per_step
    peak = metrics_lib.device_peak_flops(cfg.train.peak_tflops)
    self.peak = None if peak is None else peak * n_devices
    self.t_last, self.step_last = None, None

  def _check_finite(self, step: int, m: dict) -> None:
    if bool(m["finite"]):
      return
    msg = (f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
           f"grad_norm={float(m['grad_norm'])}); the update was not applied")
    if self.cfg.train.nan_policy == "stop":
      raise NonFiniteError(msg + "; stopping (config.train.nan_policy='stop')")
    self.progress.write(msg + "; skipping it (config.train.nan_policy='skip')")

  def _throughput(self, step: int, now: float) -> dict:
    """tokens/s etc. since the last logged (or first completed) step."""
    n, dt = step - self.step_last, max(now - self.t_last, 1e-9)
    self.t_last, self.step_last = now, step
    out = {"tokens_per_s": n * self.tokens_per_step / dt, "step_time_s": dt / n}
    flops = n * self.flops_per_step / dt
    if self.peak:
      out["mfu"] = flops / self.peak
    else:
      out["tflops_per_s"] = flops / 1e12
    return out

  def __call__(self, step: int, metrics) -> None:
    m = jax.device_get(metrics)
    now = time.perf_counter()
    self._check_finite(step, m)
    self.progress.update()
    if self.t_last is None:  # Compilation lies before this point, not after.
      self.t_last, self.step_last = now, step
    measured = any(k.startswith(TELEMETRY) for k in m)  # Rare: always logged.
    if step % self.cfg.train.log_every and step != self.cfg.train.steps and not measured:
      return
    row = dict(m)
    if step > self.step_last:
      row.update(self._throughput(step, now))
    self.writer.write(step, row)
    shown = {"loss": f"{float(m['loss']):.3f}"}
    if "lr" in m:
      shown["lr"] = f"{float(m['lr']):.2e}"
    if "exchange/ratio" in m:  # Gradient bytes a dense all-reduce sends / sent.
      shown["comm"] = f"{float(m['exchange/ratio']):.0f}x"
    if "tokens_per_s" in row:
      shown["tok/s"] = f"{row['tokens_per_s']:,.0f}"
      shown.update({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row
                   else {"TFLOP/s": f"{row['tflops_per_s']:.3f}"})
    self.progress.log(step, shown)
