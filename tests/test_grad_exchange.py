"""The compressed data-parallel exchange (qtrain/parallel/exchange.py) and its
step family (qtrain/train/compressed.py) on 8 fake CPU devices and on two
processes (gloo).

References: the ``first_order`` step (dense), the float64 mean of the
replicas' contributions (PowerSGD at full rank), a float64 NumPy DGC
(top-k, momentum correction, factor masking), the exact error-feedback
identity, the compiled HLO (what the all-gathers move), and an uninterrupted
run (kill and resume).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import parallel_util as pu
from qtrain.config import ConfigError, base_config, validate
from qtrain.data.global_batch import to_global
from qtrain.parallel import exchange as ex_lib
from qtrain.train import abstract_state, make_steps, state_shardings

D = 8  # Replicas on the data axis.
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ex(method="dense", **groups) -> ml_collections.ConfigDict:
  ex = base_config().exchange
  ex.method = method
  for name, values in groups.items():
    if isinstance(values, dict):
      ex[name].update(values)
    else:
      ex[name] = values
  return ex


# --------------------------------------------------- the exchange alone --


def _exchange_fn(ex, states, sparsity=None, devices=None):
  """jitted (contrib [D, *shape] tree, states) -> (estimate, states, bytes sent)
  over a 1-axis ``data`` mesh, as the family calls it."""
  devices = jax.devices()[:D] if devices is None else devices
  mesh = jax.sharding.Mesh(np.array(devices), (ex_lib.AXIS,))
  specs = ex_lib.state_specs(states)

  def local(contrib, states):
    wire = ex_lib.Wire(D)
    est, new = ex_lib.exchange(jax.tree.map(lambda c: c[0], contrib), states, ex, wire,
                               sparsity=sparsity)
    return est, new, jnp.float32(wire.sent)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(ex_lib.AXIS), specs),
                               out_specs=(P(), specs, P()), check_vma=False))


def _powersgd_state(shape, rank, n_batch, seed=0):
  m = int(np.prod(shape[n_batch + 1:]))
  q = np.random.default_rng(seed).normal(size=(*shape[:n_batch], m, rank)).astype(np.float32)
  return ex_lib.PowerSGD(np.zeros((D, *shape), np.float32), q)


def test_powersgd_at_full_rank_is_the_mean():
  # A scanned stack [L, n, m]: L matrices, rank = m, so P Q^T spans M's columns.
  shape, rank = (2, 16, 12), 12
  c = np.random.default_rng(1).normal(size=(D, *shape)).astype(np.float32)
  states = {"w": _powersgd_state(shape, rank, n_batch=1)}
  est, new, sent = _exchange_fn(_ex("powersgd"), states)({"w": c}, states)
  mean = c.astype(np.float64).mean(0)
  # f32 QR and two f32 matmuls on O(1) entries: ~1e-6 relative, 1e-5 leaves margin.
  np.testing.assert_allclose(np.asarray(est["w"]), mean, rtol=0, atol=1e-5 * np.abs(mean).max())
  # Each replica keeps M_r - P Q^T (its own minus the mean): at full rank they
  # cancel over replicas, nothing of the mean is left behind.
  assert np.abs(np.asarray(new["w"].error).mean(0)).max() < 1e-5
  # P [2, 16, 12] and Q [2, 12, 12] all-reduced in float32 (ring: 2 (D-1)/D bytes).
  assert float(sent) == pytest.approx(2 * (D - 1) / D * 4 * (2 * 16 * 12 + 2 * 12 * 12))


def _numpy_dgc(c_DBN, u_DBN, v_DBN, sparsity, momentum):
  """float64 DGC of Lin et al. (momentum correction, accumulation, top-k per
  matrix, factor masking): (mean estimate, u, v)."""
  n = c_DBN.shape[-1]
  k = max(1, round(n * (1 - sparsity)))
  u = momentum * u_DBN + c_DBN
  v = v_DBN + u
  est = np.zeros(c_DBN.shape[1:])
  for r in range(c_DBN.shape[0]):
    for b in range(c_DBN.shape[1]):
      top = np.argsort(-np.abs(v[r, b]))[:k]
      est[b, top] += v[r, b, top]
      u[r, b, top] = 0.0
      v[r, b, top] = 0.0
  return est / c_DBN.shape[0], u, v


def test_dgc_matches_a_numpy_reference_over_steps():
  shape, sparsity, momentum = (2, 8, 16), 0.9, 0.9  # k = 13 of 128 per matrix.
  ex = _ex("dgc", dgc={"momentum": momentum})
  zeros = np.zeros((D, *shape), np.float32)
  states = {"w": ex_lib.DGC(zeros, zeros, n_batch=1)}
  step = _exchange_fn(ex, states, sparsity=sparsity)
  u = v = np.zeros((D, 2, 128))
  rng = np.random.default_rng(2)
  for _ in range(3):
    c = rng.normal(size=(D, *shape)).astype(np.float32)
    est, states, sent = step({"w": c}, states)
    ref, u, v = _numpy_dgc(c.reshape(D, 2, 128).astype(np.float64), u, v, sparsity, momentum)
    # float32 accumulation of O(1) values over 3 steps: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(est["w"]).reshape(2, 128), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(states["w"].momentum).reshape(D, 2, 128), u, atol=1e-5)
    np.testing.assert_allclose(np.asarray(states["w"].residual).reshape(D, 2, 128), v, atol=1e-5)
  # k values (f32) + k indices (s32) per matrix, all-gathered: (D-1) x 2 x 13 x 8 bytes.
  assert float(sent) == (D - 1) * 2 * 13 * 8


@pytest.mark.parametrize("method", ["powersgd", "dgc"])
def test_error_feedback_keeps_the_applied_sum_on_the_true_sum(method):
  """Sum over steps of the estimates vs of the true means, with a steady
  signal G plus noise (PowerSGD rank 1, DGC 99%: 8 of 768 entries a step).
  Exactly, sum(true) - sum(estimates) = the replicas' mean residual; with
  feedback that gap levels off (PowerSGD ~14, DGC ~36 steps' worth of |G| by
  step 240), without it (state reset each step) it grows by ~|G| every step."""
  shape = (32, 24)
  ex = _ex(method, powersgd={"rank": 1}, dgc={"momentum": 0.0})
  if method == "dgc":
    zeros = np.zeros((D, *shape), np.float32)
    fresh = {"w": ex_lib.DGC(zeros, zeros, n_batch=0)}
  else:
    fresh = {"w": _powersgd_state(shape, 1, n_batch=0)}
  step = _exchange_fn(ex, fresh, sparsity=0.99)
  rng = np.random.default_rng(3)
  signal = rng.normal(size=shape)
  per_step = np.linalg.norm(signal)
  states, true_sum, est_sum, no_fb_sum, gaps = fresh, 0.0, 0.0, 0.0, {}
  for t in range(1, 241):
    c = (signal + rng.normal(size=(D, *shape))).astype(np.float32)
    est, states, _ = step({"w": c}, states)
    est_nofb, _, _ = step({"w": c}, fresh)
    true_sum = true_sum + c.astype(np.float64).mean(0)
    est_sum, no_fb_sum = est_sum + np.asarray(est["w"]), no_fb_sum + np.asarray(est_nofb["w"])
    if t in (120, 240):
      gaps[t] = np.linalg.norm(true_sum - est_sum) / per_step
  residual = states["w"].residual if method == "dgc" else states["w"].error
  # The identity, to float32 rounding of 240 sums of O(1) terms.
  np.testing.assert_allclose(true_sum - est_sum, np.asarray(residual).mean(0), atol=2e-3)
  assert gaps[240] < 1.2 * gaps[120] and gaps[240] < 0.2 * 240  # Levelled off.
  assert np.linalg.norm(true_sum - no_fb_sum) / per_step > 0.8 * 240  # Grows without.


# ------------------------------------------------------- the step family --


def _family(method, adamw_eps=None, **groups):
  """(Run, tx with the compressor state, state shardings) on data=8."""
  cfg = pu.smoke_config(data=D)
  if adamw_eps is not None:
    cfg.optim.adamw.eps = adamw_eps
  cfg.train.step = "compressed"
  cfg.exchange.update(_ex(method, min_size=256, **groups))
  run = pu.Run(cfg)  # build_optimizer adds the compressor state for this family.
  assert isinstance(jax.eval_shape(run.tx.init, abstract_params_values(run)),
                    ex_lib.ExchangeState)
  with run.layout:
    sh = state_shardings(run.model, run.tx, run.mesh, pu.SEQ)
  return run, run.tx, sh


def abstract_params_values(run):
  with run.layout:
    return abstract_state(run.model, run.tx, run.mesh, pu.SEQ).params


@pytest.fixture(scope="module")
def one_device():
  """The ``first_order`` Run on one device (AdamW eps _EPS) and its initial
  TrainState (numpy): every mesh starts from the same numbers."""
  cfg = pu.smoke_config()
  cfg.optim.adamw.eps = _EPS
  run = pu.Run(cfg)
  return run, run.init_state()


def _init(run, tx, sh, state0):
  """``state0`` on ``run``'s mesh with the compressor state of a fresh run
  (built eagerly on the host), so no init is compiled per mesh."""
  opt = tx.init(state0.params)
  assert isinstance(opt, ex_lib.ExchangeState)
  opt = ex_lib.ExchangeState(state0.opt_state, opt.exchange)  # The same AdamW init.
  return jax.device_put(state0.replace(opt_state=opt), sh)


def _masked_batch():
  """Rows scoring 1..B*T/2 tokens: replicas hold unequal shares of the loss."""
  b = pu.batch(0)
  lengths = np.linspace(1, pu.SEQ, pu.BATCH).astype(int)
  b["loss_mask"] = (np.arange(pu.SEQ)[None, :] < lengths[:, None]).astype(np.int32)
  return b


# Adam's first update is lr g / (|g| + eps): with eps 1e-8 a gradient entry
# within a few eps of zero turns float32 reordering (1e-7) into a visible change
# of its update. eps 1e-3 keeps the comparison well conditioned; both sides share it.
_EPS = 1e-3


def test_dense_exchange_equals_the_first_order_step(one_device):
  """Against the ``first_order`` step on one device (which equals it on
  data=8: tests/test_parallel.py::test_adamw_step_equals_single_device)."""
  ref, state0 = one_device
  ref_params, ref_metrics = ref.train_step(state0, _masked_batch())
  run, tx, sh = _family("dense", adamw_eps=_EPS)
  state = _init(run, tx, sh, state0)
  with run.layout:
    train, _ = make_steps(run.cfg, run.model, tx, run.mesh, sh)
    state, m = train(state, to_global(_masked_batch(), run.mesh))
  metrics = [{k: float(v) for k, v in m.items()}]
  # Per-replica token-weighted gradients, then pmean: the global gradient up to
  # float32 reordering of the sum; one AdamW step of lr 3e-3 moves params by
  # <= 3e-3, 1e-6 is 0.03% of it.
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_allclose(np.asarray(b), a, rtol=0, atol=1e-6)
  m = metrics[0]
  for k in ("loss", "objective", "tokens"):
    assert m[k] == pytest.approx(ref_metrics[k], rel=1e-6)
  assert m["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-5)
  assert m["exchange/ratio"] == 1.0 and m["exchange/bytes_sent"] == m["exchange/bytes_dense"]


DGC_WARMUP = dict(sparsity=0.99, warmup_steps=4, warmup_sparsity=(0.75, 0.9), momentum=0.9)


@pytest.fixture(scope="module")
def dgc_step(one_device):
  """(run, tx, shardings, the compiled DGC step with a 3-stage warm-up, its
  initial state as a function): one executable, which a stage change cannot
  recompile."""
  run, tx, sh = _family("dgc", dgc=DGC_WARMUP)
  host = jax.tree.map(np.asarray, _init(run, tx, sh, one_device[1]))
  fresh = lambda: jax.device_put(host, sh)  # The step donates its state: a new copy each.
  with run.layout:
    train, _ = make_steps(run.cfg, run.model, tx, run.mesh, sh)
    compiled = train.lower(fresh(), to_global(pu.batch(0), run.mesh)).compile()
  return run, tx, sh, compiled, fresh


def test_dgc_sends_k_values_and_indices_in_the_compiled_step(dgc_step):
  run, _, _, compiled, _ = dgc_step
  module = pu.parse_hlo(compiled.as_text())
  gathered = {s for ins in pu.instructions(module, "all-gather") for s in ins.shapes}
  # Every compressed matrix (per scanned layer: batch 2) sends k = round(n m (1 - s))
  # f32 values and s32 indices per stage; one branch per stage, one program.
  expected = set()
  for x in jax.tree.leaves(abstract_params_values(run)):
    if x.size >= 256 and x.ndim >= 2:
      batch = x.shape[0] if x.ndim == 3 else 1
      per = x.size // batch
      for s in (0.75, 0.9, 0.99):
        k = max(1, round(per * (1 - s)))
        expected |= {("f32", (D, batch, k)), ("s32", (D, batch, k))}
  assert gathered == expected, sorted(gathered)
  # Nothing gradient-sized is all-reduced: only the dense small leaves (norm
  # scales, <= 128 elements) and scalars.
  reduced = [s for ins in pu.instructions(module, "all-reduce") for s in ins.shapes]
  assert reduced and max(int(np.prod(d)) for _, d in reduced) < 256, reduced






def test_kill_and_resume_is_bit_identical_with_dgc(dgc_step, tmp_path):
  run, tx, sh, compiled, fresh = dgc_step
  straight, metrics = pu.run_steps(run, compiled, fresh(), range(6))
  # Stages by the step counter: 0.75 for steps 0-1, 0.9 for 2-3, then 0.99.
  assert [m["exchange/sparsity"] for m in metrics] == pytest.approx(
      [0.75, 0.75, 0.9, 0.9, 0.99, 0.99])
  first, _ = pu.run_steps(run, compiled, fresh(), range(3))
  restored = pu.save_restore(run, tx, sh, first, tmp_path / "ckpt", 3)
  resumed, _ = pu.run_steps(run, compiled, restored, range(3, 6))
  exchange = straight.opt_state.exchange
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(exchange))  # In play.
  leaves = lambda s: jax.tree.leaves(jax.tree.map(np.asarray, s))
  for a, b in zip(leaves(straight), leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # The per-replica state is split over data (each device holds its own slice).
  u = jax.tree.leaves(exchange)[0]
  assert u.sharding.spec[0] == "data" and u.addressable_shards[0].data.shape[0] == 1


# ----------------------------------------------------------- the config --


@pytest.mark.parametrize("fields, message", [
    (dict(method="topk"), "config.exchange.method='topk'; use one of"),
    (dict(method="dgc", step="first_order"), "config.exchange.method='dgc' runs in the "
     "'compressed' step family; set --config.train.step=compressed"),
    (dict(method="powersgd", rank=0), "config.exchange.powersgd.rank=0 must be >= 1"),
    (dict(method="dgc", sparsity=1.0), "config.exchange.dgc.sparsity / warmup_sparsity"),
    (dict(method="dgc", tensor=2), "config.train.step='compressed' runs on a data x fsdp "
     "mesh only: config.mesh.tensor=2 must be 1"),
])
def test_config_errors_name_the_field(fields, message):
  cfg = pu.smoke_config(data=4, tensor=fields.pop("tensor", 1))
  cfg.train.step = fields.pop("step", "compressed")
  cfg.exchange.method = fields.pop("method")
  if "rank" in fields:
    cfg.exchange.powersgd.rank = fields.pop("rank")
  if "sparsity" in fields:
    cfg.exchange.dgc.sparsity = fields.pop("sparsity")
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(cfg, n_devices=8 if cfg.mesh.tensor == 2 else 4)


# ------------------------------------------------------- two processes --


def _contribs(shape, seed):
  return np.random.default_rng(seed).normal(size=(D, *shape)).astype(np.float32)


def _worker_result(method: str, devices=None) -> dict:
  """The exchange of three steps on 8 devices (one process or two)."""
  shape = (2, 16, 24)
  ex = _ex(method, powersgd={"rank": 2}, dgc={"momentum": 0.9})
  if method == "dgc":
    zeros = np.zeros((D, *shape), np.float32)
    states = {"w": ex_lib.DGC(zeros, zeros, n_batch=1)}
  else:
    states = {"w": _powersgd_state(shape, 2, n_batch=1)}
  fn = _exchange_fn(ex, states, sparsity=0.95, devices=devices)
  mesh = jax.sharding.Mesh(np.array(devices or jax.devices()[:D]), (ex_lib.AXIS,))
  put = lambda x: jax.make_array_from_callback(
      x.shape, jax.sharding.NamedSharding(mesh, P(ex_lib.AXIS)), lambda i: x[i])
  states = jax.tree.map(lambda x: put(x) if x.shape[0] == D else x, states)
  out = []
  for t in range(3):
    est, states, _ = fn({"w": put(_contribs(shape, t))}, states)
    out.append(np.asarray(jax.device_get(est["w"].addressable_data(0))).ravel().tolist())
  return {"est": out}


_METHODS = ("dgc", "powersgd")
_WORKER = """
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
from qtrain.parallel import distributed
distributed.initialize({addr!r}, 2, {pid})
import jax, test_grad_exchange as t
print("result: " + json.dumps({{m: t._worker_result(m, jax.devices()) for m in t._METHODS}}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_exchange_like_one(tmp_path):
  """Two processes of 4 CPU devices each (gloo) against one process's 8, for
  each method (one pair of processes runs both: a start costs more than a
  method)."""
  addr = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  # Output to files, not pipes: a worker blocked on a full pipe that is not
  # being read would hold the other at the shutdown barrier.
  logs = [tmp_path / f"worker_{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w", encoding="utf-8") as out:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", _WORKER.format(tests=str(ROOT / "tests"), root=str(ROOT),
                                                addr=addr, pid=i)],
          env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
  for p in procs:
    p.wait(timeout=240)
  outs = [log.read_text() for log in logs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(next(l for l in o.splitlines() if l.startswith("result: "))[8:])
             for o in outs]
  for method in _METHODS:
    ref = _worker_result(method)
    for r in results:
      # The same program over gloo instead of in-process collectives: the sums
      # may be ordered differently, so float32 rounding (1e-6 of O(1) values).
      np.testing.assert_allclose(np.array(r[method]["est"]), np.array(ref["est"]), rtol=0,
                                 atol=1e-5, err_msg=method)
