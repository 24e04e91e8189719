"""Materialises a seqio task or mixture into token files for training.

  python -m qtrain.data.prepare --task=kjv --out=data/kjv [--vocab_size=8000]
  python -m qtrain.data.prepare --task=debian_en --out=data/debian_en --vocab_size=32000
  python -m qtrain.data.prepare --task=sft_en --out=data/sft_en --vocab_from=data/debian_en
  python -m qtrain.data.prepare --task=my_mix --out=data/mix --module_import=my.tasks

seqio is the front door (vocabularies, tasks, mixtures, preprocessing) but it
imports TensorFlow, which the training hosts never do. So this step, run once
on a CPU host, writes into `--out`:

  spm.model        the SentencePiece vocabulary trained on the task's train
                   split (`tasks.vocab_sentences`), only when the task uses it;
                   with --vocab_from=DIR, DIR's vocabulary instead (fine-tuning
                   data must be tokenized like the model's pretraining data);
                   a task with its own vocabulary gets that model copied to
                   vocab.model instead
  <split>.tokens   one token file per split (see `token_file.py`)
  meta.json        written last, atomically: its presence means "complete"

What becomes a document:
* a task with a "targets" feature only (plain text): the targets tokens, every
  token scored;
* a task that also has an "inputs" feature (prompt/response, SFT): inputs +
  targets, with a loss mask of 0 on the inputs and 1 on the targets, so the
  prompt is context but never predicted. The tokens are joined as the task
  emits them: give `inputs` add_eos=False for a decoder-only prompt.
* a mixture: its examples as seqio mixes them (rate-weighted sampling; seed 42
  when unshuffled, so the files are reproducible), which stops when its first
  task runs out of examples.

meta.json also records a unigram baseline over the scored tokens: a model
whose loss is above log(unigram_ppl_validation) has not learned more than
token frequencies.

Idempotent: when meta.json matches the request, the vocabulary's fingerprint
and intact token files, it says so and exits without importing TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import shutil
import time

import numpy as np

from qtrain.data import token_file
from qtrain.data import vocab as vocab_lib

META_NAME = "meta.json"
META_VERSION = 2  # 2: splits say whether their file has a loss mask.


def unigram_perplexities(train_tokens: np.ndarray, eval_tokens: np.ndarray | None,
                         vocab_size: int) -> tuple[float, float | None]:
  """(exp(entropy) of the train unigram distribution, add-one smoothed eval ppl).

  ppl_train = exp(-sum_v p_v log p_v) with p_v = c_v / N (train counts c_v);
  ppl_eval = exp(-(1/M) sum_t log q(x_t)) over the M eval tokens, with
  q_v = (c_v + 1) / (N + vocab_size) (add-one smoothing: unseen ids stay finite).
  """
  counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64)
  n = counts.sum()
  p = counts[counts > 0] / n
  ppl_train = float(np.exp(-np.sum(p * np.log(p))))
  if eval_tokens is None or len(eval_tokens) == 0:
    return ppl_train, None
  log_q = np.log((counts + 1.0) / (n + vocab_size))
  eval_counts = np.bincount(eval_tokens, minlength=vocab_size).astype(np.float64)
  ppl_eval = float(np.exp(-np.dot(eval_counts, log_q) / eval_counts.sum()))
  return ppl_train, ppl_eval


def _write_json_atomic(path: pathlib.Path, obj: dict) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _prepare_args(task: str, vocab_size: int, vocab_from: str | None) -> dict:
  args = {"task": task, "vocab_size": vocab_size}
  if vocab_from:
    args["vocab_from"] = str(vocab_from)
  return args


def _source_vocab(vocab_from: str | os.PathLike) -> pathlib.Path:
  """The prepared vocabulary of the data dir `vocab_from`."""
  path = pathlib.Path(vocab_from) / vocab_lib.MODEL_NAME
  if not path.is_file():
    raise FileNotFoundError(f"--vocab_from={vocab_from}: {path} is missing; prepare that "
                            "data first (e.g. `make corpus` for data/debian_en).")
  return path


def up_to_date(out: pathlib.Path, task: str, vocab_size: int,
               vocab_from: str | None = None) -> dict | None:
  """meta.json if it matches the request and every file it names is intact
  (with `vocab_from`: made with that dir's current vocabulary)."""
  try:
    meta = json.loads((out / META_NAME).read_text())
    if meta.get("prepare_args") != _prepare_args(task, vocab_size, vocab_from):
      return None
    if vocab_lib.vocab_fingerprint(out / meta["vocab_path"]) != meta["vocab_fingerprint"]:
      return None
    if vocab_from and (vocab_lib.vocab_fingerprint(_source_vocab(vocab_from))
                       != meta["vocab_fingerprint"]):
      return None
    for info in meta["splits"].values():
      tf = token_file.TokenFile(out / info["file"]).validate()
      if (tf.fingerprint, tf.num_tokens, tf.num_docs) != (
          meta["vocab_fingerprint"], info["n_tokens"], info["n_docs"]):
        return None
  except (OSError, KeyError, ValueError, TypeError):
    return None
  return meta


def _local_vocab_file(out: pathlib.Path, vocabulary) -> pathlib.Path:
  """The task's SentencePiece model, copied into `out` if it lives elsewhere."""
  src = getattr(vocabulary, "sentencepiece_model_file", None)
  if src is None:
    raise ValueError(
        f"{vocabulary!r} is not a seqio.SentencePieceVocabulary: the training"
        " path reads vocabularies with sentencepiece only.")
  src = pathlib.Path(src)
  if src.resolve().parent == out.resolve():
    return src
  dst = out / "vocab.model"
  shutil.copyfile(src, dst)
  return dst


def _documents(ds, prompted: bool):
  """A seqio dataset's examples as token-file documents (module docstring)."""
  for ex in ds.as_numpy_iterator():
    if not prompted:
      yield ex["targets"]
      continue
    prompt, response = ex["inputs"], ex["targets"]
    mask = np.concatenate([np.zeros(len(prompt), np.uint8),
                           np.ones(len(response), np.uint8)])
    yield np.concatenate([prompt, response]), mask


def _materialise(provider, split: str, path: pathlib.Path, vocab_size: int,
                 fingerprint: str) -> dict:
  """One pass over `split` of a seqio task/mixture, written as a token file."""
  prompted = "inputs" in provider.output_features
  ds = provider.get_dataset(sequence_length=None, split=split, shuffle=False,
                            seed=0, num_epochs=1)
  counts = token_file.write_token_file(path, _documents(ds, prompted),
                                       vocab_size, fingerprint,
                                       with_mask=prompted)
  return {"file": path.name, "loss_mask": prompted, **counts}


def _scored_tokens(out: pathlib.Path, info: dict) -> np.ndarray:
  tf = token_file.TokenFile(out / info["file"])
  return np.asarray(tf.tokens if tf.mask is None else tf.tokens[tf.mask == 1])


def _unigram_fields(out: pathlib.Path, splits: dict, vocab_size: int) -> dict:
  if "train" not in splits:
    return {"unigram_ppl_train": None, "unigram_ppl_validation": None}
  train = _scored_tokens(out, splits["train"])
  valid = None
  if "validation" in splits:
    valid = _scored_tokens(out, splits["validation"])
  ppl_train, ppl_valid = unigram_perplexities(train, valid, vocab_size)
  return {"unigram_ppl_train": ppl_train, "unigram_ppl_validation": ppl_valid}


def _vocabulary(provider):
  """The task's one vocabulary ("inputs", if present, must share it)."""
  features = provider.output_features
  if "targets" not in features:
    raise ValueError(f"seqio task/mixture {provider.name!r} has no 'targets'"
                     f" feature (has {sorted(features)}): prepare reads"
                     " 'targets' (and 'inputs' as an unscored prompt).")
  vocabulary = features["targets"].vocabulary
  if "inputs" in features and features["inputs"].vocabulary != vocabulary:
    raise ValueError(f"seqio task/mixture {provider.name!r}: 'inputs' and"
                     " 'targets' must share one vocabulary.")
  return vocabulary


def prepare(task: str, out: str | os.PathLike, vocab_size: int = 8000,
            force: bool = False, module_imports: tuple[str, ...] = (),
            vocab_from: str | os.PathLike | None = None) -> dict:
  """Vocabulary, token files and meta.json for `task` in `out`; returns meta.

  `module_imports` are imported after qtrain's tasks are registered, so they
  can define tasks and mixtures (e.g. mixtures over `kjv`). `vocab_from`: a
  prepared data dir whose vocabulary is used as is (no training).
  """
  out = pathlib.Path(out)
  vocab_from = str(vocab_from) if vocab_from else None
  if not force and (meta := up_to_date(out, task, vocab_size, vocab_from)):
    print(f"{out / META_NAME} is up to date (task {task!r}, vocab"
          f" {meta['vocab_fingerprint']}); nothing to do.")
    return meta
  source_vocab = _source_vocab(vocab_from) if vocab_from else None
  out.mkdir(parents=True, exist_ok=True)
  (out / META_NAME).unlink(missing_ok=True)  # Incomplete until rewritten.
  t0 = time.perf_counter()
  import seqio  # pylint: disable=g-import-not-at-top  # TensorFlow: slow, here only.
  from qtrain.data import tasks  # pylint: disable=g-import-not-at-top
  spm_path = out / vocab_lib.MODEL_NAME  # Trained below if the task uses it.
  tasks.register_tasks(spm_path)
  for module in module_imports:
    importlib.import_module(module)
  provider = seqio.get_mixture_or_task(task)
  t_vocab = time.perf_counter()
  if source_vocab is not None:
    if source_vocab.resolve() != spm_path.resolve():
      shutil.copyfile(source_vocab, spm_path)
  elif str(spm_path) in tasks.vocab_files(provider):
    vocab_lib.train_vocab(out, vocab_size, tasks.vocab_sentences(provider, tasks.debian_root()))
  t_vocab = time.perf_counter() - t_vocab
  vocabulary = _vocabulary(provider)
  vocab_file = _local_vocab_file(out, vocabulary)
  fingerprint = vocab_lib.vocab_fingerprint(vocab_file)
  splits = {s: _materialise(provider, s, out / f"{s}.tokens",
                            vocabulary.vocab_size, fingerprint)
            for s in tasks.splits_of(provider)}
  meta = {
      "format_version": META_VERSION,
      "task": task,
      "prepare_args": _prepare_args(task, vocab_size, vocab_from),
      "splits": splits,
      "vocab_path": vocab_file.name,
      "vocab_size": vocabulary.vocab_size,
      "vocab_fingerprint": fingerprint,
      "eos_id": vocabulary.eos_id,
      "pad_id": vocabulary.pad_id,
      **_unigram_fields(out, splits, vocabulary.vocab_size),
  }
  _write_json_atomic(out / META_NAME, meta)
  _print_summary(meta, out, t_vocab, time.perf_counter() - t0)
  return meta


def _print_summary(meta: dict, out: pathlib.Path, t_vocab: float,
                   t_total: float) -> None:
  print(f"Prepared task {meta['task']!r} in {out} ({t_total:.1f} s, vocabulary"
        f" {t_vocab:.1f} s): vocab_size {meta['vocab_size']}, fingerprint"
        f" {meta['vocab_fingerprint']}")
  for split, info in meta["splits"].items():
    print(f"  {split:>12}: {info['n_docs']:>7} docs {info['n_tokens']:>10} tokens")
  print(f"  unigram perplexity: train {meta['unigram_ppl_train']},"
        f" validation {meta['unigram_ppl_validation']}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m qtrain.data.prepare", description=__doc__.split("\n")[0])
  parser.add_argument("--task", default="kjv", help="seqio task or mixture name")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--vocab_size", type=int, default=8000,
                      help="pieces of the trained SentencePiece vocabulary")
  parser.add_argument("--vocab_from", default=None,
                      help="prepared data dir whose vocabulary to use (no training);"
                      " fine-tuning data must share the base model's vocabulary")
  parser.add_argument("--force", action="store_true",
                      help="rebuild even if meta.json is up to date")
  parser.add_argument("--module_import", action="append", default=[],
                      help="module that registers more seqio tasks/mixtures"
                      " (repeatable); imported after the qtrain tasks")
  args = parser.parse_args(argv)
  try:
    prepare(args.task, args.out, vocab_size=args.vocab_size, force=args.force,
            module_imports=args.module_import, vocab_from=args.vocab_from)
  except (FileNotFoundError, ValueError) as e:  # Expected mistakes: one line, no traceback.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
