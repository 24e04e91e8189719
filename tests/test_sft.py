"""The SFT task: its examples, its loss mask through packing against a
hand-computed loss, preparation on a base model's vocabulary, and
`python -m qtrain.finetune` from a pretrained run."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qtrain.config import ConfigError
from qtrain.data import loader, sft, token_file
from qtrain.train.loss import cross_entropy, loss_mask
from qtrain.train.warm_start import check_source
from test_corpus_sources import _b64  # dictd's base-64 digits, written apart from the reader.

ROOT = pathlib.Path(__file__).resolve().parents[1]
KJV = ROOT / "data" / "kjv"

# Three dictd entries and their index (offsets/lengths in dictd's base-64
# digits): a metadata entry, a plain one, one with two headwords.
_ENTRIES = [
    ("00-database-url", "00-database-url\n     ftp://ftp.gnu.org/gnu/gcide\n"),
    ("Anneloid", 'Anneloid \\An"ne*loid\\, n. [F. annel[\'e] ringed + -oid.] (Zool.)\n'
                 "   An animal resembling an annelid.\n   [1913 Webster]\n"),
    ("Cat", "Cat \\Cat\\, n.\n   A small domesticated carnivore.\n   [1913 Webster]\n"),
    ("Bare", "Bare \\Bare\\, a.\n   Without covering.\n   [1913 Webster]\n"),
]
def _write_gcide(root: pathlib.Path) -> None:
  """A dict-gcide install under ``root`` holding `_ENTRIES` (+ a second
  headword, "Cats", pointing at the "Cat" entry)."""
  data, lines, offset = b"", [], 0
  for word, text in _ENTRIES:
    raw = text.encode()
    lines.append(f"{word}\t{_b64(offset)}\t{_b64(len(raw))}")
    if word == "Cat":
      lines.append(f"Cats\t{_b64(offset)}\t{_b64(len(raw))}")
    data, offset = data + raw, offset + len(raw)
  d = root / "usr/share/dictd"
  d.mkdir(parents=True)
  (d / "gcide.index").write_text("\n".join(lines) + "\n")
  (d / "gcide.dict.dz").write_bytes(gzip.compress(data))  # dictzip is gzip-compatible.


def test_define_examples_strip_headword_and_skip_metadata(tmp_path):
  _write_gcide(tmp_path)
  got = {s: list(sft.define_examples((tmp_path / sft.GCIDE_INDEX).read_text(),
                                     gzip.decompress((tmp_path / sft.GCIDE_DATA).read_bytes()), s))
         for s in sft.SPLITS}
  every = sorted(got["train"] + got["validation"], key=lambda e: e["inputs"])
  assert every == [
      {"inputs": "Define: Anneloid\n",
       "targets": "n. [F. annel['e] ringed + -oid.] (Zool.) An animal resembling an annelid."},
      {"inputs": "Define: Bare\n", "targets": "a. Without covering."},
      {"inputs": "Define: Cat\n", "targets": "n. A small domesticated carnivore."},
  ]
  for split, examples in got.items():  # The split is the headword's hash.
    assert all(sft.debian.split_of(e["inputs"][len("Define: "):-1]) == split for e in examples)


def test_recite_examples_are_kjv_verses_by_split():
  train = sft.recite_examples("train")
  assert next(train) == {"inputs": "Genesis 1:1\n",
                         "targets": "In the beginning God created the heaven and the earth."}
  held_out = list(sft.recite_examples("validation"))
  assert {e["inputs"].split()[0] for e in held_out} >= {"Ruth", "Jonah", "Jude"}
  assert not any(e["inputs"].startswith("Genesis") for e in held_out)


def test_examples_name_the_package_when_the_dictionary_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install .*dict-gcide"):
    next(sft.examples("train", tmp_path))


# --------------------------------------------------------------------------
# The mask through token files, packing and the loss.

SEQ, ROWS = 16, 2


def _docs():
  """Prompt/response documents whose shifted lengths sum to exactly 3 batches
  of ROWS x SEQ targets, so the first 3 batches are one epoch, whatever the
  shuffle, with documents cut across rows and batches."""
  rng = np.random.default_rng(0)
  docs, masks = [], []
  for n_prompt, n_response in ((4, 9), (3, 8), (6, 11), (2, 7), (5, 10), (3, 4), (7, 12), (5, 8)):
    docs.append(rng.integers(2, 40, n_prompt + n_response).astype(np.int32))
    masks.append(np.r_[np.zeros(n_prompt), np.ones(n_response)].astype(np.uint8))
  assert sum(len(d) - 1 for d in docs) == 3 * ROWS * SEQ
  return docs, masks


def _write_sft_dir(path: pathlib.Path, docs, masks) -> None:
  path.mkdir()
  counts = token_file.write_token_file(path / "train.tokens", zip(docs, masks), 64, "fp",
                                       with_mask=True)
  split = {"file": "train.tokens", "loss_mask": True, **counts}
  (path / "meta.json").write_text(json.dumps(
      {"splits": {"train": split}, "vocab_size": 64, "vocab_fingerprint": "fp"}))


def test_loss_mask_through_packing_equals_hand_computed_loss(tmp_path):
  """Over one epoch of packed rows, the loss scores exactly the response
  tokens of every document, each predicted from its own document's previous
  token: the sum of -log softmax(table[prev])[next] over response positions
  j >= 1 of each document, computed here from the documents alone. Prompt
  tokens (and a document's first token) are never scored, also where a
  document is cut across rows. Tolerance: float32 log-softmax sums of ~100
  terms vs float64, 1e-5 relative."""
  docs, masks = _docs()
  _write_sft_dir(tmp_path / "d", docs, masks)
  table = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
  it = loader.make_train_iterator(tmp_path / "d", seq_len=SEQ, global_batch_size=ROWS, seed=3)
  nll, scored, pieces = 0.0, 0.0, 0
  for _ in range(3):
    b = next(it)
    pieces += sum(len(set(row[row > 0])) for row in b["segment_ids"])
    _, nll_sum, n, _ = cross_entropy(table[b["inputs"]], b["targets"], loss_mask(b))
    nll, scored = nll + float(nll_sum), scored + float(n)
  # A document cut across rows is two pieces (two segments, positions
  # restarting): more pieces than documents.
  assert pieces > len(docs), "the fixture should cut documents across rows"
  t64 = table.astype(np.float64)
  log_p = t64 - np.log(np.exp(t64).sum(-1, keepdims=True))
  want = sum(-log_p[d[j - 1], d[j]] for d, m in zip(docs, masks)
             for j in range(1, len(d)) if m[j])
  assert scored == sum(int(m[1:].sum()) for m in masks)
  np.testing.assert_allclose(nll, want, rtol=1e-5)


# --------------------------------------------------------------------------
# Preparation on the base model's vocabulary, and fine-tuning.


def _cli(*args, cwd):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
  """sft_en prepared from a two-entry dictionary + KJV on data/kjv's vocabulary."""
  from qtrain.data import prepare  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("sft")
  _write_gcide(tmp / "root")
  old = os.environ.get("QTRAIN_DEBIAN_ROOT")
  os.environ["QTRAIN_DEBIAN_ROOT"] = str(tmp / "root")
  try:
    meta = prepare.prepare("sft_en", tmp / "sft", vocab_from=KJV)
  finally:
    if old is None:
      del os.environ["QTRAIN_DEBIAN_ROOT"]
    else:
      os.environ["QTRAIN_DEBIAN_ROOT"] = old
  return tmp / "sft", meta


def test_prepare_uses_the_base_vocabulary_and_masks_prompts(sft_data):
  out, meta = sft_data
  assert meta["vocab_fingerprint"] == loader.read_meta(KJV)["vocab_fingerprint"]
  assert meta["splits"]["train"]["loss_mask"] and meta["splits"]["validation"]["loss_mask"]
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm.model"))
  tf = token_file.TokenFile(out / "train.tokens")
  doc, mask = tf.doc(0), tf.doc_mask(0)  # Dictionary examples come first.
  assert sp.decode(doc[mask == 0].tolist()) == "Define: Anneloid"  # The prompt, unscored.
  assert sp.decode(doc[mask == 1].tolist()) == (  # KJV's vocabulary has no "+".
      "n. [F. annel['e] ringed  \u2047  -oid.] (Zool.) An animal resembling an annelid.")
  assert doc[-1] == meta["eos_id"] and mask[-1] == 1  # The response's EOS is scored.
  for i in range(tf.num_docs):  # Prompt, then response: one switch, never back.
    assert np.all(np.diff(tf.doc_mask(i).astype(int)) >= 0)


def test_finetune_from_a_pretrained_run_reports_response_perplexity(sft_data, smoke_run_dir,
                                                                   tmp_path):
  """From the session's smoke run (tests/conftest.py: 4 steps on KJV, 8
  devices), read only, onto this process's one device."""
  out, _ = sft_data
  smoke = "--config=configs/default.py:smoke"
  tuned = _cli("qtrain.finetune", smoke, f"--workdir={tmp_path / 'sft'}",
               f"--init_from={smoke_run_dir}", f"--config.data.dir={out}",
               "--config.train.steps=3", "--config.train.sample_tokens=0", cwd=ROOT)
  assert tuned.returncode == 0, tuned.stderr[-2000:]
  assert f"initialised params from {smoke_run_dir} (step 4)" in tuned.stdout
  assert "held-out response perplexity: initial" in tuned.stdout
  rows = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
  first = next(r for r in rows if r.get("step") == 0 and "eval_ppl" in r)
  # The initial held-out loss is the base model's, on responses only: below
  # an untrained model's log(V) (the base trained 4 steps on KJV text).
  assert first["eval_loss"] < np.log(8192)
  # A second workdir of the same config, with another (wrong) source: refused
  # in one line before anything compiles.
  wrong = _cli("qtrain.finetune", smoke, f"--workdir={tmp_path / 'sft2'}",
               f"--init_from={tmp_path / 'missing'}", f"--config.data.dir={out}", cwd=ROOT)
  assert wrong.returncode == 2 and "config.json is missing" in wrong.stderr
  assert "Traceback" not in wrong.stderr


def test_source_trained_on_another_vocabulary_is_refused(tmp_path):
  from qtrain.config import base_config  # pylint: disable=g-import-not-at-top
  other = tmp_path / "other_data"
  other.mkdir()
  (other / "meta.json").write_text(json.dumps(
      {"splits": {}, "vocab_size": 8000, "vocab_fingerprint": "0123456789abcdef"}))
  source_cfg = base_config()
  source_cfg.data.dir = str(other)
  (tmp_path / "base").mkdir()
  (tmp_path / "base" / "config.json").write_text(source_cfg.to_json())
  cfg = base_config()
  cfg.data.dir = str(KJV)
  cfg.train.init_from = str(tmp_path / "base")
  with pytest.raises(ConfigError, match="--vocab_from=.*other_data"):
    check_source(cfg)
  cfg.model.d_model = 128
  with pytest.raises(ConfigError, match=r"config.model.d_model=128 \(source 256\)"):
    check_source(cfg)
  # Same shapes, another function (an imported Llama-3's RoPE base): refused too.
  cfg.model.d_model = source_cfg.model.d_model
  cfg.model.rope_theta = 500000.0
  with pytest.raises(ConfigError, match=r"rope_theta=500000.0 \(source 10000"):
    check_source(cfg)
  # A source written before a field existed compares as the base default:
  # without qkv_bias it is a bias-free model, so a qkv_bias run is refused.
  cfg.model.rope_theta = source_cfg.model.rope_theta
  old = json.loads(source_cfg.to_json())
  del old["model"]["qkv_bias"]
  (tmp_path / "base" / "config.json").write_text(json.dumps(old))
  cfg.model.qkv_bias = True
  with pytest.raises(ConfigError, match=r"qkv_bias=True \(source False\)"):
    check_source(cfg)
  shutil.rmtree(tmp_path / "base")
