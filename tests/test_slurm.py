"""SLURM: the job script scripts/slurm/launch.py fills, and a real one-node
cluster running it (``make test-slurm``, scripts/slurm/local_cluster.sh).

The cluster test needs SLURM's daemons and a minute; it runs with
QTRAIN_TEST_SLURM=1 (the script installs slurm-wlm and munge with apt-get as
root, or says what it needs) and is skipped otherwise, also where ``sbatch``
is on PATH: CI's .ci/run runs the same script (``make test-slurm``) right
after ``make test``, and inside ``make test`` it was the suite's slowest
test (66 s) run twice.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "slurm" / "launch.py"
DATA = pathlib.Path(os.environ.get("QTRAIN_TEST_DATA", ROOT / "data" / "kjv"))


def _launch(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(LAUNCH), *args], cwd=cwd, capture_output=True,
                        text=True, timeout=60)


def _sbatch_options(script: str) -> dict:
  return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))


def test_one_process_per_gpu_on_two_nodes(tmp_path):
  proc = _launch("--config=configs/default.py", f"--workdir={tmp_path}/run", "--nodes=2",
                 "--gpus_per_node=8", "--per=gpu", "--time=04:00:00", "--partition=gpu",
                 "--config.optim.lr=3e-4", "--dry-run")
  assert proc.returncode == 0, proc.stderr
  script = proc.stdout
  assert _sbatch_options(script) == {
      "job-name": "qtrain-run", "nodes": "2", "ntasks-per-node": "8", "time": "04:00:00",
      "chdir": str(ROOT), "output": f"{tmp_path}/run/slurm/slurm-%j.out",
      "gpus-per-node": "8", "partition": "gpu"}
  # No addresses or ids in the script: srun's SLURM_* variables give them.
  assert "coordinator" not in script.split("set -euo pipefail")[1]
  assert "XLA_FLAGS" not in script.split("set -euo pipefail")[1]
  assert script.rstrip().endswith(
      f"srun --kill-on-bad-exit=1 {sys.executable} -m qtrain.train "
      f"--config={ROOT}/configs/default.py \\\n    --workdir={tmp_path}/run \\\n"
      "    --config.optim.lr=3e-4")
  assert not (tmp_path / "run").exists()  # A dry run writes nothing.
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # Valid bash.


def test_one_process_per_node_and_cpu_jobs(tmp_path):
  per_node = _launch("--config=configs/default.py:smoke", "--workdir=runs/x", "--nodes=4",
                     "--gpus_per_node=8", "--dry-run", cwd=tmp_path.parent)
  assert per_node.returncode == 2 and "configs/default.py does not exist" in per_node.stderr
  per_node = _launch("--config=configs/default.py:smoke", f"--workdir={tmp_path}/x",
                     "--nodes=4", "--gpus_per_node=8", "--dry-run")
  opts = _sbatch_options(per_node.stdout)
  assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"]) == ("4", "1", "8")
  assert f"--config={ROOT}/configs/default.py:smoke" in per_node.stdout  # Variant kept.
  cpu = _launch("--config=configs/default.py", f"--workdir={tmp_path}/y", "--tasks_per_node=2",
                "--cpu_devices=4", "--config.train.steps=4", "--dry-run").stdout
  opts = _sbatch_options(cpu)
  assert (opts["nodes"], opts["ntasks-per-node"]) == ("1", "2") and "gpus-per-node" not in opts
  assert ("export JAX_PLATFORMS=cpu\nexport XLA_FLAGS=--xla_force_host_platform_device_count=4"
          in cpu)


@pytest.mark.parametrize("args, message", [
    (["--per=gpu"], "--per=gpu needs --gpus_per_node=N"),
    (["--gpus_per_node=8", "--tasks_per_node=2"], "--tasks_per_node is for CPU jobs"),
    (["--nodes=0"], "--nodes=0 must be at least 1"),
    (["--time=4h"], "--time='4h' must be SLURM's"),
    (["--lr=3"], "unrecognized arguments: --lr=3 (options of the trainer's config go as"),
    (["--nodes=two"], "argument --nodes: invalid int value: 'two'"),
])
def test_wrong_options_fail_in_one_line(args, message, tmp_path):
  proc = _launch("--config=configs/default.py", f"--workdir={tmp_path}/run", *args,
                 "--dry-run")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {message}"), \
      proc.stderr


def test_quoting_survives_the_shell(tmp_path):
  # An override with shell metacharacters reaches the trainer as one argument.
  proc = _launch("--config=configs/default.py", f"--workdir={tmp_path}/run",
                 "--config.train.sample_prompt=In the beginning; $HOME", "--dry-run")
  line = proc.stdout.rstrip().splitlines()[-1].strip()
  argv = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True,
                        text=True, check=True).stdout.splitlines()
  assert argv == ["--config.train.sample_prompt=In the beginning; $HOME"]


_RUN_SLURM = os.environ.get("QTRAIN_TEST_SLURM") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not _RUN_SLURM, reason="a real cluster (a minute): `make test-slurm`, run by "
                    ".ci/run; or QTRAIN_TEST_SLURM=1")
def test_a_real_one_node_slurm_trains_two_tasks_and_one_process_resumes_them():
  env = dict(os.environ, PY=sys.executable, DATA=str(DATA))
  proc = subprocess.run([str(ROOT / "scripts" / "slurm" / "local_cluster.sh")], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # The script's own checks (each a `fail` above): the 2-process start-up,
  # both shards' data positions at step 4, the refusal without the job's
  # config.data.shards, one process resuming step 2 to the job's losses.
  for line in ("2-task job done", "one process without --config.data.shards=2 refused, naming it",
               "loss at step 4: job", "eval_loss at step 4: job", "passed"):
    assert line in proc.stdout, proc.stdout
