"""Train (or resume) every config of an ablation, evaluate each the same way,
and compare them in one table and two plots.

  python -m qtrain.sweep --configs='configs/osp/*.py' --workdir=runs/osp \\
      [--evals=heldout,ptq:w4a4kv4:rtn] [--eval_batches=N] [--config.x=y ...]

``--configs``: config files, globs and ``path.py:variant`` entries, comma
separated (``'configs/osp/*.py,configs/default.py:smoke,w8a8'``). Each run
trains in ``<workdir>/<config name>[-<variant>...]``; every ``--config.x=y``
applies to every config. A run already trained to ``train.steps`` with the
same config is skipped, and cached evaluations are not run again, so a
re-run only fills in what is missing. Writes ``<workdir>/results.md`` (one
row per run with the command that reproduces it), ``results.json`` (the same
numbers and each run's curves) and ``loss.png`` / ``ppl.png`` (train loss and
held-out perplexity against tokens seen, all runs on one figure).
``qtrain.sweep.evaluations`` lists the evaluations and how to add one.

Expected mistakes (a misspelt override, no matching config, a run trained
with another config) end in one line naming the field or file, exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m qtrain.sweep",
                              description=__doc__.split("\n\n")[0],
                              epilog="Overrides: --config.<field>=<value>, applied to every run.")
  p.add_argument("--configs", required=True, help="config files / globs / path.py:variant, "
                 "comma separated")
  p.add_argument("--workdir", required=True, help="sweep directory: one run per config, "
                 "results.md, results.json, loss.png, ppl.png")
  p.add_argument("--evals", default="heldout", help="evaluations, comma separated "
                 "(heldout is always run): heldout, ptq:RECIPE[:METHOD]")
  p.add_argument("--eval_batches", type=int, default=None, help="held-out batches for every "
                 "run (0: the whole split); default each run's config.data.eval_batches")
  return p


def _eval_specs(text: str) -> list[str]:
  specs = [s.strip() for s in text.split(",") if s.strip()]
  return ["heldout", *(s for s in specs if s != "heldout")]


def sweep(configs: str, workdir: str, overrides: tuple[str, ...] = (),
          evals: str = "heldout", eval_batches: int | None = None, say=print) -> dict:
  """Trains, evaluates and reports every run; returns {"rows", "plotted",
  "preempted"} (``plotted``: the series drawn in loss.png and ppl.png)."""
  from qtrain.sweep import evaluations, report, runs  # pylint: disable=g-import-not-at-top
  options = {} if eval_batches is None else {"eval_batches": eval_batches}
  if eval_batches is not None and eval_batches < 0:
    from qtrain.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"--eval_batches={eval_batches} must be >= 0 (0: the whole split)")
  evs = [evaluations.resolve(s, options) for s in _eval_specs(evals)]  # Fail before training.
  todo = runs.discover(configs, workdir, overrides)
  rows = []
  for i, run in enumerate(todo, 1):
    say(f"[{i}/{len(todo)}] {run.name}: {run.command}")
    status = runs.train(run)
    say(f"[{i}/{len(todo)}] {run.name}: {status}")
    if status == "preempted":
      say("preempted: checkpoint saved; rerun the same command to resume the sweep")
      return {"rows": rows, "plotted": {}, "preempted": True}
    columns = {}
    for ev in evs:
      values, cached = evaluations.evaluate(ev, run.workdir, run.cfg.train.steps, options)
      say(f"    {ev.spec}{' (cached)' if cached else ''}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
      columns.update(values)
    rows.append(report.result_row(run, status, columns))
  eval_columns = [c for ev in evs for c in ev.columns]
  plotted = report.write(workdir, rows, eval_columns)
  say(f"wrote {workdir}/results.md, results.json, loss.png, ppl.png")
  return {"rows": rows, "plotted": plotted, "preempted": False}


def main(argv: list[str]) -> int:
  """The CLI on ``argv`` (without the program name); returns the exit status."""
  args, rest = _parser().parse_known_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO.
  from qtrain.train.errors import EXPECTED, one_line  # pylint: disable=g-import-not-at-top
  try:
    out = sweep(args.configs, args.workdir, tuple(rest), args.evals, args.eval_batches)
  except EXPECTED as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  del out  # A preempted sweep said so; rerunning resumes it.
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
