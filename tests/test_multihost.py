"""Multi-host start-up (``qtrain.parallel.distributed``) and a two-process
run on 127.0.0.1 checked against one process on the same 8-device mesh.

The decision of what to start is a pure function of the flags and the
environment (``distributed.plan``), tested with fake environments; the rest
starts real clusters of two CPU processes (4 devices each, gloo collectives)
through tests/multiprocess_worker.py, which is ``python -m qtrain.train``
with hooks that watch or feed the data.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import types
import zlib

import pytest

from qtrain.parallel import distributed
from qtrain.parallel.distributed import DistributedError, Plan, first_slurm_host, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("QTRAIN_TEST_DATA", ROOT / "data" / "kjv"))

# --- what to start: flags > SLURM > TPU > one process ------------------------

SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_NUM_NODES": "2"}


def _plan(*args, environ=None, on_tpu_vm=False, **kw):
  return plan(*args, environ={} if environ is None else environ, on_tpu_vm=on_tpu_vm, **kw)


def test_explicit_flags_win_over_slurm_and_tpu():
  p = _plan("10.0.0.1:1234", 2, 1, environ=SLURM, on_tpu_vm=True)
  assert p == Plan("flags", "10.0.0.1:1234", 2, 1)
  assert p.describe() == ("process 1 of 2 from --coordinator_address, --num_processes and "
                          "--process_id, coordinator 10.0.0.1:1234")
  # One process by flag: nothing to start, even inside a SLURM step.
  assert _plan(num_processes=1, process_id=0, environ=SLURM) == Plan("single")


def test_slurm_step_gives_coordinator_ids_and_devices():
  p = _plan(environ=SLURM)
  # First host of the step, port 61440 + job id mod 4096 (the same on every task).
  assert p == Plan("slurm", f"gpu007:{61440 + 123456 % 4096}", 4, 1, (1,))
  assert p.describe() == (f"process 1 of 4 from the SLURM job step, coordinator "
                          f"gpu007:{61440 + 123456 % 4096}, local devices [1]")
  # One task per node sees all its GPUs (jax's SlurmCluster would pin it to GPU 0);
  # so does a task the launcher already restricted (--gpus-per-task).
  assert _plan(environ=dict(SLURM, SLURM_NTASKS="2")).local_device_ids is None
  assert _plan(environ=dict(SLURM, CUDA_VISIBLE_DEVICES="1")).local_device_ids is None
  # The step's task count wins over the job's; the flags may move the coordinator.
  assert _plan(environ=dict(SLURM, SLURM_STEP_NUM_TASKS="2")).num_processes == 2
  assert _plan("gpu008:999", environ=SLURM).coordinator_address == "gpu008:999"
  assert _plan(environ=dict(SLURM, JAX_COORDINATOR_PORT="4321")).coordinator_address == \
      "gpu007:4321"
  assert _plan(local_device_ids=[0, 1], environ=SLURM).local_device_ids == (0, 1)


def test_slurm_without_a_multi_task_step_runs_one_process():
  assert _plan(environ=dict(SLURM, SLURM_NTASKS="1")) == Plan("single")
  batch_script = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP")}
  p = _plan(environ=batch_script)  # N tasks allocated, but not launched by srun.
  assert not p.distributed and "srun python -m qtrain.train" in p.note


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("a1,b2", "a1"), ("gpu[003-004,9],cpu1", "gpu003"),
    ("r[1-2]n[01-04]", "r1n01"), ("x-y[07,9]", "x-y07")])
def test_first_slurm_host(nodelist, host):
  assert first_slurm_host(nodelist) == host


def test_tpu_vm_is_left_to_jax_and_otherwise_one_process():
  assert _plan(on_tpu_vm=True) == Plan("tpu")
  assert _plan(on_tpu_vm=True).describe() == "process i of n from the TPU pod (jax's detection)"
  assert _plan() == Plan("single")


@pytest.mark.parametrize("kw, message", [
    (dict(num_processes=2), "--num_processes=2 given without --process_id; pass each process "
     "its own --process_id in 0..1"),
    (dict(process_id=0), "--process_id=0 given without --num_processes"),
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"),
     "--process_id=2 is outside 0..1 (--num_processes=2)"),
    (dict(num_processes=0, process_id=0), "--num_processes=0 must be at least 1"),
    (dict(num_processes=2, process_id=0), "--num_processes=2 needs --coordinator_address="
     "HOST:PORT"),
    (dict(num_processes=2, process_id=0, coordinator_address="10.0.0.1"),
     "--coordinator_address='10.0.0.1' must be HOST:PORT"),
    (dict(coordinator_address="10.0.0.1:1234"), "--coordinator_address=10.0.0.1:1234 given "
     "alone and no SLURM job step or TPU pod was found; pass --num_processes and --process_id"),
])
def test_partial_or_wrong_flags_fail_naming_the_flag(kw, message):
  with pytest.raises(DistributedError, match="^" + re.escape(message)) as e:
    _plan(**kw)
  assert "\n" not in str(e.value)


def test_bad_slurm_variables_fail_naming_the_variable():
  with pytest.raises(DistributedError, match="^SLURM_PROCID='x' is not a non-negative integer"):
    _plan(environ=dict(SLURM, SLURM_PROCID="x"))
  with pytest.raises(DistributedError, match="^SLURM_PROCID=4 is not below the step's 4 tasks"):
    _plan(environ=dict(SLURM, SLURM_PROCID="4"))
  with pytest.raises(DistributedError, match="^SLURM_STEP_NODELIST='gpu\\[1-2' is not a"):
    _plan(environ=dict(SLURM, SLURM_STEP_NODELIST="gpu[1-2"))


def test_one_process_starts_nothing(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  for k in list(os.environ):
    if k.startswith("SLURM_"):
      monkeypatch.delenv(k)
  monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
  assert distributed.initialize().startswith("one process")
  assert not jax.distributed.is_initialized()


# --- real clusters of CPU processes ------------------------------------------

_PROBE = """
import json, jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from qtrain.parallel import distributed
# No CPU collectives (older jax versions had none by default): initialize must choose gloo.
jax.config.update("jax_cpu_collectives_implementation", None)
line = distributed.initialize()
ids = multihost_utils.process_allgather(jnp.array(jax.process_index()))  # Through gloo.
print(json.dumps(dict(line=line, index=jax.process_index(), count=jax.process_count(),
                      devices=jax.device_count(), ids=ids.tolist(),
                      visible=jax.config.read("jax_cuda_visible_devices"))), flush=True)
"""


@pytest.mark.slow
def test_a_slurm_step_starts_a_cluster_from_its_variables_alone():
  # Two tasks, one per node (both nodes are this machine, reached as localhost).
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _PROBE], cwd=ROOT, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=dict(_env(4), SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_PROCID=str(i),
               SLURM_LOCALID="0", SLURM_STEP_NODELIST="localhost,node2",
               SLURM_STEP_NUM_NODES="2", JAX_COORDINATOR_PORT=str(port))) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  got = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    # Gloo's C++ logging shares stdout and once landed on the same line right
    # after the object: read the object and ignore what follows it.
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    got.append(json.JSONDecoder().raw_decode(line)[0])
  assert [(g["index"], g["count"], g["devices"], g["ids"]) for g in got] == \
      [(0, 2, 8, [0, 1]), (1, 2, 8, [0, 1])]
  assert got[1]["line"] == f"process 1 of 2 from the SLURM job step, coordinator localhost:{port}"
  # One task per node keeps every device: jax's own SLURM detection, which
  # would pin each task to GPU SLURM_LOCALID, stayed off.
  assert [g["visible"] for g in got] == ["all", "all"]
  assert f"distributed: {got[0]['line']}" in outs[0][0]  # Printed by process 0 only.
  assert "distributed:" not in outs[1][0]


@pytest.mark.slow
def test_the_trainer_rejects_partial_flags_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "qtrain.train", "--config=configs/default.py:smoke",
       f"--workdir={tmp_path / 'run'}", f"--config.data.dir={DATA}", "--num_processes=2"],
      cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --num_processes=2 given without --process_id; pass each process its own "
      "--process_id in 0..1"]
  assert not (tmp_path / "run").exists()  # Refused before anything ran.


# The smoke model on a mesh whose batch (and every weight) is split over both
# processes: each holds 4 of the 8 fsdp shards.
MESH = ("--config.mesh.data=1", "--config.mesh.fsdp=8")
STEPS = 6


def _config(workdir):
  return ["--config=configs/default.py:smoke", f"--workdir={workdir}",
          f"--config.data.dir={DATA}", f"--config.train.steps={STEPS}",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=100",
          "--config.train.sample_tokens=4", *MESH]


def _env(devices: int) -> dict:
  """This machine's environment without the cluster variables a CI runner may
  carry (they would start a cluster of their own)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONUNBUFFERED="1")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _finish(procs, timeout=600) -> list[types.SimpleNamespace]:
  outs = [p.communicate(timeout=timeout) for p in procs]
  done = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"rc={p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    lines = [l for l in out.splitlines() if l.startswith("summary: ")]
    done.append(types.SimpleNamespace(out=out, err=err,
                                      summary=json.loads(lines[-1][len("summary: "):])))
  return done


def _worker(*args, env):
  return subprocess.Popen([sys.executable, "tests/multiprocess_worker.py", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(workdir, tag, term_at=None):
  """Both processes of the worker (4 CPU devices each); each logs the batches
  it draws to ``workdir/<tag>_batches<i>.log``."""
  port = _free_port()
  return _finish([_worker(
      *_config(workdir), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      f"--process_id={i}", f"--batch_log={workdir}/{tag}_batches{i}.log",
      *([f"--term_at={term_at}"] if term_at and i == 1 else []), env=_env(4))
                  for i in range(2)])


def _rows(workdir) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checksums(path) -> list[int]:
  return [int(l) for l in path.read_text().split()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One preempted-and-resumed two-process run and its one-process reference.

  Process 1 alone is signalled while drawing its 3rd batch; both processes
  must save step 4 and stop, then resume to step 6. The reference is one
  process with 8 devices on the same mesh, fed the same global batches (the
  two processes' local batches concatenated in shard order), uninterrupted.
  """
  two, ref = tmp_path_factory.mktemp("two") / "run", tmp_path_factory.mktemp("one") / "run"
  two.mkdir()
  first = _two_processes(two, "first", term_at=3)
  after_first = types.SimpleNamespace(
      steps=sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()),
      rows=_rows(two))
  second = _two_processes(two, "second")
  # No end-of-run sample for the reference: nothing reads it, and decoding
  # compiles programs of its own.
  (reference,) = _finish([_worker(*_config(ref), "--concat_shards=2",
                                  "--config.train.sample_tokens=0", env=_env(8))])
  return types.SimpleNamespace(two=two, ref=ref, first=first, after_first=after_first,
                               second=second, reference=reference)


@pytest.mark.slow
def test_sigterm_to_one_process_leaves_both_saved_at_the_same_step(runs):
  assert [(r.summary["preempted"], r.summary["step"]) for r in runs.first] == [(True, 4)] * 2
  assert runs.after_first.steps == [2, 4]  # Step 4 saved early (forced), nothing after it.
  # Each process drew exactly the batches of steps 1..4: none trained on alone.
  assert [len(_checksums(runs.two / f"first_batches{i}.log")) for i in range(2)] == [4, 4]
  # Both processes wrote their own iterator position into step 4.
  saved = runs.two / "checkpoints" / "4" / "data"
  states = [json.loads((saved / f"process_{i}-of-2.json").read_text()) for i in range(2)]
  assert sorted(s["pipeline"]["process_index"] for s in states) == [0, 1]
  assert [(r.summary["preempted"], r.summary["step"]) for r in runs.second] == [(False, 6)] * 2


@pytest.mark.slow
def test_each_process_resumes_its_own_data_position(runs):
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  saved = runs.two / "checkpoints" / "4" / "data"
  for i in range(2):
    shard = json.loads((saved / f"process_{i}-of-2.json").read_text())["pipeline"]
    fresh = loader.make_train_iterator(DATA, seq_len=shard["seq_len"],
                                       global_batch_size=shard["global_batch_size"],
                                       seed=shard["seed"], process_index=shard["process_index"],
                                       process_count=2)
    expected = [zlib.crc32(next(fresh)["inputs"].tobytes()) for _ in range(STEPS)]
    drawn = [*_checksums(runs.two / f"first_batches{i}.log"),
             *_checksums(runs.two / f"second_batches{i}.log")]
    assert drawn == expected, i  # Batches 1..4, then 5..6 after the restart.
  assert (_checksums(runs.two / "first_batches0.log")
          != _checksums(runs.two / "first_batches1.log"))


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_the_same_mesh(runs):
  train = lambda w: {r["step"]: r["loss"] for r in _rows(w) if "loss" in r}
  held_out = lambda w: {r["step"]: r["eval_loss"] for r in _rows(w) if "eval_loss" in r}
  two, one = train(runs.two), train(runs.ref)
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  # Same program, same batches, same mesh; only the collectives differ (gloo
  # between processes vs. XLA's in-process CPU ones) and may sum partial
  # results in another order: float32 rounding. Seen: at most 1 ulp of the
  # loss (1.2e-7 relative) after 6 AdamW steps; 1e-6 leaves 8x headroom. A
  # wrong batch, shard or resumed state moves the loss by more than 1e-3.
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-6, abs=0), step
  assert sorted(held_out(runs.two)) == sorted(held_out(runs.ref)) == [0, STEPS]
  for step, nll in held_out(runs.ref).items():
    assert held_out(runs.two)[step] == pytest.approx(nll, rel=1e-6, abs=0), step


@pytest.mark.slow
def test_only_process_0_writes_logs_metrics_and_the_sample(runs):
  # One row per step (two writers would duplicate them): 0..4 from the first
  # run, then the resumed run's rows after step 4.
  steps = [r["step"] for r in _rows(runs.two) if "loss" in r]
  assert steps == list(range(1, STEPS + 1))
  assert [r["step"] for r in runs.after_first.rows if "loss" in r] == [1, 2, 3, 4]
  zero, one = runs.second
  assert "distributed: process 0 of 2 from --coordinator_address" in zero.out
  assert "held-out perplexity" in zero.out and "step 6/6" in zero.err
  ours = [l for l in one.out.splitlines() if not l.startswith(("summary: ", "[Gloo]"))]
  assert ours == []  # ([Gloo] lines are the C++ library's, on every process.)
  assert "step 6/6" not in one.err and "distributed:" not in one.out
  # The end-of-run sample decodes all-gathered params on process 0 only.
  assert isinstance(zero.summary["sample"], str) and "sample" not in one.summary
