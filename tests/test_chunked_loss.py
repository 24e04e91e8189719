"""The chunked LM head + cross-entropy (``config.model.loss_chunks``,
qtrain/train/loss.py): the same loss and gradients as the full head, less
memory in the compiled train step, and the same numbers for the other users of
``make_loss`` (zeroth-order perturbations, telemetry).

Bound for "same within float32": each loss and gradient entry is a sum over
the B x T tokens that the chunked path groups differently (per chunk, then
over chunks), so it may move by about n*u of its largest term, n = B x T,
u = 2^-24 (as tests/parallel_util.py bounds a sharded sum against one device).
"""

from __future__ import annotations

import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qtrain.config import ConfigError, validate
from qtrain.data.global_batch import to_global
from qtrain.parallel import AXES, Layout, replicated
from qtrain.train import make_loss
from qtrain.train import zeroth_order as zo
from qtrain.train.build import build_model
from step_util import train_temp_bytes  # pytest puts tests/ on sys.path

VOCAB, SEQ, BATCH = 512, 24, 8  # SEQ divisible by 3 and 4.
REORDER = BATCH * SEQ * 2.0 ** -24  # The bound of the module docstring.
Z_LOSS = 1e-2  # Large enough that log Z's gradient shows in every comparison.


def _cfg(chunks: int, variant: str = "", **model):
  cfg = default.get_config(",".join(filter(None, ("smoke", variant))))
  cfg.model.update(vocab_size=VOCAB, n_layers=1, loss_chunks=chunks, **model)
  cfg.data.update(seq_len=SEQ, global_batch_size=BATCH, eval_batch_size=BATCH)
  cfg.mesh.update({a: 1 for a in AXES})
  return cfg


def _batch(seed: int = 0) -> dict:
  """Two packed documents and 4 padding tokens per row, a random loss mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  seg = np.repeat(np.array([1] * 11 + [2] * 9 + [0] * 4, np.int32)[None], BATCH, 0)
  pos = np.repeat(np.array(list(range(11)) + list(range(9)) + [0] * 4, np.int32)[None], BATCH, 0)
  mask = ((rng.random((BATCH, SEQ)) > 0.3) & (seg > 0)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
          "positions": pos, "loss_mask": mask}


class _Run:
  """A model on the mesh of ``cfg.mesh`` with the (loss, grads) of ``make_loss``."""

  def __init__(self, cfg):
    n = int(np.prod([cfg.mesh[a] for a in AXES]))
    validate(cfg, n_devices=n)
    self.cfg, self.model = cfg, build_model(cfg)
    self.layout = Layout.from_config(cfg, jax.devices()[:n])
    self.mesh = self.layout.mesh

  def params(self):
    init = jax.jit(lambda key: self.model.init(key, jnp.zeros((1, SEQ), jnp.int32)))
    with self.layout:
      return jax.tree.map(np.asarray, nn.unbox(init(jax.random.key(0))["params"]))

  def loss_and_grads(self, params, host):
    loss_fn = make_loss(self.model, Z_LOSS)
    f = lambda p, b: loss_fn(p, b, jax.random.key(0))[0]
    with self.layout:
      step = jax.jit(jax.value_and_grad(f), out_shardings=replicated(self.mesh))
      compiled = step.lower(params, to_global(host, self.mesh)).compile()
      loss, grads = compiled(params, to_global(host, self.mesh))
    return float(loss), jax.tree.map(np.asarray, grads), compiled.as_text()


def _reference_loss(model, params, host) -> float:
  """float64 NumPy cross-entropy + z-loss of the full model call's logits."""
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a, rngs={"quant": jax.random.key(0)}))
  logits = np.asarray(apply(params, host["inputs"], host["positions"], host["segment_ids"]),
                      np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, host["targets"][..., None], -1)[..., 0]
  m = host["loss_mask"].astype(np.float64)
  return float(((log_z - target) * m).sum() / m.sum() + Z_LOSS * (log_z ** 2 * m).sum() / m.sum())


def _assert_close(loss, grads, ref_loss, ref_grads):
  assert abs(loss - ref_loss) <= REORDER * abs(ref_loss), (loss, ref_loss)
  for (path, g), (_, w) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                               jax.tree_util.tree_flatten_with_path(ref_grads)[0]):
    err = np.abs(g - w).max()
    assert err <= REORDER * np.abs(w).max(), (jax.tree_util.keystr(path), err, np.abs(w).max())


@pytest.fixture(scope="module")
def full():
  """The untied model's params and its full-head (loss, grads) on ``_batch()``,
  whose loss equals a float64 NumPy cross-entropy of the full model call's
  logits within REORDER relative (the float32 logsumexp's rounding is below)."""
  run, host = _Run(_cfg(0)), _batch()
  params = run.params()
  loss, grads, _ = run.loss_and_grads(params, host)
  want = _reference_loss(run.model, params, host)
  assert abs(loss - want) <= REORDER * abs(want), (loss, want)
  return params, host, loss, grads


def test_chunks_match_the_full_head(full):
  """loss_chunks 3 and 4 give the loss and every gradient of loss_chunks=0
  within REORDER (packed rows, loss mask, z-loss); the compiled program holds
  a chunk's float32 logits [B, T/n, V] and never the whole [B, T, V]."""
  params, host, ref_loss, ref_grads = full
  for n in (3, 4):
    loss, grads, hlo = _Run(_cfg(n)).loss_and_grads(params, host)
    _assert_close(loss, grads, ref_loss, ref_grads)
    assert f"f32[{BATCH},{SEQ // n},{VOCAB}]" in hlo
    assert f"[{BATCH},{SEQ},{VOCAB}]" not in hlo


def test_eval_step_with_chunks_gives_the_full_heads_sums(full):
  """Evaluation (qtrain.train.eval_step) runs the chunked head too: its NLL sum
  and token count equal the full head's within REORDER, and the compiled eval
  holds no whole [B, T, V] logits."""
  from qtrain.train import eval_step  # pylint: disable=g-import-not-at-top
  params, host, _, _ = full
  sums = {}
  for n in (0, 4):
    run = _Run(_cfg(n))
    with run.layout:
      f = jax.jit(lambda p, b, m=run.model: eval_step(p, b, model=m))
      compiled = f.lower(params, to_global(host, run.mesh)).compile()
      sums[n] = jax.tree.map(float, compiled(params, to_global(host, run.mesh)))
    if n:
      assert f"[{BATCH},{SEQ},{VOCAB}]" not in compiled.as_text()
  assert sums[4]["tokens"] == sums[0]["tokens"]
  assert abs(sums[4]["nll_sum"] - sums[0]["nll_sum"]) <= REORDER * abs(sums[0]["nll_sum"])


def test_quantized_tied_head_chunks_match():
  """A quantized head (int4 per-channel weights, int4 per-token activations,
  STE) on the tied embedding: its scales are per token and per vocabulary
  row, so a chunk quantizes exactly as the full call; loss and gradients
  within REORDER of loss_chunks=0."""
  full_run = _Run(_cfg(0, "w4a4+lm_head", tie_embeddings=True))
  params, host = full_run.params(), _batch()
  ref_loss, ref_grads, _ = full_run.loss_and_grads(params, host)
  run = _Run(_cfg(4, "w4a4+lm_head", tie_embeddings=True))
  loss, grads, hlo = run.loss_and_grads(params, host)
  _assert_close(loss, grads, ref_loss, ref_grads)
  assert f"f32[{BATCH},{SEQ // 4},{VOCAB}]" in hlo


def test_vocab_parallel_chunks_match_one_device(full):
  """On 8 devices (data 4 x tensor 2, the vocabulary split over tensor),
  loss_chunks=4 equals one device's full head within REORDER, and no
  all-gather assembles a whole vocabulary row of logits (the masked-sum
  target logit keeps the loss vocab-parallel)."""
  params, host, ref_loss, ref_grads = full
  cfg = _cfg(4)
  cfg.mesh.update(data=4, tensor=2)
  loss, grads, hlo = _Run(cfg).loss_and_grads(params, host)
  _assert_close(loss, grads, ref_loss, ref_grads)
  assert f"[2,{SEQ // 4},{VOCAB // 2}]" in hlo  # Per device: 2 rows, a chunk, half the vocab.
  # All-gathers of arrays with a whole vocabulary dim, but the head's kernel
  # [D, V] (its gradient leaves replicated: the jit's out_shardings).
  d = cfg.model.d_model
  gathered = [tuple(int(x) for x in m.group(1).split(","))
              for line in hlo.splitlines() if " all-gather(" in line
              for m in [re.search(r"= \w+\[([\d,]+)\]", line)] if m]
  logits = [g for g in gathered if VOCAB in g and sorted(g) != sorted((d, VOCAB))]
  assert not logits, logits


# The memory test's model: B x T x V float32 logits (8 MiB) dwarf the rest.
MEM_VOCAB, MEM_SEQ = 8192, 32


def _train_temp_bytes(chunks: int, measured: bool = False) -> int:
  """Temp memory of the compiled first-order train step (one device); with
  ``measured`` the telemetry step, whose hidden call also runs the head for
  its input's statistics and drops the logits."""
  cfg = _cfg(chunks)
  cfg.model.vocab_size = MEM_VOCAB
  cfg.data.seq_len = MEM_SEQ
  cfg.telemetry.every = int(measured)
  # Plain SGD compiles faster than AdamW and updates in place: the same temp
  # bytes but for 584 of AdamW's (measured: 29,214,216, 10,453,640, 10,521,992).
  cfg.optim.name = "sgd"
  return train_temp_bytes(cfg, measured)


def test_chunks_lower_the_train_steps_temp_memory():
  """With V x B x T dominant (8192 x 8 x 32: 8 MiB of float32 logits), the
  compiled train step's temp memory with loss_chunks=8 is lower than with 0
  by at least one whole logits tensor, and so is the telemetry step's (XLA
  drops the logits of the head call that only feeds the statistics).
  Measured on CPU (jax 0.10.2): 29,214,800 -> 10,454,224 bytes (27.9 -> 10.0
  MiB); telemetry step with loss_chunks=8: 10,522,576."""
  logits_bytes = MEM_VOCAB * BATCH * MEM_SEQ * 4
  full, chunked = _train_temp_bytes(0), _train_temp_bytes(8)
  measured = _train_temp_bytes(8, measured=True)
  print(f"temp bytes: loss_chunks=0 {full}, loss_chunks=8 {chunked}, measured {measured}",
        file=sys.stderr)
  assert chunked <= full - logits_bytes, (full, chunked, logits_bytes)
  assert measured <= full - logits_bytes, (full, measured, logits_bytes)


def test_zeroth_order_and_telemetry_see_the_same_head(full):
  """The zeroth-order loss at p + eps z (the head's kernel perturbed inside
  its matmul hook, once per chunk; eps = 0.1 moves the loss ~100x REORDER)
  and the telemetry of the head's input are those of the full head: loss
  within REORDER, kurtosis and max |x| of the same tensor within rtol 1e-6."""
  params, host, unperturbed, _ = full
  out = {}
  for chunks in (0, 4):
    cfg = _cfg(chunks)
    cfg.telemetry.every = 1
    run = _Run(cfg)
    loss_fn = make_loss(run.model, Z_LOSS, collect=("telemetry",))
    leaves = zo.leaves_of(run.cfg, params)
    rng = jax.random.key(0)
    in_matmul = zo.matmul_leaves(loss_fn, params, host, rng, leaves)
    assert "lm_head/kernel" in in_matmul, sorted(in_matmul)
    with run.layout:
      f = jax.jit(lambda p, b: zo.perturbed_loss(loss_fn, p, b, rng, jax.random.key(3), 0.1,
                                                 leaves, in_matmul))
      out[chunks] = f(params, host)
  (l0, aux0), (l4, aux4) = out[0], out[4]
  assert abs(float(l0) - unperturbed) > 100 * REORDER * unperturbed, (l0, unperturbed)
  assert abs(float(l4) - float(l0)) <= REORDER * abs(float(l0)), (l0, l4)
  head = {k: v for k, v in aux0["sown"].items() if "lm_head" in k}
  assert head, sorted(aux0["sown"])
  for k, v in head.items():
    np.testing.assert_allclose(np.asarray(aux4["sown"][k]), np.asarray(v), rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("change, field", [
    (lambda c: c.model.update(loss_chunks=5), "config.model.loss_chunks=5 does not divide"),
    (lambda c: c.model.update(loss_chunks=-1), "config.model.loss_chunks=-1"),
    (lambda c: c.quant.rules.linears.act.update(granularity="tensor"),
     "config.quant.rules.linears.act.granularity='tensor'"),
    (lambda c: c.update(quant=default.get_config("w8a8+lm_head").quant),
     "config.quant.mode='int8'"),
])
def test_config_errors_name_the_field(change, field):
  cfg = _cfg(4, "w4a4+lm_head")
  validate(cfg, n_devices=1)
  change(cfg)
  with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace(".", r"\.")):
    validate(cfg, n_devices=1)
