"""``python -m qtrain.sweep`` on two smoke configs (run in-process through its
``main``): the table, results.json and the plotted curves equal what each run
logged, a re-run trains nothing, overrides reach every run, and a misspelt
override is one line naming the field."""

from __future__ import annotations

import json
import math
import pathlib
import re

import pytest

from conftest import DATA

# Two ablations of the smoke config that differ in lr only; the sweep's
# override raises train.steps from 2 to 3 for both.
_CONFIG = '''"""Sweep test ablation."""
from configs import default


def get_config(arg=""):
  c = default.get_config("smoke")
  c.data.dir = {data!r}
  c.train.update(steps=2, checkpoint_every=100, eval_every=100, log_every=1, sample_tokens=0)
  c.optim.update(decay_steps=8, lr={lr!r})
  return c
'''
LRS = {"lr_low": 1e-3, "lr_high": 3e-3}
OVERRIDE = "--config.train.steps=3"
TOKENS_PER_STEP = 8 * 64  # The smoke config's global_batch_size x seq_len.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(argv, capsys):
  from qtrain.sweep.__main__ import main  # pylint: disable=g-import-not-at-top
  code = main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp("sweep_configs")
  for name, lr in LRS.items():
    (d / f"{name}.py").write_text(_CONFIG.format(data=str(DATA), lr=lr))
  return d


@pytest.fixture(scope="module")
def swept(configs, tmp_path_factory):
  """(sweep workdir, what sweep() returned) after one sweep of both configs."""
  from qtrain.sweep.__main__ import sweep  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("sweep") / "out"
  out = sweep(f"{configs}/*.py", str(workdir), (OVERRIDE,), say=lambda s: None)
  return workdir, out


def _metrics(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _table(md: str) -> dict[str, dict[str, str]]:
  """results.md's table: {run name: {column: cell}}."""
  lines = [l for l in md.splitlines() if l.startswith("|")]
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = [[c.strip() for c in re.split(r"(?<!\\)\|", l.strip("|"))] for l in lines[2:]]
  return {r[0]: dict(zip(head, r)) for r in rows}


def test_results_equal_each_runs_metrics(swept, configs):
  workdir, out = swept
  results = json.loads((workdir / "results.json").read_text())
  table = _table((workdir / "results.md").read_text())
  assert sorted(table) == sorted(LRS) == sorted(r["name"] for r in results["runs"])
  for r in results["runs"]:
    rows = _metrics(workdir / r["name"])
    train = [x for x in rows if "loss" in x]
    evals = [x for x in rows if "eval_loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3]  # The override: 3 steps, not the file's 2.
    assert r["steps"] == 3 and r["tokens"] == 3 * TOKENS_PER_STEP
    assert r["final_train_loss"] == train[-1]["loss"]  # Same float through JSON.
    # The sweep's evaluation (qtrain.eval on the final checkpoint) against the
    # loop's own final evaluation: same params and batches, another jitted
    # program, so float32 sums may reorder: rtol 1e-5.
    assert evals[-1]["step"] == 3
    assert r["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
    cells = table[r["name"]]  # The markdown rounds: half a unit of the last digit shown.
    assert int(cells["steps"]) == 3
    assert int(cells["tokens"].replace(",", "")) == 3 * TOKENS_PER_STEP
    assert float(cells["final_train_loss"]) == pytest.approx(train[-1]["loss"], abs=5e-5)
    assert float(cells["eval_loss"]) == pytest.approx(r["eval_loss"], abs=5e-5)
    assert float(cells["eval_ppl"]) == pytest.approx(r["eval_ppl"], abs=5e-4)
    assert cells["command"] == (f"`python -m qtrain.train --config={configs}/{r['name']}.py "
                                f"--workdir={workdir}/{r['name']} {OVERRIDE}`")
    # What loss.png and ppl.png drew: the run's rows against step x batch x seq.
    assert out["plotted"]["loss"][r["name"]] == [
        (x["step"] * TOKENS_PER_STEP, x["loss"]) for x in train]
    assert out["plotted"]["eval_ppl"][r["name"]] == [
        (x["step"] * TOKENS_PER_STEP, x["eval_ppl"]) for x in evals]
  losses = [r["final_train_loss"] for r in results["runs"]]
  assert losses[0] != losses[1]  # The lr ablation changed something: rows are not copies.
  for png in ("loss.png", "ppl.png"):
    assert (workdir / png).read_bytes()[:8] == PNG_MAGIC


def test_rerun_skips_finished_runs(swept, configs, capsys):
  workdir, _ = swept
  before = {n: (workdir / n / "metrics.jsonl").read_bytes() for n in LRS}
  results = (workdir / "results.json").read_text()
  code, out, _ = _main([f"--configs={configs}/*.py", f"--workdir={workdir}", OVERRIDE], capsys)
  assert code == 0
  assert out.count(": skipped") == 2 and out.count("heldout (cached)") == 2, out
  assert {n: (workdir / n / "metrics.jsonl").read_bytes() for n in LRS} == before
  rerun = json.loads((workdir / "results.json").read_text())
  first = json.loads(results)
  for a, b in zip(first["runs"], rerun["runs"]):
    assert a.pop("status") == "trained" and b.pop("status") == "skipped"
    assert a == b


def test_finished_run_with_another_config_is_refused(swept, configs, capsys):
  workdir, _ = swept
  code, _, err = _main([f"--configs={configs}/lr_low.py", f"--workdir={workdir}", OVERRIDE,
                        "--config.optim.weight_decay=0.5"], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "config.optim.weight_decay" in err and "lr_low" in err


def test_bad_override_is_one_line_naming_the_field(configs, tmp_path, capsys):
  code, out, err = _main([f"--configs={configs}/*.py", f"--workdir={tmp_path}",
                          "--config.optim.lrr=1e-3"], capsys)
  assert code == 2 and out == ""
  assert len(err.strip().splitlines()) == 1
  assert "config.optim.lrr" in err and "did you mean config.optim.lr?" in err
  assert not list(tmp_path.iterdir())  # Nothing trained.


def test_unknown_evaluation_fails_before_training(configs, tmp_path, capsys):
  code, _, err = _main([f"--configs={configs}/*.py", f"--workdir={tmp_path}",
                        "--evals=heldout,ptq:w5a5"], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "--evals=ptq:w5a5" in err and "w4a4kv4" in err
  assert not list(tmp_path.iterdir())


def test_entries_globs_and_variants(configs):
  from qtrain.sweep.runs import expand, run_name, split_entries  # pylint: disable=g-import-not-at-top
  assert split_entries("a/*.py,b.py:smoke,w8a8, c.py") == ["a/*.py", "b.py:smoke,w8a8", "c.py"]
  assert expand(f"{configs}/*.py:smoke") == [f"{configs}/lr_high.py:smoke",
                                             f"{configs}/lr_low.py:smoke"]
  assert run_name("configs/osp/lr_3e-4.py:smoke,w4a4+lm_head") == "lr_3e-4-smoke-w4a4+lm_head"


def test_glob_leaves_out_shared_bases(tmp_path):
  """``configs/osp/*.py`` is the five ablations, not their ``_base.py``."""
  from qtrain.sweep.runs import expand  # pylint: disable=g-import-not-at-top
  for name in ("_base.py", "adam.py", "osp.py"):
    (tmp_path / name).write_text("")
  assert expand(f"{tmp_path}/*.py") == [f"{tmp_path}/adam.py", f"{tmp_path}/osp.py"]
  assert expand(f"{tmp_path}/_base.py") == [f"{tmp_path}/_base.py"]  # Named: taken.
  assert [e.rsplit("/", 1)[1] for e in expand("configs/osp/*.py:125m")] == [
      "adam.py:125m", "muon.py:125m", "muon_embproj.py:125m", "muon_ssnorm.py:125m", "osp.py:125m"]


def test_ptq_evaluation_specs():
  from qtrain.config import ConfigError  # pylint: disable=g-import-not-at-top
  from qtrain.sweep.evaluations import resolve  # pylint: disable=g-import-not-at-top
  assert resolve("ptq:w4a4kv4", {}).columns == ("ptq_w4a4kv4_rtn_ppl", "ptq_w4a4kv4_rtn_gap")
  ev = resolve("ptq:w4a4kv4:rtn:ffn_hadamard", {})
  assert ev.spec == "ptq:w4a4kv4:rtn:ffn_hadamard"  # Its own cache key and columns.
  assert ev.columns == ("ptq_w4a4kv4_rtn_ffnh_ppl", "ptq_w4a4kv4_rtn_ffnh_gap")
  with pytest.raises(ConfigError, match=r"ptq:RECIPE\[:METHOD\]\[:ffn_hadamard\]"):
    resolve("ptq:w4a4kv4:rtn:hadamard", {})


def test_a_field_added_after_a_run_counts_as_its_default():
  """A run saved before a field existed is not "another config" while the new
  config keeps that field's default; set it otherwise and it differs."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from qtrain.train.resume import differing_fields  # pylint: disable=g-import-not-at-top
  cfg = default.get_config()
  saved = cfg.to_dict()
  del saved["telemetry"], saved["model"]["norm"]  # Fields newer than the run.
  assert differing_fields(saved, cfg) == []
  cfg.model.norm = "ssnorm"
  assert differing_fields(saved, cfg) == ["model.norm"]
