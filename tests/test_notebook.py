"""notebooks/kurtosis.ipynb, executed with nbclient on two tiny runs (the
session's telemetry runs, tests/conftest.py: the smoke config, seeds 0 and
1, telemetry at steps 1, 2 and 4): the notebook's plotted numbers (the JSON
it writes) hold the runs' values, per layer and step, from metrics.jsonl and
from the checkpoint report; the CLI wrote the same report; every figure was
drawn."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

from conftest import ROOT, TELEMETRY_RUNS  # pylint: disable=wrong-import-position

NOTEBOOK = ROOT / "notebooks" / "kurtosis.ipynb"


def test_notebook_plots_the_runs_values(telemetry_runs_dir, tmp_path, monkeypatch):
  runs = [tmp_path / name for name in TELEMETRY_RUNS]
  for workdir in runs:  # Copies: the notebook writes its report into each run.
    shutil.copytree(telemetry_runs_dir / workdir.name, workdir)
  # The CLI on run a first: the notebook's report must equal what it wrote.
  from qtrain.analysis import kurtosis  # pylint: disable=g-import-not-at-top
  kurtosis.main([f"--workdir={runs[0]}", "--batches=1", f"--out={tmp_path / 'cli'}"])
  cli = json.loads((tmp_path / "cli" / "kurtosis_step4.json").read_text())
  out = tmp_path / "figures.json"
  monkeypatch.setenv("QTRAIN_RUNS", ",".join(map(str, runs)))
  monkeypatch.setenv("QTRAIN_KURTOSIS_BATCHES", "1")
  monkeypatch.setenv("QTRAIN_NOTEBOOK_OUT", str(out))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  data = json.loads(out.read_text())
  for workdir in runs:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "telemetry/kurtosis" in r]
    got = data["over_training"][str(workdir)]
    assert got["steps"] == [1, 2, 4] and len(rows) == len(got["down_proj_kurtosis"]) == 3
    for r, k, m, agg, down in zip(rows, got["kurtosis"], got["max_abs"], got["aggregate"],
                                  got["down_proj_kurtosis"]):
      want_k = [r["telemetry/kurtosis/embed_out"], *r["telemetry/kurtosis/decoder/layers/block_out"]]
      want_m = [r["telemetry/max_abs/embed_out"], *r["telemetry/max_abs/decoder/layers/block_out"]]
      assert k == want_k and m == want_m and agg == r["telemetry/kurtosis"]
      assert down == r["telemetry/kurtosis/decoder/layers/mlp/down_proj"]
    report = json.loads((workdir / "kurtosis_step4.json").read_text())
    ck = data["checkpoint"][str(workdir)]
    assert ck["step"] == 4 and ck["kurtosis"] == report["kurtosis"]
    res = [report["sites"]["embed_out"]["kurtosis"],
           *report["sites"]["decoder/layers/block_out"]["kurtosis"]]
    assert ck["residual_kurtosis"] == res
    # The paper's aggregate is the mean over the embedding and layer outputs.
    np.testing.assert_allclose(ck["kurtosis"], np.mean(res), rtol=1e-6)
    heat = np.asarray(ck["channel_mean_abs"]["decoder/layers/block_out"])
    assert heat.shape == (2, 64) and (heat > 0).all()
  # Same checkpoint, batches and code: the CLI's report is the notebook's.
  assert cli["kurtosis"] == data["checkpoint"][str(runs[0])]["kurtosis"]
  assert data["over_training"][str(runs[0])] != data["over_training"][str(runs[1])]
  pngs = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))
  assert pngs == 3
