"""Tests of qtrain.data: token files, the grain loader, corpus, vocab, prepare.

Loader tests use tiny token files built in tmp_path whose documents start with
a unique token, so the packed rows can be parsed back into documents and
compared with the file. Real-corpus tests use the prepared `data/kjv` (the
Makefile runs prepare before the tests); a missing corpus fails them.
"""

import collections
import json
import math
import pathlib
import shutil
import struct
import subprocess
import sys
import zlib

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
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


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


def _sft_docs(n_docs, seed=0):
  """SFT-shaped docs [10 + i, prompt ..., response ..., EOS] and their masks:
  0 on the first token and the prompt, 1 on the response and EOS. Some have
  an empty prompt or an empty response (only EOS scored)."""
  rng = np.random.default_rng(seed)
  docs, masks = [], []
  for i in range(n_docs):
    n_prompt, n_response = int(rng.integers(0, 14)), int(rng.integers(0, 9))
    body = rng.integers(3, VOCAB, size=n_prompt + n_response)
    docs.append(np.concatenate([[10 + i], body, [EOS]]))
    masks.append(np.repeat(np.array([0, 1], np.uint8),
                           [1 + n_prompt, n_response + 1]))
  return docs, masks


def _write_data_dir(path, splits, fingerprint="tinyfp", masks=None):
  """A data dir like prepare's: <split>.tokens + meta.json; `masks` maps a
  split to its documents' loss masks."""
  path.mkdir(parents=True, exist_ok=True)
  meta = {"task": "tiny", "splits": {}, "vocab_size": VOCAB, "vocab_path": "none",
          "vocab_fingerprint": fingerprint, "eos_id": EOS, "pad_id": 0}
  for split, docs in splits.items():
    m = (masks or {}).get(split)
    counts = token_file.write_token_file(
        path / f"{split}.tokens", docs if m is None else zip(docs, m), VOCAB,
        fingerprint, with_mask=m is not None)
    meta["splits"][split] = {"file": f"{split}.tokens", **counts}
  (path / "meta.json").write_text(json.dumps(meta))
  return path


@pytest.fixture
def tiny(tmp_path):
  docs = _random_docs(60)
  return _write_data_dir(tmp_path / "tiny", {"train": docs, "validation": docs[:20]}), docs


@pytest.fixture
def sft(tmp_path):
  docs, masks = _sft_docs(50)
  splits = {"train": docs, "validation": docs[:30]}
  path = _write_data_dir(tmp_path / "sft", splits,
                         masks={"train": masks, "validation": masks[:30]})
  return path, docs, masks


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


def test_token_file_round_trip_with_loss_mask(tmp_path):
  docs, masks = _sft_docs(7, seed=2)
  path = tmp_path / "sft.tokens"
  counts = token_file.write_token_file(path, zip(docs, masks), VOCAB, "fp",
                                       with_mask=True)
  tf = token_file.TokenFile(path).validate()
  assert tf.has_mask and tf.version == token_file.VERSION
  assert counts["n_tokens"] == tf.num_tokens == sum(map(len, docs))
  for i, (d, m) in enumerate(zip(docs, masks)):
    np.testing.assert_array_equal(tf.doc(i), d)
    np.testing.assert_array_equal(tf.doc_mask(i), m)


def test_file_without_mask_scores_every_token(tmp_path):
  path = tmp_path / "plain.tokens"
  token_file.write_token_file(path, [np.array([5, 6, EOS])], VOCAB, "fp")
  tf = token_file.TokenFile(path).validate()
  assert not tf.has_mask and tf.mask is None
  np.testing.assert_array_equal(tf.doc_mask(0), [1, 1, 1])


def _write_version_1(path, docs, fingerprint):
  """A token file exactly as the version-1 writer made it (its layout spelled
  out here, independent of token_file.py): no mask, 4 reserved zero bytes."""
  header = struct.Struct("<8sIIQQQ16sI4x")
  tokens = np.concatenate(docs).astype("<u2").tobytes()
  offsets = np.cumsum([0] + [len(d) for d in docs]).astype("<u8").tobytes()
  body = tokens + bytes(-len(tokens) % 8) + offsets
  fields = (b"QTRAINTK", 1, 2, sum(map(len, docs)), len(docs), VOCAB,
            fingerprint.encode())
  crc = zlib.crc32(header.pack(*fields, 0), zlib.crc32(body))
  path.write_bytes(header.pack(*fields, crc) + body)


def test_version_1_files_read_as_all_scored(tmp_path):
  docs = _random_docs(30, seed=4)
  path = _write_data_dir(tmp_path / "v1", {"train": docs})
  _write_version_1(path / "train.tokens", docs, "tinyfp")
  tf = data.open_split(path, "train")
  assert (tf.version, tf.has_mask) == (1, False)
  for i in (0, 7, 29):
    np.testing.assert_array_equal(tf.doc(i), docs[i])
  it = data.make_train_iterator(path, seq_len=16, global_batch_size=2, seed=0)
  _parse_rows([next(it) for _ in range(20)], docs, 16)  # loss_mask == segments.


def _with_crc(raw):
  """`raw` with its header CRC recomputed, as a buggy writer would leave it."""
  raw = bytearray(raw)
  raw[56:60] = bytes(4)
  raw[56:60] = struct.pack("<I", zlib.crc32(bytes(raw[:64]), zlib.crc32(raw[64:])))
  return bytes(raw)


def _rewrite_header(path, **fields):
  """Changes header fields and fixes the CRC."""
  raw = bytearray(path.read_bytes())
  names = ("magic", "version", "itemsize", "n_tokens", "n_docs", "vocab_size",
           "fingerprint", "crc", "flags")
  header = dict(zip(names, token_file._HEADER.unpack(raw[:64])))
  header.update(fields)
  raw[:64] = token_file._HEADER.pack(*header.values())
  path.write_bytes(_with_crc(raw))


def _mask_start(p):
  n_tokens = token_file.TokenFile(p).num_tokens
  return 64 + -(-2 * n_tokens // 8) * 8


def _set_mask_byte(p, value):
  raw = bytearray(p.read_bytes())
  raw[_mask_start(p) + 4] = value
  p.write_bytes(_with_crc(raw))


def _truncate(p):
  p.write_bytes(p.read_bytes()[:-3])


def _flip_payload_byte(p, at=64 + 11):
  raw = bytearray(p.read_bytes())
  raw[at] ^= 0x40
  p.write_bytes(bytes(raw))


def _wrong_magic(p):
  p.write_bytes(b"NOTATOKN" + p.read_bytes()[8:])


@pytest.mark.parametrize("corrupt, problem", [
    (_truncate, "truncated"),
    (_flip_payload_byte, "checksum mismatch"),
    (lambda p: _flip_payload_byte(p, _mask_start(p) + 2), "checksum mismatch"),
    (_wrong_magic, "wrong magic"),
    (lambda p: _rewrite_header(p, vocab_size=500), "token id 999 >= vocab_size 500"),
    (lambda p: _set_mask_byte(p, 2), "loss mask value 2 is not 0/1"),
    (lambda p: _rewrite_header(p, flags=0), "has trailing bytes"),
    (lambda p: _rewrite_header(p, version=3), "format version 3"),
])
def test_token_file_errors_name_file_problem_and_fix(tmp_path, corrupt, problem):
  path = tmp_path / "bad.tokens"
  docs = [np.arange(3, 50), np.array([999, 998, 1])]
  masks = [np.zeros(47, np.uint8), np.array([0, 1, 1], np.uint8)]
  token_file.write_token_file(path, zip(docs, masks), VOCAB, "fp", with_mask=True)
  corrupt(path)
  with pytest.raises(token_file.TokenFileError) as e:
    token_file.TokenFile(path).validate()
  msg = str(e.value)
  assert str(path) in msg and problem in msg, msg
  assert "python -m qtrain.data.prepare" in msg, msg


def _open_train(path):
  return data.make_train_iterator(path, seq_len=16, global_batch_size=2, seed=0)


def _open_eval(path):
  return data.make_eval_batches(path, "train", seq_len=16, global_batch_size=2,
                                num_batches=1)


@pytest.mark.parametrize("entry", [
    lambda d: token_file.TokenFile(d / "train.tokens"),
    lambda d: data.open_split(d, "train"), _open_train, _open_eval,
], ids=["TokenFile", "open_split", "train_iterator", "eval_batches"])
@pytest.mark.parametrize("where", ["header", "tokens", "mask", "offsets"])
def test_truncated_token_file_is_one_clear_line_at_every_entry(sft, entry, where):
  path, _, _ = sft
  file = path / "train.tokens"
  keep = {"header": 40, "tokens": 64 + 9, "mask": _mask_start(file) + 5,
          "offsets": file.stat().st_size - 3}[where]
  file.write_bytes(file.read_bytes()[:keep])
  with pytest.raises(token_file.TokenFileError) as e:
    entry(path)
  msg = str(e.value)  # (The tmp path itself contains "truncated": look after it.)
  assert "\n" not in msg and msg.startswith(f"Token file {file}: truncated"), msg


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


def _parse_rows(batches, docs, seq_len, masks=None):
  """Doc ids in the order the packed rows carry them, checking every row:
  segment ids 1..k then 0 padding, positions restart per segment, each
  segment is a contiguous piece of one document with targets = next tokens,
  and loss_mask = the document's mask shifted like the targets (all ones
  without masks), 0 on padding."""
  first = {int(d[0]): i for i, d in enumerate(docs) if len(d) >= 2}
  order, cur, pos = [], None, 0
  for b in batches:
    assert set(b) == set(KEYS)
    for k in KEYS:
      assert b[k].dtype == np.int32 and b[k].shape[1] == seq_len
    for inp, tgt, seg, posn, lm in zip(*(b[k] for k in KEYS)):
      n_seg = int(seg.max())
      np.testing.assert_array_equal(seg[seg > 0], np.repeat(
          np.arange(1, n_seg + 1), np.bincount(seg)[1:]))
      assert np.all(seg[np.argmax(seg == 0):] == 0) or seg.min() > 0
      pad = seg == 0
      assert not (inp[pad].any() or tgt[pad].any() or posn[pad].any() or lm[pad].any())
      for s in range(1, n_seg + 1):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(posn[idx], np.arange(len(idx)))
        if cur is None:  # A new document starts here.
          cur, pos = first[int(inp[idx[0]])], 0
          order.append(cur)
        else:  # Continuation of a long document: only at a row start.
          assert s == 1
        d = docs[cur]
        m = np.ones(len(d)) if masks is None else masks[cur]
        np.testing.assert_array_equal(inp[idx], d[pos:pos + len(idx)])
        np.testing.assert_array_equal(tgt[idx], d[pos + 1:pos + 1 + len(idx)])
        np.testing.assert_array_equal(lm[idx], m[pos + 1:pos + 1 + len(idx)])
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


def test_sft_loss_mask_follows_packing_and_resume(sft):
  path, docs, masks = sft
  kw = dict(seq_len=16, global_batch_size=4, seed=1, process_count=2)
  for p in range(2):
    it = data.make_train_iterator(path, process_index=p, **kw)
    batches = [next(it) for _ in range(30)]  # > 1 epoch of this shard.
    order = _parse_rows(batches, docs, 16, masks)
    shard = [i for i, d in enumerate(docs) if len(d) >= 2][p::2]
    assert sorted(order[:len(shard)]) == shard
    scored = sum(int(b["loss_mask"].sum()) for b in batches)
    assert 0 < scored < sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  _assert_resumes(path, 9, 12, process_index=1, **kw)


def test_state_of_one_process_is_refused_by_another(tiny):
  path, _ = tiny
  kw = dict(seq_len=16, global_batch_size=4, seed=0, process_count=2)
  it0 = data.make_train_iterator(path, process_index=0, **kw)
  next(it0)
  state = json.loads(json.dumps(it0.get_state()))
  assert (state["pipeline"]["process_index"], state["pipeline"]["process_count"]) == (0, 2)
  it1 = data.make_train_iterator(path, process_index=1, **kw)
  with pytest.raises(ValueError, match="saved by process 0 of 2 and is being"
                     " restored by process 1 of 2"):
    it1.set_state(state)
  single = data.make_train_iterator(path, seq_len=16, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="restored by process 0 of 1"):
    single.set_state(state)


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


def _reference_rows(docs, masks, ids, seq_len):
  """Independent NumPy concat-then-split of documents `ids`, shifted for
  next-token prediction, cut into rows of seq_len: every batch key, plus
  `doc` and `offset` (which token of which document each target is)."""
  cols = collections.defaultdict(list)
  for i in ids:
    d = np.asarray(docs[i], np.int64)
    m = np.ones(len(d), np.int64) if masks is None else masks[i]
    n = len(d) - 1
    for k, v in (("inputs", d[:-1]), ("targets", d[1:]), ("loss_mask", m[1:]),
                 ("doc", np.full(n, i)), ("offset", np.arange(1, n + 1))):
      cols[k].append(np.asarray(v, np.int64))
  flat = {k: np.concatenate(v) for k, v in cols.items()}
  n_rows = -(-len(flat["inputs"]) // seq_len)
  pad = n_rows * seq_len - len(flat["inputs"])
  rows = {k: np.pad(v, (0, pad), constant_values=-1 if k == "doc" else 0
                    ).reshape(n_rows, seq_len) for k, v in flat.items()}
  starts = np.ones_like(rows["doc"], bool)
  starts[:, 1:] = rows["doc"][:, 1:] != rows["doc"][:, :-1]
  real = rows["doc"] >= 0
  rows["segment_ids"] = np.cumsum(starts, axis=1) * real
  at = np.arange(seq_len)
  seg_start = np.maximum.accumulate(np.where(starts, at, 0), axis=1)
  rows["positions"] = (at - seg_start) * real
  return rows


def _row_indices(batches, ref):
  """Index in `ref` of every non-padding row of `batches` (asserts each is one
  of ref's rows, exactly) and the padding rows' count (asserted all zero)."""
  key = lambda row: b"".join(np.asarray(row[k], np.int64).tobytes() for k in KEYS)
  index = {key({k: ref[k][r] for k in KEYS}): r for r in range(len(ref["doc"]))}
  found, n_pad = [], 0
  for b in batches:
    for j in range(len(b["inputs"])):
      row = {k: b[k][j] for k in KEYS}
      if not row["segment_ids"].any():
        assert not any(row[k].any() for k in KEYS)
        n_pad += 1
      else:
        assert key(row) in index, "an eval row that packing never makes"
        found.append(index[key(row)])
  return found, n_pad


def _scored(ref, rows):
  """(doc, offset) of every scored target in `rows` of `ref`."""
  pick = ref["loss_mask"][rows] > 0
  return list(zip(ref["doc"][rows][pick].tolist(), ref["offset"][rows][pick].tolist()))


def test_eval_sample_spreads_rows_over_the_whole_split(sft):
  path, docs, masks = sft
  val, val_masks = docs[:30], masks[:30]
  usable = [i for i, d in enumerate(val) if len(d) >= 2]
  kw = dict(seq_len=8, global_batch_size=4, num_batches=3, process_count=2)
  per_proc = [data.make_eval_batches(path, process_index=p, **kw) for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1]) == 3  # Lock-step.
  scored = []
  for p, batches in enumerate(per_proc):
    ref = _reference_rows(val, val_masks, usable[p::2], 8)
    n_ref = len(ref["doc"])
    rows, n_pad = _row_indices(batches, ref)
    assert n_ref > 2 * len(rows) and (len(rows), n_pad) == (6, 0)  # A sample.
    assert rows[0] == 0 and rows[-1] == n_ref - 1  # First and last documents.
    gaps = np.diff(rows)
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # Evenly spread.
    scored += _scored(ref, rows)
  assert len(scored) == len(set(scored)) > 0  # No token counted twice.
  again = data.make_eval_batches(path, process_index=0, **kw)
  for a, b in zip(per_proc[0], again, strict=True):
    for k in KEYS:
      np.testing.assert_array_equal(a[k], b[k])


def test_eval_whole_split_scores_every_target_once(sft):
  path, docs, masks = sft
  val, val_masks = docs[:30], masks[:30]
  usable = [i for i, d in enumerate(val) if len(d) >= 2]
  kw = dict(seq_len=8, global_batch_size=4, num_batches=0, process_count=2)
  scored, n_batches = [], set()
  for p in range(2):
    batches = data.make_eval_batches(path, process_index=p, **kw)
    n_batches.add(len(batches))
    ref = _reference_rows(val, val_masks, usable[p::2], 8)
    rows, n_pad = _row_indices(batches, ref)
    assert rows == list(range(len(ref["doc"])))  # Every row, in order.
    assert n_pad == 2 * len(batches) - len(rows)
    scored += _scored(ref, rows)
  assert len(n_batches) == 1
  expected = [(i, t) for i in usable for t in np.flatnonzero(val_masks[i][1:]) + 1]
  assert sorted(scored) == sorted(expected)


def test_eval_batches_reject_negative_count(tiny):
  path, _ = tiny
  with pytest.raises(ValueError, match=r"config\.data\.eval_batches=-1"):
    data.make_eval_batches(path, seq_len=16, global_batch_size=4, num_batches=-1)


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


def _kjv_eval_books(kjv, **kw):
  """The validation books whose tokens the eval batches score, and the count
  of scored targets."""
  tf = data.open_split(kjv, "validation")
  docs = [np.asarray(tf.doc(i)) for i in range(tf.num_docs)]
  chapters = list(dict.fromkeys(
      (r["book"], r["chapter"]) for r in corpus.load_verses("validation")))
  ref = _reference_rows(docs, None, range(len(docs)), kw["seq_len"])
  rows, _ = _row_indices(data.make_eval_batches(kjv, **kw), ref)
  scored = _scored(ref, rows)
  assert len(scored) == len(set(scored))  # No token counted twice.
  return {chapters[d][0] for d, _ in scored}, len(scored)


def test_kjv_eval_sample_covers_every_validation_book(kjv):
  # configs/default.py's evaluation: 8 batches of 16 x 128, about a third of
  # the split, in file order mostly Ruth to John before this was fixed.
  books, n = _kjv_eval_books(kjv, seq_len=128, global_batch_size=16, num_batches=8)
  info = data.read_meta(kjv)["splits"]["validation"]
  last_row_padding = -(info["n_tokens"] - info["n_docs"]) % 128  # The split's end.
  assert books == set(corpus.VALIDATION_BOOKS)
  assert n == 8 * 16 * 128 - last_row_padding


def test_kjv_eval_whole_split(kjv):
  meta = data.read_meta(kjv)
  books, n = _kjv_eval_books(kjv, seq_len=128, global_batch_size=16, num_batches=0)
  info = meta["splits"]["validation"]
  assert books == set(corpus.VALIDATION_BOOKS)
  assert n == info["n_tokens"] - info["n_docs"]  # Every target of every chapter.


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


def test_prepare_is_idempotent_and_notices_corruption(kjv, tmp_path, monkeypatch):
  meta = data.read_meta(kjv)
  stamps = {p: p.stat().st_mtime_ns for p in kjv.iterdir()}

  def no_work(*args, **kwargs):
    raise AssertionError("prepare redid work on up-to-date data")
  # Up to date means no TensorFlow/seqio import, no vocabulary, no token file
  # (the old check was a wall-clock bound, which a loaded machine can break).
  for module in ("seqio", "tensorflow"):
    monkeypatch.setitem(sys.modules, module, None)  # `import` raises.
  monkeypatch.setattr(prepare.vocab_lib, "train_vocab", no_work)
  monkeypatch.setattr(prepare.token_file, "write_token_file", no_work)
  again = prepare.prepare("kjv", kjv, vocab_size=meta["vocab_size"])
  assert again["vocab_fingerprint"] == meta["vocab_fingerprint"]
  assert {p: p.stat().st_mtime_ns for p in kjv.iterdir()} == stamps  # No rewrite.
  copy = shutil.copytree(kjv, tmp_path / "kjv")
  assert prepare.up_to_date(copy, "kjv", meta["vocab_size"]) is not None
  assert prepare.up_to_date(copy, "kjv", 4000) is None  # Other request.
  _flip_payload_byte(copy / "validation.tokens")
  assert prepare.up_to_date(copy, "kjv", meta["vocab_size"]) is None
  _truncate(copy / "train.tokens")
  assert prepare.up_to_date(copy, "kjv", meta["vocab_size"]) is None
