"""`python -m qtrain.data.prepare` on tasks that are not kjv: a mixture of two
plain-text tasks and a prompt/response (SFT) task, all with their own small
SentencePiece vocabulary trained here.

One subprocess prepares both (seqio imports TensorFlow, which this test
process must not pay for twice, nor keep); the checks read the results with
sentencepiece and the loader only, against references computed here.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qtrain import data

REPO = pathlib.Path(__file__).resolve().parents[1]
EOS = 1
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"
         " xi omicron pi rho sigma tau upsilon phi chi psi omega").split()

# Registered by prepare's --module_import: two plain-text tasks, their
# mixture, and an SFT task (prompt under "inputs", response under "targets").
TASKS_MODULE = textwrap.dedent('''
    import json, os
    import seqio
    import tensorflow as tf

    ROWS = json.loads(open(os.environ["TINY_ROWS"]).read())
    VOCAB = seqio.SentencePieceVocabulary(os.environ["TINY_SPM"])

    def _source(rows):
      keys = sorted(next(iter(rows.values()))[0])
      def fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_generator(
            lambda: iter(rows[split]),
            output_signature={k: tf.TensorSpec((), tf.string) for k in keys})
      return seqio.FunctionDataSource(fn, splits=tuple(rows))

    def _task(name, features):
      return seqio.TaskRegistry.add(
          name, source=_source(ROWS[name]),
          preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
          output_features={f: seqio.Feature(VOCAB, add_eos=f == "targets")
                           for f in features})

    _task("tiny_a", ["targets"])
    _task("tiny_b", ["targets"])
    seqio.MixtureRegistry.add("tiny_mix", ["tiny_a", "tiny_b"], default_rate=1.0)
    _task("tiny_sft", ["inputs", "targets"])
''')


def _sentences(rng, n, lo=2, hi=9):
  return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))
          for _ in range(n)]


def _rows(seed=0):
  """Texts of every task and split (the SFT task's prompts and responses)."""
  rng = np.random.default_rng(seed)
  plain = lambda n: [{"targets": t} for t in _sentences(rng, n)]
  sft = lambda n: [{"inputs": p, "targets": r} for p, r in
                   zip(_sentences(rng, n, 3, 12), _sentences(rng, n, 1, 6))]
  return {"tiny_a": {"train": plain(40), "validation": plain(10)},
          "tiny_b": {"train": plain(25), "validation": plain(8)},
          "tiny_sft": {"train": sft(30), "validation": sft(12)}}


def _train_spm(path, rows):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = [t for task in rows.values() for split in task.values()
           for ex in split for t in ex.values()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=str(path.with_suffix("")),
      vocab_size=60, model_type="unigram", character_coverage=1.0,
      hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Runs prepare on tiny_mix and tiny_sft in one subprocess."""
  tmp = tmp_path_factory.mktemp("prepare")
  rows = _rows()
  (tmp / "rows.json").write_text(json.dumps(rows))
  (tmp / "tiny_tasks.py").write_text(TASKS_MODULE)
  _train_spm(tmp / "tiny.model", rows)
  out = {task: tmp / task for task in ("tiny_mix", "tiny_sft")}
  calls = "; ".join(
      f"prepare.main(['--task={t}', '--out={o}', '--module_import=tiny_tasks'])"
      for t, o in out.items())
  env = dict(os.environ, TINY_ROWS=str(tmp / "rows.json"),
             TINY_SPM=str(tmp / "tiny.model"),
             PYTHONPATH=os.pathsep.join([str(tmp), str(REPO)]))
  subprocess.run([sys.executable, "-c", f"from qtrain.data import prepare; {calls}"],
                 check=True, cwd=REPO, env=env)
  sp = data.load_sentencepiece(tmp / "tiny.model")
  return out, rows, sp, tmp / "tiny.model"


def _docs(d, split):
  tf = data.open_split(d, split)
  return tf, [np.asarray(tf.doc(i)).tolist() for i in range(tf.num_docs)]


def test_mixture_with_its_own_vocabulary(prepared):
  out, rows, sp, model = prepared
  d = out["tiny_mix"]
  meta = data.read_meta(d)
  assert meta["vocab_path"] == "vocab.model"  # The task's model, copied.
  assert meta["vocab_fingerprint"] == data.vocab_fingerprint(model)
  assert meta["vocab_size"] == sp.get_piece_size()
  assert not (d / "spm.model").exists()  # No KJV vocabulary trained for it.
  for split in ("train", "validation"):
    tf, docs = _docs(d, split)
    assert not tf.has_mask and not meta["splits"][split]["loss_mask"]
    encode = lambda task: {tuple(sp.encode(ex["targets"]) + [EOS])
                           for ex in rows[task][split]}
    a, b = encode("tiny_a"), encode("tiny_b")
    got = [tuple(x) for x in docs]
    # seqio mixes until the first task runs out: a sample of both, no repeats.
    assert set(got) <= a | b and set(got) & a and set(got) & b
    assert len(got) == len(set(got))  # (The seeded texts are all distinct.)
  batch = next(data.make_train_iterator(d, seq_len=16, global_batch_size=2, seed=0))
  np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)


def test_prompt_response_task_gets_a_loss_mask(prepared):
  out, rows, sp, _ = prepared
  d = out["tiny_sft"]
  meta = data.read_meta(d)
  scored = {}
  for split in ("train", "validation"):
    tf, docs = _docs(d, split)
    assert tf.has_mask and meta["splits"][split]["loss_mask"]
    assert len(docs) == len(rows["tiny_sft"][split])
    scored[split] = []
    for i, ex in enumerate(rows["tiny_sft"][split]):  # Unshuffled: file order.
      prompt, response = sp.encode(ex["inputs"]), sp.encode(ex["targets"]) + [EOS]
      assert docs[i] == prompt + response
      np.testing.assert_array_equal(tf.doc_mask(i),
                                    [0] * len(prompt) + [1] * len(response))
      scored[split] += response
  # The unigram baseline counts what the loss scores: response tokens.
  v = meta["vocab_size"]
  counts = np.bincount(scored["train"], minlength=v).astype(np.float64)
  q = (counts + 1) / (counts.sum() + v)
  ppl = math.exp(-np.mean(np.log(q[scored["validation"]])))
  # Only the summation order differs from prepare's: 1e-12 relative.
  assert meta["unigram_ppl_validation"] == pytest.approx(ppl, rel=1e-12)
  # End to end: the whole held-out split scores exactly the response tokens.
  # (Prompts are never empty, so every response token is some target.)
  batches = data.make_eval_batches(d, seq_len=16, global_batch_size=2, num_batches=0)
  assert sum(int(b["loss_mask"].sum()) for b in batches) == len(scored["validation"])
