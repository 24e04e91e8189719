"""The debian_en corpus pipeline on small inline fixtures of each format.

Expected texts are written out by hand from the fixture (what a reader of the
rendered page sees, minus code and tables), so a reader that keeps markup,
drops prose or keeps code fails on an exact comparison.
"""

import gzip
import pathlib

import pytest

from qtrain.data import debian

HTML = """<!DOCTYPE html><html><head><title>ignored title</title>
<script>var x = "script text";</script><style>p { color: red }</style></head>
<body><nav role="navigation"><a href="/">Home</a> | <a>Next</a></nav>
<div class="related">previous | next</div>
<section><h1>Sorting HOW TO<a class="headerlink" href="#s">\u00b6</a></h1>
<p>Python lists have a built-in <code>list.sort()</code> method &amp; a
   <em>sorted</em> function.</p>
<div class="highlight-python3"><div class="highlight"><pre>&gt;&gt;&gt; sorted([5, 2])
[2, 5]</pre></div></div>
<table><tr><td>cell</td></tr></table>
<section><h2>Key functions</h2><ul><li>First item</li><li>Second<br>line</li></ul>
<p>Both take a key.</p><pre>bare = "code"</pre></section></section>
<div class="footer">Copyright 2023</div></body></html>
"""


def test_html_sections_strip_chrome_code_and_tables():
  assert debian.html_sections(HTML) == [
      "Sorting HOW TO\n"
      "Python lists have a built-in list.sort() method & a sorted function.",
      "Key functions\nFirst item\nSecond\nline\nBoth take a key.",
  ]


RST = """\
.. SPDX-License-Identifier: GPL-2.0

=============
Kernel timers
=============

:Author: someone

Timers run a *callback* once, see :c:func:`add_timer` and
`the docs <https://kernel.org>`_ or ``mod_timer()``.

.. note::
   Timers are not periodic.

.. code-block:: c

   add_timer(&t);

Use it like this::

    mod_timer(&t, jiffies + HZ);

Intro
-----

- first point
- second point
  wraps here

+-----+-----+
| a   | b   |
+=====+=====+
| 1   | 2   |
+-----+-----+

=====  =====
name   value
=====  =====
x      1
=====  =====

.. toctree::
   :maxdepth: 1

   other

The end.
"""


def test_rst_text_drops_directives_literal_blocks_and_tables():
  assert debian.rst_text(RST) == (
      "Kernel timers\n"
      ":Author: someone\n"
      "Timers run a callback once, see add_timer and the docs or mod_timer().\n"
      "Timers are not periodic.\n"
      "Use it like this:\n"
      "Intro\n"
      "first point second point wraps here\n"
      "The end.")


ROFF = r""".\" Copyright comment
.TH OPEN 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open, openat \- open a file
.SH SYNOPSIS
.nf
.B #include <fcntl.h>
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
It returns \fBthe\fP lowest\(emnumbered descriptor\(aqs value.
.TS
tab(:);
l l.
A:B
.TE
.PP
See
.BR close (2).
"""


def test_roff_text_resolves_macros_and_escapes():
  assert debian.roff_text(ROFF) == (
      "NAME\nopen, openat - open a file\nSYNOPSIS\nDESCRIPTION\n"
      "The open() system call opens the file specified by pathname. It"
      " returns the lowest\u2014numbered descriptor's value.\n"
      "See close(2).")


POD = """\
# Code before the first POD command is not documentation.
my $x = 1;

=head1 NAME
X<perlintro>

perlintro - a brief
introduction to Perl

=head1 DESCRIPTION

Use B<strict> and C<< $a <=> $b >> or C<$h{E<lt>}>, see
L<perlfunc/"sort"> and L<the FAQ|perlfaq>; E<eacute>tude Z<>done.

    my @sorted = sort { $a <=> $b } @list;

=over 4

=item *

First I<point>.

=item 2.

=back

=begin html

<p>raw html</p>

=end html

=for comment This paragraph is hidden.

=cut

sub hidden { "code after =cut" }

=head2 Later

Back in F<pod>.
"""


def test_pod_sections_drop_code_and_resolve_formatting_codes():
  assert debian.pod_sections(POD) == [
      "NAME\nperlintro - a brief introduction to Perl",
      "DESCRIPTION\n"
      "Use strict and $a <=> $b or $h{<}, see sort in perlfunc and the FAQ;"
      " \u00e9tude done.\n"
      "First point.\nLater\nBack in pod."]


def test_boilerplate_pages_are_not_read():
  for path in ("/usr/share/doc/python3.11/html/genindex-A.html",
               "/usr/share/doc/python3.11/html/license.html",
               "/usr/share/doc/python3.11/html/whatsnew/3.11.html",
               "/usr/share/doc/x-doc/html/_modules/x/y.html",
               "/usr/share/doc/postgresql-doc-15/html/release-15-3.html",
               "/usr/share/doc/openjdk-17-jre-headless/api/java.base/java/util/"
               "class-use/List.html",
               "/usr/share/doc/openjdk-17-jre-headless/api/java.sql/javax/sql/"
               "package-use.html",
               "/usr/share/doc/erlang-doc/lib/ssl-10.8.7/doc/html/notes.html",
               "/usr/share/doc/erlang-doc/lib/jinterface/doc/html/"
               "release_notes.html",
               "/usr/share/doc/octave/octave.html/XREFimagealphadatamapping.html"):
    assert debian._BOILERPLATE.search(path), path
  for path in ("/usr/share/doc/python3.11/html/tutorial/index-like.html",
               "/usr/share/doc/python3.11/html/library/search-tools.html",
               "/usr/share/doc/postgresql-doc-15/html/sql-select.html",
               "/usr/share/doc/rust-doc/html/book/ch04-01-what-is-ownership.html",
               "/usr/share/doc/erlang-doc/lib/tools-3.5.3/doc/html/xref.html"):
    assert not debian._BOILERPLATE.search(path), path


def _b64(n: int) -> str:
  """dictd's base-64 number digits, written independently of the reader."""
  alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  digits = ""
  while True:
    digits = alphabet[n % 64] + digits
    n //= 64
    if n == 0:
      return digits


GCIDE_ENTRIES = [
    "00-database-info\n   This file was converted from GCIDE.\n",
    "Apple \\Ap\"ple\\, n. [AS. \u00e6ppel.]\n"
    "   1. The fleshy fruit of a rosaceous tree ({Pyrus\n"
    "      malus}).\n   [1913 Webster]\n\n   2. Any fruit.\n   [PJC]\n",
    "abet\n    v 1: assist or encourage [syn: {aid},\n    {assist}]\n",
]


def _dictd_fixture(tmp_path, entries, headwords):
  """<tmp>/x.index + x.dict.dz with one index line per (headword, entry i)."""
  blobs = [e.encode("utf-8") for e in entries]
  offsets = [sum(len(b) for b in blobs[:i]) for i in range(len(blobs))]
  index = "".join(f"{w}\t{_b64(offsets[i])}\t{_b64(len(blobs[i]))}\n"
                  for w, i in headwords)
  (tmp_path / "x.index").write_text(index)
  (tmp_path / "x.dict.dz").write_bytes(gzip.compress(b"".join(blobs)))
  return [tmp_path / "x.index", tmp_path / "x.dict.dz"]


def test_dictd_reader_on_index_and_gzipped_dict(tmp_path):
  # "apple" and "Apple" point at one entry: it is read once. Offsets past 63
  # need two base-64 digits, so a wrong digit order would misread them.
  paths = _dictd_fixture(tmp_path, GCIDE_ENTRIES, [
      ("00-database-info", 0), ("Apple", 1), ("apple", 1), ("abet", 2)])
  assert list(debian._read_dict(paths)) == [
      "Apple , n. [AS. \u00e6ppel.] 1. The fleshy fruit of a rosaceous tree"
      " (Pyrus malus).\n2. Any fruit.\n"
      "abet v 1: assist or encourage"]


def test_dedup_and_held_out_split_are_deterministic_and_disjoint():
  docs = [("a", f"document number {i} has enough words to be kept here")
          for i in range(3000)]
  repeats = [("b", "  DOCUMENT number 7 has enough words to be kept HERE "),
             ("b", "too short to keep")]
  kept = list(debian.deduplicated(docs + repeats))
  assert kept == docs  # Case/space variant of #7 and the short one dropped.
  splits = {s: [t for _, t in kept if debian.split_of(t) == s]
            for s in debian.SPLITS}
  assert set(splits["train"]).isdisjoint(splits["validation"])
  assert len(splits["train"]) + len(splits["validation"]) == len(kept)
  # 1% of 3000 documents: binomial sd ~5.4, so 10..50 is > 3.5 sd wide.
  assert 10 <= len(splits["validation"]) <= 50
  again = {s: [t for _, t in debian.deduplicated(docs)
               if debian.split_of(t) == s] for s in debian.SPLITS}
  assert again == splits


def _fake_root(tmp_path: pathlib.Path) -> pathlib.Path:
  """A filesystem root where every source package is 'installed' by dpkg."""
  root = tmp_path / "root"
  files = {
      "dict-gcide": {"/usr/share/dictd/gcide.index": None,
                     "/usr/share/dictd/gcide.dict.dz": None},
      "dict-wn": {"/usr/share/dictd/wn.index": None,
                  "/usr/share/dictd/wn.dict.dz": None},
      "python3.11-doc": {"/usr/share/doc/python3.11/html/howto/sorting.html":
                         HTML.encode()},
      "linux-doc-6.1": {"/usr/share/doc/linux-doc-6.1/Documentation/timers.rst.gz":
                        gzip.compress(RST.encode())},
      "manpages": {"/usr/share/man/man2/open.2.gz": gzip.compress(ROFF.encode()),
                   "/usr/share/man/man2/creat.2.gz":
                   gzip.compress(b".so man2/open.2\n")},
      "manpages-dev": {},
      "perl-doc": {"/usr/share/perl/5.36.0/pod/perlintro.pod": POD.encode(),
                   # Release notes and generated tables are not read.
                   "/usr/share/perl/5.36.0/pod/perl5360delta.pod":
                   POD.replace("Perl", "Perl 5.36").encode()},
      # Boilerplate pages of any HTML source are not read either.
      "python-django-doc": {
          f"/usr/share/doc/python-django-doc/html/{page}.html":
          HTML.replace("Python", f"Django {i}").encode()
          for i, page in enumerate(("genindex-A", "_sources/x", "releases/4.2"))},
  }
  for source in debian.SOURCES:  # Every other package: installed, no files.
    for package in source.packages:
      files.setdefault(package, {})
  dictd = root / "usr/share/dictd"
  dictd.mkdir(parents=True)
  # WordNet and the other dictionaries get the same entries: their one
  # document repeats GCIDE's and is dropped by the de-duplication across
  # sources.
  fixture = _dictd_fixture(tmp_path, GCIDE_ENTRIES, [("Apple", 1), ("abet", 2)])
  dictionaries = {"gcide": "dict-gcide", "wn": "dict-wn", "foldoc": "dict-foldoc",
                  "jargon": "dict-jargon", "devil": "dict-devil"}
  for dictionary, package in dictionaries.items():
    files[package] = {f"/usr/share/dictd/{dictionary}{suffix}": None
                      for suffix in (".index", ".dict.dz")}
    for suffix, path in zip((".index", ".dict.dz"), fixture):
      (dictd / (dictionary + suffix)).write_bytes(path.read_bytes())
  info = root / "var/lib/dpkg/info"
  info.mkdir(parents=True)
  for package, contents in files.items():
    for name, data in contents.items():
      if data is not None:
        (root / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / name.lstrip("/")).write_bytes(data)
    (info / f"{package}.list").write_text("".join(f"{n}\n" for n in contents))
  return root


def test_corpus_over_installed_packages(tmp_path):
  root = _fake_root(tmp_path)
  docs = list(debian.all_documents(root))
  assert [name for name, _ in docs] == ["gcide", "python", "python", "linux",
                                        "man", "perl", "perl"]
  assert [t for n, t in docs if n == "perl"] == debian.pod_sections(POD)
  assert docs[3][1] == debian.rst_text(RST)
  train = list(debian.documents("train", root))
  valid = list(debian.documents("validation", root))
  assert sorted(train + valid) == sorted(t for _, t in docs)
  assert debian.main(["--check", "--root", str(root)]) == 0


def test_missing_package_names_the_apt_get_command(tmp_path, capsys):
  root = _fake_root(tmp_path)
  (root / "var/lib/dpkg/info/dict-wn.list").unlink()
  assert debian.missing_packages(root) == ["dict-wn"]
  assert debian.main(["--check", "--root", str(root)]) == 1
  assert ("apt-get install --no-install-recommends dict-wn"
          in capsys.readouterr().err)
  with pytest.raises(FileNotFoundError, match="apt-get install"):
    list(debian.documents("train", root))


def test_seqio_task_and_mixture_read_the_corpus(tmp_path):
  """debian_en yields the corpus documents, tokenized; the mixture with KJV
  draws from both. (Imports seqio/TensorFlow: the slow test of this file.)"""
  seqio = pytest.importorskip("seqio")
  from qtrain.data import tasks  # pylint: disable=g-import-not-at-top
  from qtrain.data import vocab  # pylint: disable=g-import-not-at-top
  root = _fake_root(tmp_path)
  sentences = list(debian.vocab_sentences(root))
  assert sentences and all("\n" not in s for s in sentences)
  model = tmp_path / "spm.model"
  model.write_bytes(vocab.train_model_bytes(sentences, 120))
  tasks.register_debian_en(model, root=root)
  task = seqio.get_mixture_or_task(tasks.DEBIAN_EN)
  sp = vocab.load_sentencepiece(model)
  got, n_tokens = [], {}
  for split in debian.SPLITS:
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False)
    n_tokens[split] = 0
    for ex in ds.as_numpy_iterator():
      assert ex["targets"][-1] == vocab.EOS_ID
      got.append(sp.decode(ex["targets"][:-1].tolist()))
      n_tokens[split] += len(ex["targets"])
  # `--stats --vocab` counts what seqio's tokenize + append_eos write.
  counts = debian.stats(root, str(model))
  assert {s: sum(c[s][2] for c in counts.values()) for s in debian.SPLITS} == n_tokens
  # Decoding normalises whitespace (newlines become spaces) only.
  assert sorted(got) == sorted(" ".join(t.split())
                               for _, t in debian.all_documents(root))
  assert tasks.vocab_sentences(task, root) == sentences
  mixture = seqio.get_mixture_or_task(tasks.DEBIAN_EN_KJV)
  assert sorted(t.name for t in mixture.tasks) == [tasks.DEBIAN_EN, tasks.KJV]
