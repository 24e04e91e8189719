"""Evaluations a sweep runs on every finished run, as plug-ins.

An evaluation is named by a spec, ``kind`` or ``kind:arg`` (``heldout``,
``ptq:w4a4kv4:rtn``); ``register_evaluation(kind, make)`` adds a kind, where
``make(arg, options)`` returns an ``Evaluation``. Its ``fn(workdir, step)``
returns ``{column: number}`` for the results table. Results are cached per run
in ``<run>/evaluations.json`` under the spec, the step and the options, so a
re-run sweep evaluates nothing twice.

  heldout             held-out loss and perplexity of the final checkpoint
                      (``qtrain.eval.run``, the same batches the loop uses)
  ptq:RECIPE[:METHOD][:ffn_hadamard]
                      held-out perplexity after post-training quantization at a
                      preset of configs/quant (``python -m qtrain.quantize``;
                      METHOD rtn, gptq or awq, default rtn; the run's own
                      config.data.eval_batches) and its gap to the unquantized;
                      ``ffn_hadamard`` folds OSP's FFN Hadamard into the trained
                      model first (``--ffn_hadamard``: same function, rotated
                      down_proj input)
  kurtosis            activation excess kurtosis as OSP measures it (embedding
                      output and every layer output), max |x| and the
                      down_proj input's kurtosis, on the held-out batches
                      (``qtrain.analysis.report.run``; also writes its JSON + PNG)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable

from qtrain.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Evaluation:
  spec: str  # As named on the command line; the cache key with the options.
  columns: tuple[str, ...]  # The keys of fn's result, in table order.
  fn: Callable[[str, int], dict]  # (run workdir, checkpoint step) -> {column: number}.


_KINDS: dict[str, Callable[[str, dict], Evaluation]] = {}


def register_evaluation(kind: str, make: Callable[[str, dict], Evaluation]) -> None:
  _KINDS[kind] = make


def resolve(spec: str, options: dict) -> Evaluation:
  """The evaluation a spec names; a ConfigError lists the kinds otherwise."""
  kind, _, arg = spec.partition(":")
  if kind not in _KINDS:
    raise ConfigError(f"--evals: unknown evaluation {spec!r}; kinds: {sorted(_KINDS)}")
  return _KINDS[kind](arg, options)


def _heldout(arg: str, options: dict) -> Evaluation:
  if arg:
    raise ConfigError(f"--evals=heldout:{arg}: heldout takes no argument")

  def fn(workdir: str, step: int) -> dict:
    from qtrain import eval as eval_lib  # pylint: disable=g-import-not-at-top
    r = eval_lib.run(workdir, step, options.get("eval_batches"))
    return {"eval_loss": r["eval_loss"], "eval_ppl": r["eval_ppl"]}

  return Evaluation("heldout", ("eval_loss", "eval_ppl"), fn)


def _ptq(arg: str, options: dict) -> Evaluation:
  from qtrain.config.variants import quant_presets  # pylint: disable=g-import-not-at-top
  recipe, _, rest = arg.partition(":")
  method, _, switch = rest.partition(":")
  method = method or "rtn"
  if (recipe.partition("+")[0] not in quant_presets() or method not in ("rtn", "gptq", "awq")
      or switch not in ("", "ffn_hadamard")):
    raise ConfigError(f"--evals=ptq:{arg}: use ptq:RECIPE[:METHOD][:ffn_hadamard] with RECIPE "
                      f"one of {quant_presets()} (switches after +) and METHOD rtn, gptq or awq")
  hadamard = switch == "ffn_hadamard"
  name = f"ptq_{recipe}_{method}" + ("_ffnh" if hadamard else "")
  spec = f"ptq:{recipe}:{method}" + (":ffn_hadamard" if hadamard else "")

  def fn(workdir: str, step: int) -> dict:
    # A child process: qtrain.quantize and qtrain.eval both define absl flags
    # named --workdir at import, so one process cannot hold both.
    cmd = [sys.executable, "-m", "qtrain.quantize", f"--workdir={workdir}",
           f"--recipe={recipe}", f"--method={method}", f"--step={step}",
           f"--out={os.path.join(workdir, name)}"] + (["--ffn_hadamard"] if hadamard else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      raise ConfigError(f"--evals={spec} on {workdir} failed: {last}")
    with open(os.path.join(workdir, name, "ptq_metrics.json"), encoding="utf-8") as f:
      m = json.load(f)
    return {f"{name}_ppl": m["ppl_ptq"], f"{name}_gap": m["ppl_ptq"] / m["ppl_fp"] - 1}

  return Evaluation(spec, (f"{name}_ppl", f"{name}_gap"), fn)


def _kurtosis(arg: str, options: dict) -> Evaluation:
  if arg:
    raise ConfigError(f"--evals=kurtosis:{arg}: kurtosis takes no argument")
  columns = ("excess_kurtosis", "max_abs", "down_proj_kurtosis")

  def fn(workdir: str, step: int) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from qtrain.analysis import report  # pylint: disable=g-import-not-at-top
    r = report.run(workdir, step, options.get("eval_batches"))
    down = r["sites"].get(report.DOWN_PROJ, {}).get("kurtosis", [float("nan")])
    return dict(zip(columns, (r["kurtosis"], r["max_abs"], float(np.mean(down)))))

  return Evaluation("kurtosis", columns, fn)


register_evaluation("heldout", _heldout)
register_evaluation("ptq", _ptq)
register_evaluation("kurtosis", _kurtosis)


def evaluate(ev: Evaluation, workdir: str, step: int, options: dict) -> tuple[dict, bool]:
  """(ev's columns for the run in ``workdir`` at ``step``, whether cached)."""
  path = os.path.join(workdir, "evaluations.json")
  cache = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      cache = json.load(f)
  key = json.dumps({"spec": ev.spec, "step": step, **options}, sort_keys=True)
  if key in cache:
    return cache[key], True
  cache[key] = {c: float(v) for c, v in ev.fn(workdir, step).items()}
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(cache, f, indent=2)
  os.replace(path + ".tmp", path)
  return cache[key], False
