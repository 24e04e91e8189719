"""Zig-zag token order: equal causal work per device of the ``sequence`` axis.

With the sequence split contiguously over n devices, causal attention gives
device i queries that see i + 1 of the n key chunks: the last device works n
times as long as the first, and each ring step waits for the slowest. Cut the
sequence into 2n chunks and give device i chunks i and 2n - 1 - i (Brandon et
al. 2023, "Striped Attention", and the zig-zag layout of Zhu's
ring-flash-attention): every device then holds one early and one late chunk
and does the same work on every ring step (``qtrain.parallel.context_parallel``
skips the blocks whose mask is empty).

The order is applied to the whole batch once, before the model: inputs,
targets, positions, segment ids and loss mask are permuted together along the
sequence (``zigzag_batch``), on host rows. Its place is the one door every
batch takes into the model, ``qtrain.data.global_batch.to_global``, through
``for_model``, so training, evaluation and calibration all see it (a batch
left in index order is still attended correctly, only the work is
unbalanced). Nothing downstream depends on the order: RoPE reads the ``positions`` array (added
here when the batch has none), the attention mask is built from positions and
segment ids, and the loss is a sum over tokens.
"""

from __future__ import annotations

import numpy as np


def zigzag_order(seq_len: int, n: int) -> np.ndarray:
  """Indices ``order`` [T]: position j of the permuted sequence holds token
  ``order[j]``; device i's slice [i T/n, (i+1) T/n) holds chunks i and 2n-1-i."""
  if seq_len % (2 * n):
    raise ValueError(f"config.data.seq_len={seq_len} is not a multiple of 2 x config.mesh."
                     f"sequence = {2 * n} (the zig-zag order cuts it into 2 chunks per "
                     "device); change seq_len or the mesh")
  chunks = np.arange(seq_len).reshape(2 * n, seq_len // (2 * n))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def inverse_order(order: np.ndarray) -> np.ndarray:
  """``inv`` with x[:, order][:, inv] == x."""
  inv = np.empty_like(order)
  inv[order] = np.arange(order.size)
  return inv


def zigzag_batch(batch: dict, n: int) -> dict:
  """Every [B, T] array of ``batch`` in zig-zag order for ``n`` devices (n = 1:
  unchanged); ``positions`` are added (0..T-1) when absent."""
  if n == 1:
    return batch
  rows, seq_len = np.shape(batch["inputs"])
  order = zigzag_order(seq_len, n)
  out = dict(batch)
  if "positions" not in out:
    out["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))
  return {k: np.asarray(v)[:, order] if np.ndim(v) == 2 else v for k, v in out.items()}


def for_model(batch: dict, mesh, model_cfg) -> dict:
  """``batch`` in the order the model's attention wants on ``mesh``: zig-zag
  when ``model_cfg.context_parallel`` is on and the mesh splits the sequence,
  else unchanged (the single-device and XLA paths mask by index)."""
  n = mesh.shape.get("sequence", 1)
  if getattr(model_cfg, "context_parallel", "none") == "none" or n == 1:
    return batch
  return zigzag_batch(batch, n)
