"""Gradient accumulation (config.train.grad_accum_steps) against the step on
the whole batch: the same loss, gradients (through the optimizer state and the
params after one step) and metrics with k = 2 and 4 microbatches, with loss
masks that give the microbatches very different token counts; on a
data=2 x fsdp=2 mesh against one device; no data moved between devices by the
split (compiled HLO); telemetry (kurtosis, max |x|) combined exactly; bad
divisibility and unsupported combinations refused before compiling.

Tolerances: the model computes in float32 and every row's forward is the same
whichever microbatch holds it, so accumulation only reassociates float32 sums
(over microbatches, then one division by the token count, where the whole
batch divides inside its one sum). That moves each result by a few float32
ulps (1.2e-7) of the magnitudes summed into it: rtol 2e-5 on losses, metrics,
gradients and params; and as a gradient entry is a sum of ~500 per-token
terms that may cancel to near 0, its error scales with the terms, not with
the entry: atol 1e-5 of the array's largest entry (measured: up to 9.4e-7).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qtrain.config import ConfigError, validate
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout, batch_sharding
from qtrain.train import abstract_params, make_steps, state_shardings
from qtrain.train.build import build_model
from qtrain.train.state import init_state
from qtrain.train.step import make_measured_step

RTOL = 2e-5
METRICS = ("loss", "objective", "z_loss", "grad_norm", "tokens", "finite", "lr", "skipped")
# Rows scored per row of the 8-row batch: microbatches of k=2 (rows j, j+2, ...)
# hold 232 vs 13 tokens, of k=4 128, 12, 104 and 1: a mean of
# microbatch means would weigh a 1-token microbatch like a 128-token one.
SCORED = (64, 3, 40, 0, 64, 9, 64, 1)
REAL = (64, 64, 48, 64, 64, 16, 64, 64)  # Real tokens (segment_ids > 0) per row.


def _config(k: int, data: int = 1, fsdp: int = 1):
  c = default.get_config("smoke")
  # The smoke vocabulary (8192) only makes each compile and step slower: the
  # split of the batch does not depend on the vocabulary's size.
  c.model.vocab_size = 512
  c.mesh.update(data=data, fsdp=fsdp)
  c.optim.z_loss = 1e-3  # The z-term is normalised like the loss: check it too.
  c.optim.warmup_steps = 0  # A non-zero lr at the first step, so the params move.
  # SGD with momentum: its state after one step is the (clipped) gradient and the
  # params move by lr x it, linear in the gradient. (AdamW's first step,
  # lr g / (|g| + eps), would amplify float32 noise of entries |g| ~ eps 1e8-fold.)
  c.optim.name = "sgd"
  c.optim.sgd.momentum = 0.9
  c.train.grad_accum_steps = k
  c.telemetry.every = 1  # The one-device runs are measured steps (same update).
  return c


def _batch(cfg) -> dict:
  b, t = cfg.data.global_batch_size, cfg.data.seq_len
  assert b == len(SCORED)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  pos = np.arange(t)
  real = np.stack([pos < r for r in REAL])
  scored = np.stack([pos < s for s in SCORED]) & real
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": real.astype(np.int32),
          "positions": np.tile(pos.astype(np.int32), (b, 1)),
          "loss_mask": scored.astype(np.int32)}


def _host(tree):
  return jax.tree.map(np.asarray, tree)


class _Step:
  """One config's jitted step on ``n`` devices, started from ``start`` (host
  arrays, so every run begins from the same params: only the reference
  compiles an init, through ``init``)."""

  def __init__(self, cfg, n: int = 1, measured: bool = False):
    devices = jax.devices()[:n]
    validate(cfg, n_devices=n)
    self.cfg, self.layout = cfg, Layout.from_config(cfg, devices)
    self.model, seq = build_model(cfg), cfg.data.seq_len
    model = self.model
    with self.layout:
      self.tx = build_optimizer(cfg, abstract_params(model, seq))
      self.sh = state_shardings(model, self.tx, self.layout.mesh, seq)
      self.fn = (make_measured_step(cfg, model, self.tx, self.layout.mesh, self.sh) if measured
                 else make_steps(cfg, model, self.tx, self.layout.mesh, self.sh)[0])

  def init(self):
    """The config's initial state as host arrays."""
    with self.layout:
      return _host(init_state(self.model, self.tx, self.layout.mesh, self.cfg.seed,
                              self.cfg.data.seq_len))

  def placed(self, start, host_batch):
    state = jax.device_put(start, self.sh)
    batch = {k: jax.device_put(v, batch_sharding(self.layout.mesh))
             for k, v in host_batch.items()}
    return state, batch

  def __call__(self, start, host_batch):
    state, batch = self.placed(start, host_batch)
    with self.layout:
      state, m = self.fn(state, batch)
    return _host(state), _host(m)

  def hlo(self, start, host_batch) -> str:
    state, batch = self.placed(start, host_batch)
    with self.layout:
      return self.fn.lower(state, batch).compile().as_text()


def _close(actual, expected, what: str):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    a, b = np.asarray(a), np.asarray(b)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-5 * scale,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def reference():
  """The whole-batch step (k=1) on one device: (start state, batch, after, metrics)."""
  run = _Step(_config(1), measured=True)
  batch, start = _batch(run.cfg), run.init()
  after, metrics = run(start, batch)
  return start, batch, after, metrics


def _check_equal(after, metrics, reference):
  start, _, ref_after, ref_metrics = reference
  assert float(ref_metrics["tokens"]) == sum(min(s, r) for s, r in zip(SCORED, REAL))
  for name in METRICS:
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=RTOL, err_msg=name)
  # The momentum after one step is the clipped gradient itself.
  _close(after.opt_state, ref_after.opt_state, "opt_state")
  _close(after.params, ref_after.params, "params")
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), after.params,
                                       start.params))
  assert max(moved) > 0, "the step must move the params, or the comparison shows nothing"


def test_accumulated_step_equals_the_whole_batch(reference):
  """Loss, metrics, gradients, params and telemetry of k = 4 microbatches
  equal the whole batch's. k only sets the length of the step's scan over
  microbatches, and k = 4 holds the 1-token microbatch; k = 2 runs the same
  code in test_on_a_data_fsdp_mesh_equals_one_device (each device's two rows
  as two microbatches)."""
  start, batch, _, _ = reference
  after, metrics = _Step(_config(4), measured=True)(start, batch)
  _check_equal(after, metrics, reference)
  # Telemetry (the measured step) combined exactly, though the microbatches
  # hold different numbers of real tokens: kurtosis and max |x| of every site.
  ref_metrics = reference[3]
  names = sorted(n for n in ref_metrics if n.startswith("telemetry/"))
  assert "telemetry/kurtosis" in names and "telemetry/max_abs" in names
  assert names == sorted(n for n in metrics if n.startswith("telemetry/"))
  for n in names:
    np.testing.assert_allclose(metrics[n], ref_metrics[n], rtol=RTOL, err_msg=n)


@pytest.fixture(scope="module")
def mesh_runs():
  """{k: the step on a data=2 x fsdp=2 mesh of 4 devices}."""
  return {k: _Step(_config(k, data=2, fsdp=2), n=4) for k in (1, 2)}


def test_on_a_data_fsdp_mesh_equals_one_device(reference, mesh_runs):
  """data=2 x fsdp=2, k=2: each device's two rows split into two one-row
  microbatches; same result as the whole batch on one device."""
  start, batch, _, _ = reference
  after, metrics = mesh_runs[2](start, batch)
  _check_equal(after, metrics, reference)


def _collectives(hlo: str) -> list[tuple[str, str, tuple[int, ...]]]:
  """Every collective of a compiled HLO module: (op, element type, shape)."""
  ops = r"all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute"
  found = re.findall(rf"= \(?(\w+)\[([\d,]*)\]\S* ({ops})(?:-start)?\(", hlo)
  return [(op, dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims, op in found]


def test_the_split_moves_no_batch_data_between_devices(reference, mesh_runs):
  """The compiled mesh step with k=2 runs the collectives of the whole-batch
  step (k=1), one by one, each on the same array or on one with half the rows
  (the model's own per-batch collectives, now per microbatch inside the scan),
  and nothing else: no all-to-all or collective-permute, no gather of the
  batch. A split that mixed rows across devices would add them."""
  start, batch, _, _ = reference
  whole, split = (_collectives(mesh_runs[k].hlo(start, batch)) for k in (1, 2))
  assert len(whole) > 5, f"the FSDP step must have collectives, or the parse failed: {whole}"
  unmatched = list(whole)
  for op, dtype, shape in split:
    halved = (shape[0] * 2,) + shape[1:] if shape else shape
    match = next((c for c in unmatched if c[:2] == (op, dtype) and c[2] in (shape, halved)),
                 None)
    assert match is not None, f"k=2 adds {op} {dtype}{list(shape)}; the whole batch has {whole}"
    unmatched.remove(match)
  assert not unmatched, f"k=2 lacks collectives of the whole-batch step: {unmatched}"


@pytest.mark.parametrize("update, field", [
    (dict(k=3), "config.data.global_batch_size=8 is not a multiple of config.train."
                "grad_accum_steps x config.mesh.data x fsdp = 3 x 1"),
    (dict(k=4, data=2, fsdp=2), "= 4 x 4 = 16"),
    (dict(k=0), "config.train.grad_accum_steps=0 must be an int >= 1"),
])
def test_bad_divisibility_fails_before_compiling(update, field):
  k = update.pop("k")
  cfg = _config(k, **update)
  with pytest.raises(ConfigError, match=re.escape(field)):
    validate(cfg, n_devices=cfg.mesh.data * cfg.mesh.fsdp)


def test_other_families_and_collect_are_refused():
  cfg = _config(2)
  cfg.train.step = "zeroth_order"
  with pytest.raises(ConfigError, match=r"grad_accum_steps=2 needs config.train.step='first_order'"):
    validate(cfg, n_devices=1)
  cfg = _config(2)
  cfg.train.collect = ("intermediates",)
  with pytest.raises(ConfigError, match=r"config.train.collect"):
    validate(cfg, n_devices=1)
