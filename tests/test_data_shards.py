"""Data shards (``config.data.shards``, qtrain/data/loader.py,
qtrain/train/data_state.py): the global batches do not depend on the number
of processes, and a checkpoint saved by n processes resumes on m of them
(m dividing the shard count) with the same batches, bit for bit.

Processes are emulated in one Python process: process p of n is the loader
built with ``process_index=p, process_count=n`` (what the loop passes from
``qtrain.parallel.data_shard``), and the global batch is the processes' rows
in process order (what ``to_global`` assembles). The references are
independent of the shard code: the documents a row holds (each document
starts with its own id), and the batches and iterator states that the loader
before shards wrote (golden values below). The loop's own checks (the saved
shard count against the config's) run in a one-process smoke run.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import zlib

import numpy as np
import pytest

from qtrain.data import loader, packing, token_file

SEED, SEQ, VOCAB, EOS = 7, 16, 512, 1
FIRST_ID = 10  # Document i starts with token FIRST_ID + i.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
  """48 documents [10 + i, random tokens < 10 ..., EOS] (each has a target;
  a token >= 10 is a document's first), one split."""
  rng = np.random.default_rng(18)
  docs = [np.concatenate([[FIRST_ID + i], rng.integers(2, FIRST_ID, size=int(rng.integers(0, 30))),
                          [EOS]]) for i in range(48)]
  d = tmp_path_factory.mktemp("tiny")
  counts = token_file.write_token_file(d / "train.tokens", docs, VOCAB, "shardfp")
  (d / "meta.json").write_text(json.dumps({
      "task": "tiny", "splits": {"train": {"file": "train.tokens", **counts},
                                 "validation": {"file": "train.tokens", **counts}},
      "vocab_size": VOCAB, "vocab_path": "none", "vocab_fingerprint": "shardfp",
      "eos_id": EOS, "pad_id": 0}))
  return d


def _processes(path, n, shards, gbs=8):
  return [loader.make_train_iterator(path, seq_len=SEQ, global_batch_size=gbs, seed=SEED,
                                     process_index=p, process_count=n, shards=shards)
          for p in range(n)]


def _global(its) -> dict[str, np.ndarray]:
  """One step: every process's rows, in process order."""
  local = [next(it) for it in its]
  return {k: np.concatenate([b[k] for b in local]) for k in packing.BATCH_KEYS}


def _assert_same(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for step, (g, w) in enumerate(zip(got, want)):
    for k in packing.BATCH_KEYS:
      np.testing.assert_array_equal(g[k], w[k], err_msg=f"step {step}, {k}")


def _documents(batch, rows) -> set[int]:
  """The documents whose first token starts a segment in these rows."""
  starts = (batch["positions"][rows] == 0) & (batch["segment_ids"][rows] > 0)
  first = batch["inputs"][rows][starts]
  return set((first[first >= FIRST_ID] - FIRST_ID).tolist())


def test_global_batches_are_the_same_on_1_2_and_4_processes(tiny):
  one = _processes(tiny, 1, shards=4)
  want = [_global(one) for _ in range(6)]
  for n in (2, 4):
    its = _processes(tiny, n, shards=4)
    _assert_same([_global(its) for _ in range(6)], want)
  # Independent of the loader's code: rows 2s, 2s + 1 of every global batch
  # (shard s: 8 rows / 4 shards) hold only documents i = s mod 4.
  for batch in want:
    for s in range(4):
      docs = _documents(batch, slice(2 * s, 2 * s + 2))
      assert docs and all(i % 4 == s for i in docs), (s, docs)


def test_shards_0_is_one_shard_per_process(tiny):
  # The default: each process loads one shard, with the state it had before
  # shards existed; the same batches as one process owning both shards.
  its = _processes(tiny, 2, shards=0)
  assert [it.get_state()["pipeline"]["process_index"] for it in its] == [0, 1]
  one = _processes(tiny, 1, shards=2)
  _assert_same([_global(its) for _ in range(3)], [_global(one) for _ in range(3)])


@pytest.mark.parametrize("num_batches", [0, 2])
def test_held_out_batches_are_the_same_on_1_2_and_4_processes(tiny, num_batches):
  def global_batches(n):
    per_process = [loader.make_eval_batches(tiny, "validation", seq_len=SEQ, global_batch_size=8,
                                            num_batches=num_batches, process_index=p,
                                            process_count=n, shards=4) for p in range(n)]
    return [{k: np.concatenate([b[k] for b in step]) for k in packing.BATCH_KEYS}
            for step in zip(*per_process)]
  want = global_batches(1)
  for n in (2, 4):
    _assert_same(global_batches(n), want)
  tf = token_file.TokenFile(tiny / "train.tokens")
  scored = sum(int(b["loss_mask"].sum()) for b in want)
  if num_batches == 0:  # The whole split: every target once (lengths - 1 per document).
    assert scored == int((tf.doc_lengths() - 1).sum())
  else:
    assert len(want) == 2 and 0 < scored
  for batch in want:  # Rows 2s, 2s + 1: shard s's documents, as in training.
    for s in range(4):
      assert all(i % 4 == s for i in _documents(batch, slice(2 * s, 2 * s + 2)))


def _save(directory, its) -> None:
  """What each process's checkpoint save writes into the step's data item."""
  from qtrain.train.data_state import ProcessDataHandler, ProcessDataSave  # pylint: disable=g-import-not-at-top
  for it in its:
    ProcessDataHandler().save(directory, ProcessDataSave(json.loads(json.dumps(it.get_state()))))


def _resume(directory, path, m, shards, *, gbs=8, configured=None):
  """m processes restoring the shards each owns, as the loop does."""
  from qtrain.train.data_state import ProcessDataHandler, ProcessDataRestore  # pylint: disable=g-import-not-at-top
  its = _processes(path, m, shards, gbs)
  n = shards or m
  for p, it in enumerate(its):
    it.set_state(ProcessDataHandler().restore(directory, ProcessDataRestore(
        first=p * n // m, n=n // m, shards=n,
        configured=shards if configured is None else configured)))
  return its


@pytest.mark.parametrize("m", [1, 4])
def test_saved_on_2_processes_resumes_on_another_count(tiny, tmp_path, m):
  ref = _processes(tiny, 1, shards=4)
  want = [_global(ref) for _ in range(6)]
  two = _processes(tiny, 2, shards=4)
  _assert_same([_global(two) for _ in range(3)], want[:3])
  _save(tmp_path, two)  # Saved after step 3.
  assert sorted(os.listdir(tmp_path)) == [f"process_{s}-of-4.json" for s in range(4)]
  resumed = _resume(tmp_path, tiny, m, shards=4)
  _assert_same([_global(resumed) for _ in range(3)], want[3:])


# Written by the loader before shards existed (commit bbd69e6), on `tiny`:
# the iterator states of processes 0 and 1 of 2 (global_batch_size 4, seed 7)
# after 3 batches, and crc32 of the next 3 global batches (every key, in
# packing.BATCH_KEYS order, the two processes' rows concatenated).
_PIPELINE = {"vocab_fingerprint": "shardfp", "n_tokens": 767, "loss_mask": False,
             "batch_format": 2, "seq_len": 16, "global_batch_size": 4, "seed": 7}
OLD_STATES = [
    {"pipeline": dict(_PIPELINE, process_index=0, process_count=2),
     "grain": {"parent_state": {"next_index": 5},
               "remainder_slices": {"inputs": [1, 26], "targets": [1, 26],
                                    "loss_mask": [1, 26]},
               "elements_from_buffer_after_checkpoint": 1}},
    {"pipeline": dict(_PIPELINE, process_index=1, process_count=2),
     "grain": {"parent_state": {"next_index": 4},
               "remainder_slices": {"inputs": [3, 5], "targets": [3, 5], "loss_mask": [3, 5]},
               "elements_from_buffer_after_checkpoint": 1}}]
OLD_NEXT_CRCS = [2592350930, 3738272464, 1909547826]


def _crc(batch) -> int:
  return zlib.crc32(b"".join(batch[k].tobytes() for k in packing.BATCH_KEYS))


@pytest.mark.parametrize("m, shards", [(2, 0), (1, 2)], ids=["same_count", "one_process"])
def test_a_checkpoint_from_before_shards_restores(tiny, tmp_path, m, shards):
  for i, state in enumerate(OLD_STATES):
    (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps(state))
  its = _resume(tmp_path, tiny, m, shards, gbs=4)
  assert [_crc(_global(its)) for _ in range(3)] == OLD_NEXT_CRCS


def test_mismatches_name_the_field(tiny, tmp_path):
  from qtrain.config import ConfigError, validate  # pylint: disable=g-import-not-at-top
  from qtrain.train.data_state import ShardCountError  # pylint: disable=g-import-not-at-top
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top
  _save(tmp_path, _processes(tiny, 1, shards=2))
  with pytest.raises(ShardCountError, match=r"saved by 2 processes or shards .*this run has 1 "
                     r"process\(es\) and config\.data\.shards=0 \(1 shards\): resume with 2 "
                     r"processes, or .*--config\.data\.shards=2"):
    _resume(tmp_path, tiny, 1, shards=0)
  with pytest.raises(ShardCountError, match=r"config\.data\.shards=4 \(4 shards\)"):
    _resume(tmp_path, tiny, 1, shards=4)
  with pytest.raises(ValueError, match=r"config\.data\.shards=3 is not a multiple of the 2 "
                     r"processes"):
    loader.owned_shards(0, 2, 3, 12)
  with pytest.raises(ValueError, match=r"global_batch_size=8 is not divisible by shards=3 "
                     r"\(config\.data\.shards\)"):
    loader.owned_shards(0, 1, 3, 8)
  for shards, message in [(3, r"config\.data\.shards=3 does not divide config\.data\."
                           r"global_batch_size=16 .*use shards among \[1, 2, 4, 8, 16\]"),
                          (-1, r"config\.data\.shards=-1 must be an int >= 0"),
                          (32, r"config\.data\.shards=32 does not divide config\.data\."
                           r"global_batch_size")]:
    cfg = smoke_config()
    cfg.data.update(shards=shards, global_batch_size=16, eval_batch_size=16)
    with pytest.raises(ConfigError, match=message):
      validate(cfg, 8)


def _losses(workdir) -> dict[int, float]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_run_resumes_only_with_its_shard_count(tmp_path):
  """One process, 8 devices: a run with shards=2 (what 2 processes load)
  saves both shards, refuses to resume as 1 shard before compiling, and
  resumes with shards=2 to the uninterrupted run's loss."""
  from qtrain.config import ConfigError  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  from conftest import smoke_config  # pylint: disable=g-import-not-at-top

  def cfg(shards):
    c = smoke_config(steps=3, checkpoint_every=2)
    c.data.shards = shards
    return c

  ref, resumed = tmp_path / "ref", tmp_path / "resumed"
  run(cfg(2), str(ref))
  data = ref / "checkpoints" / "2" / "data"
  assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json",
                                                           "process_1-of-2.json"]
  shutil.copytree(ref, resumed)
  shutil.rmtree(resumed / "checkpoints" / "3")
  config_before = (resumed / "config.json").read_bytes()
  with pytest.raises(ConfigError, match=r"saved by 2 processes or shards .*config\.data\."
                     r"shards=0 \(1 shards\).*--config\.data\.shards=2.*--config\.train\."
                     r"init_from=" + str(resumed)) as e:
    run(cfg(0), str(resumed))
  assert isinstance(e.value, CheckpointError)
  assert (resumed / "config.json").read_bytes() == config_before
  assert not list((resumed / "checkpoints").glob("*.damaged"))  # Not taken for damage.
  run(cfg(2), str(resumed))
  # Same process, mesh and batches as the uninterrupted run: XLA:CPU gives
  # the same bits; a wrong shard or position moves the loss by > 1e-3.
  assert _losses(resumed) == _losses(ref) and sorted(_losses(ref)) == [1, 2, 3]
