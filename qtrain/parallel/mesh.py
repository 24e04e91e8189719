"""The device mesh from ``config.mesh`` and its checks before compilation.

Five axes, outermost first: ``data, fsdp, pipeline, sequence, tensor``.
``jax.make_mesh`` lays devices out so that the innermost axes get the fastest
links (the devices of one host, one NVLink island, one ICI ring), and the
order follows how much each axis talks per step:

* ``tensor`` (innermost): all-gathers / reduce-scatters of activations inside
  every layer, on the critical path: the fastest links.
* ``sequence``: K/V exchange of context-parallel attention, once per layer.
* ``pipeline``: activations between stages, point to point, once per micro-batch.
* ``fsdp``: one layer's weights gathered and its gradients reduce-scattered
  per layer, overlappable with compute.
* ``data`` (outermost): one gradient all-reduce per step: it can cross the
  slowest links (between hosts or slices).

Sizes multiply to the device count; one may be -1 (the rest). ``pipeline``
> 1 splits the scanned stack into stages run by a schedule
(``qtrain/parallel/pipeline.py``, step family ``pipeline``). ``sequence`` > 1
shards activations over the sequence; attention then exchanges keys and
values as ``config.model.context_parallel`` says (``ring`` | ``all_gather``:
``qtrain.parallel.context_parallel``, on batches in zig-zag order) or, with
``none``, lets XLA gather them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "pipeline", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")  # The batch is split over both (FSDP is data-parallel too).


class MeshError(ValueError):
  """A ``config.mesh`` field is wrong for these devices or this model."""


def _as_dict(mesh_cfg) -> dict:
  if mesh_cfg is None:
    return {"data": -1}
  return dict(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg)


def mesh_sizes(mesh_cfg, n_devices: int) -> dict[str, int]:
  """{axis: size} with -1 resolved; raises MeshError naming the field."""
  given = _as_dict(mesh_cfg)
  unknown = sorted(set(given) - set(AXES))
  if unknown:
    raise MeshError(f"config.mesh.{unknown[0]} is not a mesh axis; the axes are {AXES}")
  sizes = {a: given.get(a, 1) for a in AXES}
  for a, s in sizes.items():
    if not isinstance(s, int) or (s < 1 and s != -1):
      raise MeshError(f"config.mesh.{a}={s!r} must be a positive int or -1 (the rest)")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise MeshError(f"config.mesh: {' and '.join(f'{a}=-1' for a in free)}; at most one "
                    "axis may be -1 (it takes the devices the others leave)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise MeshError(f"config.mesh.{free[0]}=-1: the other axes multiply to {fixed}, which "
                      f"does not divide the {n_devices} devices; make their product divide it")
    sizes[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    shown = ", ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
    raise MeshError(f"config.mesh ({shown}) multiplies to {fixed} but there are {n_devices} "
                    "devices; make the product equal the device count, or set one axis to -1")
  return sizes


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
  """The 5-axis mesh of ``config.mesh`` (None: every device on ``data``).

  Axis types are Auto: shardings come from jit's in/out shardings and the
  logical constraints of ``qtrain.parallel.rules``.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _divides(n: int, k: int) -> bool:
  return k <= 1 or n % k == 0


def check_mesh(mesh_cfg, n_devices: int, model: Any, data: Any) -> list[str]:
  """Raises MeshError naming the first wrong field; returns notes to print.

  ``model`` is a ModelConfig (or ``config.model``), ``data`` is ``config.data``.
  """
  s = mesh_sizes(mesh_cfg, n_devices)
  t, notes = s["tensor"], []
  if s["pipeline"] > 1:
    _check_pipeline(s["pipeline"], model)
  if not _divides(model.n_heads, t):
    raise MeshError(f"config.mesh.tensor={t} does not divide config.model.n_heads="
                    f"{model.n_heads}; choose tensor among {_divisors(model.n_heads)}")
  if not _divides(model.n_kv_heads, t):
    if t % model.n_kv_heads:
      raise MeshError(f"config.mesh.tensor={t} and config.model.n_kv_heads="
                      f"{model.n_kv_heads}: one must divide the other; choose tensor among "
                      f"{_divisors(model.n_heads)}")
    notes.append(f"note: config.model.n_kv_heads={model.n_kv_heads} < config.mesh.tensor={t}: "
                 "the k/v projections are replicated over tensor (each device holds all "
                 "kv heads)")
  for field in ("vocab_size", "d_ff"):
    n = getattr(model, field)
    if not _divides(n, t):
      raise MeshError(f"config.mesh.tensor={t} does not divide config.model.{field}={n}; "
                      f"pad {field} to a multiple of {t} or choose another tensor size")
  if not _divides(model.d_model, s["fsdp"]):
    raise MeshError(f"config.mesh.fsdp={s['fsdp']} does not divide config.model.d_model="
                    f"{model.d_model} (FSDP shards the model width); choose fsdp among "
                    f"{_divisors(model.d_model)[:12]}")
  rows = s["data"] * s["fsdp"]
  for field in ("global_batch_size", "eval_batch_size"):
    n = getattr(data, field)
    if n <= 0 or n % rows:
      raise MeshError(f"config.data.{field}={n} is not a positive multiple of config.mesh."
                      f"data x fsdp = {rows} (the batch is split over both); use e.g. "
                      f"{max(rows, n // rows * rows)}")
  span = s["sequence"] * t  # Sequence-parallel residual stream: length over sequence x tensor.
  if data.seq_len % span:
    raise MeshError(f"config.data.seq_len={data.seq_len} is not a multiple of config.mesh."
                    f"sequence x tensor = {span} (activations between layers are split over "
                    "both along the sequence); change seq_len or the mesh")
  mode = getattr(model, "context_parallel", "none")
  from qtrain.parallel.context_parallel import MODES  # pylint: disable=g-import-not-at-top
  if mode not in MODES:
    raise MeshError(f"config.model.context_parallel={mode!r}; use one of {MODES}")
  if mode != "none" and s["sequence"] > 1 and data.seq_len % (2 * s["sequence"]):
    raise MeshError(f"config.data.seq_len={data.seq_len} is not a multiple of 2 x config.mesh."
                    f"sequence = {2 * s['sequence']} (context_parallel={mode!r} orders the "
                    "tokens in 2 chunks per device, qtrain/parallel/zigzag.py); change seq_len "
                    "or the mesh")
  return notes


def _check_pipeline(p: int, model: Any) -> None:
  """The stack splits into p stages of whole scanned layers (the schedule's
  own fields are checked with config.train: ``qtrain/config/validate.py``)."""
  if not getattr(model, "scan_layers", True):
    raise MeshError(f"config.mesh.pipeline={p} needs config.model.scan_layers=True (stages "
                    "are slices of the scanned stack); set it, or set pipeline=1")
  if model.n_layers % p:
    raise MeshError(f"config.mesh.pipeline={p} does not divide config.model.n_layers="
                    f"{model.n_layers}; choose pipeline among {_divisors(model.n_layers)}")


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]
