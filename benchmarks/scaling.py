"""Scaling over the GPUs of one host: tokens/s, MFU and peak memory per GPU.

  python benchmarks/scaling.py --out=scaling.json          # 2 GPUs, ~6-8 min on 2xH200
  # The same on CPU with tiny models (a check before spending GPU time):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/scaling.py \\
      --model=llama_1b:smoke --model8b=llama_8b:smoke --steps=2 --layers=4

Variants, each at the same batch per GPU (weak scaling: global batch = per-GPU
batch x GPUs; ``--batch`` rows of ``--seq`` tokens per GPU):

  1gpu      llama_1b on one GPU: the baseline.
  dpN       config.mesh data=N: replicas, one gradient all-reduce per step.
  fsdpN     fsdp=N: params, grads and AdamW state split; each scanned layer's
            weights gathered while it runs.
  tpN       tensor=N: Megatron attention/MLP, sequence-parallel norms,
            vocab-parallel loss. ``tensor`` does not split the batch, so every
            GPU sees all N x batch rows on 1/N of the width: the same model
            FLOPs per GPU as the others.
  8b_fsdpN  llama_8b with fsdp=N (``--batch8b`` rows of ``--seq8b`` tokens per
            GPU): its MFU against the 40% target. Rerun with remat ``full``
            if the configured policy runs out of memory.
  ppN_S     llama_1b with pipeline=N under schedule S (gpipe, circular and
            interleaved_1f1b with --repeats virtual stages per GPU, 1f1b;
            --microbatches per step):
            every GPU holds all rows and 1/N of the layers, the same model
            FLOPs per GPU as fsdpN, against which it is compared. The bubble
            beside it is the formula's; benchmarks/pipeline_bubble.py measures it.
  longest   llama_1b on one GPU, compiled but not run, at each of
            --long_candidates tokens per row (--long_batch rows) until XLA's
            plan no longer fits: the longest sequence one GPU trains with the
            configured remat policy.
  seq1      llama_1b on one GPU at that length (--long_seq, or what
            ``longest`` found in the same run).
  cpN_2x, cpN_4x  sequence=N (context parallelism, --cp_mode: ring or
            all_gather) at 2x and 4x that length: tokens/s per GPU against
            seq1's, and the memory; rerun with remat ``full`` on running out
            of memory.
  8b_ppN_S  llama_8b with pipeline=N under schedule S, against 8b_fsdpN.
  8b_1gpu   llama_8b on one GPU, compiled but not run: the bytes XLA would
            need (arguments + temps) against the GPU's, the state's bytes per
            param from its dtypes, then (while --budget_s allows) the same for
            cheaper alternatives: remat ``full``, bf16 params and moments.

Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU); targets
>= 90% for dp and fsdp. MFU as ``benchmarks/train_step.py``
(``qtrain.train.metrics.flops_per_token``) over N GPUs' peak.

Peak memory cannot be reset inside a process, so each variant runs in a fresh
child (``scaling.py --variant=NAME``, same flags) that prints one JSON row;
the driver keeps going past a child that fails (an out-of-memory is reported
as such), prints the rows and a summary, and writes both to ``--out``.
Children get ``XLA_PYTHON_CLIENT_MEM_FRACTION=--mem_fraction`` unless set
(JAX's default 0.75 would hide a quarter of the GPU from the 8B).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from benchmarks import children
from benchmarks.train_step import load_config, synthetic_batch, time_steps, trainer_step
from qtrain.config import validate
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout, batch_sharding
from qtrain.parallel.pipeline import SCHEDULES, schedule_of
from qtrain.train import metrics as metrics_lib
from qtrain.train import pipeline as _pipeline  # noqa: F401  (registers the pipeline family)
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params, abstract_state
from qtrain.train.step import make_steps

MFU_TARGET_8B = 0.40
EFFICIENCY_TARGET = 0.90  # dp and fsdp.
# Cheaper ways to hold the 8B on one GPU, compiled in 8b_1gpu while time allows.
ALTERNATIVES = {
    "remat_full": lambda c: c.model.update(remat_policy="full"),
    "bf16_params_and_moments": lambda c: (c.model.update(param_dtype="bfloat16"),
                                          c.optim.adamw.update(mu_dtype="bfloat16")),
}


def variants(n: int) -> dict[str, dict]:
  """{name: which model flag, GPUs, config.mesh, compile only?}."""
  return {
      "1gpu": dict(model="model", gpus=1, mesh=dict(data=1)),
      f"dp{n}": dict(model="model", gpus=n, mesh=dict(data=n)),
      f"fsdp{n}": dict(model="model", gpus=n, mesh=dict(data=1, fsdp=n)),
      f"tp{n}": dict(model="model", gpus=n, mesh=dict(data=1, tensor=n)),
      **{f"pp{n}_{s}": dict(model="model", gpus=n, mesh=dict(data=1, pipeline=n), pipeline=s)
         for s in SCHEDULES},
      "longest": dict(model="model", gpus=1, mesh=dict(data=1), longest=True),
      "seq1": dict(model="model", gpus=1, mesh=dict(data=1), long=1),
      **{f"cp{n}_{k}x": dict(model="model", gpus=n, mesh=dict(data=1, sequence=n), long=k)
         for k in (2, 4)},
      f"8b_fsdp{n}": dict(model="model8b", gpus=n, mesh=dict(data=1, fsdp=n)),
      **{f"8b_pp{n}_{s}": dict(model="model8b", gpus=n, mesh=dict(data=1, pipeline=n),
                               pipeline=s) for s in SCHEDULES},
      "8b_1gpu": dict(model="model8b", gpus=1, mesh=dict(data=1), compile_only=True),
  }


def variant_config(args, spec: dict):
  """The model's config with the variant's mesh, batch, sequence and remat."""
  is_8b = spec["model"] == "model8b"
  cfg = load_config(args.model8b if is_8b else args.model)
  cfg.mesh.update(data=1, fsdp=1, pipeline=1, sequence=1, tensor=1)
  cfg.mesh.update(**spec["mesh"])
  seq = (args.seq8b if is_8b else args.seq) or cfg.data.seq_len
  rows = (args.batch8b if is_8b else args.batch) * spec["gpus"]
  if spec.get("long"):  # Rows are not split over `sequence`: the same rows, k x longer.
    if not args.long_seq:
      raise SystemExit("--long_seq=0: run the `longest` variant first (the driver passes "
                       "its result on) or give --long_seq")
    seq, rows = spec["long"] * args.long_seq, args.long_batch
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq)  # RoPE's table; the same theta.
    cfg.model.context_parallel = args.cp_mode if cfg.mesh.sequence > 1 else "none"
  cfg.data.update(seq_len=seq, global_batch_size=rows, eval_batch_size=rows)
  remat = args.remat8b if is_8b else args.remat
  if remat:
    cfg.model.remat_policy = remat
  if args.layers and not is_8b:
    cfg.model.n_layers = args.layers
  if spec.get("pipeline"):
    cfg.train.update(step="pipeline", pipeline_schedule=spec["pipeline"],
                     pipeline_microbatches=args.microbatches, pipeline_repeats=args.repeats)
  validate(cfg, n_devices=spec["gpus"])
  return cfg


def _gib(n) -> float:
  return round(float(n) / 2**30, 3)


def _memory_analysis(compiled) -> dict:
  """What XLA plans to hold: arguments + outputs not aliased to (donated)
  arguments + temporaries (activations kept for the backward pass, buffers)."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  need = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes)
  return {"arguments_gib": _gib(ma.argument_size_in_bytes),
          "outputs_gib": _gib(ma.output_size_in_bytes),
          "aliased_gib": _gib(ma.alias_size_in_bytes),
          "temps_gib": _gib(ma.temp_size_in_bytes), "needed_gib": _gib(need)}


def _gpu_total_gib() -> float | None:
  """The first visible GPU's memory as nvidia-smi reports it (None elsewhere)."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                          "nounits"], capture_output=True, text=True, timeout=30, check=True)
    return round(float(out.stdout.split()[0]) / 1024, 1)  # MiB
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    return None


def _device_facts(devices) -> dict:
  """The device, and the bytes JAX may use on it (XLA_PYTHON_CLIENT_MEM_FRACTION
  of the GPU's memory)."""
  stats = devices[0].memory_stats() or {}
  return {"device": devices[0].device_kind, "jax": jax.__version__,
          "device_limit_gib": _gib(stats["bytes_limit"]) if "bytes_limit" in stats else None,
          "device_total_gib": _gpu_total_gib() if stats else None,
          "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}


def measure(cfg, devices, steps: int, warmup: int) -> dict:
  """Times the trainer's step on synthetic rows over ``devices``."""
  seq, rows = cfg.data.seq_len, cfg.data.global_batch_size
  host = synthetic_batch(rows, seq, cfg.model.vocab_size, 0)
  layout, model, state, batch, train = trainer_step(cfg, host, devices)
  with layout:
    t0 = time.perf_counter()
    compiled = train.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box, losses = [state], []

    def step():
      box[0], m = compiled(box[0], batch)
      losses.append(float(m["loss"]))  # Host sync on the metrics.
    dt = time_steps(step, steps, warmup)
  n = len(devices)
  tok_s = rows * seq / dt
  peak = metrics_lib.device_peak_flops(cfg.train.peak_tflops)
  flops = metrics_lib.flops_per_token(model.cfg, seq)
  mem = [d.memory_stats() for d in devices]
  return {"step_s": dt, "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / n,
          "mfu": tok_s * flops / (n * peak) if peak else None,
          "peak_mem_gib": [_gib(s["peak_bytes_in_use"]) for s in mem] if all(mem) else None,
          "compile_s": compile_s, "loss_first_last": [losses[0], losses[-1]],
          "finite": bool(np.isfinite(losses).all()), "plan": _memory_analysis(compiled)}


def state_breakdown(state) -> dict:
  """Bytes of an abstract train state from its dtypes: params, their
  gradients (same dtypes) and the optimizer state, in total and per param."""
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  n = sum(x.size for x in jax.tree.leaves(state.params))
  params, opt = nbytes(state.params), nbytes(state.opt_state)
  return {"params": n, "params_gib": _gib(params), "grads_gib": _gib(params),
          "optimizer_gib": _gib(opt), "state_and_grads_gib": _gib(2 * params + opt),
          "bytes_per_param": {"params": params / n, "grads": params / n,
                              "optimizer": round(opt / n, 3)}}


def plan_only(cfg, devices) -> dict:
  """Lowers and compiles the step on abstract inputs (nothing allocated);
  the state's bytes come first, so a failed compile still reports them."""
  seq, rows = cfg.data.seq_len, cfg.data.global_batch_size
  model = build_model(cfg)
  layout = Layout.from_config(cfg, devices=devices)
  out = {"remat": cfg.model.remat_policy, "param_dtype": cfg.model.param_dtype,
         "mu_dtype": cfg.optim.adamw.mu_dtype}
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, seq))
    state = abstract_state(model, tx, layout.mesh, seq)
    out["state"] = state_breakdown(state)
    rows_sh = batch_sharding(layout.mesh)
    batch = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=rows_sh)
             for k in ("inputs", "targets")}
    sh = jax.tree.map(lambda x: x.sharding, state)
    train, _ = make_steps(cfg, model, tx, layout.mesh, sh, batch_keys=tuple(batch))
    t0 = time.perf_counter()
    try:
      out["plan"] = _memory_analysis(train.lower(state, batch).compile())
    except Exception as e:  # pylint: disable=broad-except  (reported, not fatal)
      out["plan"] = {"error": " ".join(str(e).split())[:500]}
    out["compile_s"] = time.perf_counter() - t0
  limit = (devices[0].memory_stats() or {}).get("bytes_limit")
  need = out["plan"].get("needed_gib")
  out["fits"] = need <= _gib(limit) if limit and need is not None else None
  return out


def _room_for_another(last_compile_s: float, deadline: float) -> bool:
  """Whether one more compile (about as long as the last) ends before ``deadline``."""
  return time.time() + 1.5 * last_compile_s + 15 <= deadline


def plan_with_alternatives(cfg, devices, deadline: float) -> dict:
  """The configured step's plan, then each alternative's while the next
  compile (about as long as the last) ends before ``deadline``."""
  row = plan_only(cfg, devices)
  row["alternatives"] = {}
  if "error" in row["plan"]:
    print(f"compile failed: {row['plan']['error']}", file=sys.stderr)
  last = row["compile_s"]
  for name, edit in ALTERNATIVES.items():
    if not _room_for_another(last, deadline):
      row["alternatives"][name] = {"skipped": "--budget_s reached"}
      continue
    alt = copy.deepcopy(cfg)
    edit(alt)
    validate(alt, n_devices=len(devices))
    row["alternatives"][name] = plan_only(alt, devices)
    last = row["alternatives"][name]["compile_s"]
  return row


def longest(args, cfg, devices) -> dict:
  """XLA's plan at each candidate length, shortest first, until one does not
  fit (or --budget_s is spent): the longest that fits is the answer."""
  rows, best, last = {}, None, 0.0
  for seq in sorted(int(x) for x in args.long_candidates.split(",")):
    if not _room_for_another(last, args.deadline or float("inf")):
      rows[seq] = {"skipped": "--budget_s reached"}
      break
    c = copy.deepcopy(cfg)
    c.data.update(seq_len=seq, global_batch_size=args.long_batch, eval_batch_size=args.long_batch)
    c.model.max_seq_len = max(c.model.max_seq_len, seq)
    validate(c, n_devices=len(devices))
    plan = plan_only(c, devices)
    rows[seq] = {"needed_gib": plan["plan"].get("needed_gib"), "fits": plan["fits"],
                 "compile_s": round(plan["compile_s"], 1), **(
                     {"error": plan["plan"]["error"][:200]} if "error" in plan["plan"] else {})}
    last = plan["compile_s"]
    if not plan["fits"]:
      break
    best = seq
  return {"longest_seq": best, "rows_per_step": args.long_batch, "candidates": rows}


def child(args) -> None:
  """One variant in this process; prints its JSON row."""
  spec = variants(args.gpus)[args.variant]
  cfg = variant_config(args, spec)
  devices = jax.devices()[:spec["gpus"]]
  if len(devices) < spec["gpus"]:
    raise SystemExit(f"{args.variant} needs {spec['gpus']} devices, this machine has "
                     f"{len(devices)}; run with --gpus={len(devices)}")
  row = {"variant": args.variant, "model": args.model8b if spec["model"] == "model8b"
         else args.model, "gpus": spec["gpus"], "mesh": dict(spec["mesh"]),
         "batch_per_gpu": cfg.data.global_batch_size // spec["gpus"],
         "global_batch": cfg.data.global_batch_size, "seq": cfg.data.seq_len,
         "remat": cfg.model.remat_policy, **_device_facts(devices)}
  if spec.get("pipeline"):
    sched = schedule_of(cfg, spec["gpus"])
    row["pipeline"] = {"schedule": sched.name, "microbatches": sched.m, "repeats": sched.v,
                       "bubble_formula": sched.bubble}
  if spec.get("longest"):
    row.update(longest(args, cfg, devices))
    row.update(seq=row["longest_seq"], global_batch=args.long_batch, batch_per_gpu=args.long_batch)
  elif spec.get("compile_only"):
    row.update(plan_with_alternatives(cfg, devices, args.deadline or float("inf")))
  else:
    row.update(measure(cfg, devices, args.steps, args.warmup))
  print(json.dumps(row), flush=True)


def summarize(rows: list[dict], n: int) -> dict:
  """Absolute figures of every variant that ran, the scaling efficiency of
  the N-GPU llama_1b variants, the 8B's MFU and its one-GPU plan."""
  ok = {r["variant"]: r for r in rows if "tokens_per_s" in r}  # A fallback rerun wins.
  out = {"runs": {v: {k: r[k] for k in ("tokens_per_s", "tokens_per_s_per_gpu", "mfu",
                                         "peak_mem_gib", "remat")} for v, r in ok.items()},
         "gpus": n, "efficiency": {}, "efficiency_target": EFFICIENCY_TARGET}
  base = ok.get("1gpu")
  for v in (f"dp{n}", f"fsdp{n}", f"tp{n}"):
    if base and v in ok:
      out["efficiency"][v] = ok[v]["tokens_per_s"] / (n * base["tokens_per_s"])
  fsdp_of = lambda v: f"8b_fsdp{n}" if v.startswith("8b_") else f"fsdp{n}"
  out["pipeline"] = {v: {**r["pipeline"], "vs_fsdp": (r["tokens_per_s"] / ok[fsdp_of(v)][
      "tokens_per_s"]) if fsdp_of(v) in ok else None} for v, r in ok.items() if "pipeline" in r}
  found = next((r for r in rows if r["variant"] == "longest" and "longest_seq" in r), None)
  if found:
    out["longest_seq_1gpu"] = found["longest_seq"]
  base_long = ok.get("seq1")
  out["context_parallel"] = {v: {"seq": r["seq"], "tokens_per_s_per_gpu": r[
      "tokens_per_s_per_gpu"], "vs_seq1_per_gpu": r["tokens_per_s_per_gpu"] / base_long[
          "tokens_per_s_per_gpu"] if base_long else None} for v, r in ok.items()
                             if v.startswith("cp")}
  if f"8b_fsdp{n}" in ok:
    out["mfu_8b"], out["mfu_8b_target"] = ok[f"8b_fsdp{n}"]["mfu"], MFU_TARGET_8B
  one = next((r for r in rows if r["variant"] == "8b_1gpu" and "plan" in r), None)
  if one:
    brief = lambda a: ({"needed_gib": a["plan"].get("needed_gib"), "fits": a["fits"],
                        "state_and_grads_gib": a["state"]["state_and_grads_gib"]}
                       if "plan" in a else a)
    out["8b_1gpu"] = {**brief(one), "device_limit_gib": one["device_limit_gib"],
                      "device_total_gib": one["device_total_gib"],
                      "alternatives": {k: brief(a) for k, a in one["alternatives"].items()}}
  return out


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def _mesh(r: dict) -> str:
  return ",".join(f"{a}={s}" for a, s in r["mesh"].items() if s != 1) or "1 device"


def report(rows: list[dict], summary: dict) -> str:
  """The rows as a table, then the ratios against their targets."""
  lines = [f"{'variant':<10} {'model':<16} {'mesh':<10} {'remat':<14} {'tok/s':>10} "
           f"{'tok/s/GPU':>10} {'MFU':>6} {'peak GiB/GPU':>14}"]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['variant']:<10} {'OOM' if r['oom'] else 'FAILED'}: {r['error']}")
    elif "tokens_per_s" in r:
      peak = "/".join(f"{p:.1f}" for p in r["peak_mem_gib"]) if r["peak_mem_gib"] else "-"
      lines.append(f"{r['variant']:<10} {r['model']:<16} {_mesh(r):<10} {r['remat']:<14} "
                   f"{r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_gpu']:>10,.0f} "
                   f"{_fmt(r['mfu'], '6.1%')} {peak:>14}")
  for v, e in summary["efficiency"].items():
    lines.append(f"scaling efficiency {v}: {e:.1%} = {summary['runs'][v]['tokens_per_s']:,.0f}"
                 f" / ({summary['gpus']} x {summary['runs']['1gpu']['tokens_per_s']:,.0f}) tok/s"
                 f" (target {EFFICIENCY_TARGET:.0%} for dp, fsdp)")
  for v, r in summary.get("pipeline", {}).items():
    lines.append(f"{v}: m={r['microbatches']} v={r['repeats']}, bubble (p-1)/(vm+p-1) = "
                 f"{r['bubble_formula']:.1%}; tokens/s vs {'8b_' if v.startswith('8b_') else ''}"
                 f"fsdp{summary['gpus']}: "
                 f"{_fmt(r['vs_fsdp'], '.2f')}x")
  if "longest_seq_1gpu" in summary:
    lines.append(f"longest llama_1b row one GPU trains (XLA's plan): "
                 f"{summary['longest_seq_1gpu']} tokens")
  for v, r in summary.get("context_parallel", {}).items():
    lines.append(f"{v}: {r['seq']} tokens per row, tokens/s per GPU vs seq1: "
                 f"{_fmt(r['vs_seq1_per_gpu'], '.2f')}x")
  if "mfu_8b" in summary:
    lines.append(f"llama_8b fsdp MFU: {_fmt(summary['mfu_8b'], '.1%')} "
                 f"(target {MFU_TARGET_8B:.0%})")
  one = summary.get("8b_1gpu")
  if one:
    lines.append(f"llama_8b on 1 GPU (compiled, not run): needs {one['needed_gib']} GiB, of which"
                 f" state + grads {one['state_and_grads_gib']} GiB; JAX may use "
                 f"{one['device_limit_gib']} of {one['device_total_gib']} GiB: fits={one['fits']}")
    for k, a in one["alternatives"].items():
      lines.append(f"  {k}: " + json.dumps(a))
  return "\n".join(lines)


def driver(args) -> None:
  """Every variant in a fresh child, then the summary (and --out)."""
  start, n = time.time(), args.gpus
  rows = []
  for name, spec in variants(n).items():
    if args.only and name not in args.only.split(","):
      continue
    extra = ([f"--deadline={start + args.budget_s}"]
             if spec.get("compile_only") or spec.get("longest") else [])
    found = next((r.get("longest_seq") for r in rows if r["variant"] == "longest"), None)
    if spec.get("long") and not args.long_seq and found:
      extra.append(f"--long_seq={found}")
    tries = [extra]
    if spec["model"] == "model8b" and not spec.get("compile_only") and args.remat8b != "full":
      tries.append(["--remat8b=full"])  # Keeps only the residual stream per layer.
    if spec.get("long", 1) > 1 and args.remat != "full":
      # 4x one GPU's longest row on 2 GPUs is 2x its tokens per GPU: by the
      # definition of the longest, the configured policy's activations do not fit.
      tries.append([*extra, "--remat=full"])
    for attempt in tries:
      rows.append(children.spawn(__file__, name, mem_fraction=args.mem_fraction,
                                   timeout_s=args.child_timeout_s, extra=attempt))
      print(f"[{time.time() - start:5.0f} s] {' '.join([name, *attempt])}: "
            + rows[-1].get("error", "ok"), flush=True)
      if not rows[-1].get("oom"):
        break
  summary = summarize(rows, n)
  text = report(rows, summary)
  for r in rows:
    print(json.dumps(r))
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "summary": summary, "report": text, "argv": sys.argv[1:],
                 "wall_s": round(time.time() - start, 1)}, f, indent=1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gpus", type=int, default=2, help="N: GPUs of the multi-GPU variants")
  p.add_argument("--model", default="llama_1b", help="configs/<name>[:variant], scaling runs")
  p.add_argument("--batch", type=int, default=8, help="rows per GPU (llama_1b)")
  p.add_argument("--seq", type=int, default=0, help="tokens per row; 0 = the config's")
  p.add_argument("--remat", default="", help="override the model's remat_policy")
  p.add_argument("--layers", type=int, default=0,
                 help="override llama_1b's n_layers (0 = the config's; circular needs "
                 "pipeline x repeats to divide it)")
  p.add_argument("--microbatches", type=int, default=8, help="pipeline microbatches per step")
  p.add_argument("--repeats", type=int, default=2, help="virtual stages per GPU (circular, interleaved_1f1b)")
  p.add_argument("--long_seq", type=int, default=0,
                 help="seq1/cpN_kx: one GPU's longest row (0 = what `longest` finds)")
  p.add_argument("--long_batch", type=int, default=1, help="rows per step, long variants")
  p.add_argument("--long_candidates", default="8192,16384,32768,65536,131072",
                 help="lengths `longest` compiles, shortest first")
  p.add_argument("--cp_mode", default="ring", help="config.model.context_parallel of cpN_kx")
  p.add_argument("--model8b", default="llama_8b")
  p.add_argument("--batch8b", type=int, default=1, help="rows per GPU (llama_8b)")
  p.add_argument("--seq8b", type=int, default=0, help="tokens per row; 0 = the config's (8192)")
  p.add_argument("--remat8b", default="", help="override llama_8b's remat_policy")
  p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
  p.add_argument("--only", default="", help="comma-separated variants (default: all)")
  p.add_argument("--budget_s", type=float, default=480,
                 help="the 8b_1gpu alternatives are compiled only within this wall time")
  p.add_argument("--child_timeout_s", type=float, default=420)
  p.add_argument("--mem_fraction", type=float, default=0.92,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION of the children (unless set)")
  p.add_argument("--out", default="", help="write the rows and the summary (JSON) here")
  p.add_argument("--variant", default="", help=argparse.SUPPRESS)  # Set by the driver.
  p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.variant:
    child(args)
  else:
    driver(args)


if __name__ == "__main__":
  main()
