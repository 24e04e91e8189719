"""Context parallelism in the model and the train step, on 8 fake CPU devices.

* The smoke model's training loss and gradients with ring attention on
  data=2 x sequence=4, under ``w4a4kv4`` fake-quant (KV-cache quantized), equal
  one device's within float32 reordering, on a packed batch (several documents
  per row, positions restarting, a padded tail) in zig-zag order; the compiled
  program exchanges K/V only by collective-permutes.
* One train step (``make_steps``, AdamW) with all-gather-KV attention on
  sequence=4 moves the params as one device does.
* The zig-zag order: device i holds chunks i and 2n-1-i; with it every device
  does the same attention work on every ring step (contiguous order does not),
  measured by the computation ``chunk_attention`` picks from the real mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_util import BATCH, SEQ, VOCAB, Run, instructions, parse_hlo, same_dims, smoke_config
from qtrain.layers.config import ModelConfig
from qtrain.parallel import MeshError, blockwise as bw, check_mesh, make_mesh
from qtrain.data.global_batch import to_global
from qtrain.parallel.zigzag import for_model, inverse_order, zigzag_batch, zigzag_order
from qtrain.analysis import jaxprs
from qtrain.train.build import build_model
from qtrain.train.loss import make_loss

U = 2.0 ** -24  # float32 unit roundoff.
# As tests/test_parallel.py: the layout adds the loss over B*T tokens and each
# gradient over tokens in another order (and the ring merges attention
# partials by LSE): <= n*u of the largest element. Measured: loss 4e-7
# relative, gradients <= 1e-6 of the leaf's largest element.
REORDER = BATCH * SEQ * U
RING = dict(data=2, sequence=4)
ALL_GATHER = dict(sequence=4)


def packed_batch(seed=0) -> dict:
  """Rows of 2-4 documents (positions restarting at 0); row 0 ends in 5
  padding tokens (segment 0, position 0, not scored)."""
  r = np.random.default_rng(seed)
  tokens = r.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  seg, pos = np.zeros((BATCH, SEQ), np.int32), np.zeros((BATCH, SEQ), np.int32)
  for b in range(BATCH):
    used = SEQ - 5 if b == 0 else SEQ
    cuts = np.sort(r.choice(np.arange(1, used), r.integers(1, 4), replace=False))
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used])):
      seg[b, lo:hi], pos[b, lo:hi] = i + 1, np.arange(hi - lo)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
          "positions": pos, "loss_mask": (seg > 0).astype(np.int32)}


def context_run(mode: str, mesh: dict, quant: str = "", remat_policy: str = "") -> Run:
  """The smoke Run on ``mesh`` with ``config.model.context_parallel=mode``
  (and ``remat_policy`` when given).
  The field is set after ``Run`` validates the config: ``qtrain/config/base.py``
  does not list it yet."""
  run = Run(smoke_config(quant, **mesh))
  run.cfg.model.context_parallel = mode
  if remat_policy:
    run.cfg.model.remat_policy = remat_policy
  run.model = build_model(run.cfg)
  assert run.model.cfg.context_parallel == mode
  return run


class Runs:
  def __init__(self):
    self.single = Run(smoke_config())
    self.state = self.single.init_state()
    self.batch = packed_batch()

  @functools.cache
  def reference(self, quant: str = ""):
    """One device's (loss, grads, hlo) under the ``quant`` preset."""
    run = Run(smoke_config(quant)) if quant else self.single
    return run.loss_and_grads(self.state.params, self.batch)


@pytest.fixture(scope="module")
def runs():
  return Runs()


def assert_reordered(got, want, what=""):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    err, tol = np.abs(g - w).max(), REORDER * np.abs(w).max()
    assert err <= tol, f"{what}{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > {tol:.3g}"


def test_ring_loss_and_grads_equal_single_device(runs):
  """Under ``w4a4kv4`` fake-quant: the ring passes the K/V the KV-cache
  quantizer has already rounded (4-bit, per token), so a KV-quantized model
  needs nothing more. The quantizers' inputs differ from one device's by
  float32 reordering only, and on this batch no rounding flips (as on every
  layout of tests/test_parallel.py), so the float32 bound holds."""
  run = context_run("ring", RING, "w4a4kv4")
  loss, grads, hlo = run.loss_and_grads(runs.state.params, zigzag_batch(runs.batch, 4))
  ref_loss, ref_grads, _ = runs.reference("w4a4kv4")
  assert abs(loss - ref_loss) <= REORDER * abs(ref_loss), (loss, ref_loss)
  assert_reordered(grads, ref_grads, "ring: ")
  module = parse_hlo(hlo)
  permutes = instructions(module, "collective-permute") + instructions(
      module, "collective-permute-start")
  assert permutes, "the ring passes K/V chunks by collective-permute"
  # K/V of one data shard, whole sequence: [B/2, T, K, H] in some dim order.
  cfg = run.model.cfg
  kv_shape = (BATCH // 2, SEQ, cfg.n_kv_heads, cfg.head_dim)
  gathers = instructions(module, "all-gather") + instructions(module, "all-gather-start")
  assert not [g for g in gathers if any(same_dims(s, kv_shape) for _, s in g.shapes)], gathers


def ring_gradient_jaxpr(run, host_batch, params):
  """The jaxpr of the training loss' gradient on ``run``'s mesh."""
  loss_fn = make_loss(run.model)
  with run.layout:
    return jax.make_jaxpr(jax.grad(lambda p, b: loss_fn(p, b, jax.random.key(0))[0]))(
        jax.device_put(params, run.state_sh.params), to_global(host_batch, run.mesh))


def test_ring_forward_runs_once_under_the_attention_remat_policy(runs):
  """dots_no_batch_attn keeps the ring's output and lse (named inside its
  custom VJP's forward), so the backward runs the backward ring only: as
  many K/V hops (ppermutes) and block matmuls in the gradient as without
  remat; dots_no_batch, which keeps neither, runs the forward ring again
  (more of both). Loss and grads still one device's (float32 reordering)."""
  batch = zigzag_batch(runs.batch, 2)
  counts = {}
  for policy in ("none", "dots_no_batch_attn", "dots_no_batch"):
    run = context_run("ring", dict(sequence=2), remat_policy=policy)
    jaxpr = ring_gradient_jaxpr(run, batch, runs.state.params)
    counts[policy] = (jaxprs.count(jaxpr, "ppermute"), jaxprs.count(jaxpr, "dot_general"))
  assert counts["dots_no_batch_attn"] == counts["none"], counts
  assert all(a > b for a, b in zip(counts["dots_no_batch"], counts["none"])), counts
  loss, grads, _ = context_run("ring", dict(sequence=2), remat_policy=(
      "dots_no_batch_attn")).loss_and_grads(runs.state.params, batch)
  ref_loss, ref_grads, _ = runs.reference()
  assert abs(loss - ref_loss) <= REORDER * abs(ref_loss), (loss, ref_loss)
  assert_reordered(grads, ref_grads, "ring, dots_no_batch_attn: ")


def test_all_gather_train_step_equals_single_device(runs):
  """One AdamW step (lr 3e-3, no warm-up): Adam's first update is
  g/(|g| + eps), so a gradient within reordering noise d of zero may move by
  up to 2 lr; elsewhere the update moves by at most d*eps/(|g|-d)^2 (the
  tolerance of tests/test_parallel.py's train-step check)."""
  run = context_run("all_gather", ALL_GATHER)
  params, metrics = run.train_step(runs.state, zigzag_batch(runs.batch, 4))
  ref_params, ref_metrics = runs.single.train_step(runs.state, runs.batch)
  assert metrics["finite"] == 1
  for key in ("loss", "grad_norm"):
    assert abs(metrics[key] - ref_metrics[key]) <= REORDER * abs(ref_metrics[key]), key
  _, grads, _ = runs.reference()
  lr, eps = ref_metrics["lr"], 1e-8
  flat = lambda t: jax.tree.leaves(t)
  for p, want, g, p0 in zip(flat(params), flat(ref_params), flat(grads), flat(runs.state.params)):
    d = REORDER * np.abs(g).max()
    du = np.minimum(2.0, d * eps / (np.maximum(np.abs(g) - d, 0) + eps) ** 2)
    tol = lr * (du + 16 * U) + 2 * U * np.abs(want)
    assert np.all(np.abs(p - want) <= tol), np.abs(p - want).max()
    assert np.abs(want - p0).max() > 0.5 * lr  # The step moved every leaf.


# ------------------------------------------------------------ zig-zag --


def test_zigzag_order():
  order = zigzag_order(16, 2)  # 4 chunks of 4: device 0 holds 0 and 3, device 1 holds 1 and 2.
  np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
  x = np.arange(32).reshape(2, 16)
  np.testing.assert_array_equal(x[:, order][:, inverse_order(order)], x)
  batch = zigzag_batch({"inputs": x, "targets": x + 1}, 2)
  np.testing.assert_array_equal(batch["positions"], np.tile(order, (2, 1)))
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
  with pytest.raises(ValueError, match=r"config.data.seq_len=10 .* 2 x config.mesh.sequence"):
    zigzag_order(10, 2)


def test_for_model_orders_only_context_parallel_layouts():
  batch = packed_batch()
  mesh = make_mesh(RING, jax.devices()[:8])
  ring = ModelConfig.of(context_run("ring", RING).cfg.model)
  zig = for_model(batch, mesh, ring)
  np.testing.assert_array_equal(zig["positions"], batch["positions"][:, zigzag_order(SEQ, 4)])
  plain = ModelConfig.of(smoke_config().model)  # context_parallel="none": index order kept.
  assert for_model(batch, mesh, plain) is batch
  assert for_model(batch, make_mesh(dict(data=8), jax.devices()[:8]), ring) is batch
  # The loop's door applies it: every batch the trainer, eval and calibration
  # hand to the model arrives in zig-zag order on a context-parallel mesh.
  placed = jax.device_get(to_global(batch, mesh, ring))
  np.testing.assert_array_equal(placed["positions"], zig["positions"])
  np.testing.assert_array_equal(placed["targets"], batch["targets"][:, zigzag_order(SEQ, 4)])


@pytest.mark.parametrize("mode,seq_len,match", [
    ("ring", 36, r"config.data.seq_len=36 is not a multiple of 2 x config.mesh.sequence = 8"),
    ("rnig", 32, r"config.model.context_parallel='rnig'; use one of")])
def test_check_mesh_names_the_field(mode, seq_len, match):
  cfg = smoke_config(**RING)
  cfg.data.seq_len = seq_len
  model = ModelConfig.of({**cfg.model.to_dict(), "context_parallel": mode})
  with pytest.raises(MeshError, match=match):
    check_mesh(cfg.mesh, 8, model, cfg.data)


def ring_work(order, n):
  """[n steps, n devices]: blocks of work ``chunk_attention`` picks on each
  ring step, for one causal row in ``order``."""
  pos = jnp.asarray(order)[None]
  seg = jnp.ones_like(pos)
  c = order.size // n
  chunk = lambda x, i: x[:, i * c:(i + 1) * c]
  work = np.zeros((n, n))
  for step in range(n):
    for dev in range(n):
      src = (dev - step) % n  # The chunk that reached `dev` after `step` hops.
      mask = bw.visible(chunk(pos, dev), chunk(seg, dev), chunk(pos, src), chunk(seg, src))
      work[step, dev] = bw.PLAN_WORK[int(bw.plan(mask))]
  return work


def test_zigzag_balances_ring_work():
  n, T = 4, 64
  zig = ring_work(zigzag_order(T, n), n)
  np.testing.assert_array_equal(zig[0], 1.0)  # The diagonal block everywhere.
  np.testing.assert_array_equal(zig[1:], 0.5)  # Half a block on every other step.
  contiguous = ring_work(np.arange(T), n)
  assert contiguous.sum() == zig.sum()  # The same work in total,
  np.testing.assert_array_equal(contiguous.sum(0), np.arange(1, n + 1))  # device i does i + 1,
  # and each step waits for its slowest device: n blocks against (n + 1) / 2.
  assert contiguous.max(1).sum() == n and zig.max(1).sum() == (n + 1) / 2
