"""Shared fixtures: one short smoke training run, trained in-process once per
session and copied by the tests that resume, damage or evaluate it."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("QTRAIN_TEST_DATA", ROOT / "data" / "kjv"))


def smoke_config(**train):
  """The smoke config on the test data: 4 steps, checkpoints at 2 and 4, a
  fixed cosine horizon (8) so resumed runs may raise train.steps."""
  from configs import default  # pylint: disable=g-import-not-at-top
  cfg = default.get_config("smoke")
  cfg.data.dir = str(DATA)
  cfg.train.update(steps=4, checkpoint_every=2, eval_every=100, log_every=1, sample_tokens=0)
  cfg.train.update(**train)
  cfg.optim.decay_steps = 8
  return cfg


@pytest.fixture(scope="session")
def smoke_run_dir(tmp_path_factory) -> pathlib.Path:
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("smoke_run") / "run"
  run(smoke_config(), str(workdir))
  return workdir


@pytest.fixture
def smoke_run(smoke_run_dir, tmp_path) -> pathlib.Path:
  """A private copy of the session's smoke run."""
  copy = tmp_path / "run"
  shutil.copytree(smoke_run_dir, copy)
  return copy
