"""seqio tasks of qtrain: the front door through which `prepare` reads text.

Importing this module imports seqio and therefore TensorFlow; only `prepare`
(CPU hosts, set-up time) does so, never the training path.

`kjv` is the default corpus (see `corpus.py`), one example per chapter with
the text under "targets", tokenized by the SentencePiece model of `vocab.py`
and ended by EOS. Any other registered seqio task or mixture can be prepared
the same way as long as it has a "targets" feature (and, for prompt/response
data, an "inputs" feature: see `prepare.py`).
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf

from qtrain.data import corpus
from qtrain.data import vocab as vocab_lib

KJV = "kjv"


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


def register_tasks(vocab_path: str | os.PathLike) -> None:
  """Registers every qtrain task that needs the prepared vocabulary."""
  register_kjv(vocab_path)


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
