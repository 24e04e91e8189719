"""The training loop: owns I/O, logging, evaluation, checkpoints and signals.

The steps it drives are pure (``qtrain.train.step``). Step t-1's metrics are
read after step t is dispatched, so the host never stalls the device. A run
always starts with ``restore_or_init``: a killed run resumes from its last
complete checkpoint, the iterator position of every data shard included, and
sees the same batches (on any process count dividing ``config.data.shards``).
Nothing is written into the workdir before the config has been checked
against the one its checkpoints were trained with.
"""

from __future__ import annotations

import math
import os

import jax

from qtrain.analysis import telemetry
from qtrain.config import ConfigError, validate
from qtrain.data import loader
from qtrain.data.global_batch import to_global
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout, data_shard
from qtrain.train import metrics as metrics_lib
from qtrain.train.build import build_model, quant_report
from qtrain.train.checkpoint import Checkpointer, load_config
from qtrain.train.data_state import ProcessDataRestore
from qtrain.train.errors import data_errors
from qtrain.train.evaluate import evaluate
from qtrain.train.preemption import Agreement, SigtermFlag
from qtrain.train.progress import Progress
from qtrain.train.reporter import NonFiniteError, Reporter
from qtrain.train.resume import check_resume
from qtrain.train.warm_start import initial_params
from qtrain.train.state import abstract_params, abstract_state, init_state, state_shardings
from qtrain.train.step import make_measured_step, make_seed_step, make_steps

__all__ = ["NonFiniteError", "run", "save_config"]


def _log_eval(writer, progress, step: int, nll: float, unigram_ppl) -> float:
  ppl = math.exp(nll)
  writer.write(step, {"eval_loss": nll, "eval_ppl": ppl})
  progress.write(f"step {step}: held-out loss {nll:.4f}, perplexity {ppl:.2f}"
                 + (f" (unigram {unigram_ppl:.2f})" if unigram_ppl else ""))
  return ppl


def _initial_eval_ppl(workdir: str) -> float | None:
  for row in metrics_lib.read_rows(workdir):
    if row.get("step") == 0 and "eval_ppl" in row:
      return row["eval_ppl"]
  return None


def _sample(cfg, model, params, meta) -> str:
  from qtrain.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  from qtrain.train.sample import generate  # pylint: disable=g-import-not-at-top
  sp = vocab_lib.load_sentencepiece(os.path.join(cfg.data.dir, meta["vocab_path"]))
  prompt = sp.encode(cfg.train.sample_prompt)
  new = generate(model, params, prompt, cfg.train.sample_tokens, eos_id=meta.get("eos_id"))
  # The model's vocabulary may be padded past the tokenizer's; such ids have
  # no text (never targets, but an untrained model can still emit them).
  return sp.decode(prompt + [t for t in new if t < sp.get_piece_size()])


def _local_params(params):
  """Global params -> full arrays on this process's first device.

  On one process they are addressable already; on several, every process must
  join the all-gather (``process_allgather``), even if only one samples.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = multihost_utils.process_allgather(params, tiled=True)  # The global arrays.
  return jax.device_put(params, jax.local_devices()[0])


def run(cfg, workdir: str) -> dict:
  """Trains ``cfg`` in ``workdir`` (resuming if it holds checkpoints).

  Returns a summary: final step, held-out perplexities, whether it was
  preempted by SIGTERM. The SIGTERM handler comes first: a signal during
  start-up (restore, compile, first evaluation) ends the run cleanly too.
  """
  sigterm = SigtermFlag()
  try:
    validate(cfg, jax.device_count())
    meta = loader.read_meta(cfg.data.dir)
    try:
      loader.check_vocab(meta, cfg.model.vocab_size)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    model = build_model(cfg)
    layout = Layout.from_config(cfg)
    with layout:
      tx = build_optimizer(cfg, abstract_params(model, cfg.data.seq_len))
      summary, state = _run(cfg, workdir, meta, model, tx, layout.mesh, sigterm)
    if summary["sample_due"]:  # Outside the mesh: one process decodes on one device.
      params = _local_params(state.params)
      if jax.process_index() == 0:
        summary["sample"] = _sample(cfg, model, params, meta)
    del summary["sample_due"]
    return summary
  finally:
    sigterm.restore()


def _init(cfg, model, tx, mesh, abstract):
  """A fresh state; its params from ``config.train.init_from`` when set."""
  state = init_state(model, tx, mesh, cfg.seed, cfg.data.seq_len)
  params = initial_params(cfg, model, mesh, state.params, abstract.params)
  return state if params is state.params else state.replace(params=params)


def save_config(cfg, workdir: str) -> None:
  """``workdir/config.json``: what evaluation, PTQ and generation rebuild the
  model from. Written atomically (a kill leaves the old one or the new one)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(cfg.to_json(indent=2))
    os.replace(path + ".tmp", path)


def _check_workdir(cfg, workdir: str, ckpt: Checkpointer) -> None:
  """Whether this config may resume the checkpoints in ``workdir`` (before
  any write: a rejected config never replaces config.json)."""
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(os.path.join(workdir, "hf_import.json")):  # python -m qtrain.convert import
    raise ConfigError(f"{workdir} holds imported params only (no optimizer state or data "
                      f"position); start a run from them with --config.train.init_from="
                      f"{workdir} and a new --workdir")
  if not ckpt.manager.all_steps() or not os.path.exists(saved):
    return
  harmless = check_resume(load_config(workdir), cfg, workdir)
  if harmless:
    print(f"note: resuming with changed fields {', '.join('config.' + f for f in harmless)}; "
          f"{saved} is updated", flush=True)


def _data_shards(cfg, mesh) -> tuple[int, int, int, range]:
  """(slice, slices, S, the shards this process owns): config.data.shards over
  the slices of the batch that processes load (``data_shard``)."""
  shard, shards = data_shard(mesh)
  try:
    n, owned = loader.owned_shards(shard, shards, cfg.data.get("shards", 0),
                                   cfg.data.global_batch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return shard, shards, n, owned


def _check_data_shard(data_state: dict, shard: int, shards: int) -> None:
  """A saved shard position must be the one read for it. Before shards, a
  file was named by process: a mesh whose batch axes grouped processes
  (a tensor axis across hosts) named it after another process than its slice."""
  saved = data_state.get("pipeline", {})
  was = (saved.get("process_index"), saved.get("process_count"))
  if None not in was and was != (shard, shards):
    raise ConfigError(
        f"config.mesh: this saved data position is slice {was[0]} of {was[1]} of the batch "
        f"and was read for slice {shard} of {shards} (processes holding the same batch rows "
        "load one slice); keep the batch axes data x fsdp spanning the processes as when "
        "the checkpoint was saved")


def _start(cfg, workdir, model, tx, mesh):
  """(checkpointer, state, data iterator, restored step or None).

  Everything that can reject the run comes first (a corrupt metrics.jsonl,
  bad data, a config the checkpoints cannot take); then config.json is written.
  """
  d, t = cfg.data, cfg.train
  metrics_lib.read_rows(workdir)  # Raises MetricsFileError naming a bad line.
  shard, shards, n, owned = _data_shards(cfg, mesh)
  with data_errors(d.dir):
    it = loader.make_train_iterator(
        d.dir, seq_len=d.seq_len, global_batch_size=d.global_batch_size, seed=cfg.seed,
        process_index=shard, process_count=shards, shards=n)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  try:
    _check_workdir(cfg, workdir, ckpt)
    abstract = abstract_state(model, tx, mesh, d.seq_len)
    state, data_state, restored = ckpt.restore_or_init(
        abstract, lambda: _init(cfg, model, tx, mesh, abstract),
        ProcessDataRestore(first=owned.start, n=len(owned), shards=n,
                           configured=d.get("shards", 0)))
    if data_state is not None:
      for s, saved in zip(owned, loader.shard_states(data_state)):
        _check_data_shard(saved, s, n)
      with data_errors(d.dir):
        it.set_state(data_state)
  except BaseException:
    ckpt.close()
    raise
  save_config(cfg, workdir)
  metrics_lib.truncate_rows(workdir, -1 if restored is None else restored)
  return ckpt, state, it, restored


def _run(cfg, workdir, meta, model, tx, mesh, sigterm):
  """(summary, final state)."""
  d, t = cfg.data, cfg.train
  ckpt, state, it, restored = _start(cfg, workdir, model, tx, mesh)
  progress = Progress(t.steps, int(state.step))
  writer = metrics_lib.MetricWriter(workdir)
  agree = Agreement(mesh)
  try:
    state_sh = state_shardings(model, tx, mesh, d.seq_len)
    train_step, eval_step = make_steps(cfg, model, tx, mesh, state_sh)
    measured_step = make_measured_step(cfg, model, tx, mesh, state_sh)
    # Delayed fp8 scaling: a fresh run's amax histories come from its first batch.
    seed_step = make_seed_step(cfg, model, tx, mesh, state_sh) if int(state.step) == 0 else None
    # Every config.telemetry.every steps, the step that also sows the telemetry.
    step_fn = lambda s: measured_step if telemetry.is_due(cfg, s) else train_step
    shard, shards, n, _ = _data_shards(cfg, mesh)
    with data_errors(d.dir):
      eval_batches = loader.make_eval_batches(
          d.dir, seq_len=d.seq_len, global_batch_size=d.eval_batch_size,
          num_batches=d.eval_batches, process_index=shard, process_count=shards, shards=n)
    report = quant_report(model)
    if report and cfg.quant.mode != "none":
      progress.write(report)
    unigram = meta.get("unigram_ppl_validation")
    summary = {"step": int(state.step), "preempted": False, "unigram_ppl": unigram,
               "sample_due": False}
    evaluate_now = lambda s: evaluate(eval_step, s.params, eval_batches, mesh, model.cfg)
    if restored is None:
      _log_eval(writer, progress, 0, evaluate_now(state), unigram)
    else:
      progress.write(f"resumed from checkpoint step {restored} in {ckpt.directory}")
    if agree.now(sigterm.raised):
      progress.write(f"SIGTERM during start-up: nothing trained since step {summary['step']}; "
                     "exiting")
      summary["preempted"] = True
      return summary, state
    state, summary["step"], summary["preempted"] = _train(
        cfg, state, it, step_fn, (eval_step, eval_batches), mesh, model.cfg, ckpt,
        Reporter(cfg, writer, progress, jax.device_count()), agree, sigterm, unigram,
        seed_step)
    if summary["preempted"]:
      return summary, state
    final = _log_eval(writer, progress, summary["step"], evaluate_now(state), unigram)
    summary.update(initial_ppl=_initial_eval_ppl(workdir) if jax.process_index() == 0 else None,
                   final_ppl=final, sample_due=t.sample_tokens > 0)
    return summary, state
  finally:
    ckpt.close()
    progress.close()
    writer.close()


def _train(cfg, state, it, step_fn, evals, mesh, model_cfg, ckpt, reporter, agree, sigterm,
           unigram, seed_step=None):
  """Steps until ``train.steps`` or an agreed SIGTERM: (state, last step, preempted).
  ``step_fn(step)`` is the jitted step to run at ``step``; ``seed_step``, if
  given, fills the amax histories from the first batch before its step."""
  t = cfg.train
  eval_step, eval_batches = evals
  pending, step = None, int(state.step)
  for step in range(step + 1, t.steps + 1):
    batch = to_global(next(it), mesh, model_cfg)
    if seed_step is not None:
      state, seed_step = seed_step(state, batch), None
    state, metrics = step_fn(step)(state, batch)
    if pending is not None:
      reporter(*pending)
    pending = (step, metrics)
    # Every process reads the same all-reduced flag, so all save this step.
    stop = agree.lagged(sigterm.raised)
    if step % t.checkpoint_every == 0 or step == t.steps or stop:
      ckpt.save(step, state, it.get_state(), force=stop)
    if step % t.eval_every == 0 and step != t.steps and not stop:
      nll = evaluate(eval_step, state.params, eval_batches, mesh, model_cfg)
      _log_eval(reporter.writer, reporter.progress, step, nll, unigram)
    if stop:
      reporter(*pending)
      reporter.progress.write(f"SIGTERM: saved checkpoint at step {step}; exiting")
      return state, step, True
  if pending is not None:
    reporter(*pending)
  return state, step, False
