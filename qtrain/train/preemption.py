"""SIGTERM handling that every process agrees on.

A scheduler may signal one host before another, or one host only. The signal
just sets a local flag; each step the loop dispatches an all-reduce (max) of
the flags and reads it one step later (when it reads that step's metrics
anyway), so no step waits on the host and every process sees the same value
at the same step and saves the same checkpoint.
"""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qtrain.parallel import replicated


class SigtermFlag:
  """Turns SIGTERM into a flag the loop checks; installed before anything slow
  (restore, compile, first eval), so an early signal still ends cleanly."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


class Agreement:
  """The max over processes of a local flag, as a replicated device scalar."""

  def __init__(self, mesh):
    self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    self._local_devices = len(mesh.local_devices)
    self._max = jax.jit(jnp.max, out_shardings=replicated(mesh))
    self._pending = None

  def dispatch(self, flag: bool) -> jax.Array:
    """Starts the reduction of this process's ``flag`` (returns at once)."""
    local = np.full((self._local_devices,), int(flag), np.int32)
    return self._max(jax.make_array_from_process_local_data(self._sharding, local))

  def now(self, flag: bool) -> bool:
    """The agreed value, waiting for it (start-up, not per step)."""
    return bool(jax.device_get(self.dispatch(flag)))

  def lagged(self, flag: bool) -> bool:
    """The agreed value of the previous call's flag (False on the first
    call); dispatches this call's."""
    previous = self._pending
    self._pending = self.dispatch(flag)
    return previous is not None and bool(jax.device_get(previous))
