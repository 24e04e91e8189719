"""scripts/launch_tpu.py: every gcloud command, against golden dry runs.

The golden files (tests/golden/launch_tpu/*.txt) are the exact dry-run
output with this checkout's path written ``<repo>``. Update them (run with
QTRAIN_UPDATE_GOLDEN=1) only when a command changed on purpose, and read the
diff: it is what a TPU slice will be told to do. A non-dry run with a fake
``gcloud`` on PATH checks that the launcher runs exactly the commands it
prints, packs the checkout, and passes the trainer's exit status on.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch_tpu.py"
GOLDEN = ROOT / "tests" / "golden" / "launch_tpu"

CASES = {
    # A multi-host v5e slice created on demand, the data copied to every worker.
    "create_v5e_with_data": [
        "--name=qt-v5e16", "--zone=us-west4-a", "--accelerator_type=v5litepod-16",
        "--config=configs/default.py", "--workdir=/mnt/shared/runs/v5e", "--data=data/kjv",
        "--config.optim.lr=3e-4", "--config.mesh.fsdp=-1"],
    # Queued spot capacity in a project, an env var, deleted at the end.
    "queued_spot_v4_delete": [
        "--name=qt-v4", "--zone=us-central2-b", "--project=my-proj",
        "--accelerator_type=v4-32", "--queued", "--spot", "--delete",
        "--config=configs/default.py:smoke", "--workdir=/mnt/nfs/r1",
        "--env=TPU_STDERR_LOG_LEVEL=0"],
    # A slice that exists, started detached; and deleting one.
    "existing_no_follow": [
        "--name=qt-v6e", "--zone=europe-west4-a", "--existing", "--no_follow",
        "--config=configs/default.py", "--workdir=/mnt/shared/runs/v6e", "--python=3.12"],
    "delete_only": ["--name=qt-v4", "--zone=us-central2-b", "--queued", "--delete"],
}


def _run(*args, env=None):
  return subprocess.run([sys.executable, str(LAUNCH), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60, env=env)


def _dry(name: str) -> str:
  proc = _run(*CASES[name], "--dry-run")
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  return proc.stdout.replace(str(ROOT), "<repo>")


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_prints_the_golden_commands(name):
  path = GOLDEN / f"{name}.txt"
  got = _dry(name)
  if os.environ.get("QTRAIN_UPDATE_GOLDEN") == "1":
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(got)
  assert got == path.read_text(), f"dry run of {name} changed; see the module docstring"


def test_the_trainer_runs_on_every_worker_without_distributed_flags():
  commands = [shlex.split(l) for l in _dry("create_v5e_with_data").splitlines()
              if not l.startswith("#")]
  start = next(c for c in commands if "--worker=all" in c and "nohup" in " ".join(c))
  remote = next(a for a in start if a.startswith("--command="))[len("--command="):]
  run = shlex.split(remote)[7]  # cd ~/qtrain && nohup setsid bash -c RUN > LOG ...
  trainer = shlex.split(run.split("; echo ")[0])
  assert trainer[:3] == ["../qtrain-venv/bin/python", "-m", "qtrain.train"]
  # jax.distributed.initialize() finds the pod itself (distributed.py's TPU branch).
  assert not any(a.startswith(("--coordinator", "--num_processes", "--process_id"))
                 for a in trainer)
  assert trainer[3:] == ["--config=configs/default.py", "--workdir=/mnt/shared/runs/v5e",
                         "--config.data.dir=../qtrain-data/kjv", "--config.optim.lr=3e-4",
                         "--config.mesh.fsdp=-1"]


@pytest.mark.parametrize("args, message", [
    (["--zone=z"], "the following arguments are required: --name"),
    (["--name=Bad_Name", "--zone=z", "--delete"], "--name='Bad_Name' must be lower-case"),
    (["--name=a", "--zone=z", "--config=configs/default.py"], "--config and --workdir are "
     "needed"),
    (["--name=a", "--zone=z", "--config=configs/default.py", "--workdir=w"],
     "--accelerator_type is needed to create the slice"),
    (["--name=a", "--zone=z", "--accelerator_type=v9-8", "--config=configs/default.py",
      "--workdir=w"], "--accelerator_type=v9-8 has no default runtime; pass --version"),
    (["--name=a", "--zone=z", "--existing", "--config=configs/nope.py", "--workdir=w"],
     "--config=configs/nope.py: no such file"),
    (["--name=a", "--zone=z", "--existing", "--config=/etc/hostname", "--workdir=w"],
     "--config=/etc/hostname is outside"),
    (["--name=a", "--zone=z", "--existing", "--config=configs/default.py", "--workdir=w",
      "--delete", "--no_follow"], "--delete waits for the run's end"),
    (["--name=a", "--zone=z", "--delete", "--data=data/kjv"], "--delete alone deletes"),
    (["--name=a", "--zone=z", "--existing", "--config=configs/default.py", "--workdir=w",
      "--lr=3"], "unrecognized arguments: --lr=3"),
    (["--name=a", "--zone=z", "--existing", "--config=configs/default.py", "--workdir=w",
      "--env=1X=2"], "--env='1X=2' must be KEY=VALUE"),
])
def test_wrong_arguments_fail_in_one_line(args, message):
  proc = _run(*args, "--dry-run")
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {message}"), \
      proc.stderr


_FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
  print("ACTIVE")
if "--worker=0" in sys.argv:  # Following worker 0's log: the trainer failed with 3.
  sys.exit(3)
"""


def test_a_real_launch_runs_what_the_dry_run_prints(tmp_path):
  name = "queued_spot_v4_delete"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(_FAKE_GCLOUD)
  fake.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", GCLOUD_LOG=str(log))
  proc = _run(*CASES[name], env=env)
  # The trainer's status comes back, and the slice is deleted all the same.
  assert proc.returncode == 3, proc.stderr
  ran = [json.loads(l) for l in log.read_text().splitlines()]
  printed = [shlex.split(l)[1:] for l in _dry(name).replace("<repo>", str(ROOT)).splitlines()
             if l.startswith("gcloud ")]
  assert ran == printed
  assert ran[-1][:4] == ["compute", "tpus", "queued-resources", "delete"]
  try:
    with tarfile.open("/tmp/qtrain-qt-v4.tar.gz") as tar:
      names = set(tar.getnames())
  finally:
    os.remove("/tmp/qtrain-qt-v4.tar.gz")
  assert {"qtrain/train/__main__.py", "setup.cfg", "configs/default.py"} <= names
  assert not any(n.startswith((".venv/", "data/", "runs/")) for n in names)  # Ignored.
