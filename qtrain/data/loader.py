"""The training path's data: token files -> packed, sharded, resumable batches.

Imports numpy and grain only (no seqio, TensorFlow or sentencepiece), so it
runs on every GPU/TPU host. The pipeline, per process:

  documents with >= 2 tokens, every process_count-th one from process_index
  -> shuffled (seeded; a new order each epoch) and repeated forever
  -> {"inputs": d[:-1], "targets": d[1:]}       (each d ends with EOS)
  -> concat-then-split packing into rows of seq_len (grain)
  -> batches of global_batch_size // process_count rows

A batch is a dict of int32 arrays, each [global_batch_size // process_count,
seq_len]: `inputs`, `targets`, `segment_ids` (1, 2, ... per document piece in
the row, 0 = padding) and `positions` (0, 1, ... within each piece). A
document longer than what is left of a row continues in the next row under a
new segment id with positions restarting at 0. Padding has targets 0 and
segment id 0: the loss masks on segment_ids > 0.

Everything is index-based and single-threaded, so the iterator state is a few
integers: `get_state()` is JSON-serialisable and `set_state()` on a freshly
built iterator (same arguments) replays exactly the same batches, which is
what makes a killed training run resume bit-identically.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
from typing import Any

import grain
import numpy as np

from qtrain.data import token_file
from qtrain.data.vocab import vocab_fingerprint

META_NAME = "meta.json"
_PREPARE = ("run `make data` or `python -m qtrain.data.prepare --task=kjv"
            " --out={dir}`")
# Synchronous reads: deterministic, and the state is just the next index.
_SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def read_meta(data_dir: str | os.PathLike) -> dict:
  """The meta.json that `prepare` writes last; its absence means no data."""
  path = pathlib.Path(data_dir) / META_NAME
  if not path.is_file():
    raise FileNotFoundError(f"No prepared data: {path} is missing; "
                            + _PREPARE.format(dir=data_dir) + ".")
  meta = json.loads(path.read_text())
  meta["data_dir"] = str(data_dir)
  return meta


def check_vocab(meta: dict, model_vocab_size: int) -> None:
  """The model's vocabulary must cover every id in the data (it may be larger,
  e.g. padded to a multiple of 128)."""
  if meta["vocab_size"] > model_vocab_size:
    raise ValueError(
        f"config.model.vocab_size={model_vocab_size} is smaller than the"
        f" vocabulary of the data in {meta.get('data_dir', '?')}"
        f" ({meta['vocab_size']} ids): set config.model.vocab_size >="
        f" {meta['vocab_size']} (e.g. {128 * math.ceil(meta['vocab_size'] / 128)}).")


def check_fingerprint(meta: dict, spm_path: str | os.PathLike) -> None:
  """The token files must have been made with the SentencePiece model given."""
  got = vocab_fingerprint(spm_path)
  if got != meta["vocab_fingerprint"]:
    raise ValueError(
        f"Vocabulary mismatch: {spm_path} has fingerprint {got} but the token"
        f" files in {meta.get('data_dir', '?')} were made with"
        f" {meta['vocab_fingerprint']} ({meta['vocab_path']} there). Use that"
        " model, or re-run prepare with this one.")


def open_split(data_dir: str | os.PathLike, split: str,
               meta: dict | None = None) -> token_file.TokenFile:
  """The validated token file of `split` (header, sizes, checksum, ids)."""
  meta = meta or read_meta(data_dir)
  if split not in meta["splits"]:
    raise ValueError(f"Split {split!r} not in {data_dir} (has"
                     f" {sorted(meta['splits'])}).")
  tf = token_file.TokenFile(pathlib.Path(data_dir) / meta["splits"][split]["file"])
  tf.validate()
  if tf.fingerprint != meta["vocab_fingerprint"]:
    raise token_file.TokenFileError(
        tf.path, f"vocabulary fingerprint {tf.fingerprint} differs from"
        f" meta.json's {meta['vocab_fingerprint']}: files of two prepare runs")
  return tf


def _shard(tf: token_file.TokenFile, process_index: int, process_count: int,
           global_batch_size: int) -> tuple[np.ndarray, int]:
  """(this process's document ids, per-process batch size), validated."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by"
                     f" process_count={process_count}.")
  ids = np.flatnonzero(tf.doc_lengths() >= 2)  # A lone EOS has no target.
  if len(ids) < process_count:
    raise ValueError(f"{tf.path} has {len(ids)} usable documents, fewer than"
                     f" process_count={process_count}.")
  return ids[process_index::process_count], global_batch_size // process_count


def _example(tf: token_file.TokenFile, doc_id) -> dict[str, np.ndarray]:
  doc = tf.doc(int(doc_id)).astype(np.int32)
  return {"inputs": doc[:-1], "targets": doc[1:]}


def _rename(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # inputs_* and targets_* segment ids/positions are identical by construction.
  return {"inputs": ex["inputs"], "targets": ex["targets"],
          "segment_ids": ex["inputs_segment_ids"],
          "positions": ex["inputs_positions"]}


def _packed(docs: grain.MapDataset, tf: token_file.TokenFile,
            seq_len: int) -> grain.IterDataset:
  """Rows of seq_len tokens from the documents (concat-then-split packing)."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
  examples = docs.map(functools.partial(_example, tf)).to_iter_dataset(_SYNC)
  packed = grain.experimental.ConcatThenSplitIterDataset(
      examples, length_struct={"inputs": seq_len, "targets": seq_len})
  return packed.map(_rename)


def _shuffle_seed(seed: int) -> int:
  # grain reshuffles epoch e with seed + e; hashing the user seed keeps seeds
  # s and s + 1 from sharing all but one epoch order.
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def _tuple_slices(state: Any) -> Any:
  """Undoes JSON's tuple -> list on grain's concat-then-split state.

  grain compares `remainder_slices` values with the tuple (-1, -1); after a
  JSON round trip they are lists and an empty remainder would be taken for a
  real one (grain 0.2.18), shifting every later batch.
  """
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices"
                else _tuple_slices(v)) for k, v in state.items()}
  return state


class _ResumableIterator(grain.DatasetIterator):
  """JSON-safe state, tagged with the arguments that built the pipeline."""

  def __init__(self, parent: grain.DatasetIterator, pipeline: dict):
    super().__init__(parent)
    self._pipeline = pipeline

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": dict(self._pipeline),
            "grain": json.loads(json.dumps(self._parent.get_state()))}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("pipeline") != self._pipeline:
      raise ValueError(
          "Data iterator state was saved by a different pipeline: saved"
          f" {state.get('pipeline')}, this one {self._pipeline}. Resume with"
          " the same data, seq_len, global_batch_size, seed and processes.")
    self._parent.set_state(_tuple_slices(state["grain"]))


def make_train_iterator(data_dir: str | os.PathLike, *, seq_len: int,
                        global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite, deterministic, checkpointable iterator over this process's
  share of the train batches (see the module docstring for the format)."""
  meta = read_meta(data_dir)
  tf = open_split(data_dir, "train", meta)
  ids, per_process = _shard(tf, process_index, process_count, global_batch_size)
  docs = grain.MapDataset.source(ids).shuffle(seed=_shuffle_seed(seed)).repeat()
  batches = _packed(docs, tf, seq_len).batch(per_process, drop_remainder=True)
  pipeline = {"vocab_fingerprint": meta["vocab_fingerprint"],
              "n_tokens": tf.num_tokens, "seq_len": seq_len,
              "global_batch_size": global_batch_size, "seed": seed,
              "process_index": process_index, "process_count": process_count}
  return _ResumableIterator(iter(batches), pipeline)


def _zero_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
  z = np.zeros((n, seq_len), np.int32)
  return {"inputs": z, "targets": z, "segment_ids": z, "positions": z}


def make_eval_batches(data_dir: str | os.PathLike, split: str = "validation", *,
                      seq_len: int, global_batch_size: int, num_batches: int,
                      process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` fixed batches of `split` (documents in file order).

  Every process returns the same number of batches (the fewest any process
  can fill), so evaluation steps in lock-step; the last batch may be topped up
  with padding rows (segment_ids 0, masked by the loss).
  """
  tf = open_split(data_dir, split)
  ids, per_process = _shard(tf, process_index, process_count, global_batch_size)
  tokens = tf.doc_lengths() - 1  # Targets per document.
  usable = np.flatnonzero(tokens >= 1)
  rows = [math.ceil(int(tokens[usable[p::process_count]].sum()) / seq_len)
          for p in range(process_count)]
  n = min(num_batches, math.ceil(min(rows) / per_process))
  if n < 1:
    raise ValueError(f"Cannot make eval batches from {tf.path}:"
                     f" num_batches={num_batches}, rows per process {rows}.")
  it = iter(_packed(grain.MapDataset.source(ids), tf, seq_len))
  got = [next(it) for _ in range(min(n * per_process, rows[process_index]))]
  got += [_zero_rows(1, seq_len) for _ in range(n * per_process - len(got))]
  stacked = {k: np.concatenate([np.atleast_2d(r[k]) for r in got])
             for k in ("inputs", "targets", "segment_ids", "positions")}
  return [{k: v[i * per_process:(i + 1) * per_process] for k, v in stacked.items()}
          for i in range(n)]
