"""The training loop: owns I/O, logging, evaluation, checkpoints and signals.

The steps it drives are pure (``qtrain.train.step``). Step t-1's metrics are
read after step t is dispatched, so the host never stalls the device. A run
always starts with ``restore_or_init``: a killed run resumes from its last
complete checkpoint, iterator position included, and sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np
import tqdm

from qtrain.config import validate
from qtrain.data import loader
from qtrain.layers.attention import resolve_impl
from qtrain.optim import build_optimizer
from qtrain.parallel import DATA_PARALLEL_RULES, batch_sharding, make_mesh
from qtrain.train import metrics as metrics_lib
from qtrain.train.build import build_model, quant_report
from qtrain.train.checkpoint import Checkpointer, restore_params
from qtrain.train.state import abstract_state, init_state, state_shardings
from qtrain.train.step import make_steps


class NonFiniteError(FloatingPointError):
  """Loss or gradient became NaN/Inf and ``config.train.nan_policy='stop'``."""


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def to_global(local_batch: dict, mesh) -> dict:
  """Host-local numpy rows -> global arrays split over the data axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_segments(batch: dict, model_cfg) -> None:
  """The cuDNN packed path describes at most ``attention_max_segments``
  documents per row; more would be silently wrong, so stop here instead."""
  limit = model_cfg.attention_max_segments
  if limit <= 0 or resolve_impl(model_cfg.attention_impl, model_cfg.compute_dtype) != "cudnn":
    return
  most = int(np.max(batch["segment_ids"]))  # Segment ids count 1.. within a row.
  if most > limit:
    raise ValueError(f"a batch row packs {most} documents but config.model."
                     f"attention_max_segments={limit}; raise it to at least {most}")


def evaluate(eval_step, params, batches, mesh) -> float:
  nll, tokens = 0.0, 0.0
  for batch in batches:
    out = jax.device_get(eval_step(params, to_global(batch, mesh)))
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
  return nll / max(tokens, 1.0)


def _initial_eval_ppl(workdir: str) -> float | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if row.get("step") == 0 and "eval_ppl" in row:
        return row["eval_ppl"]
  return None


class _Reporter:
  """Reads a finished step's metrics, applies the NaN policy, logs."""

  def __init__(self, cfg, writer, pbar, n_devices):
    self.cfg, self.writer, self.pbar = cfg, writer, pbar
    seq, batch = cfg.data.seq_len, cfg.data.global_batch_size
    self.tokens_per_step = seq * batch
    self.flops_per_step = metrics_lib.flops_per_token(cfg.model, seq) * self.tokens_per_step
    peak = metrics_lib.device_peak_flops(cfg.train.peak_tflops)
    self.peak = None if peak is None else peak * n_devices
    self.t_last, self.step_last = time.perf_counter(), None

  def __call__(self, step: int, metrics) -> None:
    m = jax.device_get(metrics)
    if not bool(m["finite"]):
      msg = (f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
             f"grad_norm={float(m['grad_norm'])}); the update was not applied")
      if self.cfg.train.nan_policy == "stop":
        raise NonFiniteError(msg + "; stopping (config.train.nan_policy='stop')")
      self.pbar.write(msg + "; skipping it (config.train.nan_policy='skip')")
    self.pbar.update(1)
    if step % self.cfg.train.log_every and step != self.cfg.train.steps:
      return
    now = time.perf_counter()
    n = step - self.step_last if self.step_last is not None else 1
    dt = max(now - self.t_last, 1e-9)
    self.t_last, self.step_last = now, step
    row = {k: float(m[k]) for k in ("loss", "grad_norm", "finite", "z_loss")}
    row["tokens_per_s"] = n * self.tokens_per_step / dt
    post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
    if self.peak:
      row["mfu"] = n * self.flops_per_step / dt / self.peak
      post["mfu"] = f"{row['mfu']:.1%}"
    else:
      post["TFLOP/s"] = f"{n * self.flops_per_step / dt / 1e12:.3f}"
    self.pbar.set_postfix(post, refresh=False)
    self.writer.write(step, row)


def _log_eval(writer, pbar, step: int, nll: float, unigram_ppl) -> float:
  ppl = math.exp(nll)
  writer.write(step, {"eval_loss": nll, "eval_ppl": ppl})
  pbar.write(f"step {step}: held-out loss {nll:.4f}, perplexity {ppl:.2f}"
             + (f" (unigram {unigram_ppl:.2f})" if unigram_ppl else ""))
  return ppl


def _sample(cfg, model, params, meta) -> str:
  from qtrain.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  from qtrain.train.sample import generate  # pylint: disable=g-import-not-at-top
  sp = vocab_lib.load_sentencepiece(os.path.join(cfg.data.dir, meta["vocab_path"]))
  prompt = sp.encode(cfg.train.sample_prompt)
  new = generate(model, params, prompt, cfg.train.sample_tokens, eos_id=meta.get("eos_id"))
  # The model's vocabulary may be padded past the tokenizer's; such ids have
  # no text (never targets, but an untrained model can still emit them).
  return sp.decode(prompt + [t for t in new if t < sp.get_piece_size()])


def run(cfg, workdir: str) -> dict:
  """Trains ``cfg`` in ``workdir`` (resuming if it holds checkpoints).

  Returns a summary: final step, held-out perplexities, whether it was
  preempted by SIGTERM.
  """
  validate(cfg, jax.device_count())
  meta = loader.read_meta(cfg.data.dir)
  loader.check_vocab(meta, cfg.model.vocab_size)
  model = build_model(cfg)
  tx = build_optimizer(cfg.optim, cfg.train.steps)
  mesh = make_mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(DATA_PARALLEL_RULES):
    return _run(cfg, workdir, meta, model, tx, mesh)


def _init(cfg, model, tx, mesh, abstract):
  """A fresh state; its params from ``config.train.init_from`` when set."""
  state = init_state(model, tx, mesh, cfg.seed, cfg.data.seq_len)
  if not cfg.train.init_from:
    return state
  params, step = restore_params(cfg.train.init_from, abstract.params)
  print(f"initialised params from {cfg.train.init_from} (step {step})", flush=True)
  return state.replace(params=params)


def save_config(cfg, workdir: str) -> None:
  """``workdir/config.json``: what evaluation, PTQ and generation rebuild the
  model from."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json(indent=2))


def _run(cfg, workdir, meta, model, tx, mesh) -> dict:
  d, t = cfg.data, cfg.train
  save_config(cfg, workdir)
  seq = d.seq_len
  shardings = state_shardings(model, tx, mesh, seq)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  abstract = abstract_state(model, tx, mesh, seq)
  state, data_state, restored = ckpt.restore_or_init(
      abstract, lambda: _init(cfg, model, tx, mesh, abstract))
  it = loader.make_train_iterator(
      d.dir, seq_len=seq, global_batch_size=d.global_batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  if data_state is not None:
    it.set_state(data_state)
  train_step, eval_step = make_steps(model, tx, mesh, shardings, cfg.optim.z_loss)
  eval_batches = loader.make_eval_batches(
      d.dir, seq_len=seq, global_batch_size=d.eval_batch_size, num_batches=d.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count())
  writer = metrics_lib.MetricWriter(workdir)
  unigram = meta.get("unigram_ppl_validation")
  start = int(state.step)
  report = quant_report(model)
  if report and cfg.quant.mode != "none":
    print(report, flush=True)
  pbar = tqdm.tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True)
  if restored is None:
    _log_eval(writer, pbar, 0, evaluate(eval_step, state.params, eval_batches, mesh), unigram)
  else:
    pbar.write(f"resumed from checkpoint step {restored} in {ckpt.directory}")
  reporter = _Reporter(cfg, writer, pbar, jax.device_count())
  sigterm = _SigtermFlag()
  pending, preempted, step = None, False, start
  try:
    for step in range(start + 1, t.steps + 1):
      batch = next(it)
      check_segments(batch, model.cfg)
      state, metrics = train_step(state, to_global(batch, mesh))
      if pending is not None:
        reporter(*pending)
      pending = (step, metrics)
      if step % t.checkpoint_every == 0 or step == t.steps or sigterm.raised:
        ckpt.save(step, state, it.get_state(), force=sigterm.raised)
      if step % t.eval_every == 0 and step != t.steps:
        _log_eval(writer, pbar, step, evaluate(eval_step, state.params, eval_batches, mesh),
                  unigram)
      if sigterm.raised:
        preempted = True
        pbar.write(f"SIGTERM: saved checkpoint at step {step}; exiting")
        break
    if pending is not None:
      reporter(*pending)
  finally:
    sigterm.restore()
    ckpt.close()
    pbar.close()
  summary = {"step": step, "preempted": preempted, "unigram_ppl": unigram}
  if preempted:
    writer.close()
    return summary
  final = _log_eval(writer, pbar, step, evaluate(eval_step, state.params, eval_batches, mesh),
                    unigram)
  writer.close()
  summary.update(initial_ppl=_initial_eval_ppl(workdir), final_ppl=final)
  if t.sample_tokens > 0 and jax.process_index() == 0:
    summary["sample"] = _sample(cfg, model, state.params, meta)
  return summary
