"""Submits a qtrain config to SLURM: fills scripts/slurm/qtrain.sbatch and
calls sbatch.

  python scripts/slurm/launch.py --config=configs/default.py --workdir=runs/NAME \
      --nodes=2 --gpus_per_node=8 --per=gpu --time=04:00:00 [--config.optim.lr=3e-4 ...]
  python scripts/slurm/launch.py ... --dry-run      # print the job script, submit nothing

One process per node (``--per=node``, the default) or per GPU (``--per=gpu``);
on CPU (``--gpus_per_node=0``) ``--tasks_per_node`` processes per node, each
with ``--cpu_devices`` fake devices. Every task runs ``python -m qtrain.train``
under srun, which derives ``jax.distributed``'s coordinator, process count
and ids from the step's SLURM_* variables (qtrain/parallel/distributed.py), so
the job script carries no addresses. The filled script is kept as
``WORKDIR/slurm/job.sbatch`` beside the job's log ``WORKDIR/slurm/slurm-<id>.out``.
``--wait`` blocks until the job ends and exits with its status (sbatch --wait).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = pathlib.Path(__file__).resolve().with_name("qtrain.sbatch")


class UsageError(ValueError):
  """A wrong option; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(options, the ``--config.x=y`` overrides handed to the trainer)."""
  p = _Parser(prog="launch.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="Config file (path[:variant]).")
  p.add_argument("--workdir", required=True, help="The run's workdir (shared filesystem).")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--per", choices=("node", "gpu"), default="node",
                 help="One process per node (sees all its GPUs) or per GPU.")
  p.add_argument("--gpus_per_node", type=int, default=0, help="0: a CPU job.")
  p.add_argument("--tasks_per_node", type=int, default=None,
                 help="CPU jobs only: processes per node (default 1).")
  p.add_argument("--cpu_devices", type=int, default=4,
                 help="CPU jobs: fake devices per process (XLA_FLAGS).")
  p.add_argument("--cpus_per_task", type=int, default=None)
  p.add_argument("--time", default="01:00:00", help="Wall-clock limit (sbatch --time).")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--job_name", default=None, help="Default: qtrain-<workdir's name>.")
  p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                 help="Another #SBATCH option, e.g. --sbatch=--exclusive (repeatable).")
  p.add_argument("--python", default=sys.executable,
                 help="The interpreter every task runs (default: this one).")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Print the job script; submit nothing.")
  p.add_argument("--wait", action="store_true", help="Block until the job ends (sbatch --wait).")
  args, rest = p.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (options of the trainer's "
                     "config go as --config.FIELD=VALUE)")
  _check(args)
  return args, rest


def _check(args) -> None:
  if args.nodes < 1:
    raise UsageError(f"--nodes={args.nodes} must be at least 1")
  if args.gpus_per_node < 0:
    raise UsageError(f"--gpus_per_node={args.gpus_per_node} must be 0 (CPU) or more")
  if args.gpus_per_node == 0 and args.per == "gpu":
    raise UsageError("--per=gpu needs --gpus_per_node=N (N >= 1); a CPU job takes "
                     "--tasks_per_node instead")
  if args.gpus_per_node and args.tasks_per_node is not None:
    raise UsageError("--tasks_per_node is for CPU jobs; with GPUs use --per=node (one process "
                     "per node) or --per=gpu (one per GPU)")
  if args.tasks_per_node is not None and args.tasks_per_node < 1:
    raise UsageError(f"--tasks_per_node={args.tasks_per_node} must be at least 1")
  if args.cpu_devices < 1:
    raise UsageError(f"--cpu_devices={args.cpu_devices} must be at least 1")
  if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|\d+", args.time):
    raise UsageError(f"--time={args.time!r} must be SLURM's [D-]HH:MM:SS, MM:SS or minutes")
  for name in ("workdir", "job_name", "partition", "account"):
    value = getattr(args, name)
    if value is not None and re.search(r"\s", value):  # #SBATCH lines are not shell-parsed.
      raise UsageError(f"--{name}={value!r} must not contain spaces")


def _absolute_config(config: str) -> str:
  """The config's path made absolute (the job runs in the repository), with
  its ``:variant`` kept."""
  path, sep, variant = config.partition(":")
  if not os.path.exists(path):
    raise UsageError(f"--config={config}: {path} does not exist")
  return os.path.abspath(path) + sep + variant


def fill(args, overrides: list[str]) -> str:
  """The job script: the template with every {{placeholder}} replaced."""
  workdir = os.path.abspath(args.workdir)
  gpus = args.gpus_per_node
  tasks = (gpus if args.per == "gpu" else 1) if gpus else (args.tasks_per_node or 1)
  extra = [f"--gpus-per-node={gpus}"] if gpus else []
  extra += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
  extra += [f"--partition={args.partition}"] if args.partition else []
  extra += [f"--account={args.account}"] if args.account else []
  extra += args.sbatch
  if gpus:
    device_env = "# GPU job: every task uses the GPUs SLURM gives it."
  else:  # Fake CPU devices per task; gloo collectives (chosen at start-up).
    device_env = ("export JAX_PLATFORMS=cpu\n"
                  f"export XLA_FLAGS=--xla_force_host_platform_device_count={args.cpu_devices}")
  values = {
      "job_name": args.job_name or f"qtrain-{os.path.basename(workdir.rstrip('/'))}",
      "nodes": str(args.nodes), "tasks_per_node": str(tasks), "time": args.time,
      "repo": str(REPO), "log_dir": os.path.join(workdir, "slurm"),
      "extra_sbatch": "\n".join(f"#SBATCH {o}" for o in extra),
      "device_env": device_env, "python": shlex.quote(args.python),
      "config": shlex.quote(_absolute_config(args.config)), "workdir": shlex.quote(workdir),
      "train_args": "".join(f" \\\n    {shlex.quote(o)}" for o in overrides)}
  script = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text())
  return re.sub(r"\n\n+(?=set -euo)", "\n", script)  # No blank line where no option was added.


def submit(args, script: str) -> int:
  """Writes WORKDIR/slurm/job.sbatch and runs sbatch; returns its status."""
  log_dir = os.path.join(os.path.abspath(args.workdir), "slurm")
  os.makedirs(log_dir, exist_ok=True)
  path = os.path.join(log_dir, "job.sbatch")
  with open(path, "w", encoding="utf-8") as f:
    f.write(script)
  cmd = ["sbatch", "--parsable", *(["--wait"] if args.wait else []), path]
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
  except FileNotFoundError:
    print("error: sbatch is not on PATH: run this on a SLURM login node (or --dry-run)",
          file=sys.stderr)
    return 2
  job = proc.stdout.strip().split(";")[0]
  if job:
    print(f"submitted job {job}: log {log_dir}/slurm-{job}.out", flush=True)
  return proc.returncode


def main(argv: list[str]) -> int:
  try:
    args, overrides = parse(argv)
    script = fill(args, overrides)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    print(script, end="")
    return 0
  return submit(args, script)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
