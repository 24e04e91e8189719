"""End-to-end tests of the trainer: entry point, resume, torn checkpoints,
SIGTERM, NaN policies, config errors. They run `python -m qtrain.train` in
subprocesses on the smoke config, like a user would."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("QTRAIN_TEST_DATA", ROOT / "data" / "kjv"))
pytestmark = pytest.mark.slow

# `make test` prepares data/kjv first; without it these tests must fail, not skip.
assert (DATA / "meta.json").exists(), f"{DATA} is not prepared: run `make data`"


def _cmd(workdir, *overrides, config="configs/default.py:smoke"):
  return [sys.executable, "-m", "qtrain.train", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.dir={DATA}", *overrides]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(workdir, *overrides, check=True, **kw):
  proc = subprocess.run(_cmd(workdir, *overrides, **kw), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
  return proc


def _start(workdir, *overrides):
  return subprocess.Popen(_cmd(workdir, *overrides), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _losses(workdir) -> dict[int, float]:
  """Training loss per step; a step logged twice (re-run after resume) keeps
  its last value."""
  return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _wait_for(pred, proc, timeout=300.0, poll=0.05):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if pred():
      return True
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"process ended early rc={proc.returncode}\n{out}\n{err[-3000:]}")
    time.sleep(poll)
  raise AssertionError("timed out waiting")


def _finalized_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_entry_point_trains_and_reports(tmp_path):
  # `make train`'s config itself, cut to a few steps.
  proc = _run(tmp_path, "--config.train.steps=3", "--config.train.log_every=1",
              "--config.optim.warmup_steps=1", "--config.data.eval_batches=1",
              "--config.train.sample_tokens=4", config="configs/default.py")
  rows = [r for r in _rows(tmp_path) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3]
  # Step 1's time is mostly compilation: throughput is counted from its end.
  assert "tokens_per_s" not in rows[0]
  assert all(r["tokens_per_s"] > 0 and r["step_time_s"] > 0 for r in rows[1:])
  assert all({"lr", "skipped", "grad_norm", "finite"} <= r.keys() for r in rows)
  assert "held-out perplexity: initial" in proc.stdout
  assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())
  assert _finalized_steps(tmp_path)[-1] == 3


# --- one run stopped twice: SIGTERM, then SIGKILL during a save -------------

# The schedule of the session's smoke run (conftest.smoke_config: cosine over
# 8 updates, then lr * min_lr_ratio): every run below, that one and the
# reference compile the same program, so only the first to start compiles it
# (tests/conftest.py's cache). train.steps may then change between legs.
SAME_PROGRAM = ("--config.optim.decay_steps=8", "--config.train.eval_every=1000",
                "--config.train.sample_tokens=0")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """One run interrupted twice and finished, and the same run uninterrupted.

  1. SIGTERM once step 3 is logged, with no periodic checkpoints: it must
     save, say so and exit 0.
  2. Resumed with a checkpoint every 2 steps and SIGKILLed while a save is in
     flight, after a step past the last complete checkpoint was logged: a torn
     checkpoint, and logged steps that the resumed run must train again.
  3. Resumed to two steps past the kill; the reference (in-process, one go)
     trains the same config to the same step.
  """
  run = tmp_path_factory.mktemp("interrupted") / "run"
  proc = _start(run, "--config.train.steps=400", "--config.train.checkpoint_every=1000",
                *SAME_PROGRAM)
  _wait_for(lambda: max(_losses(run), default=0) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  term_out, term_err = proc.communicate(timeout=120)
  term = types.SimpleNamespace(rc=proc.returncode, out=term_out, err=term_err,
                               saved=_finalized_steps(run))

  proc = _start(run, "--config.train.steps=400", "--config.train.checkpoint_every=2",
                *SAME_PROGRAM)
  ckpt = run / "checkpoints"

  def save_in_flight_past_a_logged_step():
    if not any("tmp" in p.name for p in ckpt.iterdir()):
      return False
    return max(_losses(run), default=0) > max(_finalized_steps(run))

  _wait_for(save_in_flight_past_a_logged_step, proc, poll=0.001)
  proc.send_signal(signal.SIGKILL)
  kill_out, kill_err = proc.communicate()
  kill = types.SimpleNamespace(out=kill_out + kill_err, killed_at=max(_losses(run)),
                               torn=[p.name for p in ckpt.iterdir() if "tmp" in p.name],
                               complete=_finalized_steps(run))

  steps = kill.killed_at + 2
  final = _run(run, f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
               *SAME_PROGRAM)
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run as train  # pylint: disable=g-import-not-at-top
  ref = run.parent / "ref"
  train(smoke_config(steps=steps, checkpoint_every=1000, eval_every=1000), str(ref))
  return types.SimpleNamespace(run=run, ref=ref, steps=steps, term=term, kill=kill,
                               final=final.stdout + final.stderr)


def test_sigterm_saves_exits_zero_and_resumes(interrupted):
  term = interrupted.term
  assert term.rc == 0, term.err[-3000:]
  assert "preempted at step" in term.out
  assert len(term.saved) == 1 and term.saved[0] >= 3  # Only the save SIGTERM asked for.
  assert f"resumed from checkpoint step {term.saved[0]}" in interrupted.kill.out


def test_torn_async_checkpoint_is_skipped(interrupted):
  kill = interrupted.kill
  assert kill.torn, "the kill did not land during a save"
  torn_step = int(kill.torn[0].split(".")[0])
  assert torn_step not in kill.complete and torn_step > max(kill.complete)
  assert f"resumed from checkpoint step {max(kill.complete)}" in interrupted.final
  assert max(_losses(interrupted.run)) == interrupted.steps


def test_sigkill_between_checkpoints_resumes_bit_identically(interrupted):
  kill = interrupted.kill
  resumed_from = max(kill.complete)
  assert resumed_from < kill.killed_at, (resumed_from, kill.killed_at)
  run_losses = _losses(interrupted.run)  # Steps logged twice keep the resumed run's value.
  assert sorted(run_losses) == list(range(1, interrupted.steps + 1))
  # Bit-identical on CPU: the same params, optimizer state and batches.
  assert run_losses == _losses(interrupted.ref)


def test_nan_policy_skip_drops_every_poisoned_update(tmp_path):
  # A NaN z-loss weight makes the objective and every gradient NaN.
  proc = _run(tmp_path, "--config.train.steps=3", "--config.optim.z_loss=nan",
              "--config.train.nan_policy=skip", "--config.train.eval_every=100")
  assert "skipping it (config.train.nan_policy='skip')" in proc.stdout + proc.stderr
  rows = _rows(tmp_path)
  assert [r["finite"] for r in rows if "loss" in r] == [0.0, 0.0, 0.0]
  evals = [r["eval_ppl"] for r in rows if "eval_ppl" in r]
  assert evals[0] == evals[-1]  # No update was applied: the params are the initial ones.


def test_nan_policy_stop_fails_with_message(tmp_path):
  proc = _run(tmp_path, "--config.train.steps=3", "--config.optim.z_loss=nan",
              "--config.train.nan_policy=stop", check=False)
  assert proc.returncode == 2
  assert "non-finite loss or gradient at step 1" in proc.stderr
  assert "nan_policy='stop'" in proc.stderr


@pytest.mark.parametrize("override, field", [
    ("--config.model.n_kv_heads=3", "config.model.n_kv_heads"),
    ("--config.data.global_batch_size=12", "config.data.global_batch_size"),
    ("--config.data.seq_len=4096", "config.data.seq_len"),
])
def test_config_errors_fail_before_compiling_and_name_the_field(tmp_path, override, field):
  proc = _run(tmp_path, override, check=False)
  assert proc.returncode == 2
  assert field in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_training_path_imports_no_tensorflow_and_starts_no_backend():
  # Importing must not start a JAX backend either: jax.distributed.initialize
  # must come first on multi-host runs, and a GPU benchmark's peer needs the
  # memory JAX would pre-allocate.
  code = ("import sys, qtrain.train.loop, qtrain.data.loader, qtrain.quantize, qtrain.generate\n"
          "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]\n"
          "assert not bad, bad\n"
          "from jax._src import xla_bridge\n"
          "assert not xla_bridge.backends_are_initialized(), 'an import started a backend'\n")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_init_from_starts_with_another_runs_params(smoke_run_dir, tmp_path):
  src, dst = smoke_run_dir, tmp_path / "dst"  # The session's smoke run (conftest.py), read only.
  proc = _run(dst, "--config.train.steps=2", f"--config.train.init_from={src}", *SAME_PROGRAM)
  assert "initialised params from" in proc.stdout
  src_final = [r["eval_ppl"] for r in _rows(src) if "eval_ppl" in r][-1]
  dst_initial = [r["eval_ppl"] for r in _rows(dst) if "eval_ppl" in r][0]
  assert dst_initial == src_final  # Same params, same held-out batches.
  assert sorted(_losses(dst)) == [1, 2]  # A new run: step 0, fresh optimizer.


# --- in-process loop tests (one shared smoke run, tests/conftest.py) ----------


def _rows_by_kind(workdir):
  train = [r for r in _rows(workdir) if "loss" in r]
  evals = [r for r in _rows(workdir) if "eval_ppl" in r]
  return train, evals


def test_resume_rewrites_rows_after_the_checkpoint_and_drops_a_torn_row(smoke_run):
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  before, _ = _rows_by_kind(smoke_run)
  # A run killed after logging steps 5 and 6 (no checkpoint past 4), mid-way
  # through writing step 7's row.
  with open(smoke_run / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 5, "loss": -1.0}\n{"step": 6, "loss": -1.0}\n{"step": 7, "lo')
  run(smoke_config(steps=6), str(smoke_run))
  after, evals = _rows_by_kind(smoke_run)  # _rows parses every line: none torn.
  assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
  assert after[:4] == before  # Rows up to the checkpoint kept as they were.
  assert all(r["loss"] > 0 for r in after)  # The stale rows of 5 and 6 are gone.
  assert [r["step"] for r in evals] == [0, 4, 6]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(smoke_run, capsys):
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  losses = _losses(smoke_run)
  files = [p for p in (smoke_run / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
  max(files, key=lambda p: p.stat().st_size).unlink()  # The params' data file.
  (smoke_run / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in _rows(smoke_run) if r["step"] <= 2))
  summary = run(smoke_config(), str(smoke_run))
  out = capsys.readouterr().out
  assert "checkpoint step 4" in out and "damaged" in out
  assert "resumed from checkpoint step 2" in out
  assert summary["step"] == 4 and (smoke_run / "checkpoints" / "4.damaged").is_dir()
  # Resumed from step 2 it replays steps 3 and 4 bit-identically (CPU).
  assert _losses(smoke_run) == losses


def test_changed_model_is_rejected_before_anything_is_written(smoke_run):
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top
  from qtrain.config import ConfigError  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  files = ("config.json", "metrics.jsonl")
  before = {f: (smoke_run / f).read_bytes() for f in files}
  cfg = smoke_config(steps=6)
  cfg.model.d_model = 96
  with pytest.raises(ConfigError, match=r"config\.model\.d_model.*init_from"):
    run(cfg, str(smoke_run))
  assert {f: (smoke_run / f).read_bytes() for f in files} == before
  # The same after editing config.json by hand: the saved config is the reference.
  saved = json.loads(before["config.json"])
  saved["model"]["n_layers"] = 3
  (smoke_run / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=r"differing: config\.model\.n_layers\)"):
    run(smoke_config(steps=6), str(smoke_run))
  assert json.loads((smoke_run / "config.json").read_text()) == saved


def test_corrupt_first_metrics_row_fails_naming_the_line(smoke_run):
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  from qtrain.train.metrics import MetricsFileError  # pylint: disable=g-import-not-at-top
  path = smoke_run / "metrics.jsonl"
  path.write_text("{garbage\n" + path.read_text())
  config_before = (smoke_run / "config.json").read_bytes()
  with pytest.raises(MetricsFileError, match=r"metrics\.jsonl line 1 is not JSON"):
    run(smoke_config(steps=6), str(smoke_run))
  assert (smoke_run / "config.json").read_bytes() == config_before


def test_sigterm_during_startup_ends_cleanly_before_the_first_step(tmp_path, monkeypatch,
                                                                  capsys):
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top
  from qtrain.train import loop  # pylint: disable=g-import-not-at-top
  real = loop.make_steps

  def signalled_while_compiling(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # Without the handler this kills pytest.
    return real(*args, **kwargs)

  monkeypatch.setattr(loop, "make_steps", signalled_while_compiling)
  handler_before = signal.getsignal(signal.SIGTERM)
  summary = loop.run(smoke_config(), str(tmp_path))
  assert summary["preempted"] and summary["step"] == 0
  assert "SIGTERM during start-up" in capsys.readouterr().out
  assert _finalized_steps(tmp_path) == [] and _losses(tmp_path) == {}
  assert signal.getsignal(signal.SIGTERM) == handler_before  # Handed back.
