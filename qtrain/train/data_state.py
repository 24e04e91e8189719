"""An orbax item holding each process's data-iterator state.

orbax's ``JsonSave`` writes from the primary process only, so on several
hosts every process but the first would resume at the first one's position.
Here each process writes ``process_<i>-of-<n>.json`` (grain's orbax handler's
names) into the step's temporary directory, which orbax renames only when all
of them are done: the step stays atomic.

A position belongs to a process's share of the data
(``qtrain.parallel.data_shard``), not to a mesh: on one process, or while
the processes keep holding distinct batch rows, a run restores onto another
``config.mesh`` or device count and sees the same batches. The number of
processes must stay (each one reads every n-th document).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class ProcessCountError(ValueError):
  """The checkpoint was saved by a different number of processes."""


def _name(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


class ProcessDataHandler(ocp.CheckpointHandler):
  """Saves and restores this process's JSON-serialisable iterator state."""

  def save(self, directory: epath.Path, args: "ProcessDataSave") -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _name(jax.process_index(), jax.process_count())).write_text(
        json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "ProcessDataRestore" = None) -> Any:
    del args
    directory = epath.Path(directory)
    path = directory / _name(jax.process_index(), jax.process_count())
    if path.exists():
      return json.loads(path.read_text())
    legacy = directory / "metadata"  # A single-process checkpoint of JsonSave.
    if jax.process_count() == 1 and legacy.exists():
      return json.loads(legacy.read_text())
    saved = sorted(p.name for p in directory.glob("process_*.json"))
    counts = sorted({int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in saved})
    if counts and jax.process_count() not in counts:
      raise ProcessCountError(
          f"the data positions in {directory} were saved by "
          f"{' or '.join(map(str, counts))} processes ({', '.join(saved)}), this run has "
          f"{jax.process_count()}: each process resumes its own position in its own share "
          f"of the data, so resume with {counts[-1]} processes (the devices per process and "
          "config.mesh may change)")
    raise FileNotFoundError(f"{path} is missing")

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class ProcessDataSave(ocp.args.CheckpointArgs):
  state: dict


@ocp.args.register_with_handler(ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class ProcessDataRestore(ocp.args.CheckpointArgs):
  pass
