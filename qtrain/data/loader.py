"""The training path's data: token files -> packed, sharded, resumable batches.

Imports numpy and grain only (no seqio, TensorFlow or sentencepiece), so it
runs on every GPU/TPU host. The pipeline, per process:

  documents with >= 2 tokens, every process_count-th one from process_index
  -> shuffled (seeded; a new order each epoch) and repeated forever
  -> shifted examples and concat-then-split packing (`packing.py`)
  -> batches of global_batch_size // process_count rows

A batch is a dict of int32 arrays, each [global_batch_size // process_count,
seq_len], with the keys of `packing.BATCH_KEYS`: `inputs`, `targets`,
`segment_ids`, `positions` and `loss_mask` (1 = target scored; 0 for SFT
prompt tokens and padding). See `packing.py` for their meaning.

Everything is index-based and single-threaded, so the iterator state is a few
integers: `get_state()` is JSON-serialisable and `set_state()` on a freshly
built iterator (same arguments) replays exactly the same batches, which is
what makes a killed training run resume bit-identically. The state belongs to
one process (it names process_index and process_count): each process saves
and restores its own.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import grain
import numpy as np

from qtrain.data import held_out
from qtrain.data import packing
from qtrain.data import token_file
from qtrain.data.vocab import vocab_fingerprint

META_NAME = "meta.json"
# Bumped when rows change meaning: a state saved for other rows is refused.
# 2: rows carry loss_mask (packed as a third feature, so grain's state differs).
BATCH_FORMAT = 2
_PREPARE = ("run `make data` or `python -m qtrain.data.prepare --task=kjv"
            " --out={dir}`")
_META_KEYS = ("splits", "vocab_size", "vocab_fingerprint")


def read_meta(data_dir: str | os.PathLike) -> dict:
  """The meta.json that `prepare` writes last; its absence means no data."""
  path = pathlib.Path(data_dir) / META_NAME
  if not path.is_file():
    raise FileNotFoundError(f"No prepared data: {path} is missing; "
                            + _PREPARE.format(dir=data_dir) + ".")
  try:
    meta = json.loads(path.read_text())
    missing = [k for k in _META_KEYS if k not in meta]
  except (ValueError, TypeError) as e:
    missing = [f"valid JSON ({e})"]
  if missing:
    raise ValueError(f"{path} is damaged (no {', '.join(missing)}); delete it"
                     " and " + _PREPARE.format(dir=data_dir) + ".")
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
  """The validated token file of `split` (header, sizes, checksum, ids).

  Every reader goes through here, so a damaged file is one TokenFileError.
  """
  meta = meta or read_meta(data_dir)
  if split not in meta["splits"]:
    raise ValueError(f"Split {split!r} not in {data_dir} (has"
                     f" {sorted(meta['splits'])}).")
  info = meta["splits"][split]
  tf = token_file.TokenFile(pathlib.Path(data_dir) / info["file"]).validate()
  if tf.fingerprint != meta["vocab_fingerprint"]:
    raise token_file.TokenFileError(
        tf.path, f"vocabulary fingerprint {tf.fingerprint} differs from"
        f" meta.json's {meta['vocab_fingerprint']}: files of two prepare runs")
  if tf.num_tokens != info.get("n_tokens", tf.num_tokens):
    raise token_file.TokenFileError(
        tf.path, f"{tf.num_tokens} tokens, meta.json says {info['n_tokens']}:"
        " files of two prepare runs")
  return tf


def _shard(tf: token_file.TokenFile, process_index: int, process_count: int,
           global_batch_size: int) -> tuple[np.ndarray, int]:
  """(this process's document ids, per-process batch size), validated."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by"
                     f" process_count={process_count}.")
  ids = _usable(tf)
  if len(ids) < process_count:
    raise ValueError(f"{tf.path} has {len(ids)} usable documents, fewer than"
                     f" process_count={process_count}.")
  return ids[process_index::process_count], global_batch_size // process_count


def _usable(tf: token_file.TokenFile) -> np.ndarray:
  return np.flatnonzero(tf.doc_lengths() >= 2)  # A lone EOS has no target.


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
  """JSON-safe state, tagged with the arguments that built the pipeline,
  including the process it belongs to."""

  def __init__(self, parent: grain.DatasetIterator, pipeline: dict):
    super().__init__(parent)
    self._pipeline = pipeline

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": dict(self._pipeline),
            "grain": json.loads(json.dumps(self._parent.get_state()))}

  def set_state(self, state: dict[str, Any]) -> None:
    saved, mine = state.get("pipeline") or {}, self._pipeline
    who = lambda p: f"process {p.get('process_index')} of {p.get('process_count')}"
    if who(saved) != who(mine):
      raise ValueError(
          f"Data iterator state was saved by {who(saved)} and is being"
          f" restored by {who(mine)}: each process must restore the state it"
          " saved itself, on the same number of processes.")
    if saved != mine:
      raise ValueError(
          "Data iterator state was saved by a different pipeline: saved"
          f" {saved}, this one {mine}. Resume with the same data, seq_len,"
          " global_batch_size, seed and processes.")
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
  rows = packing.packed_rows(docs, tf, seq_len)
  batches = rows.batch(per_process, drop_remainder=True)
  pipeline = {"vocab_fingerprint": meta["vocab_fingerprint"],
              "n_tokens": tf.num_tokens, "loss_mask": tf.has_mask,
              "batch_format": BATCH_FORMAT, "seq_len": seq_len,
              "global_batch_size": global_batch_size, "seed": seed,
              "process_index": process_index, "process_count": process_count}
  return _ResumableIterator(iter(batches), pipeline)


def make_eval_batches(data_dir: str | os.PathLike, split: str = "validation", *,
                      seq_len: int, global_batch_size: int, num_batches: int,
                      process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Fixed batches of `split`: all of it (num_batches=0) or at most
  `num_batches` batches of rows spread evenly over all of it (`held_out.py`).

  Each process packs its documents (every process_count-th, file order) and
  reads its planned rows; every process returns the same number of batches,
  topped up with padding rows (loss_mask 0). Each target is scored at most
  once over all processes (exactly once for the whole split).
  """
  tf = open_split(data_dir, split)
  ids, per_process = _shard(tf, process_index, process_count, global_batch_size)
  targets = tf.doc_lengths() - 1  # Per document.
  usable = _usable(tf)
  rows = [math.ceil(int(targets[usable[p::process_count]].sum()) / seq_len)
          for p in range(process_count)]
  n, picks = held_out.plan(rows, per_process, num_batches)
  wanted = set(picks[process_index].tolist())
  got = []
  for r, row in enumerate(packing.packed_rows(grain.MapDataset.source(ids), tf,
                                              seq_len)):
    if r in wanted:
      got.append(row)
      if len(got) == len(wanted):
        break
  pad = packing.zero_rows(n * per_process - len(got), seq_len)
  stacked = {k: np.concatenate([np.stack([g[k] for g in got]).reshape(-1, seq_len),
                                pad[k]]) for k in packing.BATCH_KEYS}
  return [{k: v[i * per_process:(i + 1) * per_process] for k, v in stacked.items()}
          for i in range(n)]
