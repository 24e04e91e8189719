"""The command lines as a new user meets them: bad input ends in one line
naming the field or file and the fix (exit 2, nothing written), and the small
tools (held-out evaluation of a checkpoint, progress lines in logs, metric
rows) do what they say. Most tests call the functions behind the CLIs
in-process; the few subprocess ones fail before any compilation."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, ROOT, smoke_config

pytestmark = pytest.mark.slow


def _cli(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                             "PATH": "/usr/bin:/bin"})
  return proc


def _one_line_error(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_misspelt_override_names_the_field_and_the_fix(tmp_path):
  proc = _cli("qtrain.train", "--config=configs/default.py:smoke", f"--workdir={tmp_path}",
              "--config.trian.steps=3")
  assert "did you mean config.train.steps?" in _one_line_error(proc)
  assert not any(tmp_path.iterdir())


def test_check_override_suggests_the_whole_path():
  from qtrain.config import ConfigError, check_override  # pylint: disable=g-import-not-at-top
  check_override("train.steps")
  check_override("quant.rules.w.bits")  # Below a non-group field: the config's own checks.
  with pytest.raises(ConfigError, match=r"config\.optim\.lrr is not a config field; did you "
                     r"mean config\.optim\.lr\?"):
    check_override("optim.lrr")


def test_truncated_token_file_is_one_line_naming_it(tmp_path):
  data = tmp_path / "data"
  shutil.copytree(DATA, data)
  tokens = data / "train.tokens"
  tokens.write_bytes(tokens.read_bytes()[:-1000])
  proc = _cli("qtrain.train", "--config=configs/default.py:smoke",
              f"--workdir={tmp_path / 'run'}", f"--config.data.dir={data}")
  assert "train.tokens" in _one_line_error(proc)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_with_an_empty_prompt_is_one_line(tmp_path):
  proc = _cli("qtrain.generate", f"--workdir={tmp_path}", "--prompt=")
  assert "--prompt is empty" in _one_line_error(proc)


def test_eval_of_a_checkpoint_equals_the_loops_evaluation(smoke_run):
  from qtrain import eval as eval_cli  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  logged = {r["step"]: r["eval_ppl"] for r in map(json.loads, (
      smoke_run / "metrics.jsonl").read_text().splitlines()) if "eval_ppl" in r}
  result = eval_cli.run(str(smoke_run))
  # Same params, same batches, same jitted eval_step: bit-identical on CPU.
  assert result["step"] == 4 and result["eval_ppl"] == logged[4]
  assert json.loads((smoke_run / "eval_step4.json").read_text())["eval_ppl"] == logged[4]
  at_2 = eval_cli.run(str(smoke_run), step=2)
  assert at_2["step"] == 2 and at_2["eval_ppl"] > logged[4]  # Two steps less trained.
  assert math.isclose(at_2["eval_ppl"], math.exp(at_2["eval_loss"]), rel_tol=1e-12)
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 3 .* steps \[2, 4\]"):
    eval_cli.run(str(smoke_run), step=3)


def test_evaluation_checks_packed_segments_for_cudnn(monkeypatch):
  """On GPU the cuDNN path describes attention_max_segments documents per row;
  evaluation batches must be checked like training ones (they were not)."""
  import jax  # pylint: disable=g-import-not-at-top
  from qtrain.data import global_batch  # pylint: disable=g-import-not-at-top
  from qtrain.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  from qtrain.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from qtrain.train.evaluate import evaluate  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(global_batch, "resolve_impl", lambda impl, dtype: "cudnn")
  model_cfg = ModelConfig.from_dict({**smoke_config().model.to_dict(),
                                     "attention_max_segments": 4})
  n = jax.device_count()
  seg = np.tile(np.repeat(np.arange(1, 6, dtype=np.int32), 2), (n, 1))  # 5 documents a row.
  batch = {k: seg for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  calls = []
  step = lambda p, b: calls.append(1) or {"nll_sum": 0.0, "tokens": 1.0}
  with pytest.raises(ValueError, match=r"packs 5 documents.*attention_max_segments=4"):
    evaluate(step, None, [batch], make_mesh(), model_cfg)
  assert not calls
  monkeypatch.setattr(global_batch, "resolve_impl", lambda impl, dtype: "xla")
  evaluate(step, None, [batch], make_mesh(), model_cfg)  # XLA masks any number.
  assert calls


class _Recorder:
  def __init__(self):
    self.scalars = []

  def add_scalar(self, name, value, step):
    self.scalars.append((name, value, step))

  def close(self):
    pass


def test_metric_writer_logs_scalars_and_per_layer_vectors(tmp_path):
  from qtrain.train.metrics import MetricWriter  # pylint: disable=g-import-not-at-top
  writer = MetricWriter(str(tmp_path))
  writer._tb.close()  # pylint: disable=protected-access
  writer._tb = tb = _Recorder()  # pylint: disable=protected-access
  writer.write(3, {"loss": np.float32(2.5), "act_absmax": np.array([1.0, 2.0, 4.0])})
  writer.close()
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
      "step": 3, "loss": 2.5, "act_absmax": [1.0, 2.0, 4.0]}
  assert tb.scalars == [("loss", 2.5, 3), ("act_absmax/0", 1.0, 3), ("act_absmax/1", 2.0, 3),
                        ("act_absmax/2", 4.0, 3)]


def test_truncate_rows_keeps_earlier_steps_and_repairs_a_torn_row(tmp_path):
  from qtrain.train.metrics import read_rows, truncate_rows  # pylint: disable=g-import-not-at-top
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": float(s)} for s in range(5)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
  truncate_rows(str(tmp_path), 2)
  assert read_rows(str(tmp_path)) == rows[:3]
  assert path.read_text().endswith("\n")
  path.write_text(json.dumps(rows[0]) + "\n" + '{"step": 1, "lo\n')  # Torn, then a newline.
  truncate_rows(str(tmp_path), 10)
  assert read_rows(str(tmp_path)) == rows[:1]


class _Collect:
  def __init__(self):
    self.rows = []

  def write(self, step, row):
    self.rows.append((step, row))


def test_throughput_starts_after_the_first_completed_step(monkeypatch):
  """The first step includes compilation: the first row has no tokens/s, and
  later rows count from the first step's completion (the formula, by hand)."""
  from qtrain.train import reporter as reporter_lib  # pylint: disable=g-import-not-at-top
  from qtrain.train.progress import Progress  # pylint: disable=g-import-not-at-top
  cfg = smoke_config()
  clock = iter([100.0, 100.5, 101.5])  # Step 1 done after a 100 s compile; then 0.5, 1.0 s.
  monkeypatch.setattr(reporter_lib.time, "perf_counter", lambda: next(clock))
  writer = _Collect()
  rep = reporter_lib.Reporter(cfg, writer, Progress(3, 0, stream=io.StringIO()), 8)
  for step in (1, 2, 3):
    rep(step, {"loss": np.float32(1.0), "grad_norm": np.float32(1.0),
               "finite": np.float32(1.0), "lr": np.float32(1e-3)})
  rows = dict(writer.rows)
  tokens = cfg.data.seq_len * cfg.data.global_batch_size
  assert "tokens_per_s" not in rows[1]
  assert rows[2]["tokens_per_s"] == tokens / 0.5 and rows[2]["step_time_s"] == 0.5
  assert rows[3]["tokens_per_s"] == tokens / 1.0 and rows[3]["lr"] == np.float32(1e-3)


def test_progress_is_plain_lines_when_not_a_terminal():
  from qtrain.train.progress import Progress  # pylint: disable=g-import-not-at-top
  stream = io.StringIO()
  progress = Progress(10, 0, stream=stream)
  for step in range(1, 4):
    progress.update()
    progress.log(step, {"loss": f"{1.0 / step:.3f}"})
  progress.close()
  assert stream.getvalue() == ("step 1/10: loss 1.000\nstep 2/10: loss 0.500\n"
                               "step 3/10: loss 0.333\n")
