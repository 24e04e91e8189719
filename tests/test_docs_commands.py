"""The commands of the user docs run as written.

Two checks over the fenced code blocks of README.md and docs/*.md:

* with ``QTRAIN_DOCS_SMOKE=1`` (``make test-docs``, which ``.ci/run`` runs
  after ``make test``): every command of any block that writes under
  ``$TMP`` (the docs' mark of a smoke-sized command) is run from the
  repository root with ``$TMP`` a fresh temporary directory and
  ``XLA_FLAGS`` empty (one CPU device) unless the command sets it; each must
  exit 0. The quickstart's ``sh smoke`` block runs first (the others start
  from its ``$TMP/smoke``), then README and docs/*.md in order. ``make
  test`` only checks that the smoke block is short and comes first.
* every ``python -m qtrain.X`` / ``python scripts/....py`` command in any
  fenced block names a module or script that exists, passes only flags its
  parser lists in ``--help`` (``--helpfull`` for absl), and — where it gives
  ``--config=path[:variants]`` — names a config file that loads with those
  variants and ``--config.a.b=...`` fields that exist in it, and whose
  ``--recipe`` and ``--evals`` values resolve. So commands that are too big
  to run still cannot rot.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"(?:^|\s)python3?\s+(-m\s+(qtrain[\w.]*)|(scripts/[\w./-]+\.py))")
MAX_SMOKE = 5  # The file's time budget: each smoke command is configs/default.py:smoke sized.


def fenced(text: str) -> list[tuple[str, str]]:
  """(info string, body) of every fenced block of a markdown text."""
  return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def blocks() -> list[tuple[pathlib.Path, str, str]]:
  """(doc, info string, body) of every fenced block of the docs."""
  return [(doc, info, body) for doc in DOCS for info, body in fenced(doc.read_text())]


def logical_lines(body: str) -> list[str]:
  """Lines with ``\\`` continuations joined."""
  return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def smoke_commands() -> list[tuple[str, str]]:
  return [(f"{doc.name}", line) for doc, info, body in blocks() if info.split() == ["sh", "smoke"]
          for line in logical_lines(body) if not line.startswith("#")]


def tmp_commands() -> list[tuple[str, str]]:
  """(doc, line) of every command writing under ``$TMP``, the quickstart's first."""
  quickstart = ROOT / "docs" / "quickstart.md"
  order = [quickstart, *(d for d in DOCS if d != quickstart)]
  return [(doc.name, line) for doc in order for info, body in fenced(doc.read_text())
          if info.split()[:1] == ["sh"] for line in logical_lines(body)
          if "$TMP" in line and not line.startswith("#")]


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
  """(doc, the line, module or script, its argument tokens) of every
  qtrain / scripts command in any fenced block."""
  return [(doc.name, *c) for doc, _, body in blocks() for c in commands_in(body, doc.name)]


def commands_in(body: str, where: str = "") -> list[tuple[str, str, list[str]]]:
  """(the line, module or script, its argument tokens) of each command of a block."""
  out = []
  for line in logical_lines(body):
    for m in COMMAND.finditer(line):
      try:
        tokens = shlex.split(line[m.end():], comments=True)
      except ValueError as e:  # Unbalanced quotes: not a command a shell runs.
        raise AssertionError(f"{where}: cannot parse {line!r}: {e}") from e
      for i, t in enumerate(tokens):  # A chained command ends this one.
        if t in ("&&", "||", ";", "|"):
          tokens = tokens[:i]
          break
      out.append((line, m.group(2) or m.group(3), tokens))
  return out


def _source(target: str) -> pathlib.Path:
  """The file ``python -m target`` / ``python target`` runs."""
  if not target.startswith("qtrain"):
    return ROOT / target
  path = ROOT / target.replace(".", "/")
  return path / "__main__.py" if path.is_dir() else path.with_suffix(".py")


def _help_text(target: str, sub: str | None) -> str:
  """The flag listing of a module (absl: --helpfull; argparse: --help).

  An absl app's --help only says to try --helpfull, so one whose source
  imports absl's app is asked for --helpfull at once (each call imports the
  module: jax and all). Where that guess is wrong the listing lacks the
  flags and the check below fails naming them; it cannot pass wrongly.
  """
  base = [sys.executable] + (["-m", target] if target.startswith("qtrain") else [target])
  base += [sub] if sub else []
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  text = ""
  absl_app = "from absl import app" in _source(target).read_text()
  for flag in ("--helpfull",) if absl_app else ("--help", "--helpfull"):
    r = subprocess.run(base + [flag], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    text = r.stdout + r.stderr
    if "Traceback" in text or "No module named" in text:
      raise AssertionError(f"{' '.join(base)} {flag} failed:\n{text[-2000:]}")
    if "Try --helpfull" not in text:
      return text  # argparse: --help lists every flag.
  return text  # absl: --helpfull adds the flags of imported modules.


def known_flags(text: str) -> set[str]:
  """Flag names a help text lists: absl's ``--[no]name:`` / ``--name:``
  lines, argparse's ``--name`` anywhere (usage and options)."""
  names = set()
  for m in re.finditer(r"^\s+--(\[no\])?([\w.-]+):", text, re.M):
    names.add(m.group(2))
    if m.group(1):
      names.add("no" + m.group(2))
  names.update(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", text))
  return names


@functools.cache
def _load_config(spec: str):
  """``get_config(variants)`` of ``path.py:variants``, as config_flags loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_doc_config", ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _has_field(config, dotted: str) -> bool:
  node = config
  for key in dotted.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def _subcommand(target: str, tokens: list[str]) -> str | None:
  return tokens[0] if target == "qtrain.convert" and tokens and not tokens[0].startswith("-") else None


def _check_values(doc: str, line: str, options: dict) -> list[str]:
  """Values the parsers take as free strings but the run resolves later:
  PTQ recipes (presets of configs/quant) and sweep evaluations."""
  from qtrain.config.variants import quant_presets  # pylint: disable=g-import-not-at-top
  from qtrain.sweep import evaluations  # pylint: disable=g-import-not-at-top
  problems = []
  recipe = options.get("recipe")
  if recipe and recipe.partition("+")[0] not in quant_presets():
    problems.append(f"{doc}: --recipe={recipe} is no preset of configs/quant: {line}")
  for spec in filter(None, options.get("evals", "").split(",")):
    try:
      evaluations.resolve(spec, {})
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"{doc}: --evals: {e}: {line}")
  return problems


def test_smoke_blocks_are_few_and_among_the_commands_make_test_docs_runs():
  # They ran here until 2026-11-24 (47 s of `make test`); `make test-docs`,
  # which .ci/run runs after `make test`, runs every one of them first.
  commands = smoke_commands()
  assert 0 < len(commands) <= MAX_SMOKE, (
      f"{len(commands)} smoke commands; keep 1..{MAX_SMOKE} (the file's time budget)")
  run = tmp_commands()
  assert run[:len(commands)] == commands, (
      "the quickstart's `sh smoke` block must come first among the commands writing under $TMP "
      f"(make test-docs runs them in that order): {commands} vs {run[:len(commands)]}")


@pytest.mark.skipif(os.environ.get("QTRAIN_DOCS_SMOKE") != "1",
                    reason="every $TMP command of the docs (minutes): make test-docs, run by .ci/run")
def test_every_smoke_sized_command_of_the_docs_runs(tmp_path):
  commands = tmp_commands()
  assert len(commands) > MAX_SMOKE, commands
  env = dict(os.environ, TMP=str(tmp_path), XLA_FLAGS="", PYTHONPATH=str(ROOT))
  env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
  failed = []
  for doc, command in commands:
    r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    print(f"{doc}: exit {r.returncode}: {command}", flush=True)
    if r.returncode:
      failed.append(f"{doc}: `{command}` exited {r.returncode}:\n{(r.stdout + r.stderr)[-2000:]}")
  assert not failed, "\n\n".join(failed)


def test_documented_commands_name_real_modules_flags_and_fields():
  commands = documented_commands()
  assert commands, "no python -m qtrain / scripts commands found in the docs"
  targets = sorted({(t, _subcommand(t, tok)) for _, _, t, tok in commands})
  for target, _ in targets:
    if target.startswith("scripts/"):
      assert (ROOT / target).is_file(), f"{target} does not exist"
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # The CI machine has two cores.
    helps = dict(zip(targets, pool.map(lambda ts: _help_text(*ts), targets)))
  flags = {ts: known_flags(text) for ts, text in helps.items()}

  problems = []
  for doc, line, target, tokens in commands:
    sub = _subcommand(target, tokens)
    known = flags[(target, sub)]
    takes_config = "config" in known or "configs" in known
    for t in tokens:
      if not t.startswith("--"):
        continue
      name, _, value = t[2:].partition("=")
      if name.startswith("config.") and takes_config:
        continue  # Checked against the config below.
      if name not in known:
        problems.append(f"{doc}: {target}{' ' + sub if sub else ''} has no flag --{name}: {line}")
    options = dict(t[2:].partition("=")[::2] for t in tokens if t.startswith("--"))
    for pattern in options.get("configs", "").split(","):
      if pattern and not glob.glob(str(ROOT / pattern.partition(":")[0])):
        problems.append(f"{doc}: --configs={pattern} matches no file: {line}")
    problems += _check_values(doc, line, options)
    spec = options.get("config")
    if spec:
      try:
        config = _load_config(spec)
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f"{doc}: --config={spec} does not load ({type(e).__name__}: {e}): {line}")
        continue
      for name in options:
        if name.startswith("config.") and not _has_field(config, name[len("config."):]):
          problems.append(f"{doc}: --{name}: no such field in {spec}: {line}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text,expected", [
    ("  --[no]act_order: GPTQ\n  --method: <rtn|gptq>\n", {"act_order", "noact_order", "method"}),
    ("usage: x [-h] --out OUT\n  --names NAMES  legend\n", {"out", "names"}),
])
def test_known_flags_reads_absl_and_argparse_help(text, expected):
  assert known_flags(text) >= expected
  assert "typo_flag" not in known_flags(text)


def test_extraction_reads_tags_continuations_comments_and_chains():
  doc = ("text\n```sh smoke\npython -m qtrain.train --config=c.py \\\n    --workdir=$TMP/a\n```\n"
         "```\nXLA_FLAGS= python -m qtrain.eval --workdir=w  # --not_a_flag\n"
         "python scripts/x.py --a=1 && python -m qtrain.plot --out=o w\n```\n")
  (info1, body1), (info2, body2) = fenced(doc)
  assert info1.split() == ["sh", "smoke"] and info2 == ""
  assert logical_lines(body1) == ["python -m qtrain.train --config=c.py      --workdir=$TMP/a"]
  assert [(t, toks) for _, t, toks in commands_in(body2)] == [
      ("qtrain.eval", ["--workdir=w"]),
      ("scripts/x.py", ["--a=1"]),
      ("qtrain.plot", ["--out=o", "w"]),
  ]
