"""A sweep's results: one row per run in ``results.md`` and ``results.json``,
and curves against tokens seen in ``loss.png`` and ``ppl.png``.

Tokens seen after step s are s x global batch x sequence length (every step
consumes one full packed batch; metrics.jsonl rows carry the step only). The
curves are read and drawn by ``qtrain.plot``, which ``python -m qtrain.plot``
uses for any set of runs.
"""

from __future__ import annotations

import json
import os

from qtrain.plot import plot_curves, read_series


def curves(workdir: str, tokens_per_step: int) -> dict:
  """{"loss": [(tokens, train loss)], "eval_ppl": [(tokens, held-out ppl)]}
  from a run's metrics.jsonl (``qtrain.plot.read_series``); empty before
  its first logged step."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return {"loss": [], "eval_ppl": []}
  series = read_series(workdir, tokens_per_step)
  return {key: series.get(key, []) for key in ("loss", "eval_ppl")}


def result_row(run, status: str, evals: dict) -> dict:
  """One run's numbers: what results.md shows and results.json holds."""
  d = run.cfg.data
  per_step = d.global_batch_size * d.seq_len
  c = curves(run.workdir, per_step)
  steps = run.cfg.train.steps
  return {"name": run.name, "config": run.entry, "workdir": run.workdir,
          "command": run.command, "status": status, "steps": steps,
          "tokens": steps * per_step, "final_train_loss": c["loss"][-1][1],
          **evals, "curves": c}


def _cell(column: str, v) -> str:
  if isinstance(v, float):
    if column.endswith("_gap"):
      return f"{v:+.2%}"
    return f"{v:.4f}" if column.endswith("loss") else f"{v:.3f}"
  return f"{v:,}" if isinstance(v, int) else str(v)


FIXED = ("name", "steps", "tokens", "final_train_loss")


def markdown(rows: list[dict], eval_columns: list[str]) -> str:
  """The table (a column per number, then each run's command)."""
  cols = [*FIXED, *eval_columns]
  lines = ["| " + " | ".join([*cols, "command"]) + " |",
           "|" + "---|" * (len(cols) + 1)]
  for r in rows:
    cmd = r["command"].replace("|", "\\|")
    lines.append("| " + " | ".join([_cell(c, r.get(c, "")) for c in cols] + [f"`{cmd}`"]) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], key: str, ylabel: str, path: str, log_y: bool = False) -> dict:
  """One line per run of ``key`` against tokens, saved as a PNG
  (``qtrain.plot.plot_curves``); returns {run name: [(tokens, value)]} read
  back from the figure's lines."""
  return plot_curves({r["name"]: r["curves"][key] for r in rows}, ylabel, path, log_y)


def write(workdir: str, rows: list[dict], eval_columns: list[str]) -> dict:
  """results.json, results.md, loss.png and ppl.png in ``workdir``; returns
  {"loss": plotted series, "eval_ppl": plotted series}."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json.tmp"), "w", encoding="utf-8") as f:
    json.dump({"columns": [*FIXED, *eval_columns], "runs": rows}, f, indent=2)
  os.replace(os.path.join(workdir, "results.json.tmp"), os.path.join(workdir, "results.json"))
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"# Sweep results: {len(rows)} runs\n\n" + markdown(rows, eval_columns))
  return {"loss": plot(rows, "loss", "train loss", os.path.join(workdir, "loss.png")),
          "eval_ppl": plot(rows, "eval_ppl", "held-out perplexity",
                           os.path.join(workdir, "ppl.png"), log_y=True)}
