"""Starts a qtrain config on a Cloud TPU VM slice (one or many hosts) with gcloud.

  python scripts/launch_tpu.py --name=qt-v5e16 --zone=us-west4-a \
      --accelerator_type=v5litepod-16 --config=configs/default.py \
      --workdir=/mnt/shared/runs/NAME --data=data/kjv [--queued] [--spot] [--delete] \
      [--config.optim.lr=3e-4 ...]
  python scripts/launch_tpu.py ... --dry-run        # print every command, run none
  python scripts/launch_tpu.py --name=qt-v5e16 --zone=us-west4-a --delete   # only delete

In order:
1. create the slice (``tpu-vm create``, or ``queued-resources create`` with
   ``--queued``, then wait until it is ACTIVE); ``--existing`` skips this;
2. pack this checkout (``git ls-files``: tracked and untracked, not ignored
   files), copy it to every worker (``--worker=all``) and install it there
   with ``jax[tpu]`` in a venv (``~/qtrain-venv``, uv); copy ``--data`` (a
   prepared token directory) too;
3. start ``python -m qtrain.train`` on every worker, detached (a dropped SSH
   session does not stop the run), its output in ``~/qtrain-logs/<run>.log``.
   No distributed flags: on a TPU VM qtrain.parallel.distributed leaves the
   pod to ``jax.distributed.initialize()``, which finds the workers, their ids
   and the coordinator itself (GCE metadata);
4. stream worker 0's log (process 0 speaks for the run) until the trainer
   exits, and exit with its status; ``--no_follow`` returns at once;
5. with ``--delete``, delete the slice (and its queued resource) at the end.

The workdir must be a path every worker sees (an NFS/Filestore or gcsfuse
mount): the hosts write one checkpoint together. Argument errors end in one
line, exit status 2; a failing command stops the launch with its status.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# Runtime (software) versions per TPU generation, from Cloud TPU's docs.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
EXIT_LINE = "qtrain: exit status "
VENV = "qtrain-venv"  # In each worker's home, beside the checkout ~/qtrain.
POLL_S = 30


class UsageError(ValueError):
  """A wrong option; one line, exit status 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(options, the ``--config.x=y`` overrides handed to the trainer)."""
  p = _Parser(prog="launch_tpu.py")
  p.add_argument("--name", required=True, help="The TPU (and queued resource) name.")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None, help="Default: gcloud's configured project.")
  p.add_argument("--accelerator_type", default=None, help="e.g. v4-32, v5litepod-16.")
  p.add_argument("--version", default=None,
                 help="TPU runtime; default by generation (" +
                 ", ".join(f"{k}: {v}" for k, v in RUNTIMES.items()) + ").")
  p.add_argument("--queued", action="store_true", help="Create through queued resources.")
  p.add_argument("--spot", action="store_true", help="Spot capacity.")
  p.add_argument("--existing", action="store_true", help="The slice exists: do not create it.")
  p.add_argument("--config", default=None, help="Config file inside this repository.")
  p.add_argument("--workdir", default=None, help="The run's workdir, on a shared mount.")
  p.add_argument("--data", default=None,
                 help="A prepared data directory to copy to every worker (sets "
                 "--config.data.dir); default: the config's, already on the workers.")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="An environment variable of the trainer on every worker (repeatable).")
  p.add_argument("--jax", default="jax[tpu]", help="pip requirement for jax on the workers.")
  p.add_argument("--python", default="3.11", help="Python version of the workers' venv.")
  p.add_argument("--no_follow", action="store_true", help="Do not stream the log.")
  p.add_argument("--delete", action="store_true",
                 help="Delete the slice when the run ends; alone: only delete it.")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="Print every command; run none.")
  args, rest = p.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (options of the trainer's "
                     "config go as --config.FIELD=VALUE)")
  _check(args, rest)
  return args, rest


def _check(args, overrides) -> None:
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name):
    raise UsageError(f"--name={args.name!r} must be lower-case letters, digits and '-', "
                     "starting with a letter")
  for e in args.env:
    if not re.fullmatch(r"[A-Za-z_]\w*=.*", e):
      raise UsageError(f"--env={e!r} must be KEY=VALUE")
  only_delete = args.delete and args.config is None and args.workdir is None
  if only_delete:
    if overrides or args.data or args.existing:
      raise UsageError("--delete alone deletes the slice; it takes no run options")
    return
  if args.config is None or args.workdir is None:
    raise UsageError("--config and --workdir are needed to start a run (or --delete alone to "
                     "delete the slice)")
  if args.delete and args.no_follow:
    raise UsageError("--delete waits for the run's end, which --no_follow skips; delete later "
                     "with --name=... --zone=... --delete")
  if not args.existing:
    if args.accelerator_type is None:
      raise UsageError("--accelerator_type is needed to create the slice (e.g. v5litepod-16), "
                       "or --existing to use one that exists")
    if args.version is None and _generation(args.accelerator_type) not in RUNTIMES:
      raise UsageError(f"--accelerator_type={args.accelerator_type} has no default runtime; "
                       "pass --version=<TPU runtime>")
  _repo_path(args.config.partition(":")[0], "--config")
  if args.data is not None and not os.path.isdir(args.data):
    raise UsageError(f"--data={args.data} is not a directory")


def _generation(accelerator_type: str) -> str:
  return accelerator_type.rsplit("-", 1)[0]


def _repo_path(path: str, flag: str) -> str:
  """``path`` relative to the repository (the workers hold a copy of it)."""
  full = os.path.abspath(path)
  if not os.path.isfile(full):
    raise UsageError(f"{flag}={path}: no such file")
  rel = os.path.relpath(full, REPO)
  if rel.startswith(".."):
    raise UsageError(f"{flag}={path} is outside {REPO}: the workers get a copy of the "
                     "repository, so put the config inside it")
  return rel


def _gcloud(args, *words) -> list[str]:
  project = [f"--project={args.project}"] if args.project else []
  return ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}", *project]


def _ssh(args, command: str, worker: str = "all") -> list[str]:
  return _gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}", f"--command={command}")


def create(args) -> list[list[str]]:
  version = args.version or RUNTIMES[_generation(args.accelerator_type)]
  spot = ["--spot"] if args.spot else []
  if args.queued:
    return [_gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                    f"--accelerator-type={args.accelerator_type}",
                    f"--runtime-version={version}", *spot)]
  return [_gcloud(args, "tpu-vm", "create", args.name,
                  f"--accelerator-type={args.accelerator_type}", f"--version={version}", *spot)]


def describe_queued(args) -> list[str]:
  return _gcloud(args, "queued-resources", "describe", args.name, "--format=value(state.state)")


def tarball(args) -> str:
  return f"/tmp/qtrain-{args.name}.tar.gz"


def install(args) -> list[list[str]]:
  """Copy the checkout (and data) to every worker and install it in a venv:
  TPU runtimes ship Ubuntu 22.04's Python 3.10, qtrain needs 3.11+, so uv
  fetches ``--python``."""
  data = f" ~/qtrain-data/{os.path.basename(os.path.normpath(args.data))}" if args.data else ""
  setup = ("set -e; cd ~; rm -rf ~/qtrain" + data + "; "
           "mkdir -p ~/qtrain ~/qtrain-data ~/qtrain-logs; tar -xzf qtrain.tar.gz -C qtrain; "
           "python3 -m pip install -q -U uv; "
           f"python3 -m uv venv -q --allow-existing --python {shlex.quote(args.python)} {VENV}; "
           f"python3 -m uv pip install -q --python {VENV}/bin/python -e ./qtrain "
           f"{shlex.quote(args.jax)}")
  cmds = [_gcloud(args, "tpu-vm", "scp", tarball(args), f"{args.name}:qtrain.tar.gz",
                  "--worker=all"),
          _ssh(args, setup)]
  if args.data:
    cmds.append(_gcloud(args, "tpu-vm", "scp", "--recurse", os.path.normpath(args.data),
                        f"{args.name}:qtrain-data/", "--worker=all"))
  return cmds


def log_path(args) -> str:
  return f"~/qtrain-logs/{os.path.basename(os.path.normpath(args.workdir))}.log"


def train_command(args, overrides: list[str]) -> list[str]:
  cmd = [f"../{VENV}/bin/python", "-m", "qtrain.train", f"--config={_config_arg(args.config)}",
         f"--workdir={args.workdir}"]
  if args.data:  # Relative to ~/qtrain, where the trainer runs.
    cmd.append(f"--config.data.dir=../qtrain-data/{os.path.basename(os.path.normpath(args.data))}")
  return [*(["env", *args.env] if args.env else []), *cmd, *overrides]


def _config_arg(config: str) -> str:
  path, sep, variant = config.partition(":")
  return _repo_path(path, "--config") + sep + variant


def start(args, overrides: list[str]) -> list[str]:
  """Every worker starts the trainer detached; its status ends the log."""
  run = f"{shlex.join(train_command(args, overrides))}; echo \"{EXIT_LINE}$?\""
  log = log_path(args)
  return _ssh(args, f"cd ~/qtrain && nohup setsid bash -c {shlex.quote(run)} > {log} 2>&1 "
              "< /dev/null &")


def follow(args) -> list[str]:
  """Worker 0's log until the exit line; the SSH session exits with that status."""
  log = log_path(args)
  script = (f"tail -n +1 -F {log} & t=$!; until grep -q '^{EXIT_LINE}' {log} 2>/dev/null; "
            f"do sleep 5; done; sleep 1; kill $t; "
            f"exit $(sed -n 's/^{EXIT_LINE}//p' {log} | tail -n 1)")
  return _ssh(args, script, worker="0")


def delete(args) -> list[str]:
  if args.queued:
    return _gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")
  return _gcloud(args, "tpu-vm", "delete", args.name, "--quiet")


def pack(path: str) -> int:
  """The checkout's tracked and untracked, not ignored files into ``path``."""
  names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode().split("\0")
  names = [n for n in names if n and os.path.isfile(REPO / n)]
  with tarfile.open(path, "w:gz") as tar:
    for n in names:
      tar.add(REPO / n, arcname=n)
  return len(names)


class Runner:
  """Runs (or, dry, prints) the commands; a failure stops with its status."""

  def __init__(self, dry: bool):
    self.dry = dry

  def note(self, text: str) -> None:
    print(f"# {text}", flush=True)

  def __call__(self, cmd: list[str], check: bool = True) -> int:
    print(shlex.join(cmd), flush=True)
    if self.dry:
      return 0
    status = subprocess.run(cmd, check=False).returncode
    if status and check:
      raise CommandError(cmd, status)
    return status

  def output(self, cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class CommandError(RuntimeError):

  def __init__(self, cmd, status):
    super().__init__(f"`{shlex.join(cmd[:5])} ...` failed with status {status}")
    self.status = status


def wait_active(args, run: Runner) -> None:
  cmd = describe_queued(args)
  run.note(f"every {POLL_S} s until it prints ACTIVE:")
  print(shlex.join(cmd), flush=True)
  while not run.dry:
    state = run.output(cmd)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise CommandError(cmd, f"{state} (queued resource)")
    time.sleep(POLL_S)


def launch(args, overrides: list[str], run: Runner) -> int:
  if args.config is None:  # --delete alone.
    run(delete(args))
    return 0
  try:
    if not args.existing:
      for cmd in create(args):
        run(cmd)
      if args.queued:
        wait_active(args, run)
    run.note(f"pack {REPO} (git ls-files -co --exclude-standard) into {tarball(args)}")
    if not run.dry:
      run.note(f"{pack(tarball(args))} files")
    for cmd in install(args):
      run(cmd)
    run(start(args, overrides))
    if args.no_follow:
      run.note(f"running; its log on each worker: {log_path(args)}")
      return 0
    return run(follow(args), check=False)
  finally:
    if args.delete:
      run(delete(args), check=False)


def main(argv: list[str]) -> int:
  try:
    args, overrides = parse(argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    return launch(args, overrides, Runner(args.dry_run))
  except CommandError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.status if isinstance(e.status, int) else 1
  except FileNotFoundError as e:  # No gcloud (or git) on PATH.
    print(f"error: {e.filename} is not on PATH; install the Google Cloud CLI (or --dry-run)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
