"""Step time of Muon against AdamW: the trainer's jitted step, one process.

  python benchmarks/optim_step.py --model=llama_1b --batch=8 --seq=2048            # 1 GPU
  python benchmarks/optim_step.py --model=llama_1b --batch=8 --seq=2048 --accum=16  # 256k tok/step
  python benchmarks/optim_step.py --model=llama_1b --batch=8 --seq=2048 --mesh=fsdp=2
  python benchmarks/optim_step.py --model=llama_1b:smoke --batch=2 --seq=64 --steps=1 --accum=2  # CPU

Times the same model and batch under each optimizer variant in turn:

  adamw              AdamW on every param (the baseline of the ratios)
  muon               OSP's partition, optax.contrib.muon per leaf
                     (config.optim.muon.stacked=False)
  muon_stacked       OSP's partition, stacked Muon: same-shape matrices
                     concatenated and split over the mesh (the default)
  muon_stacked_bf16  as muon_stacked, Newton-Schulz in bfloat16 (OSP's choice)

and prints ms/step, tok/s and each variant's step time over AdamW's; the
issue's target is Muon's overhead <= 3%. On CPU the numbers only show the
script runs (don't read CPU timings).

Muon's extra work is per optimizer step: Newton-Schulz over every Muon matrix
(``qtrain.optim.muon.newton_schulz_flops``: ~48 TFLOP for llama_1b) against
the model's ~6.8 GFLOP per token. At 8 x 2048 = 16k tokens per step the two
are comparable; Megatron's 2-4% and OSP's 97.9% of Adam's throughput are at
~1-4M tokens per step. ``--accum=K`` runs K microbatches of ``--batch`` rows
per optimizer step (``config.train.grad_accum_steps``), so the same device
reaches those batches; each row prints the analytic Newton-Schulz FLOPs over
the model's FLOPs per step beside the measured overhead. float32
Newton-Schulz runs in TF32 on an H100 (about half the bf16 rate, see
``qtrain/optim/muon.py``), so expect its time share near twice its FLOP share;
bfloat16 near its FLOP share.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top

import flax.linen as nn  # pylint: disable=g-import-not-at-top

from benchmarks.train_step import load_config, synthetic_batch, time_steps, trainer_step
from qtrain.optim import osp_groups
from qtrain.optim.groups import assign_groups, param_path, parse_groups
from qtrain.optim.muon import matrix_of, newton_schulz_flops
from qtrain.parallel import AXES
from qtrain.train import metrics as metrics_lib
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params

VARIANTS = {
    "adamw": None,
    "muon": dict(stacked=False),
    "muon_stacked": dict(stacked=True),
    "muon_stacked_bf16": dict(stacked=True, ns_dtype="bfloat16"),
}


def parse_mesh(spec: str) -> dict[str, int]:
  """``"fsdp=2,data=1"`` -> config.mesh sizes (the other axes 1)."""
  sizes = {a: 1 for a in AXES}
  for item in filter(None, spec.split(",")):
    axis, _, n = item.partition("=")
    if axis not in AXES or not n.isdigit():
      raise SystemExit(f"--mesh={spec}: use axis=N pairs over {AXES}, e.g. fsdp=2")
    sizes[axis] = int(n)
  return sizes


def variant_config(model: str, variant: str, mesh: dict[str, int], accum: int = 1):
  cfg = load_config(model)
  cfg.mesh.update(mesh)
  cfg.train.grad_accum_steps = accum
  muon = VARIANTS[variant]
  if muon is not None:
    cfg.optim.groups = osp_groups()
    cfg.optim.muon.update(**muon)
  return cfg


def flops_per_step(cfg, rows: int, seq: int) -> dict:
  """Analytic FLOPs of one optimizer step over ``rows`` x ``seq`` tokens: the
  model's (6N + attention per token, as MFU counts them) and Newton-Schulz's
  over the params the config's groups send to Muon (0 without Muon)."""
  model = build_model(cfg)
  flat = jax.tree_util.tree_flatten_with_path(
      abstract_params(model, seq), is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  leaves = {param_path(p): leaf for p, leaf in flat}
  groups = parse_groups(cfg.optim)
  index, _ = assign_groups(groups, list(leaves))
  muon = [path for path, i in index.items() if groups[i].optimizer == "muon"]
  ns = sum(newton_schulz_flops(matrix_of(p, leaves[p]), cfg.optim.muon.ns_steps) for p in muon)
  return {"model_flops": metrics_lib.flops_per_token(model.cfg, seq) * rows * seq,
          "ns_flops": ns}


def bench(cfg, batch: int, seq: int, steps: int, n_devices: int) -> dict:
  """``batch`` rows per microbatch, ``config.train.grad_accum_steps`` of them
  per optimizer step."""
  batch *= cfg.train.grad_accum_steps
  host = synthetic_batch(batch, seq, cfg.model.vocab_size, 0)
  layout, _, state, data, train_step = trainer_step(cfg, host, jax.devices()[:n_devices])
  box = [state]
  del state

  def step():
    box[0], m = train_step(box[0], data)
    jax.block_until_ready(m["loss"])
  with layout:
    dt = time_steps(step, steps)
  del box, data, train_step
  gc.collect()  # Free this variant's state before the next one's.
  return {"step_ms": dt * 1e3, "tokens_per_s": batch * seq / dt,
          **flops_per_step(cfg, batch, seq)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b", help="configs/<name>.py[:variants]")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--accum", type=int, default=1,
                 help="microbatches of --batch rows per optimizer step (grad_accum_steps)")
  p.add_argument("--mesh", default="", help="config.mesh sizes, e.g. fsdp=2 (default 1 device)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated, from {list(VARIANTS)}; the first is the baseline")
  p.add_argument("--out", default=None, help="append JSON lines here")
  args = p.parse_args()
  mesh = parse_mesh(args.mesh)
  n = 1
  for s in mesh.values():
    n *= s
  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; use {list(VARIANTS)}")
  if args.accum < 1:
    raise SystemExit(f"--accum={args.accum}: use K >= 1 microbatches per optimizer step")
  common = {"model": args.model, "batch": args.batch, "accum": args.accum, "seq": args.seq,
            "tokens_per_step": args.batch * args.accum * args.seq,
            "mesh": ",".join(f"{a}={s}" for a, s in mesh.items() if s > 1) or "1 device",
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  rows = []
  for v in variants:
    row = {**common, "variant": v,
           **bench(variant_config(args.model, v, mesh, args.accum), args.batch, args.seq,
                   args.steps, n)}
    row["ns_over_model_flops"] = row["ns_flops"] / row["model_flops"]
    row["vs_first"] = row["step_ms"] / rows[0]["step_ms"] if rows else 1.0
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
  print(f"\n{args.model} {args.accum} x b{args.batch}x{args.seq} = "
        f"{common['tokens_per_step']:,} tokens/step on {common['mesh']} ({common['device']}); "
        f"model {rows[0]['model_flops'] / 1e12:,.1f} TFLOP/step:")
  for r in rows:
    print(f"  {r['variant']:<18} {r['step_ms']:9.1f} ms/step {r['tokens_per_s']:12,.0f} tok/s "
          f"  x{r['vs_first']:.3f} of {rows[0]['variant']} "
          f"({(r['vs_first'] - 1) * 100:+.1f}%)   Newton-Schulz {r['ns_flops'] / 1e12:6.2f} "
          f"TFLOP/step = {r['ns_over_model_flops'] * 100:5.2f}% of the model's")


if __name__ == "__main__":
  main()
