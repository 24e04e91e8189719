"""``python -m qtrain.train`` with test hooks (tests/test_multihost.py).

  python tests/multiprocess_worker.py --config=configs/default.py:smoke --workdir=W \
      [--config.mesh.fsdp=8 ...] [--coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=I] [--batch_log=FILE] [--term_at=K] \
      [--concat_shards=N]

Everything a user's run does, start-up through ``qtrain.parallel.distributed``
included, runs unchanged; the hooks only watch or feed the data:

* ``--batch_log``: appends a checksum of every batch this process draws
  (its rows: all the data shards it owns).
* ``--term_at=K``: this process (only) sends itself SIGTERM while drawing
  its K-th batch.
* ``--concat_shards=N``: one process is fed what N processes would load
  together: each batch (train and held-out) is the concatenation, in shard
  order, of the N per-process batches of ``qtrain.data.loader``. The
  single-process reference of an N-process run on the same mesh, built
  apart from the loader's own ``config.data.shards`` (which does the same).

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
  """One process drawing the global batch of ``len(parts)`` processes; its
  state is theirs, as the data shards of the checkpoint they would write."""

  def __init__(self, parts):
    self._parts = parts

  def __iter__(self):
    return self

  def __next__(self):
    return _concat([next(p) for p in self._parts])

  def get_state(self):
    from qtrain.data import loader  # pylint: disable=g-import-not-at-top
    return loader.join_shard_states([p.get_state() for p in self._parts])

  def set_state(self, state):
    from qtrain.data import loader  # pylint: disable=g-import-not-at-top
    for p, s in zip(self._parts, loader.shard_states(state)):
      p.set_state(s)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _feed_shards(loader, n):
  """Each process's iterator of ``qtrain.data.loader`` for n processes (one
  shard each), concatenated here: a reference independent of the loader's
  own ``shards``."""
  train, held_out = loader.make_train_iterator, loader.make_eval_batches

  def make_train_iterator(*args, process_index, process_count, shards=0, **kw):
    assert (process_index, process_count, shards) in ((0, 1, 0), (0, 1, 1)), (
        process_index, process_count, shards)
    return _Concatenated([train(*args, process_index=i, process_count=n, **kw)
                          for i in range(n)])

  def make_eval_batches(*args, process_index, process_count, shards=0, **kw):
    assert (process_index, process_count, shards) in ((0, 1, 0), (0, 1, 1)), (
        process_index, process_count, shards)
    per_process = [held_out(*args, process_index=i, process_count=n, **kw) for i in range(n)]
    return [_concat(list(b)) for b in zip(*per_process)]

  loader.make_train_iterator, loader.make_eval_batches = make_train_iterator, make_eval_batches


class _Watched:
  """A train iterator whose every drawn batch (this process's rows, all its
  shards) is logged and counted."""

  def __init__(self, it, log, term_at, drawn):
    self._it, self._log, self._term_at, self._drawn = it, log, term_at, drawn

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._drawn.append(1)
    if self._log:
      with open(self._log, "a", encoding="utf-8") as f:
        f.write(f"{zlib.crc32(batch['inputs'].tobytes())}\n")
    if self._term_at is not None and len(self._drawn) == self._term_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def _watch_batches(loader, log, term_at):
  make, drawn = loader.make_train_iterator, []
  loader.make_train_iterator = lambda *a, **kw: _Watched(make(*a, **kw), log, term_at, drawn)


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
