"""Held-out perplexity of a training run's checkpoint.

  python -m qtrain.eval --workdir=runs/NAME [--step=N] [--eval_batches=N] [--data_dir=DIR]

Rebuilds the model from ``workdir/config.json`` (its quantization included:
a QAT run is evaluated as it trained), restores the params of the latest
checkpoint (or ``--step``), evaluates the held-out split exactly as the
training loop does, prints the result and writes it to
``<workdir>/eval_step<N>.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_BATCHES = flags.DEFINE_integer("eval_batches", None, "Held-out batches (0: the whole split); "
                                "default the run's config.data.eval_batches.")
_DATA = flags.DEFINE_string("data_dir", None, "Prepared data; default config.data.dir of the run.")
flags.mark_flags_as_required(["workdir"])


def run(workdir: str, step: int | None = None, eval_batches: int | None = None,
        data_dir: str | None = None) -> dict:
  """Evaluates the checkpoint; returns (and writes) the result's dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.parallel import Layout, data_shard  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config, restore_params  # pylint: disable=g-import-not-at-top
  from qtrain.train.errors import data_errors  # pylint: disable=g-import-not-at-top
  from qtrain.train.evaluate import evaluate, jit_eval_step  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import param_shardings, params_target  # pylint: disable=g-import-not-at-top
  cfg = load_config(workdir)
  d = cfg.data
  data_dir = data_dir or d.dir
  meta = loader.read_meta(data_dir)
  model = build_model(cfg)
  layout = Layout.for_checkpoint(cfg)
  mesh = layout.mesh
  with layout:
    param_sh = param_shardings(model, mesh, d.seq_len)
    params, step = restore_params(workdir, params_target(model, mesh, d.seq_len), step)
    n = d.eval_batches if eval_batches is None else eval_batches
    shard, shards = data_shard(mesh)
    with data_errors(data_dir):
      batches = loader.make_eval_batches(
          data_dir, seq_len=d.seq_len, global_batch_size=d.eval_batch_size, num_batches=n,
          process_index=shard, process_count=shards)
    eval_step = jit_eval_step(model, mesh, param_sh, tuple(batches[0]))
    nll = evaluate(eval_step, params, batches, mesh, model.cfg)
  result = {"step": step, "eval_loss": nll, "eval_ppl": math.exp(nll),
            "unigram_ppl": meta.get("unigram_ppl_validation"), "eval_batches": len(batches),
            "data_dir": str(data_dir)}
  result["path"] = os.path.join(workdir, f"eval_step{step}.json")
  if jax.process_index() == 0:
    with open(result["path"] + ".tmp", "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
    os.replace(result["path"] + ".tmp", result["path"])
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO.
  from qtrain.train.errors import EXPECTED  # pylint: disable=g-import-not-at-top
  if _BATCHES.value is not None and _BATCHES.value < 0:
    _fail(f"--eval_batches={_BATCHES.value} must be >= 0 (0: the whole held-out split)")
  try:
    r = run(_WORKDIR.value, _STEP.value, _BATCHES.value, _DATA.value)
  except EXPECTED as e:
    _fail(str(e))
  uni = f" (unigram {r['unigram_ppl']:.2f})" if r.get("unigram_ppl") else ""
  print(f"step {r['step']}: held-out loss {r['eval_loss']:.4f}, perplexity "
        f"{r['eval_ppl']:.2f}{uni} over {r['eval_batches']} batches")
  print(f"wrote {r['path']}")


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main)
