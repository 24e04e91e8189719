"""``python -m qtrain.plot``: the series each PNG draws equal the runs' files.

Two synthetic runs (config.json + metrics.jsonl in the layout
qtrain.train.metrics.MetricWriter writes: one JSON object per row, per-layer
telemetry as lists) with different batch shapes, so a wrong tokens-per-step
or a series taken from the other run shows. The expected points are
recomputed here from the rows the test wrote, not read back through
qtrain.plot; matplotlib hands back the float64 values it was given, so they
must be equal exactly.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from qtrain import plot
from qtrain.sweep import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
K = "telemetry/kurtosis/"


def _run(path: pathlib.Path, batch: int, seq: int, layers: int, scale: float,
         exchange: bool) -> list[dict]:
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(
      {"data": {"global_batch_size": batch, "seq_len": seq}, "train": {"steps": 6}}))
  rows = [{"step": 0, "eval_loss": 9.0, "eval_ppl": 8103.08 * scale}]
  for step in range(1, 7):
    row = {"step": step, "loss": scale * (9.0 - step * 0.25), "lr": 1e-3, "finite": 1.0}
    if step > 1:
      row.update(tokens_per_s=1000.0 * step * scale, step_time_s=0.5)
    if exchange:
      row.update({"exchange/bytes_sent": 4096.0 / step, "exchange/ratio": 8.0 * step})
    if step in (1, 4):  # Telemetry steps: the residual stream's kurtosis per layer.
      row.update({K + "embed_out": 0.5 * step * scale,
                  K + "decoder/layers/block_out": [step * scale + i for i in range(layers)],
                  "telemetry/kurtosis": 1.0})
    rows.append(row)
  rows.append({"step": 6, "eval_loss": 7.5, "eval_ppl": 1808.04 * scale})
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return rows


@pytest.fixture
def runs(tmp_path):
  a = _run(tmp_path / "runs" / "adamw", batch=8, seq=64, layers=2, scale=1.0, exchange=False)
  b = _run(tmp_path / "runs" / "muon", batch=4, seq=32, layers=3, scale=0.9, exchange=True)
  return tmp_path / "runs", {"adamw": (a, 8 * 64), "muon": (b, 4 * 32)}


def _expected(rows, per_step, key):
  return [(r["step"] * per_step, r[key]) for r in rows if key in r]


def test_every_png_draws_the_files_values(runs, tmp_path):
  base, want = runs
  drawn = plot.plot_runs([str(base / "adamw"), str(base / "muon")], str(tmp_path / "out"))
  assert sorted(drawn) == ["bytes.png", "kurtosis.png", "loss.png", "ppl.png",
                           "throughput.png"]
  for file in drawn:
    assert (tmp_path / "out" / file).read_bytes()[:8] == PNG_MAGIC
  for key, file in (("loss", "loss.png"), ("eval_ppl", "ppl.png"),
                    ("tokens_per_s", "throughput.png")):
    assert drawn[file] == {name: _expected(rows, per_step, key)
                           for name, (rows, per_step) in want.items()}, key
  # Only the compressed-exchange run logged bytes.
  rows, per_step = want["muon"]
  assert drawn["bytes.png"] == {"muon": _expected(rows, per_step, "exchange/bytes_sent")}
  # One panel per residual position; the 2-layer run has no "layer 2" line.
  assert list(drawn["kurtosis.png"]) == ["embedding output", "layer 0 output",
                                         "layer 1 output", "layer 2 output"]
  for name, (rows, per_step) in want.items():
    measured = [r for r in rows if K + "embed_out" in r]
    assert drawn["kurtosis.png"]["embedding output"][name] == [
        (r["step"] * per_step, r[K + "embed_out"]) for r in measured]
    for i in range(len(measured[0][K + "decoder/layers/block_out"])):
      assert drawn["kurtosis.png"][f"layer {i} output"][name] == [
          (r["step"] * per_step, r[K + "decoder/layers/block_out"][i]) for r in measured]
  assert list(drawn["kurtosis.png"]["layer 2 output"]) == ["muon"]


def test_the_sweep_report_draws_through_the_same_code(runs, tmp_path):
  base, want = runs
  rows = []
  for name, (_, per_step) in want.items():
    rows.append({"name": name, "curves": report.curves(str(base / name), per_step)})
  shared = plot.plot_runs([str(base / n) for n in want], str(tmp_path / "plots"))
  assert report.plot(rows, "loss", "train loss", str(tmp_path / "loss.png")) == \
      shared["loss.png"]
  assert report.plot(rows, "eval_ppl", "held-out perplexity", str(tmp_path / "ppl.png"),
                     log_y=True) == shared["ppl.png"]


def test_the_command_line(runs, tmp_path):
  base, _ = runs
  cmd = [sys.executable, "-m", "qtrain.plot", f"--out={tmp_path / 'out'}",
         str(base / "adamw"), str(base / "muon"), "--names=AdamW,Muon"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"wrote {tmp_path / 'out' / 'loss.png'}, ")
  missing = subprocess.run([*cmd[:4], str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'nope'}/metrics.jsonl is missing: the run has not logged a step"]
