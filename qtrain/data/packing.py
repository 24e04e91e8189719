"""Documents -> packed rows: the one place that turns token files into the
batch format every consumer reads.

For a document d (ending with EOS) and its loss mask m (all ones for plain
text), the example is shifted for next-token prediction::

  inputs = d[:-1]   targets = d[1:]   loss_mask = m[1:]

so loss_mask[t] says whether targets[t] (token t + 1 of the document) is
scored: an SFT prompt is seen as context but its tokens are not predicted, and
the first response token is scored from the last prompt token.

Rows are concat-then-split packed (grain): documents follow each other; one
longer than what is left of a row continues in the next row under a new
segment id with positions restarting at 0. Each row is a dict of int32 arrays
[seq_len]: `inputs`, `targets`, `segment_ids` (1, 2, ... per document piece,
0 = padding), `positions` (0, 1, ... within a piece) and `loss_mask`.
Padding is all zeros, so loss_mask is 0 there too; for plain text
loss_mask == (segment_ids > 0).
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from qtrain.data import token_file

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_PACKED = ("inputs", "targets", "loss_mask")
# Synchronous reads: deterministic, and the state is just the next index.
SYNC_READS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def example(tf: token_file.TokenFile, doc_id) -> dict[str, np.ndarray]:
  """Document `doc_id` shifted for next-token prediction (module docstring)."""
  doc = tf.doc(int(doc_id)).astype(np.int32)
  mask = tf.doc_mask(int(doc_id)).astype(np.int32)
  return {"inputs": doc[:-1], "targets": doc[1:], "loss_mask": mask[1:]}


def _rename(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Segment ids/positions of the three packed features are identical by
  # construction (equal lengths); keep the inputs' under the contract's names.
  return {"inputs": ex["inputs"], "targets": ex["targets"],
          "segment_ids": ex["inputs_segment_ids"],
          "positions": ex["inputs_positions"], "loss_mask": ex["loss_mask"]}


def packed_rows(docs: grain.MapDataset, tf: token_file.TokenFile,
                seq_len: int) -> grain.IterDataset:
  """Rows of seq_len tokens from the document ids `docs` (module docstring)."""
  if seq_len < 1:
    raise ValueError(f"config.data.seq_len must be >= 1, got {seq_len}.")
  examples = docs.map(functools.partial(example, tf)).to_iter_dataset(SYNC_READS)
  packed = grain.experimental.ConcatThenSplitIterDataset(
      examples, length_struct={k: seq_len for k in _PACKED})
  return packed.map(_rename)


def zero_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
  """n padding rows (segment id 0, nothing scored)."""
  return {k: np.zeros((n, seq_len), np.int32) for k in BATCH_KEYS}
