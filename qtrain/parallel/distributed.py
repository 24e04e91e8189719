"""Multi-host start-up: ``jax.distributed.initialize`` from flags, SLURM or a
TPU pod, decided before anything touches a device.

Where the cluster comes from, first match wins:

1. Explicit flags (``--coordinator_address``, ``--num_processes``,
   ``--process_id``): any launcher (torchrun-style scripts, Open MPI,
   Kubernetes, two shells on one machine). ``--num_processes=1`` forces one
   process even inside a SLURM step or on a TPU pod.
2. A SLURM job step with several tasks (``srun``, ``SLURM_NTASKS`` > 1).
3. A Cloud TPU VM (GCE or GKE): jax's own pod detection.
4. Otherwise one process, nothing started.

Why SLURM is derived here while TPU pods are delegated to jax: SLURM's
variables are plain environment strings, so ``plan`` decides from them alone
and is tested with fake environments, and it gets two cases right that jax's
``SlurmCluster`` does not: a batch script run without ``srun`` (N tasks
allocated, one process running: a note, not a hang waiting for N-1 peers),
and one task per node (jax pins each task to GPU ``SLURM_LOCALID`` whenever
it detects SLURM, which hides 7 of a node's 8 GPUs from the only task on
it; here a task is pinned only when several share a node). A TPU pod's
workers, ids and slices come from the GCE metadata server or GKE's variables
(and multislice's MEGASCALE_* ones): that is network and version-specific
code jax maintains, so ``initialize`` hands it over unchanged.

On CPU, processes exchange collectives through gloo; it is selected before
start-up unless another implementation was chosen (jax 0.10 defaults to it,
older versions had none, and without it the first cross-process reduction
fails).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import jax

# jax's convention for SLURM too: a port in the ephemeral range derived from
# the job id, so every task computes the same one without talking.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 61440, 4096
_FLAGS = "--coordinator_address, --num_processes and --process_id"


class DistributedError(ValueError):
  """A start-up flag or cluster variable the user can fix; one line."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``initialize`` will start. ``source`` is ``flags``, ``slurm``,
  ``tpu`` or ``single``; for ``tpu`` jax fills in whatever is None."""
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  note: str | None = None

  @property
  def distributed(self) -> bool:
    return self.source != "single"

  def describe(self, process_id=None, num_processes=None) -> str:
    """One line; the ids default to the plan's (jax's, once started, for TPU)."""
    if not self.distributed:
      return "one process (no multi-process flags, SLURM job step or TPU pod)"
    i = self.process_id if process_id is None else process_id
    n = self.num_processes if num_processes is None else num_processes
    if i is None or n is None:  # A TPU pod before jax has detected it.
      i, n = "i", "n"
    how = {"flags": f"from {_FLAGS}", "slurm": "from the SLURM job step",
           "tpu": "from the TPU pod (jax's detection)"}[self.source]
    where = f", coordinator {self.coordinator_address}" if self.coordinator_address else ""
    devices = (f", local devices {list(self.local_device_ids)}"
               if self.local_device_ids is not None else "")
    return f"process {i} of {n} {how}{where}{devices}"


def _address(address: str, flag: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"{flag}={address!r} must be HOST:PORT (process 0's host and a "
                           "free port, the same on every process), e.g. 10.0.0.1:1234")
  return address


def _explicit(coordinator_address, num_processes, process_id, local_device_ids) -> Plan:
  if num_processes is None:
    raise DistributedError(f"--process_id={process_id} given without --num_processes; pass "
                           "--num_processes=N (every process of the job) too")
  if process_id is None:
    raise DistributedError(f"--num_processes={num_processes} given without --process_id; pass "
                           f"each process its own --process_id in 0..{num_processes - 1}")
  if num_processes < 1:
    raise DistributedError(f"--num_processes={num_processes} must be at least 1")
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id={process_id} is outside 0..{num_processes - 1} "
                           f"(--num_processes={num_processes}); number the processes from 0")
  if num_processes == 1:
    return Plan("single")
  if coordinator_address is None:
    raise DistributedError(f"--num_processes={num_processes} needs --coordinator_address="
                           "HOST:PORT (process 0's host and a free port, the same on every "
                           "process)")
  return Plan("flags", _address(coordinator_address, "--coordinator_address"), num_processes,
              process_id, local_device_ids)


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: ``gpu[003-004,9],cpu1`` -> ``gpu003``.

  Brackets may appear more than once in a name (``r[1-2]n[01-04]`` ->
  ``r1n01``); each is replaced by the first number of its first range.
  """
  nodelist = nodelist.strip()
  head = re.match(r"([^,\[\]]*(\[[^\]]*\][^,\[\]]*)*)", nodelist).group(1)
  host = re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", head)
  if not host or nodelist[len(head):][:1] not in ("", ","):
    raise DistributedError(f"SLURM_STEP_NODELIST={nodelist!r} is not a SLURM hostlist; pass "
                           f"{_FLAGS} instead")
  return host


def _slurm_int(environ: Mapping[str, str], name: str) -> int:
  value = environ.get(name, "")
  if not value.strip().isdigit():
    raise DistributedError(f"{name}={value!r} is not a non-negative integer; this does not "
                           f"look like a SLURM job step: unset SLURM_* or pass {_FLAGS}")
  return int(value)


def _slurm(environ: Mapping[str, str], coordinator_address, local_device_ids) -> Plan | None:
  """The SLURM step's plan; None outside a multi-task job."""
  if "SLURM_NTASKS" not in environ or "SLURM_PROCID" not in environ:
    return None
  tasks = _slurm_int(environ, "SLURM_NTASKS")
  if tasks <= 1:
    return None
  if "SLURM_STEP_NODELIST" not in environ:  # The batch script itself, not an srun step.
    return Plan("single", note=f"note: this SLURM job has {tasks} tasks but this process was "
                "not started by srun, so it runs alone; launch it as `srun python -m "
                "qtrain.train ...` to use every task")
  tasks = _slurm_int(environ, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in environ \
      else tasks
  process_id = _slurm_int(environ, "SLURM_PROCID")
  if process_id >= tasks:
    raise DistributedError(f"SLURM_PROCID={process_id} is not below the step's {tasks} tasks; "
                           f"this does not look like a SLURM job step: pass {_FLAGS}")
  if coordinator_address is None:
    port = (_slurm_int(environ, "JAX_COORDINATOR_PORT") if "JAX_COORDINATOR_PORT" in environ
            else _SLURM_PORT_BASE + _slurm_int(environ, "SLURM_JOB_ID") % _SLURM_PORT_SPAN)
    coordinator_address = f"{first_slurm_host(environ['SLURM_STEP_NODELIST'])}:{port}"
  if local_device_ids is None:
    nodes = _slurm_int(environ, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in environ \
        else 1
    # Several tasks per node: one device each, unless the launcher already
    # restricted what each task sees (--gpus-per-task sets CUDA_VISIBLE_DEVICES).
    if tasks > nodes and "CUDA_VISIBLE_DEVICES" not in environ:
      local_device_ids = (_slurm_int(environ, "SLURM_LOCALID"),)
  return Plan("slurm", _address(coordinator_address, "--coordinator_address"), tasks,
              process_id, local_device_ids)


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
         environ: Mapping[str, str], on_tpu_vm: bool) -> Plan:
  """Decides what to start from the flags and the environment alone (pure).

  ``on_tpu_vm`` is whether this machine has Cloud TPU chips (jax checks the
  PCI bus at import). Raises DistributedError naming the flag and the fix.
  """
  ids = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
  if num_processes is not None or process_id is not None:
    return _explicit(coordinator_address, num_processes, process_id, ids)
  slurm = _slurm(environ, coordinator_address, ids)
  if slurm is not None:
    return slurm
  if on_tpu_vm:
    return Plan("tpu", None if coordinator_address is None else
                _address(coordinator_address, "--coordinator_address"),
                local_device_ids=ids)
  if coordinator_address is not None:
    raise DistributedError(f"--coordinator_address={coordinator_address} given alone and no "
                           "SLURM job step or TPU pod was found; pass --num_processes and "
                           "--process_id too")
  return Plan("single")


def _on_tpu_vm() -> bool:
  # Set by jax at import when a Cloud TPU chip is on the PCI bus (no network);
  # the same test jax's own TPU cluster detection starts from.
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               *, initialization_timeout: int = 300) -> str:
  """Starts ``jax.distributed`` as ``plan`` decides; returns one line saying
  what was started (also printed by process 0 when there are several).

  Call it before anything touches a device (``jax.devices()``, a computation).
  One process: a no-op. Raises DistributedError (one line) for a wrong flag,
  a second start, devices already in use, or a coordinator not reached in
  ``initialization_timeout`` seconds.
  """
  p = plan(coordinator_address, num_processes, process_id, local_device_ids,
           environ=os.environ, on_tpu_vm=_on_tpu_vm())
  if p.note:
    print(p.note, flush=True)
  if not p.distributed:
    return p.describe()
  if jax.distributed.is_initialized():
    raise DistributedError("jax.distributed is already running in this process; call "
                           "qtrain.parallel.distributed.initialize once, at start-up")
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  args = dict(coordinator_address=p.coordinator_address, num_processes=p.num_processes,
              process_id=p.process_id, local_device_ids=p.local_device_ids,
              initialization_timeout=initialization_timeout)
  if p.source != "tpu":  # Everything is decided: jax must not re-detect SLURM on top.
    args["cluster_detection_method"] = "deactivate"
  try:
    jax.distributed.initialize(**args)
  except (RuntimeError, ValueError) as e:
    raise DistributedError(f"starting {p.describe()} failed: {_first_line(e)}") from None
  line = p.describe(jax.process_index(), jax.process_count())
  if jax.process_index() == 0:
    print(f"distributed: {line}", flush=True)
  return line
