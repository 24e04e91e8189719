"""Tests of qtrain.data: token files, the grain loader, corpus, vocab, prepare.

Loader tests use tiny token files built in tmp_path whose documents start with
a unique token, so the packed rows can be parsed back into documents and
compared with the file. Real-corpus tests use the prepared `data/kjv` (the
Makefile runs prepare before the tests); a missing corpus fails them.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from qtrain import data
from qtrain.data import corpus
from qtrain.data import prepare
from qtrain.data import token_file

REPO = pathlib.Path(__file__).resolve().parents[1]
KJV_DIR = REPO / "data" / "kjv"
VOCAB = 1000
EOS = 1
KEYS = ("inputs", "targets", "segment_ids", "positions")


def _random_docs(n_docs, seed=0, max_len=40):
  """Docs [10 + i, random ..., EOS]; a few are a lone EOS (no target)."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n_docs):
    if i % 17 == 5:
      docs.append(np.array([EOS]))
      continue
    body = rng.integers(3, VOCAB, size=int(rng.integers(0, max_len)))
    docs.append(np.concatenate([[10 + i], body, [EOS]]))
  return docs


def _write_data_dir(path, splits, fingerprint="tinyfp"):
  """A data dir like prepare's: <split>.tokens + meta.json."""
  path.mkdir(parents=True, exist_ok=True)
  meta = {"task": "tiny", "splits": {}, "vocab_size": VOCAB, "vocab_path": "none",
          "vocab_fingerprint": fingerprint, "eos_id": EOS, "pad_id": 0}
  for split, docs in splits.items():
    counts = token_file.write_token_file(path / f"{split}.tokens", docs, VOCAB,
                                         fingerprint)
    meta["splits"][split] = {"file": f"{split}.tokens", **counts}
  (path / "meta.json").write_text(json.dumps(meta))
  return path


@pytest.fixture
def tiny(tmp_path):
  docs = _random_docs(60)
  return _write_data_dir(tmp_path / "tiny", {"train": docs, "validation": docs[:20]}), docs


@pytest.fixture(scope="module")
def kjv():
  # `make test` prepares it first; a missing corpus is a failure, not a skip.
  assert (KJV_DIR / "meta.json").is_file(), f"{KJV_DIR} not prepared: run `make data`"
  return KJV_DIR


# --- token files -------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [VOCAB, 70_000])
def test_token_file_round_trip(tmp_path, vocab_size):
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, vocab_size, size=n) for n in (5, 0, 1, 300, 7)]
  path = tmp_path / "x.tokens"
  counts = token_file.write_token_file(path, iter(docs), vocab_size, "fp123")
  assert counts == {"n_tokens": 313, "n_docs": 5}
  tf = token_file.TokenFile(path).validate()
  assert tf.dtype == (np.uint16 if vocab_size <= 65536 else np.uint32)
  assert (tf.num_docs, tf.vocab_size, tf.fingerprint) == (5, vocab_size, "fp123")
  for i, d in enumerate(docs):
    np.testing.assert_array_equal(tf.doc(i), d)
  np.testing.assert_array_equal(tf.doc_lengths(), [5, 0, 1, 300, 7])


def _rewrite_header(path, **fields):
  """Changes header fields and fixes the CRC, as a buggy writer would."""
  raw = bytearray(path.read_bytes())
  names = ("magic", "version", "itemsize", "n_tokens", "n_docs", "vocab_size",
           "fingerprint", "crc")
  header = dict(zip(names, token_file._HEADER.unpack(raw[:64])))
  header.update(fields, crc=0)
  crc = token_file.zlib.crc32(raw[64:])
  crc = token_file.zlib.crc32(token_file._HEADER.pack(*header.values()), crc)
  header["crc"] = crc
  raw[:64] = token_file._HEADER.pack(*header.values())
  path.write_bytes(bytes(raw))


def _truncate(p):
  p.write_bytes(p.read_bytes()[:-3])


def _flip_payload_byte(p):
  raw = bytearray(p.read_bytes())
  raw[64 + 11] ^= 0x40
  p.write_bytes(bytes(raw))


def _wrong_magic(p):
  p.write_bytes(b"NOTATOKN" + p.read_bytes()[8:])


@pytest.mark.parametrize("corrupt, problem", [
    (_truncate, "truncated"),
    (_flip_payload_byte, "checksum mismatch"),
    (_wrong_magic, "wrong magic"),
    (lambda p: _rewrite_header(p, vocab_size=500), "token id 999 >= vocab_size 500"),
])
def test_token_file_errors_name_file_problem_and_fix(tmp_path, corrupt, problem):
  path = tmp_path / "bad.tokens"
  docs = [np.arange(3, 50), np.array([999, 998, 1])]
  token_file.write_token_file(path, docs, VOCAB, "fp")
  corrupt(path)
  with pytest.raises(token_file.TokenFileError) as e:
    token_file.TokenFile(path).validate()
  msg = str(e.value)
  assert str(path) in msg and problem in msg, msg
  assert "python -m qtrain.data.prepare" in msg, msg


def test_killed_write_leaves_no_file(tmp_path):
  def docs():
    yield np.arange(10)
    raise KeyboardInterrupt  # Killed mid-way.
  path = tmp_path / "t.tokens"
  with pytest.raises(KeyboardInterrupt):
    token_file.write_token_file(path, docs(), VOCAB, "fp")
  assert list(tmp_path.iterdir()) == []


def test_writer_rejects_ids_outside_vocab(tmp_path):
  with pytest.raises(ValueError, match="outside"):
    token_file.write_token_file(tmp_path / "t.tokens", [np.array([VOCAB])], VOCAB, "fp")


# --- loader ------------------------------------------------------------------


def _parse_rows(batches, docs, seq_len):
  """Doc ids in the order the packed rows carry them, checking every row:
  segment ids 1..k then 0 padding, positions restart per segment, each
  segment is a contiguous piece of one document with targets = next tokens."""
  first = {int(d[0]): i for i, d in enumerate(docs) if len(d) >= 2}
  order, cur, pos = [], None, 0
  for b in batches:
    assert set(b) == set(KEYS)
    for k in KEYS:
      assert b[k].dtype == np.int32 and b[k].shape[1] == seq_len
    for inp, tgt, seg, posn in zip(*(b[k] for k in KEYS)):
      n_seg = int(seg.max())
      np.testing.assert_array_equal(seg[seg > 0], np.repeat(
          np.arange(1, n_seg + 1), np.bincount(seg)[1:]))
      assert np.all(seg[np.argmax(seg == 0):] == 0) or seg.min() > 0
      assert not (inp[seg == 0].any() or tgt[seg == 0].any() or posn[seg == 0].any())
      for s in range(1, n_seg + 1):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(posn[idx], np.arange(len(idx)))
        if cur is None:  # A new document starts here.
          cur, pos = first[int(inp[idx[0]])], 0
          order.append(cur)
        else:  # Continuation of a long document: only at a row start.
          assert s == 1
        d = docs[cur]
        np.testing.assert_array_equal(inp[idx], d[pos:pos + len(idx)])
        np.testing.assert_array_equal(tgt[idx], d[pos + 1:pos + 1 + len(idx)])
        pos += len(idx)
        if pos == len(d) - 1:
          cur = None
  return order


def test_train_batches_pack_shift_and_cover_each_epoch_once(tiny):
  path, docs = tiny
  seq_len, gbs, pc = 16, 4, 2
  usable = [i for i, d in enumerate(docs) if len(d) >= 2]
  orders = []
  for p in range(pc):
    shard = usable[p::pc]
    epoch_tokens = sum(len(docs[i]) - 1 for i in shard)
    n = 2 * math.ceil(epoch_tokens / (seq_len * gbs // pc)) + 2
    it = data.make_train_iterator(path, seq_len=seq_len, global_batch_size=gbs,
                                  seed=3, process_index=p, process_count=pc)
    batches = [next(it) for _ in range(n)]
    assert batches[0]["inputs"].shape == (gbs // pc, seq_len)
    order = _parse_rows(batches, docs, seq_len)
    epoch0, epoch1 = order[:len(shard)], order[len(shard):2 * len(shard)]
    assert sorted(epoch0) == shard and sorted(epoch1) == shard
    assert epoch0 != epoch1  # Reshuffled every epoch.
    orders.append(epoch0)
  assert not set(orders[0]) & set(orders[1])
  assert sorted(orders[0] + orders[1]) == usable


def test_different_seeds_give_different_orders(tiny):
  path, _ = tiny
  first = [next(data.make_train_iterator(path, seq_len=16, global_batch_size=4,
                                         seed=s))["inputs"] for s in (0, 1, 0)]
  assert not np.array_equal(first[0], first[1])
  np.testing.assert_array_equal(first[0], first[2])


def _assert_resumes(path, n_before, n_after, **kw):
  ref = data.make_train_iterator(path, **kw)
  for _ in range(n_before):
    next(ref)
  state = json.loads(json.dumps(ref.get_state()))  # As a checkpoint stores it.
  expected = [next(ref) for _ in range(n_after)]
  resumed = data.make_train_iterator(path, **kw)
  resumed.set_state(state)
  for want, got in zip(expected, (next(resumed) for _ in range(n_after))):
    for k in KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  return state


@pytest.mark.parametrize("n_before", [0, 1, 7, 40])
def test_resume_reproduces_batches(tiny, n_before):
  path, _ = tiny
  _assert_resumes(path, n_before, 12, seq_len=16, global_batch_size=4, seed=5,
                  process_index=1, process_count=2)


def test_resume_at_document_boundary(tmp_path):
  # Every doc has 4 targets and rows hold 8: each batch ends exactly at a
  # document boundary, the state whose JSON form grain alone misreads.
  docs = [np.array([10 + i, 5, 6, 7, EOS]) for i in range(30)]
  path = _write_data_dir(tmp_path / "aligned", {"train": docs})
  state = _assert_resumes(path, 3, 10, seq_len=8, global_batch_size=2, seed=0)
  assert state["grain"]["remainder_slices"]["inputs"] == [-1, -1]


def test_set_state_rejects_other_pipeline(tiny):
  path, _ = tiny
  state = data.make_train_iterator(path, seq_len=16, global_batch_size=4, seed=0).get_state()
  other = data.make_train_iterator(path, seq_len=32, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="different pipeline"):
    other.set_state(state)


def test_bad_batch_split_is_a_clear_error(tiny):
  path, _ = tiny
  with pytest.raises(ValueError, match="not divisible by process_count"):
    data.make_train_iterator(path, seq_len=16, global_batch_size=3, seed=0,
                             process_count=2)


def test_eval_batches_are_fixed_and_in_lock_step(tiny):
  path, docs = tiny
  kw = dict(seq_len=16, global_batch_size=4, num_batches=1000, process_count=2)
  per_proc = [data.make_eval_batches(path, process_index=p, **kw) for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) >= 1  # Lock-step.
  again = data.make_eval_batches(path, process_index=0, **kw)
  for a, b in zip(per_proc[0], again, strict=True):
    for k in KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  val = docs[:20]
  order = _parse_rows(per_proc[0], val, 16)
  usable = [i for i, d in enumerate(val) if len(d) >= 2]
  assert order == usable[0::2][:len(order)]  # File order, no shuffle.
  few = data.make_eval_batches(path, seq_len=16, global_batch_size=4, num_batches=2)
  assert len(few) == 2


def test_read_meta_missing_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="make data"):
    data.read_meta(tmp_path)


def test_check_vocab_names_config_field():
  meta = {"vocab_size": 8000, "data_dir": "d"}
  data.check_vocab(meta, 8064)  # Padded up: fine.
  with pytest.raises(ValueError, match=r"config\.model\.vocab_size=4000"):
    data.check_vocab(meta, 4000)


def test_training_path_imports_no_tensorflow():
  code = ("import sys, qtrain.data; "
          "bad = {'tensorflow', 'seqio', 'sentencepiece'} & set(sys.modules); "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- corpus, vocabulary, prepare (real corpus) --------------------------------


def test_corpus_split_is_by_book_and_about_five_percent():
  train, valid = (corpus.load_verses(s) for s in corpus.SPLITS)
  train_books = {r["book"] for r in train}
  valid_books = {r["book"] for r in valid}
  assert valid_books == set(corpus.VALIDATION_BOOKS)
  assert not train_books & valid_books and len(train_books | valid_books) == 66
  assert 0.03 <= len(valid) / (len(train) + len(valid)) <= 0.08
  assert len(corpus.load_documents("validation")) == 60  # Chapters.


def test_vocab_ids_and_fingerprint(kjv):
  meta = data.read_meta(kjv)
  spm_path = kjv / meta["vocab_path"]
  sp = data.load_sentencepiece(spm_path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.get_piece_size() == meta["vocab_size"] == 8000
  assert data.vocab_fingerprint(spm_path) == data.vocab_fingerprint(spm_path)
  assert data.vocab_fingerprint(spm_path) == meta["vocab_fingerprint"]
  data.check_fingerprint(meta, spm_path)
  mtime = spm_path.stat().st_mtime_ns
  assert data.train_vocab(kjv, 8000) == str(spm_path)  # Cached, not retrained.
  assert spm_path.stat().st_mtime_ns == mtime


def test_check_fingerprint_rejects_other_vocab(kjv, tmp_path):
  meta = data.read_meta(kjv)
  other = tmp_path / "other.model"
  other.write_bytes((kjv / meta["vocab_path"]).read_bytes() + b"x")
  with pytest.raises(ValueError, match="Vocabulary mismatch"):
    data.check_fingerprint(meta, other)


def test_token_files_hold_sentencepiece_tokens_plus_eos(kjv):
  meta = data.read_meta(kjv)
  sp = data.load_sentencepiece(kjv / meta["vocab_path"])
  tf = data.open_split(kjv, "validation")
  texts = corpus.load_documents("validation")
  assert tf.num_docs == len(texts) == meta["splits"]["validation"]["n_docs"]
  for i in (0, 17, len(texts) - 1):
    np.testing.assert_array_equal(tf.doc(i), sp.encode(texts[i]) + [meta["eos_id"]])


def test_unigram_perplexity_matches_float64_recomputation(kjv):
  meta = data.read_meta(kjv)
  train = np.asarray(data.open_split(kjv, "train").tokens, dtype=np.int64)
  valid = np.asarray(data.open_split(kjv, "validation").tokens, dtype=np.int64)
  v = meta["vocab_size"]
  ids, counts = np.unique(train, return_counts=True)
  p = counts / counts.sum()
  ppl_train = math.exp(-float(np.sum(p * np.log(p))))
  smoothed = np.ones(v)
  smoothed[ids] += counts
  smoothed /= len(train) + v
  ppl_valid = math.exp(-float(np.mean(np.log(smoothed[valid]))))
  # Only the summation order differs from prepare's: 1e-12 relative.
  assert meta["unigram_ppl_train"] == pytest.approx(ppl_train, rel=1e-12)
  assert meta["unigram_ppl_validation"] == pytest.approx(ppl_valid, rel=1e-12)


def test_prepare_is_idempotent_and_notices_corruption(kjv, tmp_path):
  meta = data.read_meta(kjv)
  stamps = {p: p.stat().st_mtime_ns for p in kjv.iterdir()}
  t0 = time.perf_counter()
  again = prepare.prepare("kjv", kjv, vocab_size=meta["vocab_size"])
  assert time.perf_counter() - t0 < 2.0
  assert again["vocab_fingerprint"] == meta["vocab_fingerprint"]
  assert {p: p.stat().st_mtime_ns for p in kjv.iterdir()} == stamps  # No rewrite.
  copy = shutil.copytree(kjv, tmp_path / "kjv")
  assert prepare.up_to_date(copy, "kjv", meta["vocab_size"]) is not None
  assert prepare.up_to_date(copy, "kjv", 4000) is None  # Other request.
  _flip_payload_byte(copy / "validation.tokens")
  assert prepare.up_to_date(copy, "kjv", meta["vocab_size"]) is None
