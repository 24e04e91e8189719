"""Step time of quantized training against the unquantized bf16 step.

  python benchmarks/quant_step.py --model=llama_1b --batch=8 --seq=2048

In one process, times qtrain's train step for ``llama_1b`` unquantized (bf16
compute, the baseline) and under the presets ``w4a4`` (fake quant, QAT),
``w8a8`` (real int8 dots; backward int8 too), ``fp8+tensor`` (per-tensor
scales, cuBLASLt's scaled fp8 GEMM), ``fp8+tensor+pallas`` (the same with
the codes cast in both layouts by qtrain's kernel; one GPU),
``fp8+tensor+pallas+delayed`` (the same with delayed scaling: scales from
an absmax history, the absmax read by the cast) and ``fp8`` (per
token / channel; e4m3 forward, e5m2 gradients; last, since its GPU compile
is the slowest), and prints each as a ratio to the baseline with the
absolute figures and the compiled step's temporary memory. A variant may
carry config overrides: ``fp8+tensor@model.save_quant_codes=True``.

The model's remat policy keeps each quantized matmul's bf16 output
(``qtrain.quant.dot_general.SAVED_OUT``, saved by qtrain's dot policies), so
the backward does not run the forward int8 kernels again.
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


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--variants",
                 default="none,w4a4,w8a8,w8a8+hp_bwd,fp8+tensor,fp8+tensor+pallas,"
                         "fp8+tensor+pallas+delayed,fp8",
                 help="quant presets ('none': bf16), each optionally with config "
                      "overrides after '@', ';'-separated")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  rows = []
  for variant in args.variants.split(","):
    # "preset@field=value;field=value": the preset with config overrides, e.g.
    # fp8+tensor@model.save_quant_codes=True.
    name, _, sets = variant.partition("@")
    cfg = load_config(args.model, tuple(o for o in sets.split(";") if o))
    if name != "none":
      apply_variants(cfg, [name], args.model)
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
            f"{r['tokens_per_s']:>9,.0f} tok/s, x{r.get('speedup_vs_bf16', 1.0):.3f} vs bf16, "
            f"temp {r.get('temp_gib', float('nan')):.2f} GiB")
    else:
      print(f"{r['variant']:>14s}: {r['error']}")


if __name__ == "__main__":
  main()
