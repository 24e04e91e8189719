"""An orbax item holding the data-iterator state of every shard of the stream.

The train stream is cut into S fixed shards (``config.data.shards``,
``qtrain/data/loader.py``); each process owns S / n consecutive ones. Every
process writes its shards' states, shard s of S as ``process_<s>-of-<S>.json``
(grain's orbax handler's name for process s of S: with one shard per process,
the default, a shard is a process's share, and checkpoints written before
shards existed read as S = their process count), into the step's temporary
directory, which orbax renames only when all of them are done: the step stays
atomic. orbax's ``JsonSave`` would write from the primary process only.

A restore reads the shards this process owns now, so a checkpoint resumes on
any number of processes dividing S with the same global batches, and onto
another ``config.mesh`` or device count. S itself must stay: on another
process count, set ``config.data.shards`` = S (its default 0 means one shard
per process now). A checkpoint of other shards is refused with
``ShardCountError`` (or start again from its params with
``config.train.init_from``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from qtrain.data.loader import join_shard_states, shard_states


class ShardCountError(ValueError):
  """The checkpoint holds the positions of another number of shards."""


def _name(shard: int, shards: int) -> str:
  return f"process_{shard}-of-{shards}.json"


def _write(path: epath.Path, text: str) -> None:
  # Processes holding the same batch rows (a tensor axis across hosts) own the
  # same shards and write the same file: each renames its own temporary file.
  tmp = path.parent / f".{path.name}.{jax.process_index()}.{os.getpid()}.tmp"
  tmp.write_text(text)
  tmp.rename(path)


class ProcessDataHandler(ocp.CheckpointHandler):
  """Saves this process's shards' JSON iterator states; restores the shards
  asked for."""

  def save(self, directory: epath.Path, args: "ProcessDataSave") -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not args.state:  # No iterator (an imported checkpoint, a test's state): this process's {}.
      _write(directory / _name(jax.process_index(), jax.process_count()), json.dumps({}))
      return
    for state in shard_states(args.state):
      p = state["pipeline"]
      _write(directory / _name(p["process_index"], p["process_count"]), json.dumps(state))

  def restore(self, directory: epath.Path, args: "ProcessDataRestore" = None) -> Any:
    args = args or ProcessDataRestore()
    directory = epath.Path(directory)
    owned, shards = args.owned(), args.count()
    paths = [directory / _name(s, shards) for s in owned]
    if all(p.exists() for p in paths):
      return join_shard_states([json.loads(p.read_text()) for p in paths])
    legacy = directory / "metadata"  # A single-process checkpoint of JsonSave.
    if shards == 1 and legacy.exists():
      return json.loads(legacy.read_text())
    saved = sorted(p.name for p in directory.glob("process_*.json"))
    counts = sorted({int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in saved})
    if counts and shards not in counts:
      raise ShardCountError(
          f"the data positions in {directory} were saved by {' or '.join(map(str, counts))} "
          f"processes or shards ({', '.join(saved)}), this run has {jax.process_count()} "
          f"process(es) and config.data.shards={args.configured} ({shards} shards): resume "
          f"with {counts[-1]} processes, or on any process count dividing {counts[-1]} with "
          f"--config.data.shards={counts[-1]} (the same batches)")
    raise FileNotFoundError(f"{[str(p) for p in paths if not p.exists()]} missing")

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class ProcessDataSave(ocp.args.CheckpointArgs):
  state: dict  # The process iterator's state: one shard's, or {"shards": [...]}.


@ocp.args.register_with_handler(ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class ProcessDataRestore(ocp.args.CheckpointArgs):
  """Which shards to read: ``first`` .. ``first + n - 1`` of ``shards``;
  by default (None) this process's one shard of jax.process_count()."""
  first: int | None = None
  n: int = 1
  shards: int | None = None
  configured: int = 0  # config.data.shards, for the message of a mismatch.

  def owned(self) -> range:
    first = jax.process_index() if self.first is None else self.first
    return range(first, first + self.n)

  def count(self) -> int:
    return jax.process_count() if self.shards is None else self.shards
