"""Host-local batches -> global arrays: the one door every batch takes into a
model (training, evaluation, PTQ calibration).

Each process holds its own rows (``[global_batch // process_count, T]``);
``to_global`` assembles them into arrays split over the mesh's ``data`` x ``fsdp`` axes.
Given the model's config it first checks the batch against what the attention
kernel can represent, so no caller can forget the check: on GPU the cuDNN
packed path describes at most ``attention_max_segments`` documents per row and
would silently drop the rest.
"""

from __future__ import annotations

import jax
import numpy as np

from qtrain.layers.attention import resolve_impl
from qtrain.parallel import batch_sharding, data_shard, zigzag


def check_segments(batch: dict, model_cfg) -> None:
  """Raises ValueError naming ``config.model.attention_max_segments`` when a
  row packs more documents than the cuDNN path describes."""
  limit = model_cfg.attention_max_segments
  if limit <= 0 or "segment_ids" not in batch:
    return
  if resolve_impl(model_cfg.attention_impl, model_cfg.compute_dtype) != "cudnn":
    return
  most = int(np.max(batch["segment_ids"]))  # Segment ids count 1.. within a row.
  if most > limit:
    raise ValueError(f"a batch row packs {most} documents but config.model."
                     f"attention_max_segments={limit}; raise it to at least {most}")


def to_global(local_batch: dict, mesh, model_cfg=None) -> dict:
  """Host-local numpy rows -> global arrays, rows over ``data`` x ``fsdp``.

  ``model_cfg`` (a ``qtrain.layers.ModelConfig``) turns on ``check_segments``
  and the token order its attention wants on ``mesh`` (zig-zag under context
  parallelism: ``qtrain/parallel/zigzag.py``). Every batch enters the model
  here: training, evaluation, calibration and the kurtosis report.
  """
  if model_cfg is not None:
    check_segments(local_batch, model_cfg)
    local_batch = zigzag.for_model(local_batch, mesh, model_cfg)
  sharding, (_, shards) = batch_sharding(mesh), data_shard(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)  # This process's slice: 1 of `shards` (see data_shard).
    out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * shards,
                                                                  *v.shape[1:]))
  return out
