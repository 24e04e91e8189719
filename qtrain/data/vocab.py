"""The SentencePiece vocabulary of the default corpus, trained at set-up.

Ids follow seqio's (T5's) convention, so the same model file works as a
`seqio.SentencePieceVocabulary` at prepare time and as a plain
`sentencepiece.SentencePieceProcessor` on the training path:
pad=0, eos=1, unk=2, no bos. The training path must never import seqio or
TensorFlow, which is why `seqio_vocabulary` imports seqio lazily; sentencepiece
is imported lazily too, so the loader can use `vocab_fingerprint` for free.

The model is trained on the train split only (no validation text leaks into
the pieces) from verses, which are short enough for SentencePiece's sentence
length limit; with ~30k verses it trains in seconds on two cores.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib

from qtrain.data import corpus

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MODEL_NAME = "spm.model"
_SEED = 0


def load_sentencepiece(path: str | os.PathLike):
  """The training path's vocabulary, a `sentencepiece.SentencePieceProcessor`
  (sentencepiece only, no TensorFlow)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"SentencePiece model {path} not found: run `make data` or"
        " `python -m qtrain.data.prepare --task=kjv --out=<dir>`."
    )
  return spm.SentencePieceProcessor(model_file=str(path))


def seqio_vocabulary(path: str | os.PathLike):
  """The same model as a `seqio.SentencePieceVocabulary` (imports seqio)."""
  import seqio  # pylint: disable=g-import-not-at-top  # TF: prepare time only.
  return seqio.SentencePieceVocabulary(str(path))


def vocab_fingerprint(path: str | os.PathLike) -> str:
  """A short sha256 of the model file bytes: names the exact vocabulary."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def _matches(path: pathlib.Path, vocab_size: int) -> bool:
  """Whether a cached model has the requested size and seqio's special ids."""
  try:
    sp = load_sentencepiece(path)
  except (OSError, RuntimeError):
    return False
  return (sp.get_piece_size() == vocab_size and sp.pad_id() == PAD_ID
          and sp.eos_id() == EOS_ID and sp.unk_id() == UNK_ID
          and sp.bos_id() == -1)


def train_model_bytes(sentences: list[str], vocab_size: int) -> bytes:
  """A SentencePiece unigram model (serialized) trained on ``sentences``."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.set_random_generator_seed(_SEED)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=vocab_size,
      model_type="unigram",
      character_coverage=1.0,  # English: ~70 characters, keep them all.
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      input_sentence_size=200_000,  # Caps a bigger corpus; KJV has ~30k.
      shuffle_input_sentence=True,
      num_threads=2,
      minloglevel=2,
  )
  return model.getvalue()


def train_vocab(out_dir: str | os.PathLike, vocab_size: int = 8000,
                sentences: list[str] | None = None) -> str:
  """Trains `<out_dir>/spm.model` on `sentences` (None: the KJV train
  split's verses); returns its path.

  For the KJV verses a model already there with `vocab_size` pieces and
  seqio's special ids is kept as is (training is deterministic, so this is
  only a cache); other text is always trained on (the check could not tell
  which text a model came from). Written atomically: a killed run never
  leaves a half model file.
  """
  out_dir = pathlib.Path(out_dir)
  path = out_dir / MODEL_NAME
  if sentences is None:
    if path.is_file() and _matches(path, vocab_size):
      return str(path)
    sentences = [r["text"] for r in corpus.load_verses("train")]
  model = train_model_bytes(sentences, vocab_size)
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_bytes(model)
  os.replace(tmp, path)
  return str(path)
