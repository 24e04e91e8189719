"""Progress on the console: a tqdm bar on a terminal, plain lines elsewhere.

Redrawn bars turn SLURM logs and ``> log`` files into walls of carriage
returns; when stderr is not a terminal each log interval prints one line
instead. Only process 0 prints.
"""

from __future__ import annotations

import sys

import jax
import tqdm


class Progress:
  """``update`` per finished step, ``log`` per log interval, ``write`` for notes."""

  def __init__(self, total: int, initial: int, *, stream=None):
    self.stream = stream or sys.stderr
    self.enabled = jax.process_index() == 0
    self.total = total
    self.bar = None
    if self.enabled and self.stream.isatty():
      self.bar = tqdm.tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                           file=self.stream)

  def update(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def log(self, step: int, fields: dict) -> None:
    """``fields``: short name -> already formatted value."""
    if self.bar is not None:
      self.bar.set_postfix(fields, refresh=False)
    elif self.enabled:
      print(f"step {step}/{self.total}: " + ", ".join(f"{k} {v}" for k, v in fields.items()),
            file=self.stream, flush=True)

  def write(self, msg: str) -> None:
    if self.bar is not None:
      self.bar.write(msg)
    elif self.enabled:
      print(msg, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
