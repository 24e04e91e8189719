"""An orbax item holding each process's data-iterator state.

orbax's ``JsonSave`` writes from the primary process only, so on several
hosts every process but the first would resume at the first one's position.
Here each process writes ``process_<i>-of-<n>.json`` (grain's orbax handler's
names) into the step's temporary directory, which orbax renames only when all
of them are done: the step stays atomic.
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
    if saved and not any(n.endswith(f"-of-{jax.process_count()}.json") for n in saved):
      raise ProcessCountError(
          f"{directory} holds the data positions of another number of processes ({saved}); "
          f"this run has {jax.process_count()}: resume with the number that saved it")
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
