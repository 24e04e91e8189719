"""Step time of quantized training against the unquantized bf16 step.

  python benchmarks/quant_step.py --model=llama_1b --batch=8 --seq=2048

In one process, times qtrain's train step for ``llama_1b`` unquantized (bf16
compute, the baseline) and under the presets ``w4a4`` (fake quant, QAT),
``w8a8`` (real int8 dots; backward int8 too) and ``fp8`` (e4m3 forward, e5m2
gradients), and prints each as a ratio to the baseline with the absolute
figures.

A variant ending in ``+save_out`` (``w8a8+pallas+save_out``) also keeps each
quantized matmul's output through remat (the model's policy plus
``qtrain.quant.dot_general.SAVED_OUT``): under ``dots_no_batch`` the backward
otherwise runs again every forward Pallas kernel whose output it needs (6 of
a block's 7), and XLA's int8 path keeps the int32 accumulator instead of the
bf16 output. The policy is registered here, in this process, until
``qtrain/layers/decoder.py`` has it.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top

from benchmarks.train_step import bench_qtrain, load_config  # noqa: E402
from qtrain.config.variants import apply_variants  # noqa: E402


SAVE_OUT = "+save_out"


def save_quant_out(cfg) -> None:
  """Sets cfg.model.remat_policy to its policy that also saves SAVED_OUT,
  registering that policy by name (``<policy>_quant_out``)."""
  from qtrain.layers import decoder  # pylint: disable=g-import-not-at-top
  from qtrain.quant.dot_general import SAVED_OUT  # pylint: disable=g-import-not-at-top
  policy = cfg.model.remat_policy
  if policy in ("none", "full") or policy.endswith("_quant_out"):
    return  # none keeps everything; full keeps nothing by design.
  cp = jax.checkpoint_policies
  name = f"{policy}_quant_out"
  decoder.REMAT_POLICIES[name] = cp.save_from_both_policies(
      decoder.REMAT_POLICIES[policy], cp.save_only_these_names(SAVED_OUT))
  cfg.model.remat_policy = name


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--variants", default="none,w4a4,w8a8,w8a8+hp_bwd,fp8")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  rows = []
  for variant in args.variants.split(","):
    cfg = load_config(args.model)
    preset = variant.removesuffix(SAVE_OUT)
    if preset != "none":
      apply_variants(cfg, [preset], args.model)
    if preset != variant:
      save_quant_out(cfg)
    try:
      r = bench_qtrain(cfg, args.batch, args.seq, 0, args.steps)
    except Exception as e:  # pylint: disable=broad-except
      r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    r.update(variant=variant, mode=cfg.quant.mode, remat=cfg.model.remat_policy,
             model=args.model, batch=args.batch,
             seq=args.seq, device=jax.devices()[0].device_kind)
    if rows and "step_s" in rows[0] and "step_s" in r:
      r["speedup_vs_bf16"] = rows[0]["step_s"] / r["step_s"]
    rows.append(r)
    print(json.dumps(r), flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(r) + "\n")
    jax.clear_caches()
    gc.collect()
  for r in rows:
    if "step_s" in r:
      print(f"{r['variant']:>14s} ({r['mode']}): {r['step_s'] * 1e3:7.1f} ms/step, "
            f"{r['tokens_per_s']:>9,.0f} tok/s, x{r.get('speedup_vs_bf16', 1.0):.3f} vs bf16")
    else:
      print(f"{r['variant']:>14s}: {r['error']}")


if __name__ == "__main__":
  main()
