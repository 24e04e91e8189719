"""The runs of a sweep: which configs, where each trains, and whether it is done.

A sweep entry is a config file or a glob of them, each optionally with the
variants a training run takes after a colon (``configs/default.py:smoke,w8a8``).
Every run trains in ``<workdir>/<name>`` through the same loop as
``python -m qtrain.train`` (in this process: one JAX start-up for the whole
sweep), with the sweep's ``--config.x=y`` overrides applied to each config.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex

import ml_collections

from qtrain.config import ConfigError, check_override


@dataclasses.dataclass(frozen=True)
class Run:
  """One config of a sweep: ``entry`` (path[:variants]) trained in ``workdir``."""
  name: str
  entry: str
  workdir: str
  cfg: ml_collections.ConfigDict
  overrides: tuple[str, ...]

  @property
  def command(self) -> str:
    """The command that trains this run alone, exactly as the sweep did."""
    return shlex.join(["python", "-m", "qtrain.train", f"--config={self.entry}",
                       f"--workdir={self.workdir}", *self.overrides])


def split_entries(spec: str) -> list[str]:
  """``"a/*.py,b.py:smoke,w8a8"`` -> ``["a/*.py", "b.py:smoke,w8a8"]``.

  Variants are comma-separated too, so a piece that names no ``.py`` file
  belongs to the variants of the entry before it."""
  entries: list[str] = []
  for piece in (p.strip() for p in spec.split(",")):
    if not piece:
      continue
    if ".py" in piece.split(":", 1)[0] or not entries:
      entries.append(piece)
    elif ":" in entries[-1]:
      entries[-1] += "," + piece
    else:
      raise ConfigError(f"--configs: {piece!r} is not a .py config file; list config files "
                        "(globs allowed) and their variants as path.py:variant,...")
  return entries


def expand(spec: str) -> list[str]:
  """Config entries with globs expanded (sorted), each a file that exists. A
  glob leaves out files whose name starts with "_" (``configs/osp/_base.py``:
  what the ablations share, not an ablation)."""
  out = []
  for entry in split_entries(spec):
    path, sep, variants = entry.partition(":")
    paths = [path]
    if glob.has_magic(path):
      paths = sorted(p for p in glob.glob(path) if not os.path.basename(p).startswith("_"))
    if not paths or not all(os.path.isfile(p) for p in paths):
      raise ConfigError(f"--configs: {path} matches no config file")
    out += [p + sep + variants for p in paths]
  return out


def run_name(entry: str) -> str:
  """``configs/osp/lr_3e-4.py:smoke,w8a8`` -> ``lr_3e-4-smoke-w8a8``."""
  path, _, variants = entry.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return "-".join([stem, *(re.sub(r"[^\w.+-]", "_", v) for v in variants.split(",") if v)])


def load_config(entry: str, overrides: tuple[str, ...]) -> ml_collections.ConfigDict:
  """``entry`` with ``--config.x=y`` overrides, parsed by ml_collections as
  ``python -m qtrain.train`` parses them; a bad one is a ConfigError naming
  the field (``qtrain.config.check_override``)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["qtrain.sweep", f"--config={entry}", *overrides]
  fv = flags.FlagValues()  # A private registry: each config gets its own --config.* flags.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
    return fv.config
  except (KeyError, AttributeError, ValueError, TypeError, flags.Error) as e:
    for arg in overrides:
      check_override(arg.lstrip("-").split("=", 1)[0].removeprefix("config.")
                     .removeprefix("noconfig."))
    from qtrain.train.errors import one_line  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"{entry}: {one_line(e)}") from None


def discover(spec: str, workdir: str, overrides: tuple[str, ...] = ()) -> list[Run]:
  """Every run of the sweep, configs loaded and overridden (all before any trains)."""
  bad = [a for a in overrides if not a.startswith(("--config.", "--noconfig."))]
  if bad:
    raise ConfigError(f"{bad[0]}: overrides are --config.<field>=<value>")
  runs = []
  for entry in expand(spec):
    name = run_name(entry)
    if any(r.name == name for r in runs):
      raise ConfigError(f"--configs: two entries give the run name {name!r} "
                        f"({next(r.entry for r in runs if r.name == name)} and {entry}); "
                        "rename one config file")
    runs.append(Run(name, entry, os.path.join(workdir, name), load_config(entry, overrides),
                    tuple(overrides)))
  if not runs:
    raise ConfigError("--configs names no config file")
  return runs


def is_finished(run: Run) -> bool:
  """Trained to ``train.steps`` with this very config: the final checkpoint is
  committed (orbax renames a step's directory into place when complete) and
  metrics.jsonl holds the held-out evaluation the loop logs after the last
  step. A finished run trained with another config is an error, not a skip."""
  from qtrain.train.checkpoint import load_config as saved_config  # pylint: disable=g-import-not-at-top
  from qtrain.train.metrics import read_rows  # pylint: disable=g-import-not-at-top
  from qtrain.train.resume import differing_fields  # pylint: disable=g-import-not-at-top
  steps = run.cfg.train.steps
  if not os.path.isdir(os.path.join(run.workdir, "checkpoints", str(steps))):
    return False
  if not any(r.get("step") == steps and "eval_loss" in r for r in read_rows(run.workdir)):
    return False
  diff = differing_fields(saved_config(run.workdir), run.cfg)
  if diff:
    raise ConfigError(
        f"{run.workdir} finished {steps} steps with another config (differing: "
        f"{', '.join('config.' + f for f in diff)}); restore those values, or move that "
        "directory away to retrain it")
  return True


def train(run: Run) -> str:
  """Trains or resumes ``run``; returns "skipped", "trained", "resumed" or
  "preempted" (SIGTERM: checkpoint saved, the sweep should stop)."""
  if is_finished(run):
    return "skipped"
  from qtrain.train.loop import run as train_loop  # pylint: disable=g-import-not-at-top
  ckpts = os.path.join(run.workdir, "checkpoints")
  resumed = os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts))
  summary = train_loop(run.cfg, run.workdir)
  if summary["preempted"]:
    return "preempted"
  return "resumed" if resumed else "trained"
