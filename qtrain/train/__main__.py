"""Entry point.

  python -m qtrain.train --config=configs/default.py --workdir=runs/NAME \
      [--config.optim.lr=3e-4 ...]

Several processes (one per host, or per GPU): under ``srun`` or on a TPU pod
nothing more is needed; elsewhere give every process the same coordinator
and its own id (``qtrain.parallel.distributed`` says how each is detected):

  python -m qtrain.train ... --coordinator_address=10.0.0.1:1234 \
      --num_processes=2 --process_id=0   # and =1 on the other host

Expected mistakes (a misspelt override, a config the workdir's checkpoints
cannot take, missing or damaged data, a corrupt metrics.jsonl) end in one
line naming the field or file and the fix, with exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TB.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, the same on every process "
    "(multi-process runs without SLURM or a TPU pod).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process: 0..num_processes-1.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Devices this process uses (e.g. 0,1); default: all it sees, "
    "or one per task when SLURM puts several tasks on a node.")


def fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with ml_collections' errors for ``--config`` and its
  overrides (raised while parsing, before ``main``) turned into one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    from qtrain.config import ConfigError, check_override  # pylint: disable=g-import-not-at-top
    from qtrain.train.errors import one_line  # pylint: disable=g-import-not-at-top
    for arg in argv[1:]:
      if arg.startswith("--config."):
        try:
          check_override(arg[len("--config."):].split("=", 1)[0])
        except ConfigError as c:
          fail(str(c))
    fail(one_line(e))


def _local_device_ids() -> list[int] | None:
  if _LOCAL_DEVICE_IDS.value is None:
    return None
  try:
    return [int(i) for i in _LOCAL_DEVICE_IDS.value]
  except ValueError:
    fail(f"--local_device_ids={','.join(_LOCAL_DEVICE_IDS.value)} must be device numbers, "
         "e.g. --local_device_ids=0,1")


def train(cfg, workdir: str, prepare=None) -> None:
  """Runs ``cfg`` in ``workdir`` (multi-process start-up first) and prints the
  result; an expected mistake ends in one line and exit status 2. ``prepare(cfg)``,
  when given, runs after the start-up and before training: work that touches
  devices and may still fill the config (RoSTE's rotation choice)."""
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO.
  from qtrain.parallel import distributed  # pylint: disable=g-import-not-at-top
  from qtrain.train.errors import EXPECTED, one_line  # pylint: disable=g-import-not-at-top
  try:  # Before anything touches a device (importing touches none).
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _local_device_ids())
  except distributed.DistributedError as e:
    fail(one_line(e))
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  try:
    if prepare is not None:
      prepare(cfg)
    summary = run(cfg, workdir)
  except EXPECTED as e:
    fail(one_line(e))
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:  # Process 0 speaks for the run.
    return
  if summary["preempted"]:
    print(f"preempted at step {summary['step']}; checkpoint saved, rerun to resume")
    return
  print(held_out_line(summary, scored_prompted(cfg.data.dir)))
  if "sample" in summary:
    print(f"sample: {summary['sample']!r}")


def scored_prompted(data_dir: str) -> bool:
  """Whether the held-out split scores responses only (SFT data with a loss mask)."""
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  split = loader.read_meta(data_dir)["splits"].get("validation", {})
  return bool(split.get("loss_mask"))


def held_out_line(summary: dict, prompted: bool = False) -> str:
  """"held-out [response] perplexity: initial A -> final B (unigram U), loss L"."""
  import math  # pylint: disable=g-import-not-at-top
  what = "held-out response" if prompted else "held-out"
  final, init, uni = summary["final_ppl"], summary.get("initial_ppl"), summary.get("unigram_ppl")
  line = (f"{what} perplexity: initial {init:.2f} -> final {final:.2f}" if init else
          f"{what} perplexity: final {final:.2f}")
  if uni and not prompted:  # The unigram baseline of SFT data counts responses only too.
    line += f" (unigram {uni:.2f})"
  return line + f", {'response ' if prompted else ''}loss {math.log(final):.4f}"


def main(argv):
  del argv
  train(CONFIG.value, WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
