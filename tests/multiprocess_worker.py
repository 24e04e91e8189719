"""``python -m qtrain.train`` with test hooks (tests/test_multihost.py).

  python tests/multiprocess_worker.py --config=configs/default.py:smoke --workdir=W \
      [--config.mesh.fsdp=8 ...] [--coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=I] [--batch_log=FILE] [--term_at=K] \
      [--concat_shards=N]

Everything a user's run does, start-up through ``qtrain.parallel.distributed``
included, runs unchanged; the hooks only watch or feed the data:

* ``--batch_log``: appends a checksum of every batch this process draws.
* ``--term_at=K``: this process (only) sends itself SIGTERM while drawing
  its K-th batch.
* ``--concat_shards=N``: one process is fed what N processes would load
  together: each batch (train and held-out) is the concatenation, in shard
  order, of the N per-process batches of ``qtrain.data.loader``. The
  single-process reference of an N-process run on the same mesh.

Each process prints its run summary as one JSON line prefixed ``summary: ``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qtrain.train import __main__ as cli  # pylint: disable=wrong-import-position

_BATCH_LOG = flags.DEFINE_string("batch_log", None, "Append a checksum per drawn batch.")
_TERM_AT = flags.DEFINE_integer("term_at", None, "SIGTERM this process at its K-th batch.")
_CONCAT = flags.DEFINE_integer("concat_shards", None, "Feed the batches of N processes.")


class _Concatenated:
  """One process drawing the global batch of ``len(parts)`` processes."""

  def __init__(self, parts):
    self._parts = parts

  def __iter__(self):
    return self

  def __next__(self):
    return _concat([next(p) for p in self._parts])

  def get_state(self):
    return {"parts": [p.get_state() for p in self._parts]}

  def set_state(self, state):
    for p, s in zip(self._parts, state["parts"]):
      p.set_state(s)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _feed_shards(loader, n):
  train, held_out = loader.make_train_iterator, loader.make_eval_batches

  def make_train_iterator(*args, process_index, process_count, **kw):
    assert (process_index, process_count) == (0, 1), (process_index, process_count)
    return _Concatenated([train(*args, process_index=i, process_count=n, **kw)
                          for i in range(n)])

  def make_eval_batches(*args, process_index, process_count, **kw):
    assert (process_index, process_count) == (0, 1), (process_index, process_count)
    shards = [held_out(*args, process_index=i, process_count=n, **kw) for i in range(n)]
    return [_concat(list(b)) for b in zip(*shards)]

  loader.make_train_iterator, loader.make_eval_batches = make_train_iterator, make_eval_batches


def _watch_batches(loader, log, term_at):
  original_next = loader._ResumableIterator.__next__  # pylint: disable=protected-access
  drawn = []

  def recording_next(self):
    batch = original_next(self)
    drawn.append(1)
    if log:
      with open(log, "a", encoding="utf-8") as f:
        f.write(f"{zlib.crc32(batch['inputs'].tobytes())}\n")
    if term_at is not None and len(drawn) == term_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  loader._ResumableIterator.__next__ = recording_next  # pylint: disable=protected-access


def _print_summaries(loop):
  run = loop.run

  def run_and_print(cfg, workdir):
    import jax  # pylint: disable=g-import-not-at-top
    summary = run(cfg, workdir)
    shown = {k: v for k, v in summary.items() if k != "unigram_ppl"}
    print("summary: " + json.dumps(dict(shown, process=jax.process_index())), flush=True)
    return summary

  loop.run = run_and_print


def main(argv):
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.train import loop  # pylint: disable=g-import-not-at-top
  if _CONCAT.value:
    _feed_shards(loader, _CONCAT.value)
  _watch_batches(loader, _BATCH_LOG.value, _TERM_AT.value)
  _print_summaries(loop)
  cli.main(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
