"""Pipeline parallelism (``qtrain/parallel/pipeline.py``, step family
``pipeline``) on 8 fake CPU devices, against one device.

* GPipe, circular (2 repeats), 1F1B and interleaved 1F1B (2 repeats) on
  pipeline=2 and pipeline=4: the training loss and every gradient equal one
  device's within float32 reordering; the compiled programs pass activations
  by collective-permutes between neighbouring pipeline devices only.
* One AdamW train step of the family on data=2 x pipeline=2 x tensor=2
  (1F1B and interleaved 1F1B) moves the params as one device does.
* 1F1B's compiled temp memory is below GPipe's at m = 2p = 4 microbatches;
  interleaved 1F1B's falls with m where circular's does not.
* The 1F1B tick tables against Megatron-LM's per-device order, their
  hand-overs, stash bound and tick count.
* The tick accounting: every schedule's busy ticks per device match the
  bubble formula (p - 1) / (v m + p - 1) (timing: benchmarks/pipeline_bubble.py).
* Wrong configs fail in validation, naming the field.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest

from parallel_util import BATCH, SEQ, Run, batch, save_restore, smoke_config
from qtrain.config import ConfigError, validate
from qtrain.data.global_batch import to_global
from qtrain.layers import attention
from qtrain.parallel import pipeline as pp
from qtrain.parallel.rules import batch_sharding, replicated
from qtrain.train import make_loss
from qtrain.train import pipeline as family  # Registers the `pipeline` step family.

U = 2.0 ** -24  # float32 unit roundoff.
# As tests/test_parallel.py: the pipeline computes the same sums as one
# device but adds the loss and each weight gradient over the B*T tokens in
# another order (per microbatch, then over microbatches); reordering a float32
# sum of n terms moves it by at most ~n*u of the largest magnitude. Measured:
# loss <= 1e-7 relative, gradients <= 6e-7 of the leaf's largest element.
REORDER = BATCH * SEQ * U
N_LAYERS = 4
# (schedule, pipeline size, microbatches). m = 2p on pipeline=2 so the
# memory comparison sees 1F1B's bound; circular with 2 repeats needs m % p == 0.
# 1F1B and interleaved 1F1B on pipeline=4 run under ``w4a4kv4`` fake-quant
# with blocks 1 and 2 kept in float by a per-layer rule: the stages resolve
# the quantizers' path rules and per-layer choices as the whole model does,
# so each stage must run its blocks under their own indices (interleaved:
# device s runs blocks s and 4 + s).
# Interleaved on pipeline=4 takes m = 2p so that it reaches its steady state.
CASES = [("gpipe", 2, 4, ""), ("gpipe", 4, 4, ""), ("circular", 2, 4, ""),
         ("circular", 4, 4, ""), ("1f1b", 2, 4, ""), ("1f1b", 4, 4, "w4a4kv4"),
         ("interleaved_1f1b", 2, 4, ""), ("interleaved_1f1b", 4, 8, "w4a4kv4")]
INTERLEAVED = ("circular", "interleaved_1f1b")  # Two repeats: 2p layers.


def pipeline_config(schedule="gpipe", m=0, n_layers=N_LAYERS, quant="", dtype="float32",
                    **mesh):
  cfg = smoke_config(quant, **mesh)
  cfg.model.update(n_layers=n_layers, dtype=dtype)
  if quant:
    cfg.quant.rules.float_1_2 = dict(pattern=cfg.quant.rules.linears.pattern, layers="1,2")
    cfg.quant.order = ("float_1_2", *cfg.quant.order)
  if mesh.get("pipeline", 1) > 1:
    cfg.train.update(step="pipeline", pipeline_schedule=schedule, pipeline_microbatches=m)
  return cfg


def compile_gradients(cfg, params, host_batch):
  """(compiled loss-and-gradients of the ``pipeline`` step family, their args,
  run) for ``cfg`` on ``params`` and ``host_batch``."""
  run = Run(cfg)
  accum = family.gradients(pp.schedule_of(run.cfg, cfg.mesh.pipeline), run.mesh,
                           batch_sharding(run.mesh))
  loss_fn = make_loss(run.model)
  f = lambda prm, b: accum(loss_fn, prm, b, jax.random.key(0))[::2]
  with run.layout:
    jitted = jax.jit(f, out_shardings=(replicated(run.mesh), run.state_sh.params))
    args = jax.device_put(params, run.state_sh.params), to_global(host_batch, run.mesh)
    return jitted.lower(*args).compile(), args, run


class Runs:
  def __init__(self):
    self.single = Run(pipeline_config())
    self.state = self.single.init_state()
    self.batch = batch()

  @functools.cached_property
  def reference(self):
    return self.single.loss_and_grads(self.state.params, self.batch)

  @functools.cache
  def variant_reference(self, quant: str = "", dtype: str = "float32", n_layers=N_LAYERS):
    run = Run(pipeline_config(n_layers=n_layers, quant=quant, dtype=dtype))
    params = self.state.params if n_layers == N_LAYERS else self.deep_params(n_layers)
    return run.loss_and_grads(params, self.batch)

  @functools.cache
  @functools.cache
  def pipelined(self, schedule: str, p: int, m: int, quant: str = "", dtype: str = "float32"):
    """(loss, grads, compiled, run) of the family's gradients on pipeline=p."""
    compiled, args, run = self.compiled(schedule, p, m, quant, dtype)
    with run.layout:
      loss, grads = compiled(*args)
    return float(loss), jax.tree.map(np.asarray, grads), compiled, run

  def compiled(self, schedule, p, m, quant="", dtype="float32", rows=BATCH):
    """(compiled gradients, their args, run) on a batch of ``rows`` rows."""
    n_layers = 2 * N_LAYERS if schedule in INTERLEAVED and p == 4 else N_LAYERS
    cfg = pipeline_config(schedule, m, n_layers, quant, dtype, pipeline=p)
    cfg.data.update(global_batch_size=rows, eval_batch_size=rows)
    params = self.state.params if n_layers == N_LAYERS else self.deep_params(n_layers)
    host_batch = self.batch if rows == BATCH else jax.tree.map(
        lambda a: np.resize(a, (rows, *a.shape[1:])), self.batch)
    return compile_gradients(cfg, params, host_batch)

  @functools.cache
  def deep_params(self, n_layers):
    return Run(pipeline_config(n_layers=n_layers)).init_state().params

  @functools.cache
  def deep_reference(self, n_layers):
    run = Run(pipeline_config(n_layers=n_layers))
    return run.loss_and_grads(self.deep_params(n_layers), self.batch)


@pytest.fixture(scope="module")
def runs():
  return Runs()


def assert_reordered(got, want, what=""):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    assert g.shape == w.shape, (what, jax.tree_util.keystr(path))
    err, tol = np.abs(g - w).max(), REORDER * np.abs(w).max()
    assert err <= tol, f"{what}{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > {tol:.3g}"


def permutes(hlo: str) -> list[set[tuple[int, int]]]:
  """The (source, target) device pairs of each collective-permute in ``hlo``."""
  out = []
  for line in hlo.splitlines():
    if re.search(r"collective-permute(-start)?\(", line):
      found = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
      out.append({tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", found.group(1))})
  return out


def ring(mesh, step: int) -> set[tuple[int, int]]:
  """Pairs of a shift by ``step`` along the pipeline axis, every other mesh
  coordinate kept."""
  k = list(mesh.axis_names).index(pp.AXIS)
  devices = np.moveaxis(mesh.devices, k, 0)
  p = devices.shape[0]
  return {(devices[(s,) + idx].id, devices[((s + step) % p,) + idx].id)
          for s in range(p) for idx in np.ndindex(devices.shape[1:])}


@pytest.mark.parametrize("schedule,p,m,quant", CASES)
def test_schedule_equals_single_device(runs, schedule, p, m, quant):
  """Under fake-quant the quantizers' inputs differ from one device's by
  float32 reordering only and no rounding flips on this batch (as on every
  layout of tests/test_parallel.py), so the same bound holds."""
  loss, grads, compiled, run = runs.pipelined(schedule, p, m, quant)
  n_layers = 2 * N_LAYERS if schedule in INTERLEAVED and p == 4 else N_LAYERS
  if quant:
    ref_loss, ref_grads, _ = runs.variant_reference(quant, n_layers=n_layers)
  elif n_layers != N_LAYERS:
    ref_loss, ref_grads, _ = runs.deep_reference(n_layers)
  else:
    ref_loss, ref_grads, _ = runs.reference
  assert abs(loss - ref_loss) <= REORDER * abs(ref_loss), (loss, ref_loss)
  assert_reordered(grads, ref_grads, f"{schedule} p={p}: ")
  # Activations pass to the next device of the pipeline axis by one
  # collective-permute (1F1B's cotangents back by another).
  found = permutes(compiled.as_text())
  assert ring(run.mesh, 1) in found, found
  if schedule in pp.ONE_F_ONE_B:
    assert ring(run.mesh, -1) in found, found


def test_bfloat16_compute(runs):
  """GPipe with bfloat16 activations (the GPU configs' compute dtype) against
  one device in bfloat16. Every activation is rounded to 2^-8 relative, and
  where the two programs' float32 accumulations differ (microbatch shapes) a
  rounding flips and propagates through the 4 layers: measured <= 1.2% of
  each leaf's largest gradient, 1e-5 of the loss; bound 8 bf16 ulps (3.1%)."""
  loss, grads, _, _ = runs.pipelined("gpipe", 2, 2, "", "bfloat16")
  ref_loss, ref_grads, _ = runs.variant_reference("", "bfloat16")
  assert abs(loss - ref_loss) <= 2 ** -8 * abs(ref_loss), (loss, ref_loss)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert np.abs(g - w).max() <= 8 * 2 ** -8 * np.abs(w).max()


@pytest.mark.parametrize("data,tensor", [(2, 2), (1, 4)])
def test_cudnn_kernel_runs_with_every_axis_manual(runs, monkeypatch, data, tensor):
  """JAX's cuDNN attention is a custom_partitioning op whose partitioner
  cannot read shardings manual over some axes (on 2 GPUs the pipeline failed
  to compile). Inside a stage (manual over ``pipeline`` only, data=2 left to
  XLA; tensor=4 splits the q heads but not the 2 kv heads) the kernel must see
  every axis manual, this device's rows and heads: here a
  stand-in for cuDNN (the XLA kernel, which would run anywhere) records that,
  and the result still equals one device's."""
  seen = []

  def kernel(q, k, v, segment_ids=None, scale=None, max_segments=16):
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.manual_axes:  # Not the model's init (no mesh / no stage).
      seen.append((mesh.are_all_axes_manual, q.shape[0], q.shape[2], k.shape[2]))
    return attention.xla_attention(q, k, v, segment_ids, scale)

  monkeypatch.setattr(attention, "cudnn_attention", kernel)
  cfg = pipeline_config("gpipe", 2, data=data, pipeline=2, tensor=tensor)
  cfg.model.attention_impl = "cudnn"
  N, K = cfg.model.n_heads, cfg.model.n_kv_heads
  compiled, args, run = compile_gradients(cfg, runs.state.params, runs.batch)
  with run.layout:
    loss, grads = compiled(*args)
  # GPipe m = 2 of BATCH rows: BATCH / 2 rows per microbatch, split over
  # data; the q heads over tensor, the kv heads too where they divide, else
  # the one kv head of this device's q heads.
  want = (True, BATCH // 2 // data, N // tensor, K // tensor if K % tensor == 0 else 1)
  assert seen and all(s == want for s in seen), (seen, want)
  ref_loss, ref_grads, _ = runs.reference
  assert abs(float(loss) - ref_loss) <= REORDER * abs(ref_loss), (loss, ref_loss)
  assert_reordered(jax.tree.map(np.asarray, grads), ref_grads, "cudnn stand-in: ")


def test_1f1b_memory_below_gpipe(runs):
  """At m = 2p GPipe keeps every tick's activations for its backward (the
  residuals of v m + p - 1 ticks); 1F1B keeps at most 2p - 1 stage inputs
  and recomputes the stage in its backward slot."""
  temp = {s: runs.pipelined(s, 2, 4, "")[2].memory_analysis().temp_size_in_bytes
          for s in ("gpipe", "1f1b")}
  assert temp["1f1b"] < 0.8 * temp["gpipe"], temp


def test_interleaved_memory_bounded_in_m(runs):
  """With BATCH / 4 = 2 rows per microbatch, m = 4 -> 8 (p = 2, v = 2):
  circular keeps every tick's residuals for its backward, so its compiled
  temp memory grows by ~100 stage inputs (one stage input: 2 x SEQ x 64
  float32, 16 KB) per microbatch (measured 7.29 -> 13.61 MB). Interleaved
  1F1B stashes at most (v + 1) p - 1 = 5 stage inputs whatever m; only the
  stage-0 inputs and their cotangents are [m, ...] (measured 1.54 -> 1.59
  MB: 0.7 stage inputs per microbatch; a stash of every (microbatch, repeat)
  adds v = 2 per microbatch: measured 2.7)."""
  stage_input = 2 * SEQ * runs.single.cfg.model.d_model * 4
  grow = {}
  for s in INTERLEAVED:
    small = runs.pipelined(s, 2, 4)[2].memory_analysis().temp_size_in_bytes
    big = runs.compiled(s, 2, 8, rows=16)[0].memory_analysis().temp_size_in_bytes
    grow[s] = (big - small) / 4 / stage_input  # Stage inputs per added microbatch.
  assert grow["interleaved_1f1b"] <= 1 and grow["circular"] >= 20, grow


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_train_step_3d_layout(runs, schedule):
  """data=2 x pipeline=2 x tensor=2 under (interleaved) 1F1B, through
  ``make_steps``: one AdamW step (lr 3e-3, no warm-up). Adam's first update
  is g/(|g| + eps), so a gradient within reordering noise d of zero may move
  by up to 2 lr; elsewhere the update moves by at most d eps/(|g| - d)^2.
  Interleaved: each device's two stages are blocks s and 2 + s, so the
  tensor-sharded [L, ...] params are regrouped into [v, p, K, ...] and back."""
  run = Run(pipeline_config(schedule, 2, data=2, pipeline=2, tensor=2))
  params, metrics = run.train_step(runs.state, runs.batch)
  ref_params, ref_metrics = runs.single.train_step(runs.state, runs.batch)
  assert metrics["finite"] == 1
  for key in ("loss", "grad_norm", "tokens"):
    assert abs(metrics[key] - ref_metrics[key]) <= REORDER * abs(ref_metrics[key]), key
  _, grads, _ = runs.reference
  lr, eps = ref_metrics["lr"], 1e-8
  leaves = jax.tree.leaves
  for p, want, g, p0 in zip(leaves(params), leaves(ref_params), leaves(grads),
                            leaves(runs.state.params)):
    d = REORDER * np.abs(g).max()
    du = np.minimum(2.0, d * eps / (np.maximum(np.abs(g) - d, 0) + eps) ** 2)
    assert np.all(np.abs(p - want) <= lr * (du + 16 * U) + 2 * U * np.abs(want))
    assert np.abs(want - p0).max() > 0.5 * lr  # The step moved every leaf.


def test_checkpoint_restores_without_pipeline(runs, tmp_path):
  """A pipelined run's state keeps the [L, ...] layout: saved from the
  data=2 x pipeline=2 mesh, it restores onto one device unchanged."""
  run = Run(pipeline_config("1f1b", 0, data=2, pipeline=2))
  placed = jax.device_put(runs.state, run.state_sh)
  restored = save_restore(runs.single, runs.single.tx, runs.single.state_sh, placed, tmp_path, 1)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(runs.state)):
    np.testing.assert_array_equal(np.asarray(got), want)


def megatron_order(p: int, v: int, m: int, s: int) -> list[tuple[str, int, int]]:
  """Device s's operations ("F" | "B", microbatch, stage) in Megatron-LM's
  interleaved 1F1B (megatron/core/pipeline_parallel/schedules.py,
  forward_backward_pipelining_with_interleaving), written from its rules:
  W = min(2(p - s - 1) + (v - 1) p, v m) warm-up forwards, then forward W + k
  followed by backward k, then the remaining backwards. The k-th forward runs
  model chunk r = (k mod p v) // p (a backward: v - 1 - r) on microbatch
  (k // (p v)) p + k mod p; chunk r of device s is stage r p + s. (Megatron
  runs every forward first when m = p; not compared there.)"""
  n = v * m
  warm = min(2 * (p - s - 1) + (v - 1) * p, n)
  order = [("F", k) for k in range(warm)]
  for k in range(n - warm):
    order += [("F", warm + k), ("B", k)]
  order += [("B", k) for k in range(n - warm, n)]

  def op(kind, k):
    r = (k % (p * v)) // p
    r = r if kind == "F" else v - 1 - r
    return kind, (k // (p * v)) * p + k % p, r * p + s
  return [op(*o) for o in order]


@pytest.mark.parametrize("p,v,m", [(2, 1, 3), (4, 1, 8), (2, 2, 2), (2, 2, 4), (4, 2, 8),
                                   (3, 2, 9), (4, 3, 12), (2, 4, 6)])
def test_one_f_one_b_tick_tables(p, v, m):
  """The static plan of ``one_f_one_b`` (v = 1: 1F1B; v > 1: interleaved):
  every (microbatch, stage) forward and backward happens exactly once; the
  program keeps no receive buffer, so a forward runs exactly one tick after
  its predecessor stage's (one ppermute hop), a backward one tick after its
  successor stage's, and the last stage's backward in its forward's tick
  (its loss); a backward reads the input its forward stashed, and device s
  never holds more than min((v + 1) p - 1 - 2s, v m) (1F1B: 2(p - s) - 1);
  the program takes v m + (v + 1) p - 2 ticks; each device's operations are
  in Megatron-LM's order."""
  sched = pp.Schedule("1f1b" if v == 1 else "interleaved_1f1b", p, m, v)
  tb = pp.tick_tables(sched)
  n_stages, ticks = p * v, v * m + (v + 1) * p - 2
  assert sched.ticks == ticks and tb.f_ok.shape == (ticks, p)
  fwd, bwd = {}, {}  # (microbatch, stage) -> tick.
  for done, ok, mb, rep in ((fwd, tb.f_ok, tb.f_mb, tb.f_rep), (bwd, tb.b_ok, tb.b_mb, tb.b_rep)):
    for t, s in zip(*np.nonzero(ok)):
      key = (int(mb[t, s]), int(rep[t, s]) * p + int(s))
      assert key not in done, key
      done[key] = t
    assert set(done) == {(i, j) for i in range(m) for j in range(n_stages)}
  for (i, j), t in fwd.items():
    assert j == 0 or fwd[(i, j - 1)] == t - 1, (i, j)
  for (i, j), t in bwd.items():
    assert bwd[(i, j + 1)] == t - 1 if j < n_stages - 1 else t == fwd[(i, j)], (i, j)
  for s in range(p):
    held, peak = {}, 0  # slot -> (microbatch, repeat).
    for t in range(ticks):
      if tb.f_ok[t, s]:
        assert tb.f_slot[t, s] not in held, (t, s)
        held[tb.f_slot[t, s]] = (tb.f_mb[t, s], tb.f_rep[t, s])
      peak = max(peak, len(held))
      if tb.b_ok[t, s]:
        assert held.pop(tb.b_slot[t, s]) == (tb.b_mb[t, s], tb.b_rep[t, s]), (t, s)
    assert peak == min((v + 1) * p - 1 - 2 * s, v * m), (s, peak)
  assert tb.slots == min((v + 1) * p - 1, v * m)
  if v > 1 and m == p:
    return
  for s in range(p):
    ours = []
    for t in range(ticks):  # A tick's forward slot runs before its backward slot.
      if tb.f_ok[t, s]:
        ours.append(("F", tb.f_mb[t, s], tb.f_rep[t, s] * p + s))
      if tb.b_ok[t, s]:
        ours.append(("B", tb.b_mb[t, s], tb.b_rep[t, s] * p + s))
    assert ours == megatron_order(p, v, m, s), s


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 2, 4, 1), ("gpipe", 4, 8, 1),
                                        ("circular", 4, 8, 2), ("circular", 2, 2, 4),
                                        ("1f1b", 4, 8, 1), ("1f1b", 2, 1, 1),
                                        ("interleaved_1f1b", 4, 8, 2),
                                        ("interleaved_1f1b", 2, 6, 3)])
def test_tick_accounting(name, p, m, v):
  """Each device works v m forward (and as many backward) stage slots; with
  every tick as long as its busiest device, the idle fraction is the bubble
  formula (p - 1) / (v m + p - 1), for (interleaved) 1F1B too (priced F = 1,
  B = 2 per stage)."""
  sched = pp.Schedule(name, p, m, v)
  fwd, bwd = (np.asarray(a) for a in pp.busy_ticks(sched))
  np.testing.assert_array_equal(fwd.sum(0), v * m)
  if name in pp.ONE_F_ONE_B:
    np.testing.assert_array_equal(bwd.sum(0), v * m)
  f, b = 1.0, 2.0
  idle = 1 - v * m * (f + b) / pp.step_time(sched, f, b)
  np.testing.assert_allclose(idle, (p - 1) / (v * m + p - 1), rtol=1e-6)
  np.testing.assert_allclose(sched.bubble, (p - 1) / (v * m + p - 1))
  if name in pp.ONE_F_ONE_B:
    return
  # Each (microbatch, stage) pair is visited exactly once, in stage order.
  t = np.arange(sched.ticks)[:, None]
  s = np.arange(p)[None, :]
  i, r, ok = (np.asarray(a) for a in pp.forward_slot(t, s, sched))
  seen = {}
  for tt, ss in zip(*np.nonzero(ok)):
    seen[(i[tt, ss], r[tt, ss] * p + ss)] = tt
  assert len(seen) == m * v * p
  for (mb, j), tt in seen.items():
    if j:
      assert seen[(mb, j - 1)] == tt - 1  # Handed over by the previous stage one tick before.


@pytest.mark.parametrize("change,match", [
    (dict(train=dict(step="first_order")), r"config.mesh.pipeline=2 needs config.train.step"),
    (dict(train=dict(pipeline_schedule="zb")), r"config.train.pipeline_schedule='zb'"),
    (dict(train=dict(pipeline_microbatches=3)),
     r"config.train.pipeline_microbatches=3 does not divide the 4 rows per data x fsdp shard.*global_batch_size=6"),
    (dict(model=dict(n_layers=3)), r"config.mesh.pipeline=2 does not divide config.model."
     "n_layers=3"),
    (dict(train=dict(pipeline_schedule="circular", pipeline_repeats=4)),
     r"config.model.n_layers=4 does not split into config.mesh.pipeline x config.train."
     "pipeline_repeats"),
    (dict(train=dict(pipeline_schedule="interleaved_1f1b", pipeline_repeats=1)),
     r"config.train.pipeline_repeats=1 must be an int >= 2 for pipeline_schedule="
     r"'interleaved_1f1b' \(1 is '1f1b'"),
    (dict(train=dict(pipeline_schedule="interleaved_1f1b", pipeline_microbatches=1)),
     r"config.train.pipeline_microbatches=1 must be a multiple of config.mesh.pipeline=2 for "
     r"'interleaved_1f1b'.*use one of \[2, 4\]"),
    (dict(train=dict(pipeline_schedule="interleaved_1f1b", pipeline_repeats=4)),
     r"config.model.n_layers=4 does not split into config.mesh.pipeline x config.train."
     "pipeline_repeats"),
    (dict(train=dict(grad_accum_steps=2)), r"config.train.grad_accum_steps=2 with config.mesh"),
    (dict(model=dict(context_parallel="ring"), mesh=dict(sequence=2, data=1)),
     r"config.model.context_parallel='ring' with config.mesh.pipeline"),
    (dict(telemetry=dict(every=5)), r"config.telemetry.every=5 with config.mesh.pipeline"),
])
def test_validation_names_the_field(change, match):
  cfg = pipeline_config("gpipe", 0, data=2, pipeline=2)
  for group, fields in change.items():
    cfg[group].update(fields)
  with pytest.raises(ConfigError, match=match):
    validate(cfg, n_devices=4)


def test_pipeline_step_needs_a_pipeline():
  cfg = smoke_config(data=2)
  cfg.train.step = "pipeline"
  with pytest.raises(ConfigError, match=r"config.train.step='pipeline' needs config.mesh"):
    validate(cfg, n_devices=2)
