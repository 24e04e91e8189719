"""Logical axis names -> mesh axes: the one table that decides sharding.

Params and activations carry different logical names, so a weight's width
can be split one way (FSDP) while the activations of that width stay whole:

=======================  ===================  =====================================
logical name             mesh axes            what it splits
=======================  ===================  =====================================
vocab                    tensor               embedding rows, LM-head columns
embed                    fsdp                 every weight's model-width dim (ZeRO-3)
q_heads, mlp             tensor               column-parallel outputs / row-parallel
                                              inputs (Megatron)
kv_heads                 tensor or None       as q_heads; replicated when there are
                                              fewer kv heads than ``tensor``
norm, rank               None                 norm scales, low-rank r
layers                   pipeline or None     the scan axis: stages of a pipeline
embed_proj               None                 EmbProj's second d (its first is embed)
activation_batch         (data, fsdp[,        rows of every activation (outside the
                         pipeline])           pipeline's stages with pipeline > 1)
activation_length        sequence             tokens inside attention and the MLP
activation_norm_length   (sequence, tensor)   tokens of the residual stream and the
                                              norms between layers (sequence
                                              parallelism, Korthikanti et al. 2022)
activation_heads         tensor               query heads
activation_kv_heads      tensor or None       key/value heads
activation_mlp           tensor               the MLP hidden width
activation_vocab         tensor               logits (the loss is vocab-parallel)
activation_embed         None                 the model width of activations
=======================  ===================  =====================================

With these, XLA's SPMD partitioner inserts Megatron's collectives: the
residual stream is all-gathered over ``tensor`` before a column-parallel
projection and reduce-scattered after a row-parallel one; FSDP weights are
all-gathered one scanned layer at a time and their gradients reduce-scattered.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qtrain.parallel.mesh import BATCH_AXES, MeshError, make_mesh


def logical_rules(mesh, model_cfg) -> tuple:
  """The rules table (see the module docstring) for ``mesh`` and the model."""
  t = mesh.shape["tensor"]
  kv = "tensor" if model_cfg.n_kv_heads % t == 0 else None
  # Pipeline stages hold their own layers (and their optimizer state); outside
  # the stages (embedding, head, loss) the rows split over the stage devices too,
  # so no device runs the head on the whole batch.
  pp = mesh.shape["pipeline"] > 1
  return (
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("q_heads", "tensor"),
      ("kv_heads", kv),
      ("mlp", "tensor"),
      ("norm", None),
      ("layers", "pipeline" if pp else None),
      ("rank", None),
      ("embed_proj", None),
      ("activation_batch", BATCH_AXES + (("pipeline",) if pp else ())),
      ("activation_length", "sequence"),
      ("activation_norm_length", ("sequence", "tensor")),
      ("activation_heads", "tensor"),
      ("activation_kv_heads", kv),
      ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"),
      ("activation_embed", None),
  )


@contextlib.contextmanager
def sharding_context(mesh, rules):
  """The mesh and the rules every ``with_logical_constraint`` resolves against."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


class Layout:
  """A mesh and its rules table, from ``config.mesh`` and ``config.model``.

    layout = Layout.from_config(cfg)
    with layout:
      state = init_state(model, tx, layout.mesh, ...)
  """

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._entered: list[contextlib.ExitStack] = []  # Re-entrant: one stack per `with`.

  @classmethod
  def from_config(cls, cfg, devices=None) -> "Layout":
    return cls.of(cfg.mesh, cfg.model, devices)

  @classmethod
  def of(cls, mesh_cfg, model_cfg, devices=None) -> "Layout":
    from qtrain.layers.config import ModelConfig  # pylint: disable=g-import-not-at-top
    mesh = make_mesh(mesh_cfg, devices)
    return cls(mesh, logical_rules(mesh, ModelConfig.of(model_cfg)))

  @classmethod
  def for_checkpoint(cls, cfg, devices=None) -> "Layout":
    """The layout to evaluate or quantize a saved run on this machine: its
    own ``config.mesh`` when it fits these devices, else (or for a run saved
    before meshes were configurable) every device on ``fsdp``: params split,
    not replicated."""
    n = len(jax.devices() if devices is None else devices)
    if cfg.get("mesh") is not None:
      try:
        return cls.of(cfg.mesh, cfg.model, devices)
      except MeshError as e:
        if jax.process_index() == 0:
          print(f"note: the run's mesh does not fit here ({e}); using fsdp={n}", flush=True)
    return cls.of({"fsdp": -1}, cfg.model, devices)

  def __enter__(self) -> "Layout":
    stack = contextlib.ExitStack()
    stack.enter_context(sharding_context(self.mesh, self.rules))
    self._entered.append(stack)
    return self

  def __exit__(self, *exc) -> None:
    self._entered.pop().close()

  def __repr__(self) -> str:
    return "mesh " + " x ".join(f"{a}={n}" for a, n in self.mesh.shape.items())


def logical_sharding(abstract_tree, mesh, rules=None):
  """NamedShardings for a tree of (possibly LogicallyPartitioned) leaves;
  ``rules`` None: the table of the active ``sharding_context``."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules or nn.get_logical_axis_rules())


def batch_sharding(mesh) -> NamedSharding:
  """[B, T] arrays: rows over ``data`` x ``fsdp``."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _row_blocks(mesh) -> dict[int, tuple[int, int]]:
  """{process: [start, stop)} of the batch-row shards its devices hold (in
  units of one of the data x fsdp shards)."""
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  held: dict[int, set[int]] = {}
  for device, (rows, _) in batch_sharding(mesh).devices_indices_map((n, 1)).items():
    held.setdefault(device.process_index, set()).add(rows.start or 0)
  blocks = {}
  for p, shards in held.items():
    lo, hi = min(shards), max(shards) + 1
    if len(shards) != hi - lo:
      raise ValueError(f"process {p} holds batch shards {sorted(shards)}, not a contiguous "
                       "block; keep config.mesh's axis order (tensor innermost)")
    blocks[p] = (lo, hi)
  return blocks


@functools.lru_cache(maxsize=16)  # Per mesh; to_global asks for every batch.
def data_shard(mesh) -> tuple[int, int]:
  """(index, count): which of ``count`` equal slices of the global batch this
  process loads. Processes whose devices hold the same rows (a ``tensor`` or
  ``sequence`` axis spanning hosts) load the same slice."""
  blocks = _row_blocks(mesh)
  distinct = sorted(set(blocks.values()))
  if len({b - a for a, b in distinct}) != 1 or any(
      a != prev_b for (a, _), (_, prev_b) in zip(distinct[1:], distinct[:-1])):
    raise ValueError(f"processes hold unequal or overlapping batch blocks {distinct}")
  return distinct.index(blocks[jax.process_index()]), len(distinct)
