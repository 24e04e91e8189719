"""seqio tasks of qtrain: the front door through which `prepare` reads text.

Importing this module imports seqio and therefore TensorFlow; only `prepare`
(CPU hosts, set-up time) does so, never the training path.

`kjv` is the default corpus (see `corpus.py`), one example per chapter with
the text under "targets", tokenized by the SentencePiece model of `vocab.py`
and ended by EOS. Any other registered seqio task or mixture can be prepared
the same way as long as it has a "targets" feature (and, for prompt/response
data, an "inputs" feature: see `prepare.py`).

`debian_en` is real English from Debian packages (see `debian.py`), one
example per document; `debian_en_kjv` mixes it with `kjv`. Both share the
vocabulary that `prepare` trains on their own train split
(`vocab_sentences`).

`sft_en` is prompt/response data (see `sft.py`): "inputs" (the prompt, no
EOS) and "targets" (the response + EOS). Prepare it on the vocabulary of the
model it fine-tunes: `python -m qtrain.data.prepare --task=sft_en
--out=data/sft_en --vocab_from=data/debian_en`.
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf

from qtrain.data import corpus
from qtrain.data import debian
from qtrain.data import sft
from qtrain.data import vocab as vocab_lib

KJV = "kjv"
DEBIAN_EN = "debian_en"
DEBIAN_EN_KJV = "debian_en_kjv"
SFT_EN = "sft_en"
# Rates are per example, and the mixture stops when its first task runs out:
# about the ratio of train documents (93.7k debian_en : 1.1k KJV chapters),
# so both run out near the same point and little of either is left unused.
DEBIAN_EN_KJV_RATES = ((DEBIAN_EN, 0.988), (KJV, 0.012))


def _kjv_dataset(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
  """All chapters of `split`, in canonical order (one file: nothing to shuffle)."""
  del shuffle_files, seed
  docs = corpus.load_documents(split)
  return tf.data.Dataset.from_generator(
      lambda: ({"targets": d} for d in docs),
      output_signature={"targets": tf.TensorSpec((), tf.string)})


def register_kjv(vocab_path: str | os.PathLike) -> seqio.Task:
  """Registers (or re-registers with a new vocabulary) the `kjv` task."""
  vocab_path = str(vocab_path)
  if KJV in seqio.TaskRegistry.names():
    task = seqio.TaskRegistry.get(KJV)
    if task.output_features["targets"].vocabulary.sentencepiece_model_file == vocab_path:
      return task  # Idempotent: same vocabulary, nothing to do.
    seqio.TaskRegistry.remove(KJV)
  return seqio.TaskRegistry.add(
      KJV,
      source=seqio.FunctionDataSource(_kjv_dataset, splits=corpus.SPLITS),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(
          vocab_lib.seqio_vocabulary(vocab_path), add_eos=True, dtype=tf.int32)},
  )


def _text_task(name: str, source: seqio.DataSource, vocab_path: str) -> seqio.Task:
  """(Re-)registers a plain-text task whose "targets" use `vocab_path`."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(
          vocab_lib.seqio_vocabulary(vocab_path), add_eos=True, dtype=tf.int32)})


def register_debian_en(vocab_path: str | os.PathLike,
                       root: str | os.PathLike = "/") -> seqio.Task:
  """Registers `debian_en` (read from the packages installed under `root`)
  and the `debian_en_kjv` mixture, both on the vocabulary `vocab_path`."""
  def dataset(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # Source order is the document order.
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in debian.documents(split, root)),
        output_signature={"targets": tf.TensorSpec((), tf.string)})
  task = _text_task(DEBIAN_EN, seqio.FunctionDataSource(
      dataset, splits=debian.SPLITS), str(vocab_path))
  register_kjv(vocab_path)
  if DEBIAN_EN_KJV in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(DEBIAN_EN_KJV)
  seqio.MixtureRegistry.add(DEBIAN_EN_KJV, list(DEBIAN_EN_KJV_RATES))
  return task


def register_sft_en(vocab_path: str | os.PathLike, root: str | os.PathLike = "/") -> seqio.Task:
  """Registers `sft_en` (prompt under "inputs", response under "targets")."""
  def dataset(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: sft.examples(split, root),
        output_signature={"inputs": tf.TensorSpec((), tf.string),
                          "targets": tf.TensorSpec((), tf.string)})
  if SFT_EN in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(SFT_EN)
  vocabulary = vocab_lib.seqio_vocabulary(str(vocab_path))
  return seqio.TaskRegistry.add(
      SFT_EN, source=seqio.FunctionDataSource(dataset, splits=sft.SPLITS),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={  # A decoder-only prompt: no EOS between it and the response.
          "inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
          "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)})


def debian_root() -> str:
  """Where the Debian packages' files are read: $QTRAIN_DEBIAN_ROOT (a chroot,
  an unpacked image, a test fixture) or "/"."""
  return os.environ.get("QTRAIN_DEBIAN_ROOT", "/")


def register_tasks(vocab_path: str | os.PathLike) -> None:
  """Registers every qtrain task that needs the prepared vocabulary."""
  register_kjv(vocab_path)
  register_debian_en(vocab_path, debian_root())
  register_sft_en(vocab_path, debian_root())


def vocab_sentences(provider, root: str | os.PathLike = "/") -> list[str] | None:
  """What `prepare` trains the vocabulary of `provider` on: None for `kjv`
  alone (`vocab.train_vocab`'s verses), else the train-split text of each of
  its tasks (KJV verses, debian_en paragraphs)."""
  names = [t.name for t in (getattr(provider, "tasks", None) or [provider])]
  if names == [KJV]:
    return None
  sentences = []
  for name in names:
    if name == KJV:
      sentences += [r["text"] for r in corpus.load_verses("train")]
    elif name == DEBIAN_EN:
      sentences += debian.vocab_sentences(root)
    else:
      raise ValueError(f"no vocabulary text is known for task {name!r}: prepare it with"
                       " --vocab_from=<the base model's data dir> (or give it its own"
                       " SentencePiece model file).")
  return sentences


def splits_of(provider) -> tuple[str, ...]:
  """Splits that every task of a task or mixture has, in a stable order."""
  tasks = getattr(provider, "tasks", None) or [provider]
  common = set(tasks[0].splits).intersection(*(t.splits for t in tasks[1:]))
  return tuple(sorted(common))


def vocab_files(provider) -> set[str]:
  """The SentencePiece model files that a task or mixture's features use."""
  tasks = getattr(provider, "tasks", None) or [provider]
  return {getattr(f.vocabulary, "sentencepiece_model_file", None)
          for t in tasks for f in t.output_features.values()} - {None}
