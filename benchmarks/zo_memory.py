"""Peak memory and step time of zeroth-order fine-tuning (issue 12) against the
inference forward pass and against first-order AdamW fine-tuning.

  python benchmarks/zo_memory.py --out=zo_memory.json                   # 1 GPU, llama_1b
  python benchmarks/zo_memory.py --model=llama_1b:smoke --batch=2 --seq=64 \\
      --steps=1 --warmup=1                                               # CPU self-check

MeZO (Malladi et al. 2023) estimates the gradient from two forward passes and a
direction z regenerated from its seed, so it should train in the memory of
inference; backprop holds activations, gradients and optimizer state (up to
12x in the paper). One model and batch (``--model``; llama_1b's own 8 x 2048),
each variant in a fresh child process:

  forward       the inference forward pass: ``eval_step`` (logits and token
                NLL) on the params alone, nothing else on the device. The
                baseline of every ratio.
  adamw         first-order AdamW fine-tuning (``configs/zo/adamw.py``).
  mezo, zo_adam, forward_grad, blockwise, zeroqat_w4a16
                the zeroth-order step (``qtrain/train/zeroth_order.py``) with the
                estimator, update rule, groups and quantizers of
                ``configs/zo/<name>.py`` applied to ``--model``; any other file
                of configs/zo/ can be named with ``--only``.

Per variant: ``peak_bytes`` = ``device.memory_stats()["peak_bytes_in_use"]``
after compiling and timing the step (the whole process: params, optimizer
state, batch, the step's temporaries). Backends without memory stats (CPU)
fall back to XLA's plan of the compiled step, ``planned_bytes`` = arguments +
outputs not aliased to donated arguments + temporaries
(``compiled.memory_analysis()``); the report says which of the two its ratios
use. The params keep the model's ``param_dtype`` in every variant (float32 for
llama_1b), so the forward pass is not flattered by bf16 weights. ``step_ms``
is the mean wall time of a step (after ``--warmup``), ``forwards`` the forward
passes one step costs (``configs/zo/_base.py:forwards_per_step``).

The issue's target: MeZO's peak <= 1.2x the forward pass's. Peak memory cannot
be reset inside a process, hence the children (``--variant=NAME``, same flags),
each printing one JSON row; the driver keeps going past a child that fails.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

from benchmarks import children
from benchmarks.train_step import load_config, synthetic_batch, time_steps
from qtrain.config import base_config, validate
from qtrain.config.variants import config_module
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout, batch_sharding
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params, abstract_state, init_state, state_shardings
from qtrain.train.step import make_steps

VARIANTS = ("forward", "adamw", "mezo", "zo_adam", "forward_grad", "blockwise", "zeroqat_w4a16")
MEZO_TARGET = 1.2  # x the forward pass's peak.
_ZO_BASE = config_module("zo._base")


def apply_method(cfg, name: str) -> None:
  """Gives ``cfg`` (any model) the method of ``configs/zo/<name>.py``: its step
  family, ``config.zo``, update rule, groups and quantizers, and XLA attention
  where the method needs it (the forward gradient's jvp). Data, model size and
  schedule stay ``cfg``'s."""
  src = config_module(f"zo.{name}").get_config("")
  cfg.train.step = src.train.step
  cfg.zo = src.zo
  for field in ("name", "lr", "grad_clip", "groups", "sgd"):  # Not the schedule: cfg's.
    cfg.optim[field] = src.optim[field]
  if src.optim.groups:
    cfg.optim.weight_decay = src.optim.weight_decay
  if src.quant.mode != "none":
    cfg.quant = src.quant
  if src.model.attention_impl != base_config().model.attention_impl:
    cfg.model.attention_impl = src.model.attention_impl


def variant_config(args, name: str):
  cfg = load_config(args.model)
  if name != "forward":
    apply_method(cfg, name)
  cfg.mesh.update(data=1, fsdp=1, pipeline=1, sequence=1, tensor=1)
  seq = args.seq or cfg.data.seq_len
  cfg.data.update(seq_len=seq, global_batch_size=args.batch, eval_batch_size=args.batch)
  if args.remat:
    cfg.model.remat_policy = args.remat
  validate(cfg, n_devices=1)
  return cfg


def planned_bytes(compiled) -> int | None:
  """XLA's plan: arguments + outputs not aliased to donated arguments + temporaries."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes)


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def child(args) -> None:
  """One variant in this process; prints its JSON row."""
  name = args.variant
  cfg = variant_config(args, name)
  devices = jax.devices()[:1]
  seq, rows = cfg.data.seq_len, cfg.data.global_batch_size
  host = synthetic_batch(rows, seq, cfg.model.vocab_size, 0)
  host["loss_mask"] = np.ones_like(host["targets"], dtype=np.float32)
  model = build_model(cfg)
  layout = Layout.from_config(cfg, devices)
  with layout:
    # The forward pass holds the params only: an empty optimizer state.
    tx = optax.identity() if name == "forward" else build_optimizer(
        cfg, abstract_params(model, seq))
    sh = state_shardings(model, tx, layout.mesh, seq)
    if args.compile_only:  # Shapes only: nothing of the model's size is allocated.
      state = abstract_state(model, tx, layout.mesh, seq)
      batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(layout.mesh))
               for k, v in host.items()}
    else:
      state = init_state(model, tx, layout.mesh, cfg.seed, seq)
      batch = {k: jax.device_put(v, batch_sharding(layout.mesh)) for k, v in host.items()}
    train, evaluate = make_steps(cfg, model, tx, layout.mesh, sh, batch_keys=tuple(host))
    row = {"variant": name, "model": args.model, "batch": rows, "seq": seq,
           "device": devices[0].device_kind, "jax": jax.__version__,
           "params_bytes": _nbytes(state.params), "optimizer_bytes": _nbytes(state.opt_state),
           "forwards": 1 if name == "forward" else _ZO_BASE.forwards_per_step(cfg)}
    t0 = time.perf_counter()
    if name == "forward":
      compiled = evaluate.lower(state.params, batch).compile()
    else:
      compiled = train.lower(state, batch).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["planned_bytes"] = planned_bytes(compiled)
    if args.compile_only:
      print(json.dumps({**row, "step_ms": None, "peak_bytes": None, "finite": None}), flush=True)
      return
    box, losses = [state], []

    def step():
      if name == "forward":
        m = compiled(box[0].params, batch)
        losses.append(float(m["nll_sum"]) / float(m["tokens"]))  # Host sync.
      else:
        box[0], m = compiled(box[0], batch)
        losses.append(float(m["loss"]))
    row["step_ms"] = 1e3 * time_steps(step, args.steps, args.warmup)
  children.finish_row(row, devices[0], losses)


def report(rows: list[dict]) -> str:
  """One line per variant; memory and time as ratios to the forward pass."""
  base = next((r for r in rows if r["variant"] == "forward" and "error" not in r), {})
  ok = [r for r in rows if "error" not in r]
  measured = bool(ok) and all(r["peak_bytes"] is not None for r in ok)
  key = "peak_bytes" if measured else "planned_bytes"
  gib = lambda n: "-" if n is None else f"{n / 2**30:.3f}"
  x = lambda v: "-" if v is None else f"{v:.2f}"
  ms = lambda v: "-" if v is None else f"{v:.1f}"
  lines = [f"memory: {'device peak_bytes_in_use' if measured else 'XLA plan of the compiled step (arguments + unaliased outputs + temps; no device memory stats on this backend)'}",
           f"{'variant':<16} {'opt GiB':>8} {'mem GiB':>9} {'x fwd':>6} {'x AdamW':>8} "
           f"{'fwd/step':>8} {'ms/step':>9} {'x fwd':>6}"]
  adamw = next((r for r in ok if r["variant"] == "adamw"), {})
  for r in rows:
    if "error" in r:
      lines.append(f"{r['variant']:<16} {'OOM' if r['oom'] else 'FAILED'}: {r['error']}")
      continue
    lines.append(
        f"{r['variant']:<16} {gib(r['optimizer_bytes']):>8} {gib(r[key]):>9} "
        f"{x(children.ratio(r[key], base.get(key))):>6} {x(children.ratio(r[key], adamw.get(key))):>8} "
        f"{r['forwards']:>8} {ms(r['step_ms']):>9} {x(children.ratio(r['step_ms'], base.get('step_ms'))):>6}")
  mezo = next((r for r in ok if r["variant"] == "mezo"), None)
  if mezo and base:
    v = children.ratio(mezo[key], base[key])
    lines.append(f"MeZO: {x(v)}x the forward pass (target <= {MEZO_TARGET}: "
                 f"{'met' if v is not None and v <= MEZO_TARGET else 'NOT met'})")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b", help="configs/<name>[:variant]")
  p.add_argument("--batch", type=int, default=8, help="rows per step (llama_1b's 8)")
  p.add_argument("--seq", type=int, default=2048, help="tokens per row; 0 = the config's")
  p.add_argument("--remat", default="", help="override the model's remat_policy")
  p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
  p.add_argument("--compile_only", action="store_true",
                 help="compile on abstract shapes and report XLA's plan only (no step run, "
                 "nothing allocated): llama_1b's plan on a CPU host")
  p.add_argument("--only", default="", help="comma-separated variants (forward or any "
                 "configs/zo file; default: " + ",".join(VARIANTS) + ")")
  p.add_argument("--child_timeout_s", type=float, default=600)
  p.add_argument("--mem_fraction", type=float, default=0.92,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION of the children (unless set)")
  p.add_argument("--out", default="", help="write the rows and the report (JSON) here")
  p.add_argument("--variant", default="", help=argparse.SUPPRESS)  # Set by the driver.
  args = p.parse_args()
  if args.variant:
    child(args)
    return
  names = args.only.split(",") if args.only else list(VARIANTS)
  if "forward" not in names:
    names.insert(0, "forward")  # Every ratio needs it.
  children.run_all(__file__, names, args, report)

if __name__ == "__main__":
  main()
