"""Checkpoints of the train state and the data iterator position (orbax).

Saves are asynchronous and atomic: orbax writes a step into a temporary
directory and renames it only once every array and the iterator state are on
disk, and ``CheckpointManager`` lists only finalised steps, so a run killed
mid-save resumes from the previous complete checkpoint. ``restore_or_init`` is
the one call a run starts with.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections
import orbax.checkpoint as ocp


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
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored.state, restored.data

  def restore_or_init(self, abstract_state: Any, init: Callable[[], Any]):
    """(state, data_state or None, step restored or None)."""
    step = self.latest_step()
    if step is None:
      return init(), None, None
    state, data_state = self.restore(step, abstract_state)
    return state, data_state, step

  def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Only the params of the latest (or given) complete checkpoint (orbax
    partial restore), into the given shapes and shardings; the optimizer state
    is not read, so a checkpoint stays readable when the optimizer moves on."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
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
