"""Checkpoints of the train state and the data iterator positions (orbax).

Saves are asynchronous and atomic: orbax writes a step into a temporary
directory and renames it only once every array and every process's iterator
state are on disk, and ``CheckpointManager`` lists only finalised steps, so a
run killed mid-save resumes from the previous complete checkpoint. Each
process saves its data shards' iterator states and restores those it owns now
(``data/process_<s>-of-<S>.json``: ``qtrain/train/data_state.py``), so a run
resumes on any process count dividing ``config.data.shards``. A
damaged step (a file deleted inside it) is moved aside and the previous intact
one restored. ``restore_or_init`` is the one call a run starts with.

Arrays are saved with their global shapes and restored into the shardings of
the target (``qtrain.train.state.abstract_state`` on the current mesh), so a
checkpoint restores onto another ``config.mesh`` or device count
(tests/test_remesh.py); a target without shardings would restore onto the
saving mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from qtrain.config import ConfigError
from qtrain.train.data_state import ProcessDataRestore, ProcessDataSave, ShardCountError
from qtrain.train.state import TrainState


class CheckpointError(ValueError):
  """No intact checkpoint, or not the one asked for; the message says which."""


class DataShardsError(CheckpointError, ConfigError):
  """The checkpoint's data shards cannot be read with this config.data.shards
  and process count: a config error (the field names the fix) about this
  checkpoint."""


class Checkpointer:
  """An orbax CheckpointManager holding items ``state`` and ``data``."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts an async save of (state, iterator state) at ``step``."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(_item(state)),
                              data=ProcessDataSave(data_state))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any,
              data: ProcessDataRestore | None = None) -> tuple[Any, dict]:
    """(state, data_state): ``data`` says which data shards to read (by
    default this process's one shard of jax.process_count())."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_item(abstract_state)),
                              data=data or ProcessDataRestore())
    restored = self.manager.restore(step, args=args)
    if isinstance(abstract_state, TrainState):
      return abstract_state.replace(**restored.state), restored.data
    return restored.state, restored.data

  def restore_or_init(self, abstract_state: Any, init: Callable[[], Any],
                      data: ProcessDataRestore | None = None):
    """(state, data_state or None, step restored or None).

    Tries the newest step first; a damaged one (orbax and tensorstore raise
    many error types for a missing or corrupt file, hence the broad except)
    is reported, moved aside to ``<step>.damaged`` and the next older tried.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state, data)
      except ShardCountError as e:
        raise DataShardsError(
            f"{e}; or start a new run from these params with "
            f"--config.train.init_from={os.path.dirname(self.directory)}") from None
      except Exception as e:  # pylint: disable=broad-except
        print(f"warning: checkpoint step {step} in {self.directory} is damaged "
              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
              "trying the previous one", flush=True)
        damaged.append(step)
        continue
      self._set_aside(damaged)
      return state, data_state, step
    if damaged:
      raise CheckpointError(
          f"no intact checkpoint under {self.directory}: steps {damaged} are damaged; "
          "move them away to start from scratch, or train in a new workdir")
    return init(), None, None

  def _set_aside(self, steps) -> None:
    """Renames damaged steps to ``<step>.damaged`` (kept for a look, ignored by
    orbax), so new saves of those steps do not collide with them."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.damaged", 1
        while os.path.exists(dst):
          dst, n = f"{src}.damaged{n}", n + 1
        os.rename(src, dst)
        print(f"warning: moved damaged checkpoint step {step} to {dst}", flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("qtrain_checkpoint_set_aside")
    self.manager.reload()

  def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Only the params of the latest (or given) complete checkpoint (orbax
    partial restore), into the given shapes and shardings; the optimizer state
    is not read, so a checkpoint stays readable when the optimizer moves on."""
    steps = self.manager.all_steps()
    if not steps:
      raise CheckpointError(f"no complete checkpoint under {self.directory}")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} under {self.directory}; "
                            f"it has steps {sorted(steps)}")
    item = {"params": abstract_params}
    path = os.path.join(self.directory, str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    return restored["params"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _item(state: Any) -> Any:
  """What a checkpoint holds for ``state``: a TrainState as the dict of its
  fields, less ``amax`` where it is empty (no delayed fp8 scaling), so runs
  without delayed scaling keep the layout of checkpoints written before the
  field existed, and those checkpoints still restore."""
  if not isinstance(state, TrainState):
    return state
  item = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  if not item["amax"]:
    del item["amax"]
  return item


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ``config.json`` a training run wrote into its workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: the directory must be a training run's workdir")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, abstract_params: Any, step: int | None = None):
  """(params, step) from the checkpoints of another run's ``workdir``."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory; "
                            "point it at a training run's workdir")
  ckpt = Checkpointer(directory, keep=1, async_save=False)
  try:
    return ckpt.restore_params(abstract_params, step)
  finally:
    ckpt.close()
