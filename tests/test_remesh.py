"""Restore onto another mesh: a checkpoint saved on ``fsdp=8`` resumes on
``data=2, fsdp=4`` (the same 8 devices) and then on 4 devices, and training
goes on as if the run had never been re-meshed: the same batches, the same
losses as an uninterrupted ``fsdp=8`` run.

Run as a script, this file is the 4-device leg (a fresh process: the device
count is fixed when JAX starts):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python tests/test_remesh.py WORKDIR BATCH_LOG STEPS
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import DATA, smoke_config  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow

SOURCE = dict(data=1, fsdp=8)  # The layout the checkpoint is saved with.
REMESHED = dict(data=2, fsdp=4)  # Same 8 devices, other axis sizes.
FOUR = dict(data=1, fsdp=4)  # Another device count.

# The re-meshed losses against the uninterrupted run's. A layout changes
# the order of float32 reductions (the loss over 512 tokens, gradients summed
# over 8 rows in shards of 1 or 2 and reduce-scattered over 4 or 8 devices),
# so values may move by a few ulps per reduction and, carried through two
# AdamW updates, by ~1e-6 relative. 1e-5 relative (~9e-5 on a loss of 9) is
# above that and far below what a wrong batch (~1e-2) or a lost optimizer
# state moves. On XLA:CPU they come out bitwise equal today.
RTOL = 1e-5


def _config(steps: int, mesh: dict):
  cfg = smoke_config(steps=steps)
  cfg.mesh.update(**mesh)
  return cfg


@contextlib.contextmanager
def _recording_batches(log: list):
  """Appends a checksum of every train batch drawn (this process's rows)."""
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  real = loader._ResumableIterator.__next__  # pylint: disable=protected-access

  def recording(self):
    batch = real(self)
    log.append(zlib.crc32(batch["inputs"].tobytes()))
    return batch

  loader._ResumableIterator.__next__ = recording  # pylint: disable=protected-access
  try:
    yield log
  finally:
    loader._ResumableIterator.__next__ = real  # pylint: disable=protected-access


def _rows(workdir) -> list[dict]:
  text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(l) for l in text.splitlines() if l.strip()]


def _metric(workdir, key: str) -> dict[int, float]:
  return {r["step"]: r[key] for r in _rows(workdir) if key in r}


def _four_device_leg(workdir, steps: int) -> tuple[str, list[int]]:
  """(stdout, batch checksums) of this file run as a script on 4 devices."""
  log = pathlib.Path(workdir).parent / "four_device_batches.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, __file__, str(workdir), str(log), str(steps)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
  return proc.stdout, json.loads(log.read_text())


def _legs(tmp: pathlib.Path) -> dict:
  """The uninterrupted reference and the re-meshed run, once per module."""
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  ref, remeshed = tmp / "ref", tmp / "remeshed"
  with _recording_batches([]) as ref_batches:
    run(_config(6, SOURCE), str(ref))  # Checkpoints at 2, 4, 6 (keep_checkpoints=3).
  # The source: the reference's own fsdp=8 checkpoint of step 2 and nothing after.
  shutil.copytree(ref, remeshed)
  for step in (4, 6):
    shutil.rmtree(remeshed / "checkpoints" / str(step))
  out = io.StringIO()
  with _recording_batches([]) as remeshed_batches, contextlib.redirect_stdout(out):
    run(_config(4, REMESHED), str(remeshed))
  four_out, four_batches = _four_device_leg(remeshed, 6)
  return dict(ref=ref, remeshed=remeshed, ref_batches=ref_batches,
              remeshed_batches=remeshed_batches + four_batches,
              notes=out.getvalue() + four_out)


def main(workdir: str, log: str, steps: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  with _recording_batches([]) as drawn:
    run(_config(steps, FOUR), workdir)
  pathlib.Path(log).write_text(json.dumps(drawn))


@pytest.fixture(scope="module")
def legs(tmp_path_factory) -> dict:
  return _legs(tmp_path_factory.mktemp("remesh"))


def test_remeshed_run_sees_the_same_batches(legs):
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  # Reference: the loader itself, fresh (one process: the whole batch).
  fresh = loader.make_train_iterator(DATA, seq_len=64, global_batch_size=8, seed=0)
  expected = [zlib.crc32(next(fresh)["inputs"].tobytes()) for _ in range(6)]
  assert legs["ref_batches"] == expected
  # Steps 3-4 on data=2 x fsdp=4, steps 5-6 on 4 devices.
  assert legs["remeshed_batches"] == expected[2:]


def test_remeshed_losses_equal_the_uninterrupted_run(legs):
  ref, remeshed = legs["ref"], legs["remeshed"]
  ref_loss, loss = _metric(ref, "loss"), _metric(remeshed, "loss")
  assert sorted(loss) == list(range(1, 7))
  assert [loss[s] for s in (1, 2)] == [ref_loss[s] for s in (1, 2)]  # The source's rows.
  np.testing.assert_allclose([loss[s] for s in range(3, 7)],
                             [ref_loss[s] for s in range(3, 7)], rtol=RTOL)
  # Held-out loss after the last re-meshed step: the params, not just the losses.
  np.testing.assert_allclose(_metric(remeshed, "eval_loss")[6],
                             _metric(ref, "eval_loss")[6], rtol=RTOL)
  # The learning rate continued from the restored update count.
  np.testing.assert_array_equal([_metric(remeshed, "lr")[s] for s in range(3, 7)],
                                [_metric(ref, "lr")[s] for s in range(3, 7)])


def test_mesh_fields_are_a_harmless_change_on_resume(legs):
  notes = [l for l in legs["notes"].splitlines() if l.startswith("note: resuming")]
  assert len(notes) == 2, legs["notes"]
  assert "config.mesh.data, config.mesh.fsdp, config.train.steps" in notes[0]
  assert "config.mesh.data" in notes[1] and "config.mesh.fsdp" not in notes[1]
  saved = json.loads((legs["remeshed"] / "config.json").read_text())
  assert saved["mesh"] == dict(FOUR, pipeline=1, sequence=1, tensor=1)  # Updated.


@pytest.mark.parametrize("mesh, n_devices", [(REMESHED, 8), (FOUR, 4)],
                         ids=["data2_fsdp4", "fsdp4_on_4_devices"])
def test_restore_lays_the_saved_values_out_on_the_new_mesh(legs, mesh, n_devices):
  import jax  # pylint: disable=g-import-not-at-top
  from qtrain.optim import build_optimizer  # pylint: disable=g-import-not-at-top
  from qtrain.parallel import Layout  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import abstract_params, abstract_state  # pylint: disable=g-import-not-at-top
  cfg = _config(6, SOURCE)
  model = build_model(cfg)
  ckpt = Checkpointer(str(legs["ref"] / "checkpoints"), keep=3, async_save=False)

  def restore(layout):
    with layout:
      tx = build_optimizer(cfg, abstract_params(model, cfg.data.seq_len))
      target = abstract_state(model, tx, layout.mesh, cfg.data.seq_len)
      return ckpt.restore(2, target), target

  try:
    # Reference: the saving layout itself (the bit-identical resume of test_train).
    (saved, saved_data), saved_target = restore(Layout.of(SOURCE, cfg.model))
    (state, data), target = restore(
        Layout.of(mesh, cfg.model, jax.devices()[:n_devices]))
  finally:
    ckpt.close()
  assert data == saved_data  # One process: its iterator position, whatever the mesh.
  leaves, target_leaves = jax.tree.leaves(state), jax.tree.leaves(target)
  moved = 0
  for leaf, want, ref, ref_want in zip(leaves, target_leaves, jax.tree.leaves(saved),
                                       jax.tree.leaves(saved_target)):
    assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
    assert len(leaf.sharding.device_set) == n_devices
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))  # A copy: exact.
    moved += not want.sharding.is_equivalent_to(ref_want.sharding, leaf.ndim)
  assert moved > len(leaves) // 2  # Most leaves really changed layout.


def test_another_process_count_is_refused_naming_the_fix(legs, tmp_path):
  from qtrain.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import run  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  shutil.copytree(legs["ref"], workdir)
  # Step 6 as two processes would have saved it; this run is one process.
  data = workdir / "checkpoints" / "6" / "data"
  position = json.loads((data / "process_0-of-1.json").read_text())
  (data / "process_0-of-1.json").unlink()
  for i in range(2):
    position["pipeline"].update(process_index=i, process_count=2)
    (data / f"process_{i}-of-2.json").write_text(json.dumps(position))
  config_before = (workdir / "config.json").read_bytes()
  with pytest.raises(CheckpointError, match=r"saved by 2 processes .*this run has 1.*resume "
                     r"with 2 processes.*init_from=" + re.escape(str(workdir))):
    run(_config(8, SOURCE), str(workdir))
  assert (workdir / "config.json").read_bytes() == config_before
  assert not list((workdir / "checkpoints").glob("*.damaged"))  # Not taken for damage.


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))


def test_a_mesh_that_moves_a_process_to_another_batch_slice_is_refused():
  """Same process count, but the new mesh's batch axes split the processes
  differently (e.g. tensor spanning hosts): the saved position is of another
  slice of the batch, and the loop says so instead of loading it."""
  from qtrain.config import ConfigError  # pylint: disable=g-import-not-at-top
  from qtrain.train.loop import _check_data_shard  # pylint: disable=g-import-not-at-top
  saved = {"pipeline": {"process_index": 1, "process_count": 2}}
  _check_data_shard(saved, 1, 2)  # The same slice: fine.
  with pytest.raises(ConfigError, match=r"config\.mesh: .*slice 1 of 2.*slice 0 of 1"):
    _check_data_shard(saved, 0, 1)
