"""Post-training quantization of a trained run.

  python -m qtrain.quantize --workdir=runs/NAME --recipe=w4a4kv4 --method=rtn|gptq|awq \\
      [--calib_batches=8] [--out=runs/NAME/ptq_<recipe>_<method>] [--act_order] [--step=N] \\
      [--ffn_hadamard] [--rotate=quarot]

Restores the run's latest params (or those of checkpoint ``--step``) (config.json + checkpoints/), quantizes the
weight of every matmul the recipe's rules match (``--recipe``: a preset in
configs/quant, switches after ``+``, e.g. ``w4a4+lm_head``), calibrating GPTQ
and AWQ on the first ``--calib_batches`` training batches, saves codes and
scales under ``--out``, reloads them from disk and prints held-out perplexity
of the unquantized model next to the PTQ model (dequantized weights,
fake-quantized activations and KV per the recipe). Writes
``<out>/ptq_metrics.json``.

``--ffn_hadamard`` quantizes the run's model with OSP's FFN Hadamard folded in
(``qtrain.layers.hadamard.fold_ffn_hadamard``: down_proj W -> H W, and the
online H on its input): the same function unquantized, but the down_proj
input the quantizer sees is rotated. One trained model thus gives the W4A4KV4
perplexity with and without it (default ``--out``: ``..._ffnh``).

``--rotate=quarot`` quantizes the run's model rotated QuaRot-style
(``qtrain.convert.rotate.fuse_rotations``): random Hadamard R1 (residual
stream) and R2 (per head on V/O) fused into the weights after folding the norm
gains, R3 (Q, K after RoPE) and R4 (down_proj input) online, R4^T fused. The
unquantized perplexity is the run's own (the same function); the quantizers
see rotated weights, activations and KV (default ``--out``: ``..._quarot``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging
import jax

from qtrain.convert.rotate import fuse_rotations, rotated_config
from qtrain.data import loader
from qtrain.data.global_batch import to_global
from qtrain.layers import Transformer
from qtrain.layers.hadamard import fold_ffn_hadamard, is_power_of_two
from qtrain.parallel import Layout, data_shard
from qtrain.quant import validate_quant
from qtrain.train.build import model_config
from qtrain.train.checkpoint import load_config
from qtrain.quantize import evaluate as ev
from qtrain.quantize.export import load_quantized, ptq_providers, save_quantized
from qtrain.quantize.gptq_awq import collect_stats, quantize_params
from qtrain.quantize.rtn import weight_sites, weight_sites_checked



def _method_kwargs(method: str) -> dict:
  if method == "gptq":
    return dict(blocksize=_BLOCK.value, percdamp=_DAMP.value, act_order=_ACT_ORDER.value)
  if method == "awq":
    return dict(n_grid=_GRID.value)
  return {}


def _calibration_stats(cfg, data_dir, model_cfg, params, sites, method, n_batches, mesh):
  """GPTQ: input Hessians; AWQ: mean |x|; of the first training batches."""
  d, (shard, shards) = cfg.data, data_shard(mesh)
  it = loader.make_train_iterator(data_dir, seq_len=d.seq_len,
                                  global_batch_size=d.global_batch_size, seed=cfg.seed,
                                  process_index=shard, process_count=shards,
                                  shards=d.get("shards", 0))  # With shards set: the run's batches.
  batches = (to_global(next(it), mesh, model_cfg) for _ in range(n_batches))
  kinds = ("hessian",) if method == "gptq" else ("act_scale",)
  return jax.block_until_ready(collect_stats(model_cfg, params, batches, sites, kinds))


def _with_ffn_hadamard(cfg):
  """A copy of the run's config with config.model.ffn_hadamard on, checked."""
  m = cfg.model
  if m.ffn_hadamard:
    raise ValueError("--ffn_hadamard: the run was trained with config.model.ffn_hadamard=True; "
                     "its down_proj input is rotated already (drop the flag)")
  if not is_power_of_two(m.d_ff):
    raise ValueError(f"--ffn_hadamard needs config.model.d_ff a power of two; this run has "
                     f"d_ff={m.d_ff}")
  cfg = cfg.copy_and_resolve_references()
  cfg.model.ffn_hadamard = True
  return cfg


def _rotated(cfg, rotate: str):
  """(the run's config with its model rotated by ``rotate``, fuse) checked:
  ``fuse(params)`` gives the rotated params of the same function."""
  if rotate != "quarot":
    raise ValueError(f"--rotate={rotate!r}; use none or quarot")
  trained_model = model_config(cfg)
  rotated = rotated_config(trained_model, rotate)
  cfg = cfg.copy_and_resolve_references()
  for field in ("norm", "embproj", "ffn_hadamard", "tie_embeddings"):
    cfg.model[field] = getattr(rotated, field)
  cfg.model.rotation = dataclasses.asdict(rotated.rotation)
  return cfg, lambda params: fuse_rotations(params, trained_model, rotate)[0]


def run(workdir: str, recipe: str, method: str, *, calib_batches: int = 8, out: str | None = None,
        data_dir: str | None = None, method_kwargs: dict | None = None,
        step: int | None = None, ffn_hadamard: bool = False, rotate: str = "none") -> dict:
  """Quantizes, exports, reloads and evaluates; returns ptq_metrics.json's dict."""
  if rotate != "none" and ffn_hadamard:
    raise ValueError("--rotate and --ffn_hadamard both rotate the down_proj input (R4); "
                     "keep one")
  trained = load_config(workdir)
  cfg = _with_ffn_hadamard(trained) if ffn_hadamard else trained
  fuse = None
  if rotate != "none":
    cfg, fuse = _rotated(trained, rotate)
  if method == "awq" and (cfg.model.get("norm", "rmsnorm") != "rmsnorm" or cfg.model.get("embproj")):
    # AWQ folds a per-channel 1/s into the RMSNorm gain feeding each group; a
    # Single-Scale norm has one gain, and EmbProj puts head_proj between the
    # final norm and the LM head.
    raise ValueError("--method=awq folds its scales into per-channel RMSNorm gains; this run "
                     "has config.model.norm=ssnorm or embproj=True (OSP): use --method=rtn or "
                     "gptq, or quantize the merged plain Llama (qtrain.convert.osp.merge_osp)")
  d = cfg.data
  data_dir = data_dir or d.dir
  meta = loader.read_meta(data_dir)
  recipe_quant = ev.load_recipe(recipe)
  model_cfg = model_config(cfg)
  sites, notes = weight_sites(model_cfg, validate_quant(recipe_quant, cfg.model))
  if not sites:
    raise ValueError(f"--recipe={recipe}: its rules quantize no weight of this model")
  out = out or os.path.join(workdir, f"ptq_{recipe}_{method}" + ("_ffnh" if ffn_hadamard else "")
                            + ("" if rotate == "none" else f"_{rotate}"))
  calib_batches = calib_batches if method in ("gptq", "awq") else 0
  layout, times, stats = Layout.for_checkpoint(cfg), {}, None
  mesh = layout.mesh
  with layout:
    params, step = ev.restore_params(workdir, trained, mesh, step)
    if ffn_hadamard:  # (h H)(H W) = h W: same function, rotated down_proj input.
      params, _ = fold_ffn_hadamard(params, model_config(trained))
    if fuse is not None:  # (x R)(R^T W) = x W: same function, rotated operands.
      params = fuse(params)
    weight_sites_checked(params, sites)
    if calib_batches:
      t = time.perf_counter()
      stats = _calibration_stats(cfg, data_dir, model_cfg, params, sites, method,
                                 calib_batches, mesh)
      times["calibrate_s"] = time.perf_counter() - t
  # On one device, outside the mesh: replicated inputs would repeat the work on each.
  one = jax.local_devices()[0]
  t = time.perf_counter()
  qweights = jax.block_until_ready(quantize_params(
      method, jax.device_put(params, one), sites, jax.device_put(stats, one),
      **(method_kwargs or {})))
  times["quantize_s"] = time.perf_counter() - t
  save_quantized(out, params, qweights, sites, {
      "recipe": recipe, "method": method, "method_kwargs": method_kwargs or {},
      "calib_batches": calib_batches, "source": {"workdir": os.path.abspath(workdir),
                                                 "step": step},
      "recipe_quant": recipe_quant.to_dict(), "model": cfg.model.to_dict()})
  t = time.perf_counter()
  loaded = load_quantized(out)  # From disk: the evaluator sees what the export holds.
  with layout:
    shard, shards = data_shard(mesh)
    eval_batches = loader.make_eval_batches(
        data_dir, seq_len=d.seq_len, global_batch_size=d.eval_batch_size,
        num_batches=d.eval_batches, process_index=shard, process_count=shards)
    nll_fp, ppl_fp = ev.perplexity(Transformer(model_cfg), params, eval_batches, mesh,
                                   d.seq_len)
    ptq_model = Transformer(model_cfg, ptq_providers(out, ev.eval_provider(recipe_quant,
                                                                           cfg.model)))
    nll_ptq, ppl_ptq = ev.perplexity(ptq_model, loaded, eval_batches, mesh, d.seq_len)
  times["eval_s"] = time.perf_counter() - t
  metrics = {"recipe": recipe, "method": method, "ffn_hadamard": ffn_hadamard, "rotate": rotate,
             "step": step,
             "ppl_fp": ppl_fp, "ppl_ptq": ppl_ptq, "nll_fp": nll_fp, "nll_ptq": nll_ptq,
             "unigram": meta.get("unigram_ppl_validation"), "eval_batches": len(eval_batches),
             "calib_batches": calib_batches, "quantized_matmuls": [s.path for s in sites],
             "notes": notes, **times, "out": out}
  if jax.process_index() == 0:
    with open(os.path.join(out, "ptq_metrics.json"), "w", encoding="utf-8") as f:
      json.dump(metrics, f, indent=2)
  return metrics


def _print(m: dict) -> None:
  for note in m["notes"]:
    print(f"note: {note}")
  print(f"{m['recipe']} {m['method']}: {len(m['quantized_matmuls'])} weight matmuls quantized "
        f"(step {m['step']}); " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in m.items()
                                            if k.endswith("_s")))
  name = (f"{m['recipe']} {m['method']}" + (" +ffn_hadamard" if m.get("ffn_hadamard") else "")
          + (f" +{m['rotate']}" if m.get("rotate", "none") != "none" else ""))
  w = max(len(name), len("unquantized"))
  uni = f"  (unigram {m['unigram']:.2f})" if m.get("unigram") else ""
  print(f"held-out perplexity over {m['eval_batches']} batches:")
  print(f"  {'unquantized':>{w}}  {m['ppl_fp']:10.3f}")
  print(f"  {name:>{w}}  {m['ppl_ptq']:10.3f}  ({m['ppl_ptq'] / m['ppl_fp'] - 1:+.2%}){uni}")
  print(f"wrote {m['out']}/ptq_metrics.json")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO.
  from qtrain.train.errors import EXPECTED  # pylint: disable=g-import-not-at-top
  try:
    m = run(_WORKDIR.value, _RECIPE.value, _METHOD.value, calib_batches=_CALIB.value,
            out=_OUT.value, data_dir=_DATA.value, method_kwargs=_method_kwargs(_METHOD.value),
            step=_STEP.value, ffn_hadamard=_FFN_H.value, rotate=_ROTATE.value)
  except (ValueError, *EXPECTED) as e:  # ValueError: a recipe or GPTQ input the user can fix.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  _print(m)


def _define_flags() -> None:
  """The CLI's flags, defined only when it runs: importing ``run`` (tests, the
  sweep) must not claim --workdir, which qtrain.eval defines too."""
  global _WORKDIR, _RECIPE, _METHOD, _CALIB, _OUT, _DATA, _ACT_ORDER, _BLOCK, _DAMP, _GRID, _STEP
  global _FFN_H, _ROTATE
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training run (config.json, checkpoints/).")
  _RECIPE = flags.DEFINE_string("recipe", None, "Quant preset in configs/quant, e.g. w4a4kv4.")
  _METHOD = flags.DEFINE_enum("method", "rtn", ["rtn", "gptq", "awq"], "PTQ method.")
  _CALIB = flags.DEFINE_integer("calib_batches", 8, "Training batches for GPTQ/AWQ statistics.")
  _OUT = flags.DEFINE_string("out", None, "Output dir; default <workdir>/ptq_<recipe>_<method>.")
  _DATA = flags.DEFINE_string("data_dir", None, "Prepared data; default config.data.dir of the run.")
  _ACT_ORDER = flags.DEFINE_bool("act_order", False, "GPTQ: columns by decreasing Hessian diagonal.")
  _BLOCK = flags.DEFINE_integer("gptq_blocksize", 128, "GPTQ: columns per lazy-update block.")
  _DAMP = flags.DEFINE_float("gptq_damp", 0.01, "GPTQ: damping, a fraction of mean(diag H).")
  _GRID = flags.DEFINE_integer("awq_grid", 20, "AWQ: exponents searched in [0, 1].")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to quantize; default the latest.")
  _FFN_H = flags.DEFINE_bool("ffn_hadamard", False, "Fold the FFN Hadamard into the trained "
                             "model (down_proj W -> H W, online H on its input) before PTQ.")
  _ROTATE = flags.DEFINE_enum("rotate", "none", ["none", "quarot"], "Rotate the trained model "
                              "before PTQ: quarot = random Hadamard R1/R2 fused, R3/R4 online.")
  flags.mark_flags_as_required(["workdir", "recipe"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
