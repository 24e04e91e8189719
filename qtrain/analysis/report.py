"""Activation kurtosis of a trained checkpoint on held-out batches: the run
logic of ``python -m qtrain.analysis.kurtosis`` and of the sweep evaluation
``kurtosis``, importable (it defines no CLI flags).

``analyze`` applies the model (its own providers, quantizers included, with
``TelemetryProvider(channels=True)`` outermost) with the ``telemetry``
collection mutable, batch by batch, and combines batches weighted by their
real tokens: kurtosis and per-channel mean |x| are token means, max |x| a
maximum, the |x| histograms counts. Measured: the residual stream
(``embed_out``, every ``block_out``), the down_proj input before any rotation
(``mlp_hidden``) and the input of every matmul. ``run`` restores the latest
checkpoint (as ``qtrain.eval`` does) and writes ``kurtosis_step<N>.json`` and
``kurtosis_step<N>.png``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from qtrain.analysis import kurtosis as kurt
from qtrain.analysis import telemetry
from qtrain.analysis.telemetry import PREFIX, TelemetryProvider

SITES = frozenset({"embed_out", "block_out", "mlp_hidden"})
BLOCK_OUT, DOWN_PROJ = "decoder/layers/block_out", "decoder/layers/mlp/down_proj"


def analysis_model(cfg):
  """The run's model with the analysis provider outermost (a telemetry
  provider of the run's own config is replaced: one set of sows)."""
  from qtrain.layers import Transformer  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import model_config, providers  # pylint: disable=g-import-not-at-top
  own = tuple(p for p in providers(cfg) if not isinstance(p, TelemetryProvider))
  return Transformer(model_config(cfg), (TelemetryProvider(SITES, ".*", channels=True),) + own)


def _measure_fn(model):
  from qtrain.optim.groups import path_keys  # pylint: disable=g-import-not-at-top

  @jax.jit
  def measure(params, batch):
    from qtrain.train.step import EVAL_SEED  # pylint: disable=g-import-not-at-top
    seg = batch.get("segment_ids")
    _, col = model.apply({"params": params}, batch["inputs"], batch.get("positions"), seg,
                         rngs={"quant": jax.random.key(EVAL_SEED)}, mutable=[telemetry.COLLECTION])
    flat = {"/".join(path_keys(p)[:-1]): v for p, v in jax.tree_util.tree_flatten_with_path(col)[0]}
    tokens = (jnp.sum(seg > 0) if seg is not None else batch["inputs"].size).astype(jnp.float32)
    return telemetry.summarize(flat), tokens

  return measure


def _combine(parts: list[tuple[dict, float]]) -> dict:
  """Token-weighted means (kurtosis, channel mean |x|), maxima (max |x|) and
  sums (histograms) of per-batch statistics."""
  total = sum(t for _, t in parts)
  out = {}
  for name in parts[0][0]:
    vals = [np.asarray(m[name], np.float64) for m, _ in parts]
    stat = name.split("/")[1]
    if stat == "max_abs":
      out[name] = np.max(vals, axis=0)
    elif stat == "abs_hist":
      out[name] = np.sum(vals, axis=0)
    else:
      out[name] = sum(v * t for v, (_, t) in zip(vals, parts)) / max(total, 1.0)
  return out, total


def analyze(cfg, params, batches, mesh, model_cfg=None) -> dict:
  """Statistics of ``params`` over host-local ``batches`` (JSON-able):
  ``kurtosis`` / ``max_abs`` (the paper's aggregate over the residual
  stream), ``sites`` {site: {stat: value or per-layer list}},
  ``channel_mean_abs`` and ``abs_hist`` {site: [L or 1][D or bins]},
  ``hist_edges`` and ``tokens``."""
  from qtrain.data.global_batch import to_global  # pylint: disable=g-import-not-at-top
  measure = _measure_fn(analysis_model(cfg))
  parts = []
  for b in batches:
    m, tokens = measure(params, to_global(b, mesh, model_cfg))
    parts.append((jax.device_get(m), float(tokens)))
  # The aggregate is recomputed from the combined per-layer values (the
  # per-batch aggregates are means too, so this equals their weighted mean).
  stats, total = _combine(parts)
  result = {"tokens": total, "kurtosis": float(stats.pop(f"{PREFIX}/kurtosis")),
            "max_abs": float(stats.pop(f"{PREFIX}/max_abs")), "sites": {},
            "channel_mean_abs": {}, "abs_hist": {}, "hist_edges": kurt.HIST_EDGES.tolist()}
  for name, v in sorted(stats.items()):
    _, stat, site = name.split("/", 2)
    if stat in telemetry.STATS:
      result["sites"].setdefault(site, {})[stat] = v.tolist()
    else:
      result[stat][site] = np.atleast_2d(v).tolist()
  return result


def run(workdir: str, step: int | None = None, batches: int | None = None,
        out: str | None = None) -> dict:
  """Analyzes the checkpoint of ``workdir`` (latest, or ``step``) on
  ``batches`` held-out batches (default the run's config.data.eval_batches;
  0 the whole split); writes the JSON and PNG into ``out`` (default the
  workdir) and returns the result with their paths."""
  from qtrain.data import loader  # pylint: disable=g-import-not-at-top
  from qtrain.parallel import Layout, data_shard  # pylint: disable=g-import-not-at-top
  from qtrain.train.checkpoint import load_config, restore_params  # pylint: disable=g-import-not-at-top
  from qtrain.train.errors import data_errors  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import params_target  # pylint: disable=g-import-not-at-top
  cfg = load_config(workdir)
  d = cfg.data
  model = analysis_model(cfg)
  layout = Layout.for_checkpoint(cfg)
  with layout:
    params, step = restore_params(workdir, params_target(model, layout.mesh, d.seq_len), step)
    shard, shards = data_shard(layout.mesh)
    with data_errors(d.dir):
      held_out = loader.make_eval_batches(
          d.dir, seq_len=d.seq_len, global_batch_size=d.eval_batch_size,
          num_batches=d.eval_batches if batches is None else batches,
          process_index=shard, process_count=shards)
    result = {"step": step, "workdir": str(workdir), "batches": len(held_out),
              **analyze(cfg, params, held_out, layout.mesh, model.cfg)}
  out = out or workdir
  base = os.path.join(out, f"kurtosis_step{step}")
  result.update(json=base + ".json", png=base + ".png")
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(base + ".json.tmp", "w", encoding="utf-8") as f:
      json.dump(result, f)
    os.replace(base + ".json.tmp", base + ".json")
    plot(result, base + ".png")
  return result


def residual_series(result: dict, stat: str = "kurtosis") -> list[float]:
  """[L + 1]: the embedding output, then every layer's output."""
  s = result["sites"]
  return [*np.ravel(s["embed_out"][stat]), *np.ravel(s[BLOCK_OUT][stat])]


def plot(result: dict, path: str) -> None:
  """Four panels: per-layer kurtosis and max |x| (residual stream, down_proj
  input), the residual stream's channel heatmap, |x| histograms."""
  # A bare Figure (Agg canvas), not pyplot: the caller's backend (a
  # notebook's inline one) is left alone.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(11, 8))
  ax = fig.subplots(2, 2)
  for a, stat in zip(ax[0], ("kurtosis", "max_abs")):
    res = residual_series(result, stat)
    a.plot(range(len(res)), res, "o-", label="residual (0 = embedding output)")
    if DOWN_PROJ in result["sites"]:
      down = np.ravel(result["sites"][DOWN_PROJ][stat])
      a.plot(range(1, len(down) + 1), down, "s-", label="down_proj input")
    a.set(xlabel="layer", ylabel="excess kurtosis" if stat == "kurtosis" else "max |x|",
          yscale="symlog" if stat == "kurtosis" else "log")
    a.legend()
  heat = np.asarray(result["channel_mean_abs"][BLOCK_OUT])
  im = ax[1, 0].imshow(np.log10(heat + 1e-6), aspect="auto", interpolation="nearest")
  ax[1, 0].set(xlabel="channel", ylabel="layer", title="log10 mean |x|, layer outputs")
  fig.colorbar(im, ax=ax[1, 0])
  edges = np.asarray(result["hist_edges"])
  for site in (BLOCK_OUT, "decoder/layers/mlp/mlp_hidden"):
    if site in result["abs_hist"]:
      counts = np.asarray(result["abs_hist"][site])[-1]
      ax[1, 1].stairs(counts[1:-1], edges[1:], label=f"{site} (last layer)")
  ax[1, 1].set(xscale="log", yscale="log", xlabel="|x|", ylabel="count")
  ax[1, 1].legend()
  fig.suptitle(f"{result['workdir']} step {result['step']}: excess kurtosis "
               f"{result['kurtosis']:.3f}, max |x| {result['max_abs']:.1f}")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
