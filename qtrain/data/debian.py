"""`debian_en`: real English prose and technical text from Debian packages.

KJV (~1M tokens) is too small and too uniform for activation outliers to
appear. This corpus (52.7M train tokens with its 32k vocabulary) reads
dictionaries and documentation that the Debian (bookworm) registry serves,
installed with the command that `python -m qtrain.data.debian --check`
prints (`missing_packages` of `SOURCES`; about 3 GB installed):

  apt-get install --no-install-recommends dict-gcide dict-wn python3.11-doc \
      linux-doc-6.1 manpages manpages-dev perl-doc perl-modules-5.36 \
      dict-foldoc dict-jargon dict-devil postgresql-doc-15 sqlite3-doc \
      python-django-doc python-sqlalchemy-doc python-sklearn-doc \
      python-scipy-doc python-pandas-doc python-statsmodels-doc \
      python-astropy-doc python-sympy-doc python-dask-doc python-xarray-doc \
      llvm-15-doc clang-15-doc debian-handbook debian-reference-en \
      debian-policy developers-reference git-doc zsh-doc apache2-doc \
      postfix-doc exim4-doc-html libreoffice-help-en-us gimp-help-en \
      octave-doc maxima-doc sagemath-doc erlang-doc nodejs-doc rust-doc \
      racket-doc openjdk-17-doc

Sources, in the fixed order they are read (each package's files are the ones
its `/var/lib/dpkg/info/<package>.list` names, sorted), prose first:

  gcide    dict-gcide: the 1913 Webster's (with GCIDE additions), dictd format
           (`/usr/share/dictd/gcide.index` + `gcide.dict.dz`). 19th-century
           definitional prose, etymologies and quotations.
  wordnet  dict-wn: WordNet 3.0 glosses and usage examples, dictd format.
           Modern short definitions.
  python   python3.11-doc: the Python tutorial, language and library reference
           and HOWTOs, Sphinx HTML (`/usr/share/doc/python3.11/html`).
  linux    linux-doc-6.1: the kernel's Documentation/ tree as
           reStructuredText (`Documentation/**/*.rst.gz`). Technical prose.
  man      manpages, manpages-dev: Linux man pages (sections 2-7), roff.
  perl     perl-doc, perl-modules-5.36: the Perl manual (perlfunc, perlop,
           perlre, the FAQ, tutorials) and the core modules' documentation,
           POD (`pod_sections`). Release notes (perl*delta), perlhist, the
           licences, the table of contents and generated tables are skipped.
  foldoc   dict-foldoc: the Free On-line Dictionary of Computing, dictd.
  jargon   dict-jargon: the Jargon File, dictd. Hacker-culture prose.
  devil    dict-devil: Ambrose Bierce's The Devil's Dictionary (1911), dictd.
  sql      postgresql-doc-15, sqlite3-doc: the PostgreSQL 15 manual and the
           SQLite documentation, HTML. Long technical prose.
  pydocs   python-{django,sqlalchemy,sklearn,scipy,pandas,statsmodels,
           astropy,sympy,dask,xarray}-doc: user guides, tutorials and API
           reference of Python libraries, Sphinx HTML.
  llvm     llvm-15-doc, clang-15-doc: the LLVM and Clang manuals, Sphinx HTML.
  debian   debian-handbook (en-US), debian-reference-en, debian-policy,
           developers-reference: Debian's books and policy, HTML.
  tools    git-doc, zsh-doc, apache2-doc (en), postfix-doc, exim4-doc-html,
           libreoffice-help-en-us, gimp-help-en: manuals of programs, HTML.
  math     octave-doc, maxima-doc, sagemath-doc (en): manuals of mathematical
           software, HTML.
  langs    erlang-doc, nodejs-doc, rust-doc (the books only: The Rust
           Programming Language, the reference, Rust by Example, the
           Rustonomicon...; not the std API pages, whose blanket-impl text
           repeats on every page), racket-doc: programming-language guides
           and references, HTML.
  java     openjdk-17-doc: the Java SE 17 API documentation (Javadoc HTML):
           API reference, but mostly sentences describing classes/methods.

Every HTML source skips boilerplate pages at any depth (`_BOILERPLATE`:
indexes, search, tables of contents, release notes and changelogs, licences,
Sphinx `_sources`/`_modules`, Javadoc `class-use`/`index-files`).

What becomes a document: 20 consecutive dictionary entries (in the order of
the dictionary file: neighbouring headwords); one section of an HTML page (a
new document starts at each <h1>/<h2>); one rST file; one man page; one
=head1 section of a POD file.

Markup is stripped with the standard library and a few rules per format
(`html_sections`, `rst_text`, `roff_text`, `pod_sections`,
`dict_entry_text`); code is dropped where it is cheap to recognise (<pre>,
rST literal blocks and code directives, roff .nf/.EX blocks, POD verbatim
paragraphs and the Perl code around the POD) and so are tables (<table>, rST
grid/simple tables, roff .TS). Inline code (``x``, <code>, \\fB) is kept: it
is part of the sentence.

De-duplication is exact: a document whose normalised text (lower case,
whitespace collapsed) hashes like an earlier one is dropped; the first copy in
source order is kept. Near duplicates (boilerplate licence paragraphs, man
pages that differ by a line) are NOT removed: that needs MinHash/LSH over
shingles, which this corpus does not do.

The held-out split is by document hash: a document is in `validation` when the
first 8 bytes of the sha256 of its normalised text, mod 10_000, are below 100
(1%). It depends on the text alone, so it does not move when a source is added
or the package order changes.

`python -m qtrain.data.debian --check` says which packages are missing (and
the apt-get command); `--stats` prints a markdown table of documents and
words per source and split, and with `--vocab=data/debian_en/spm.model` the
tokens `prepare` writes for them (pieces + EOS).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import html.parser
import pathlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator

SPLITS = ("train", "validation")
HELD_OUT_PER_10K = 100  # 1% of documents; fixed forever (moves every split).
DICT_ENTRIES_PER_DOC = 20
MIN_WORDS = 8  # Shorter documents are navigation residue or empty stubs.


# --------------------------------------------------------------------------
# dictd: <name>.index (headword \t offset \t length, numbers in base64 digits)
# and <name>.dict or <name>.dict.dz (dictzip is gzip-compatible).

_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def b64_number(digits: str) -> int:
  n = 0
  for c in digits:
    n = n * 64 + _B64[c]
  return n


def dict_entries(index_text: str, dict_bytes: bytes) -> list[str]:
  """The raw entries of a dictd dictionary, each once, in file order.

  Several headwords may point at one entry (spelling variants): it is read
  once. The `00-database-*` / `00database*` pseudo-entries (the dictionary's
  own metadata) are skipped.
  """
  spans = set()
  for line in index_text.splitlines():
    parts = line.split("\t")
    if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
      continue
    spans.add((b64_number(parts[1]), b64_number(parts[2])))
  return [dict_bytes[o:o + n].decode("utf-8", "replace")
          for o, n in sorted(spans)]


_DICT_SOURCE_LINE = re.compile(r"^\s*\[[^\]]*\]\s*$")  # [1913 Webster], [PJC]
_DICT_XREF = re.compile(r"\[(?:syn|ant|also|see):[^\]]*\]", re.S)  # WordNet
_DICT_PRON = re.compile(r"\\[^\\\n]*\\")  # \Ab"so*lute\


def dict_entry_text(entry: str) -> str:
  """One entry as plain paragraphs: pronunciations, source tags, WordNet
  synonym lists and cross-reference braces removed; wrapped lines joined."""
  lines = [l for l in entry.splitlines() if not _DICT_SOURCE_LINE.match(l)]
  text = _DICT_XREF.sub("", "\n".join(lines))
  text = _DICT_PRON.sub("", text).replace("{", "").replace("}", "")
  return _paragraphs(text)


def dict_documents(index_text: str, dict_bytes: bytes) -> Iterator[str]:
  entries = [dict_entry_text(e) for e in dict_entries(index_text, dict_bytes)]
  for i in range(0, len(entries), DICT_ENTRIES_PER_DOC):
    yield "\n".join(e for e in entries[i:i + DICT_ENTRIES_PER_DOC] if e)


def _paragraphs(text: str) -> str:
  """Blank-line separated blocks, each joined onto one whitespace-collapsed
  line; empty blocks dropped."""
  blocks = (" ".join(b.split()) for b in re.split(r"\n\s*\n", text))
  return "\n".join(b for b in blocks if b)


# --------------------------------------------------------------------------
# HTML (Sphinx output): html.parser, skipping chrome, code and tables.

_SKIP_TAGS = {"script", "style", "nav", "header", "footer", "pre", "table",
              "form", "button", "select", "textarea", "noscript", "svg"}
_SKIP_CLASSES = {"related", "sphinxsidebar", "footer", "headerlink",
                 "mobile-nav", "inline-search", "version_switcher_placeholder",
                 "language_switcher_placeholder", "highlight"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
         "meta", "source", "track", "wbr"}
_BLOCK = {"p", "div", "li", "dt", "dd", "dl", "ul", "ol", "blockquote",
          "section", "br", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "hr",
          "figcaption", "caption", "article", "main", "title"}
_SPLIT_AT = {"h1", "h2"}


class _HtmlText(html.parser.HTMLParser):
  """Collects visible text into sections (a new one at each h1/h2)."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.sections: list[list[str]] = [[]]
    self._open: list[tuple[str, bool]] = []  # (tag, skips its content)
    self._skipping = 0
    self._in_head = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "head":
      self._in_head = True
    classes = set((attrs.get("class") or "").split())
    skip = (tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
            or attrs.get("role") in ("navigation", "search"))
    if not self._skipping and not self._in_head:
      if tag in _SPLIT_AT:
        self.sections.append([])
      if tag in _BLOCK:
        self.sections[-1].append("\n\n")
    if tag in _VOID:
      return
    self._open.append((tag, skip))
    self._skipping += skip

  def handle_endtag(self, tag):
    if tag == "head":
      self._in_head = False
    if all(t != tag for t, _ in self._open):
      return  # A stray end tag: ignore it.
    while self._open:  # Closes elements left open inside `tag` too.
      t, skip = self._open.pop()
      self._skipping -= skip
      if t == tag:
        break
    if tag in _BLOCK and not self._skipping and not self._in_head:
      self.sections[-1].append("\n\n")

  def handle_data(self, data):
    if not self._skipping and not self._in_head:
      self.sections[-1].append(data)


def html_sections(markup: str) -> list[str]:
  """The text of an HTML page, one string per h1/h2 section (the part before
  the first heading counts as a section), paragraphs on their own lines."""
  parser = _HtmlText()
  parser.feed(markup)
  parser.close()
  texts = (_paragraphs("".join(s)) for s in parser.sections)
  return [t for t in texts if t]


# --------------------------------------------------------------------------
# reStructuredText: line rules, no docutils.

_ADMONITIONS = {"note", "warning", "attention", "caution", "danger", "error",
                "hint", "important", "tip", "seealso", "admonition"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_GRID_LINE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\|)\s*$")
_SIMPLE_BORDER = re.compile(r"^\s*=+( +=+)+\s*$")
_BULLET = re.compile(r"^(\s*)([-*+\u2022]|#\.|\d+[.)]|\(\d+\))\s+")
_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_INLINE = re.compile(r"``(.+?)``|\*\*(.+?)\*\*|\*(.+?)\*|`([^`]+)`_{0,2}")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _skip_block(lines: list[str], i: int, base: int) -> int:
  """Index of the first line after the block indented deeper than `base`
  that starts at line i (blank lines inside it belong to it)."""
  while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
    i += 1
  return i


def _rst_inline(line: str) -> str:
  line = _ROLE.sub(r"\1", line)
  line = _LINK.sub(r"\1", line)
  line = _INLINE.sub(lambda m: next(g for g in m.groups() if g is not None),
                     line)
  return re.sub(r"\b(\w+)_\b", r"\1", line)  # reference_ -> reference


def _rst_lines(lines: list[str]) -> Iterator[str]:
  """Content lines, blank lines kept as paragraph breaks."""
  i = 0
  while i < len(lines):
    line = lines[i]
    if (m := _DIRECTIVE.match(line)):
      body_start = i + 1
      i = _skip_block(lines, i + 1, len(m.group(1)))
      if m.group(2) in _ADMONITIONS:
        yield m.group(3)
        yield from _rst_lines(lines[body_start:i])
      yield ""
    elif _COMMENT.match(line):
      i = _skip_block(lines, i + 1, _indent(line))
      yield ""  # The skipped block took the blank lines after it.
    elif _ADORNMENT.match(line) or _GRID_LINE.match(line):
      i += 1
      yield ""  # A title is a paragraph of its own.
    elif _SIMPLE_BORDER.match(line):
      i = _skip_simple_table(lines, i)
    elif line.rstrip().endswith("::"):
      text = line.rstrip()[:-2].rstrip()
      yield text + (":" if text.strip() and not line.rstrip()[:-2].endswith(" ") else "")
      i = _skip_block(lines, i + 1, _indent(line))  # The literal block.
      yield ""
    else:
      yield _BULLET.sub(r"\1", line)
      i += 1


def _skip_simple_table(lines: list[str], i: int) -> int:
  """Past a simple table: it ends at a border line followed by a blank line
  (or the end); the header separator is a border line followed by rows."""
  i += 1
  while i < len(lines):
    border = _SIMPLE_BORDER.match(lines[i])
    i += 1
    if border and (i == len(lines) or not lines[i].strip()):
      break
  return i


def rst_text(source: str) -> str:
  """A reStructuredText file as plain paragraphs (rules in the module doc)."""
  lines = source.expandtabs(8).splitlines()
  return _paragraphs("\n".join(_rst_inline(l) for l in _rst_lines(lines)))


# --------------------------------------------------------------------------
# roff man pages (man(7) macros).

_ROFF_CHARS = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"',
               "lq": '"', "rq": '"', "oq": "'", "cq": "'", "mi": "-",
               "hy": "-", "ti": "~", "ha": "^", "bu": "", "co": "\u00a9",
               "rg": "\u00ae", "tm": "\u2122", "<=": "<=", ">=": ">=",
               "mu": "\u00d7", "de": "\u00b0", "pl": "+", "eq": "="}
_ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[-+]?\d+|\((..)|\[([^\]]*)\]|\*(?:\((..)|\[([^\]]*)\]|(.))|(.))")
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_ROFF_SKIP = {"nf": "fi", "EX": "EE", "TS": "TE"}  # block start: its end
_ROFF_HEADINGS = {"SH", "SS"}


def _roff_escape(m: re.Match) -> str:
  two, named, str2, strn, str1, single = m.groups()
  name = two or named or str2 or strn or str1
  if name is not None:
    return _ROFF_CHARS.get(name, "")
  return {"-": "-", "e": "\\", " ": " ", "~": " ", "0": " ", "|": "",
          "^": "", "&": "", "c": "", ".": ".", "'": "'", "`": "`",
          "\\": "\\", None: ""}.get(single, "")


def _roff_args(rest: str) -> list[str]:
  return [a[1:-1] if a.startswith('"') else a
          for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_text(source: str) -> str:
  """A man page as plain paragraphs: macro arguments kept, fonts and escapes
  resolved, comments, no-fill/example blocks and tables dropped."""
  out, end_of_skip = [], None
  for line in source.splitlines():
    if line.startswith(('.\\"', "'\\\"", '\\"')):
      continue
    name, rest = "", line
    if line[:1] in ".'":
      name, _, rest = line[1:].strip().partition(" ")
    if end_of_skip is not None:
      end_of_skip = None if name == end_of_skip else end_of_skip
      continue
    if (block := _ROFF_SKIP.get(name)):
      end_of_skip = block
    elif name in _ROFF_HEADINGS:
      out += ["", " ".join(_roff_args(rest)), ""]
    elif name in ("B", "I", "SM", "SB"):
      out.append(" ".join(_roff_args(rest)))
    elif name in _ALTERNATING:
      out.append("".join(_roff_args(rest)))
    elif name in ("IP", "TP", "PP", "P", "LP", "HP", "sp"):
      out.append("")
      if name == "IP" and (args := _roff_args(rest)):
        out.append(args[0])
    elif not name:
      out.append(line)
  text = _ROFF_ESCAPE.sub(_roff_escape, "\n".join(out))
  return _paragraphs(text)


# --------------------------------------------------------------------------
# POD (perlpod(1)): command paragraphs, ordinary text, verbatim code.

# C<x>, or C<< x >> / C<<< x >>> (which may hold a bare ">").
_POD_CODE = re.compile(
    r"([BCEFILSXZ])(?:<<<\s+(.*?)\s+>>>|<<\s+(.*?)\s+>>|<([^<>]*)>)", re.S)
# E<lt>/E<gt> resolve to stand-ins first, so they never close a code.
_LT, _GT = "\ue000", "\ue001"
_POD_ENTITIES = {"lt": _LT, "gt": _GT, "verbar": "|", "sol": "/"}


def _pod_code(m: re.Match) -> str:
  code, *bodies = m.groups()
  body = next(b for b in bodies if b is not None)
  if code in "XZ":  # Index entries and the null code say nothing.
    return ""
  if code == "E":
    if body.isdigit() or body.lower().startswith("0x"):
      return chr(int(body, 0))
    return _POD_ENTITIES.get(body) or html.unescape(f"&{body};")
  if code == "L":
    text, bar, target = body.partition("|")
    if bar:
      return text
    name, _, section = text.partition("/")
    section = section.strip('"')
    return f"{section} in {name}" if name and section else section or name
  return body  # B, I, C, F, S: the words themselves.


def _pod_inline(text: str) -> str:
  """Formatting codes resolved innermost first (B<I<x>> is two passes)."""
  while (resolved := _POD_CODE.sub(_pod_code, text)) != text:
    text = resolved
  return text.replace(_LT, "<").replace(_GT, ">")


def pod_sections(source: str) -> list[str]:
  """A POD file as plain paragraphs, one string per =head1 section: code
  outside POD, verbatim (indented) paragraphs, =begin/=end and =for blocks
  and index codes dropped; =item bullets dropped, item text kept."""
  sections, in_pod, skip_to = [[]], False, None
  for para in re.split(r"\n[ \t]*\n", source.expandtabs(8)):
    para = para.strip("\n")
    if not para:
      continue
    command, rest = "", ""
    if para[:1] == "=":
      command, _, rest = para[1:].partition(" ")
      command = command.split("\n")[0]
    if skip_to is not None:  # Inside =begin FORMAT ... =end FORMAT.
      if command == "end" and rest.split()[:1] == [skip_to]:
        skip_to = None
      continue
    if command == "cut":
      in_pod = False
    elif command:
      in_pod = True
      if command == "begin":
        skip_to = rest.split()[0] if rest.split() else ""
      elif command == "head1":
        sections.append([rest])
      elif command.startswith("head") or command == "item":
        sections[-1].append(re.sub(r"^(\*|\d+[.)]?)(\s+|$)", "", rest.strip()))
    elif in_pod and not para[:1].isspace():
      sections[-1].append(para)
  texts = (_paragraphs(_pod_inline("\n\n".join(s))) for s in sections)
  return [t for t in texts if t]


# --------------------------------------------------------------------------
# Sources: which package files, read how, in which order.


@dataclasses.dataclass(frozen=True)
class Source:
  """One corpus source: its packages, the files of theirs it reads (a regex
  over installed paths) and the reader turning those files into documents."""
  name: str
  packages: tuple[str, ...]
  pattern: str
  read: Callable[[list[pathlib.Path]], Iterable[str]]


def read_bytes(path: pathlib.Path) -> bytes:
  data = path.read_bytes()
  return gzip.decompress(data) if path.suffix in (".gz", ".dz") else data


def read_text(path: pathlib.Path) -> str:
  return read_bytes(path).decode("utf-8", "replace")


def _read_dict(paths: list[pathlib.Path]) -> Iterator[str]:
  index = [p for p in paths if p.name.endswith(".index")]
  data = [p for p in paths if ".dict" in p.name]
  if len(index) != 1 or len(data) != 1:
    raise FileNotFoundError(
        f"a dictd dictionary is one .index and one .dict(.dz) file, found"
        f" {[str(p) for p in paths]}: reinstall its Debian package.")
  index, data = index[0], data[0]
  yield from dict_documents(read_text(index), read_bytes(data))


def _read_html(paths):
  for p in paths:
    yield from html_sections(read_text(p))


def _read_rst(paths):
  return (rst_text(read_text(p)) for p in paths)


def _read_roff(paths):
  # A link page (".so man2/open.2") reads as "" and is dropped as too short.
  return (roff_text(read_text(p)) for p in paths)


def _read_pod(paths):
  for p in paths:
    yield from pod_sections(read_text(p))


PYDOC_PACKAGES = ("python-django-doc", "python-sqlalchemy-doc",
                  "python-sklearn-doc", "python-scipy-doc", "python-pandas-doc",
                  "python-statsmodels-doc", "python-astropy-doc",
                  "python-sympy-doc", "python-dask-doc", "python-xarray-doc")


def _dictd(name: str, package: str, stem: str | None = None) -> Source:
  """A dictd dictionary `<stem>.index` + `<stem>.dict.dz` of `package`."""
  return Source(name, (package,),
                rf"/usr/share/dictd/{stem or name}\.(index|dict\.dz)$",
                _read_dict)


# Pages that are navigation, indexes, search, release notes or licences, at
# any depth of any HTML source (Sphinx, mdBook, DocBook, Javadoc layouts;
# Erlang's notes.html are release notes; Texinfo's XREF*.html are one-line
# redirects to the node that holds an index entry).
_BOILERPLATE = re.compile(
    r"/(_sources|_static|_images|_modules|_downloads|releases?|releaselog"
    r"|whatsnew|changelog|index-files|class-use)/"
    r"|/(genindex[-\w]*|(py-mod|mod|book|all(classes|packages)-)?index"
    r"|search|contents"
    r"|toc|print|license|licence|copyright|copying|changelog|changes"
    r"|chronology|(release[-_]?)?notes|release-[\d.-]+|whats-?new"
    r"|overview-tree|package-(tree|use)|deprecated-list|constant-values"
    r"|serialized-form|help-doc|(?-i:XREF)[^/]*)(\.[\w.]+)?$", re.I)

SOURCES = (
    _dictd("gcide", "dict-gcide"),
    _dictd("wordnet", "dict-wn", "wn"),
    Source("python", ("python3.11-doc",),
           r"/usr/share/doc/python3\.11/html/.*\.html$", _read_html),
    Source("linux", ("linux-doc-6.1",),
           r"/usr/share/doc/linux-doc-6\.1/Documentation/.*\.rst\.gz$",
           _read_rst),
    Source("man", ("manpages", "manpages-dev"),
           r"/usr/share/man/man\d/[^/]+\.\d\w*\.gz$", _read_roff),
    Source("perl", ("perl-doc", "perl-modules-5.36"),
           r"/usr/share/perl/5\.36\.0/(pod/(?!perl\d*delta|perlhist"
           r"|perlartistic|perlgpl|perltoc|perluniprops|perlapi\.|perlintern"
           r"|perl(cn|jp|ko|tw)\.)perl\w*\.pod|(?!pod/).*\.pm)$", _read_pod),
    _dictd("foldoc", "dict-foldoc"),
    _dictd("jargon", "dict-jargon"),
    _dictd("devil", "dict-devil"),
    Source("sql", ("postgresql-doc-15", "sqlite3-doc"),
           r"/usr/share/doc/(postgresql-doc-15/html|sqlite3)/.*\.html$",
           _read_html),
    Source("pydocs", PYDOC_PACKAGES,
           r"/usr/share/doc/python-\w+-doc/html/.*\.html$", _read_html),
    Source("llvm", ("llvm-15-doc", "clang-15-doc"),
           r"/usr/share/doc/(llvm-15-doc|clang-15)/html/.*\.html$", _read_html),
    Source("debian", ("debian-handbook", "debian-reference-en", "debian-policy",
                      "developers-reference"),
           r"/usr/share/(doc/debian-handbook/html/en-US|debian-reference"
           r"|doc/debian-policy/policy\.html|developers-reference)"
           r"/[^/]*\.html$",
           _read_html),
    Source("tools", ("git-doc", "zsh-doc", "apache2-doc", "postfix-doc",
                     "exim4-doc-html", "libreoffice-help-en-us",
                     "gimp-help-en"),
           r"/usr/share/(doc/(git-doc|zsh-common/html|apache2-doc/manual/en"
           r"|postfix/html|exim4-doc-html/spec_html)"
           r"|libreoffice/help/en-US/text|gimp/2\.0/help/en)/.*\.html$",
           _read_html),
    Source("math", ("octave-doc", "maxima-doc", "sagemath-doc"),
           r"/usr/share/doc/(octave/octave\.html|maxima-doc/html"
           r"|sagemath/html/en)/.*\.html$",
           _read_html),
    Source("langs", ("erlang-doc", "nodejs-doc", "rust-doc", "racket-doc"),
           r"/usr/share/doc/(erlang-doc|nodejs/api|racket|rust-doc/html/(book"
           r"|reference|nomicon|rust-by-example|edition-guide|embedded-book"
           r"|rustc|rustdoc|cargo))/.*\.html$", _read_html),
    Source("java", ("openjdk-17-doc",),
           r"/usr/share/doc/openjdk-17-jre-headless/api/java\.[^/]*/.*\.html$",
           _read_html),
)


def _dpkg_list(root: pathlib.Path, package: str) -> pathlib.Path:
  return root / "var/lib/dpkg/info" / f"{package}.list"


def missing_packages(root: str | pathlib.Path = "/") -> list[str]:
  """Packages of `SOURCES` that dpkg under `root` does not list as installed."""
  root = pathlib.Path(root)
  return [p for s in SOURCES for p in s.packages
          if not _dpkg_list(root, p).is_file()]


def install_command(packages: Iterable[str]) -> str:
  return "apt-get install --no-install-recommends " + " ".join(packages)


def source_files(source: Source, root: pathlib.Path) -> list[pathlib.Path]:
  """The installed files of `source`, sorted, as paths under `root`."""
  missing = [p for p in source.packages if not _dpkg_list(root, p).is_file()]
  if missing:
    raise FileNotFoundError(
        f"corpus source {source.name!r} needs the Debian package(s)"
        f" {', '.join(missing)}, not installed under {root}: run"
        f" `{install_command(missing_packages(root))}` (as root).")
  pattern = re.compile(source.pattern)
  names = sorted({line.strip() for p in source.packages
                  for line in _dpkg_list(root, p).read_text().splitlines()
                  if pattern.search(line.strip())})
  return [root / n.lstrip("/") for n in names
          if not _BOILERPLATE.search(n) and (root / n.lstrip("/")).is_file()]


def normalise(text: str) -> str:
  """What de-duplication and the split compare: lower case, one space."""
  return " ".join(text.lower().split())


def split_of(text: str) -> str:
  """'validation' for 1% of documents, chosen by the hash of their text."""
  digest = hashlib.sha256(normalise(text).encode("utf-8")).digest()
  held_out = int.from_bytes(digest[:8], "little") % 10_000 < HELD_OUT_PER_10K
  return "validation" if held_out else "train"


def deduplicated(docs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
  """(source, text) pairs without exact repeats of normalised text (first
  kept) and without documents under MIN_WORDS words."""
  seen = set()
  for name, text in docs:
    norm = normalise(text)
    key = hashlib.sha1(norm.encode("utf-8")).digest()
    if key in seen or len(norm.split()) < MIN_WORDS:
      continue
    seen.add(key)
    yield name, text


_DOCUMENTS: dict = {}  # (root, sources) -> the list all_documents returns.


def all_documents(root: str | pathlib.Path = "/",
                  sources=SOURCES) -> list[tuple[str, str]]:
  """Every (source name, document) of the corpus, de-duplicated, in order.

  Read once per process and kept (~35M words; `prepare` peaks near 2 GB
  resident): `prepare` asks for the vocabulary's text and then for each
  split, and parsing ~45k HTML, POD and rST files takes minutes. Packages
  installed or removed while a process runs are not seen by it.
  """
  root = pathlib.Path(root).resolve()
  key = (root, tuple(sources))
  if key not in _DOCUMENTS:
    _DOCUMENTS[key] = list(deduplicated(
        (s.name, text)
        for s in sources for text in s.read(source_files(s, root))))
  return _DOCUMENTS[key]


def documents(split: str, root: str | pathlib.Path = "/",
              sources=SOURCES) -> Iterator[str]:
  """The documents of `split`, in source order."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  return (t for _, t in all_documents(root, sources) if split_of(t) == split)


def vocab_sentences(root: str | pathlib.Path = "/", sources=SOURCES,
                    max_bytes: int = 4000) -> Iterator[str]:
  """Train-split paragraphs for the SentencePiece trainer. Longer paragraphs
  are cut into pieces of at most `max_bytes` at word boundaries (the trainer
  skips sentences over its max_sentence_length, 4192 bytes)."""
  for text in documents("train", root, sources):
    for para in text.split("\n"):
      piece = []
      for word in para.split():
        if sum(len(w) + 1 for w in piece) + len(word) > max_bytes:
          yield " ".join(piece)
          piece = []
        piece.append(word)
      if piece:
        yield " ".join(piece)


def stats(root: str | pathlib.Path = "/", vocab: str | None = None) -> dict:
  """{source: {split: [documents, words(, tokens)]}} over the whole corpus.

  With `vocab` (a SentencePiece model path) tokens are counted as `prepare`
  writes them: the document's pieces plus one EOS.
  """
  encode = None
  if vocab is not None:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    encode = spm.SentencePieceProcessor(model_file=str(vocab)).encode
  width = 2 if encode is None else 3
  counts = collections.defaultdict(lambda: {s: [0] * width for s in SPLITS})
  for name, text in all_documents(root):
    entry = counts[name][split_of(text)]
    entry[0] += 1
    entry[1] += len(text.split())
    if encode is not None:
      entry[2] += len(encode(text)) + 1
  return dict(counts)


def _print_stats(counts: dict) -> None:
  """A markdown table: documents, words (and tokens) per source and split."""
  width = len(next(iter(counts.values()))["train"])
  fields = ["docs", "words", "tokens"][:width]
  total = {s: [sum(c[s][i] for c in counts.values()) for i in range(width)]
           for s in SPLITS}
  print("| source | " + " | ".join(f"{s} {f}" for s in SPLITS for f in fields)
        + " |\n|---|" + "---|" * (width * len(SPLITS)))
  for name, splits in [*counts.items(), ("total", total)]:
    print(f"| {name} | " + " | ".join(f"{v:,}" for s in SPLITS
                                      for v in splits[s]) + " |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m qtrain.data.debian",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="exit 1, naming the apt-get command, if a package is missing")
  parser.add_argument("--stats", action="store_true",
                      help="documents and words per source and split")
  parser.add_argument("--vocab", default=None,
                      help="with --stats: count tokens with this spm.model")
  parser.add_argument("--root", default="/", help="filesystem root (tests)")
  args = parser.parse_args(argv)
  if (missing := missing_packages(args.root)):
    print(f"debian_en needs Debian packages that are not installed: run\n"
          f"  {install_command(missing)}\n(as root; about 3 GB installed).",
          file=sys.stderr)
    return 1
  if args.check:
    print("debian_en: every source package is installed.")
  if args.stats:
    _print_stats(stats(args.root, args.vocab))
  return 0


if __name__ == "__main__":
  sys.exit(main())
