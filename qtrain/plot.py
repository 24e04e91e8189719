"""Curves of one or more runs on shared axes, for side-by-side ablations.

  python -m qtrain.plot --out=plots runs/adamw runs/muon [--names=AdamW,Muon]

From each workdir's ``metrics.jsonl`` (``qtrain.train.reporter`` writes it),
against tokens seen (step x global batch x sequence length, from the run's
``config.json``: every step consumes one full packed batch), one PNG per
quantity that at least one run logged:

* ``loss.png``: train loss; ``ppl.png``: held-out perplexity (log scale);
* ``throughput.png``: tokens/s (logged every ``config.train.log_every`` steps);
* ``bytes.png``: gradient bytes a device sends per step, ``exchange/bytes_sent``
  of the compressed-exchange family (``qtrain.train.compressed``), log scale;
* ``kurtosis.png``: excess kurtosis of the residual stream, one panel per
  position (the embedding output, then each layer's output; OSP's measure,
  ``qtrain.analysis.telemetry``) on shared axes, from the telemetry steps.

The sweep's report (``qtrain.sweep.report``) draws its ``loss.png`` and
``ppl.png`` with ``plot_curves``. Every plotting function returns the series
it drew, read back from the figure's lines, so tests compare them with the
files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qtrain.analysis.telemetry import residual_layers

# (metric key, y label, file, log y)
CURVES = (("loss", "train loss", "loss.png", False),
          ("eval_ppl", "held-out perplexity", "ppl.png", True),
          ("tokens_per_s", "tokens/s", "throughput.png", False),
          ("exchange/bytes_sent", "gradient bytes sent per device per step", "bytes.png", True))
KURTOSIS_FILE = "kurtosis.png"

Points = list[tuple[float, float]]  # (tokens seen, value)


def tokens_per_step(workdir: str) -> int:
  """Global batch x sequence length of the run's config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir} is not a training run's workdir")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)["data"]
  return int(data["global_batch_size"]) * int(data["seq_len"])


def read_series(workdir: str, per_step: int | None = None) -> dict[str, Points]:
  """{metric: [(tokens, value)]} of every scalar metric in the run's rows, and
  ``kurtosis/<i>`` for residual position i (0 = embedding output) of the
  telemetry rows. A resumed run's rows after its restored step were truncated
  by the loop, so each step appears once per metric."""
  from qtrain.train.metrics import read_rows  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    raise FileNotFoundError(f"{workdir}/metrics.jsonl is missing: the run has not logged a step")
  per_step = tokens_per_step(workdir) if per_step is None else per_step
  out: dict[str, Points] = {}
  for row in read_rows(workdir):
    x = row["step"] * per_step
    for key, v in row.items():
      if key != "step" and isinstance(v, (int, float)):
        out.setdefault(key, []).append((x, float(v)))
    layers = residual_layers(row)
    if layers is not None:
      for i, v in enumerate(layers):
        out.setdefault(f"kurtosis/{i}", []).append((x, float(v)))
  return out


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)  # A reader never sees half a PNG.


def _draw(ax, runs: dict[str, Points], colors: dict[str, str] | None) -> dict[str, Points]:
  for name, pts in runs.items():
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None,
            label=name, color=(colors or {}).get(name))
  ax.grid(True, alpha=0.3)
  return {line.get_label(): [tuple(map(float, xy)) for xy in line.get_xydata()]
          for line in ax.get_lines()}


def plot_curves(runs: dict[str, Points], ylabel: str, path: str, log_y: bool = False,
                colors: dict[str, str] | None = None) -> dict[str, Points]:
  """One line per run against tokens, saved as a PNG; returns {name: points}
  read back from the figure. ``colors`` keeps a run's colour across figures
  where some runs lack the quantity."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  try:
    drawn = _draw(ax, runs, colors)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    if log_y:
      ax.set_yscale("log")
    ax.legend(fontsize="small")
    _save(fig, path)
    return drawn
  finally:
    plt.close(fig)


def plot_layers(runs: dict[str, dict[int, Points]], path: str,
                colors: dict[str, str] | None = None) -> dict[str, dict[str, Points]]:
  """Residual kurtosis, a panel per position (shared x and y), a line per run
  in each; returns {panel title: {name: points}}."""
  positions = sorted({i for by_pos in runs.values() for i in by_pos})
  titles = ["embedding output" if i == 0 else f"layer {i - 1} output" for i in positions]
  cols = min(4, len(positions))
  rows = -(-len(positions) // cols)
  plt = _pyplot()
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True,
                           sharey=True, squeeze=False)
  try:
    drawn = {}
    for ax, i, title in zip(axes.flat, positions, titles):
      drawn[title] = _draw(ax, {name: by_pos[i] for name, by_pos in runs.items()
                                if i in by_pos}, colors)
      ax.set_title(title, fontsize="small")
    for ax in axes.flat[len(positions):]:
      ax.set_visible(False)
    for ax in axes[-1]:
      ax.set_xlabel("tokens seen")
    for ax in axes[:, 0]:
      ax.set_ylabel("excess kurtosis")
    axes.flat[0].legend(fontsize="small")
    _save(fig, path)
    return drawn
  finally:
    plt.close(fig)


def run_names(workdirs: list[str]) -> list[str]:
  """Each run's directory name, or its path when two names collide."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def plot_runs(workdirs: list[str], out: str, names: list[str] | None = None) -> dict:
  """Every PNG of the module docstring whose quantity some run logged, in
  ``out``; returns {file name: the series drawn}."""
  names = run_names(workdirs) if names is None else names
  if len(names) != len(workdirs):
    raise ValueError(f"--names has {len(names)} names for {len(workdirs)} workdirs")
  series = {n: read_series(w) for n, w in zip(names, workdirs)}
  colors = {n: f"C{i % 10}" for i, n in enumerate(names)}  # One colour per run everywhere.
  os.makedirs(out, exist_ok=True)
  drawn = {}
  for key, ylabel, file, log_y in CURVES:
    runs = {n: s[key] for n, s in series.items() if key in s}
    if runs:
      drawn[file] = plot_curves(runs, ylabel, os.path.join(out, file), log_y, colors)
  layers = {n: {int(k.split("/")[1]): v for k, v in s.items() if k.startswith("kurtosis/")}
            for n, s in series.items()}
  layers = {n: by_pos for n, by_pos in layers.items() if by_pos}
  if layers:
    drawn[KURTOSIS_FILE] = plot_layers(layers, os.path.join(out, KURTOSIS_FILE), colors)
  return drawn


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m qtrain.plot", description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+", help="Run directories (metrics.jsonl, config.json).")
  p.add_argument("--out", required=True, help="Directory for the PNGs.")
  p.add_argument("--names", default=None, help="Comma-separated legend names, one per run.")
  args = p.parse_args(argv)
  try:
    drawn = plot_runs(args.workdirs, args.out, args.names.split(",") if args.names else None)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {', '.join(os.path.join(args.out, f) for f in drawn)}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
