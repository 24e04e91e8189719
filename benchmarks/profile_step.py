"""Where a train step's GPU time goes: kernel time summed by kind.

  python benchmarks/profile_step.py --model=llama_1b --batch=8 --out=/tmp/prof

Traces a few steps with ``jax.profiler`` (Perfetto JSON) and prints the top
kernels by total device time, grouped by a coarse category (gemm, attention,
elementwise/fusion, reduction, copy).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top

from benchmarks.train_step import load_config, synthetic_batch, trainer_step  # noqa: E402
from qtrain.kernels import timing  # noqa: E402


def _category(name: str) -> str:
  n = name.lower()
  for key, cat in (("fmha", "attention"), ("flash", "attention"), ("cudnn", "attention"),
                   ("gemm", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("nvjet", "gemm"),
                   ("triton", "triton"), ("reduce", "reduction"), ("memcpy", "copy"),
                   ("memset", "copy"), ("fusion", "fusion"), ("loop", "fusion"),
                   ("input", "fusion")):
    if key in n:
      return cat
  return "other"


def summarize(trace_dir: str, steps: int, top: int = 25) -> dict:
  by_name, by_cat = collections.Counter(), collections.Counter()
  for e in timing.gpu_kernel_events(timing.load_trace(trace_dir)) or ():
    by_name[e["name"]] += e["dur"] / steps
    by_cat[_category(e["name"])] += e["dur"] / steps
  total = sum(by_cat.values())
  print(f"device time per step: {total / 1e3:.1f} ms")
  for cat, us in by_cat.most_common():
    print(f"  {cat:12s} {us / 1e3:8.2f} ms  {us / total:6.1%}")
  for name, us in by_name.most_common(top):
    print(f"  {us / 1e3:8.2f} ms  {name[:110]}")
  return {"total_us": total, "by_category_us": dict(by_cat),
          "top_us": dict(by_name.most_common(top))}


def hlo_sources(hlo_text: str, names) -> dict:
  """For each kernel name that is an instruction of the optimized HLO (XLA's
  fusions keep their instruction's name), the JAX op that produced it (its
  ``op_name`` metadata): what a profile's fusion is, in the model's terms."""
  out = {}
  for name in names:
    # The trace writes the instruction's dots as underscores.
    pattern = re.escape(name).replace("_", "[._]")
    m = re.search(r"^\s*(?:ROOT )?%?" + pattern + r" = .*?op_name=\"([^\"]+)\"", hlo_text,
                  re.M)
    if m:
      out[name] = m.group(1)
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--remat", default=None)
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field (as benchmarks/train_step.py)")
  p.add_argument("--out", default="/tmp/qtrain_profile")
  p.add_argument("--top", type=int, default=25, help="kernels listed by total time")
  p.add_argument("--hlo", action="store_true",
                 help="also write the optimized HLO and the JAX op behind each top kernel")
  args = p.parse_args()
  cfg = load_config(args.model, args.set)
  if args.remat:
    cfg.model.remat_policy = args.remat
  host = synthetic_batch(args.batch, args.seq, cfg.model.vocab_size, 0)
  layout, _, state, batch, step = trainer_step(cfg, host)
  with layout:
    compiled = step.lower(state, batch).compile()  # Profiled, and its HLO read: one compile.
    for _ in range(3):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
  summary = summarize(args.out, args.steps, args.top)
  os.makedirs(args.out, exist_ok=True)
  if args.hlo:
    text = compiled.as_text()
    with open(os.path.join(args.out, "hlo.txt"), "w", encoding="utf-8") as f:
      f.write(text)
    summary["sources"] = hlo_sources(text, summary["top_us"])
    for name, src in summary["sources"].items():
      print(f"  {summary['top_us'][name] / 1e3:8.2f} ms  {name[:40]:40s} <- {src[:90]}")
  with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f)


if __name__ == "__main__":
  main()
