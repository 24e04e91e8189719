"""`sft_en`: an instruction-style (prompt -> response) task built from the corpora.

Two kinds of examples, each a prompt the model sees and a response it is
scored on (`prepare` writes the loss mask: 0 on the prompt, 1 on the response
and its EOS):

  define   prompt "Define: <headword>\\n", response the headword's entry in
           the 1913 Webster's (dict-gcide, as `debian.py` reads it) with the
           headword itself and its pronunciation removed, e.g.
           "Define: Anneloid\\n" -> "n. [F. annel['e] ringed + -oid.] (Zool.)
           An animal resembling an annelid."
  recite   prompt "<Book> <chapter>:<verse>\\n", response the verse of the
           King James Bible, e.g. "Genesis 1:3\\n" -> "And God said, Let
           there be light: and there was light."

Held-out split: KJV verses of the validation books (`corpus.VALIDATION_BOOKS`,
as pretraining on `kjv` holds them out); dictionary entries by the hash of
the headword (`debian.split_of`, 1%). The `debian_en` pretraining corpus reads
all of GCIDE, 20 entries per document, and holds out 1% of those documents by
their text: most held-out definitions here were seen in pretraining as text.
The SFT task teaches the format (a headword -> its entry); its held-out
response loss measures recall plus format, not generalisation to unseen text.

Entries of more than `MAX_WORDS` words (the longest 1%: "set", "take" run to
thousands) are dropped: a response should fit a training row.

Order: all `define` examples (dictionary order), then all `recite` (canonical
order); the loader shuffles documents.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

from qtrain.data import corpus
from qtrain.data import debian

SPLITS = ("train", "validation")
MAX_WORDS = 300
MIN_WORDS = 2  # "n." alone says nothing.
GCIDE_INDEX = "usr/share/dictd/gcide.index"
GCIDE_DATA = "usr/share/dictd/gcide.dict.dz"


def define_prompt(headword: str) -> str:
  return f"Define: {headword}\n"


def recite_prompt(citation: str) -> str:
  return f"{citation}\n"


def _headwords(index_text: str) -> dict[tuple[int, int], str]:
  """{(offset, length): the first headword the index lists for that entry}.

  Entries that any "00..." headword names (``00-database-url``,
  ``00-gcide-url``: the dictionary's own metadata) are left out."""
  spans, metadata = {}, set()
  for line in index_text.splitlines():
    parts = line.split("\t")
    if len(parts) < 3:
      continue
    span = (debian.b64_number(parts[1]), debian.b64_number(parts[2]))
    if parts[0].startswith("00"):
      metadata.add(span)
    spans.setdefault(span, parts[0])
  return {span: word for span, word in spans.items() if span not in metadata}


def definition(headword: str, entry: str) -> str:
  """The entry's text without its leading headword (and the comma after it)."""
  text = debian.dict_entry_text(entry)
  if text.lower().startswith(headword.lower()):
    text = text[len(headword):].lstrip(" ,")
  return text


def define_examples(index_text: str, dict_bytes: bytes, split: str) -> Iterator[dict]:
  """{"inputs", "targets"} of every dictionary entry in `split`."""
  _check_split(split)
  for (offset, length), headword in sorted(_headwords(index_text).items()):
    if debian.split_of(headword) != split:
      continue
    entry = dict_bytes[offset:offset + length].decode("utf-8", "replace")
    text = definition(headword, entry)
    if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
      yield {"inputs": define_prompt(headword), "targets": text}


def recite_examples(split: str) -> Iterator[dict]:
  """{"inputs", "targets"} of every KJV verse in `split`."""
  for r in corpus.load_verses(split):
    yield {"inputs": recite_prompt(r["citation"]), "targets": r["text"].strip()}


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def examples(split: str, root: str | pathlib.Path = "/") -> Iterator[dict]:
  """Every example of `split`: `define` (from dict-gcide under `root`), then `recite`."""
  _check_split(split)
  root = pathlib.Path(root)
  index, data = root / GCIDE_INDEX, root / GCIDE_DATA
  if not (index.is_file() and data.is_file()):
    raise FileNotFoundError(
        f"sft_en reads the 1913 Webster's from {index} and {data}: "
        f"{debian.install_command(['dict-gcide'])}")
  yield from define_examples(debian.read_text(index), debian.read_bytes(data), split)
  yield from recite_examples(split)
