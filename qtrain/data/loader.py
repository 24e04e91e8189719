"""The training path's data: token files -> packed, sharded, resumable batches.

Imports numpy and grain only (no seqio, TensorFlow or sentencepiece), so it
runs on every GPU/TPU host. The stream is cut into S fixed *shards*
(``config.data.shards``; 0 = one per process). Shard s of S is, per shard:

  documents with >= 2 tokens, every S-th one from s
  -> shuffled (seeded; a new order each epoch) and repeated forever
  -> shifted examples and concat-then-split packing (`packing.py`)
  -> batches of global_batch_size // S rows

Process p of n owns the S / n consecutive shards from p * S / n, and its
batch is their rows concatenated in shard order, so the global batch (every
process's rows in process order) is shards 0..S-1 in order whatever n is: a
run resumed on another number of processes dividing S sees the same batches.
Shard s of S is exactly what process s of an S-process run loaded before
shards existed (one shard per process), so its state still names it
``process_index`` s of ``process_count`` S, and those checkpoints are
checkpoints of S shards.

A batch is a dict of int32 arrays, each [global_batch_size // process_count,
seq_len], with the keys of `packing.BATCH_KEYS`: `inputs`, `targets`,
`segment_ids`, `positions` and `loss_mask` (1 = target scored; 0 for SFT
prompt tokens and padding). See `packing.py` for their meaning.

Everything is index-based and single-threaded, so a shard's state is a few
integers: `get_state()` is JSON-serialisable (one shard's state, or
{"shards": [...]} for several: `shard_states`) and `set_state()` on a freshly
built iterator (same arguments) replays exactly the same batches, which is
what makes a killed training run resume bit-identically.
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


def owned_shards(process_index: int, process_count: int, shards: int,
                 global_batch_size: int) -> tuple[int, range]:
  """(S, the shards process_index of process_count owns), validated;
  shards = 0 means one per process."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  n = shards or process_count
  if n % process_count:
    raise ValueError(f"config.data.shards={shards} is not a multiple of the {process_count}"
                     " processes loading distinct batch rows (each owns whole shards): run on"
                     f" a number of processes dividing {shards}, or in a new run set a"
                     f" multiple of {process_count} (0 = one shard per process).")
  if global_batch_size % n:
    what = (f"shards={n} (config.data.shards)" if shards and shards != process_count
            else f"process_count={process_count}")
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {what}.")
  k = n // process_count
  return n, range(process_index * k, (process_index + 1) * k)


def _shard_docs(tf: token_file.TokenFile, shards: int) -> list[np.ndarray]:
  """Each shard's document ids: every shards-th usable one."""
  ids = _usable(tf)
  if len(ids) < shards:
    raise ValueError(f"{tf.path} has {len(ids)} usable documents, fewer than"
                     f" {shards} shards (process_count or config.data.shards).")
  return [ids[s::shards] for s in range(shards)]


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
  """One shard's batches. JSON-safe state, tagged with the arguments that
  built the pipeline, including the shard (as the process that would load it
  alone: ``process_index`` of ``process_count``)."""

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
          f" restored by {who(mine)}: each shard must restore the state it"
          " saved itself, with the same number of shards (config.data.shards).")
    if saved != mine:
      raise ValueError(
          "Data iterator state was saved by a different pipeline: saved"
          f" {saved}, this one {mine}. Resume with the same data, seq_len,"
          " global_batch_size, seed and shards.")
    self._parent.set_state(_tuple_slices(state["grain"]))


class _ConcatShards:
  """A process's batches when it owns several shards: their rows
  concatenated in shard order; the state lists the shards' states."""

  def __init__(self, parts: list[_ResumableIterator]):
    self._parts = parts

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(p) for p in self._parts]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": [p.get_state() for p in self._parts]}

  def set_state(self, state: dict[str, Any]) -> None:
    states = shard_states(state)
    if len(states) != len(self._parts):
      raise ValueError(f"Data iterator state holds {len(states)} shards; this process owns"
                       f" {len(self._parts)}.")
    for part, s in zip(self._parts, states):
      part.set_state(s)


def shard_states(state: dict[str, Any]) -> list[dict[str, Any]]:
  """A process iterator's state -> its shards' states, in shard order."""
  return list(state["shards"]) if "shards" in state else [state]


def join_shard_states(states: list[dict[str, Any]]) -> dict[str, Any]:
  """The inverse of `shard_states`: what the process iterator's `set_state` takes."""
  return states[0] if len(states) == 1 else {"shards": list(states)}


def make_train_iterator(data_dir: str | os.PathLike, *, seq_len: int,
                        global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, shards: int = 0):
  """Infinite, deterministic, checkpointable iterator over this process's
  rows of the train batches: its shards' (see the module docstring)."""
  meta = read_meta(data_dir)
  tf = open_split(data_dir, "train", meta)
  n, owned = owned_shards(process_index, process_count, shards, global_batch_size)
  docs = _shard_docs(tf, n)
  parts = []
  for s in owned:
    shuffled = grain.MapDataset.source(docs[s]).shuffle(seed=_shuffle_seed(seed)).repeat()
    batches = packing.packed_rows(shuffled, tf, seq_len).batch(
        global_batch_size // n, drop_remainder=True)
    pipeline = {"vocab_fingerprint": meta["vocab_fingerprint"],
                "n_tokens": tf.num_tokens, "loss_mask": tf.has_mask,
                "batch_format": BATCH_FORMAT, "seq_len": seq_len,
                "global_batch_size": global_batch_size, "seed": seed,
                "process_index": s, "process_count": n}
    parts.append(_ResumableIterator(iter(batches), pipeline))
  # One shard (the default, one per process): its own iterator and state,
  # as before shards existed.
  return parts[0] if len(parts) == 1 else _ConcatShards(parts)


def make_eval_batches(data_dir: str | os.PathLike, split: str = "validation", *,
                      seq_len: int, global_batch_size: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1,
                      shards: int = 0) -> list[dict[str, np.ndarray]]:
  """Fixed batches of `split`: all of it (num_batches=0) or at most
  `num_batches` batches of rows spread evenly over all of it (`held_out.py`).

  Cut into shards like the train stream (every S-th document, file order):
  each shard packs its documents and reads its planned rows; every shard has
  the same number of batches, topped up with padding rows (loss_mask 0), and
  a process's batch is its shards' rows in shard order, so the batches do not
  depend on the process count. Each target is scored at most once over all
  shards (exactly once for the whole split).
  """
  tf = open_split(data_dir, split)
  n, owned = owned_shards(process_index, process_count, shards, global_batch_size)
  docs, per_shard = _shard_docs(tf, n), global_batch_size // n
  targets = tf.doc_lengths() - 1  # Per document.
  rows = [math.ceil(int(targets[d].sum()) / seq_len) for d in docs]
  n_batches, picks = held_out.plan(rows, per_shard, num_batches)
  parts = [_planned_rows(tf, docs[s], picks[s], n_batches * per_shard, seq_len)
           for s in owned]
  return [{k: np.concatenate([p[k][i * per_shard:(i + 1) * per_shard] for p in parts])
           for k in packing.BATCH_KEYS} for i in range(n_batches)]


def _planned_rows(tf: token_file.TokenFile, doc_ids: np.ndarray, picks: np.ndarray,
                  n_rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """Rows `picks` of the packed documents, padded to n_rows: [n_rows, seq_len]."""
  wanted = set(picks.tolist())
  got = []
  for r, row in enumerate(packing.packed_rows(grain.MapDataset.source(doc_ids), tf,
                                              seq_len)):
    if r in wanted:
      got.append(row)
      if len(got) == len(wanted):
        break
  pad = packing.zero_rows(n_rows - len(got), seq_len)
  return {k: np.concatenate([np.stack([g[k] for g in got]).reshape(-1, seq_len), pad[k]])
          for k in packing.BATCH_KEYS}
