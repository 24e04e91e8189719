"""Step-time cost of the online rotations R3 (Q and K after RoPE) and R4 (the
down_proj input) of ``config.model.rotation`` (qtrain/layers/rotation.py),
and the cost of each transform alone against a copy of the same tensor.

  python benchmarks/rotation.py --model=llama_1b --batch=8 --seq=2048
  python benchmarks/rotation.py --model=llama_1b:smoke --batch=2 --seq=64 --steps=1   # CPU
  python benchmarks/rotation.py --parts=step --impls=matmul_bf16 --save=false,true --steps=5

Two parts, one JSON line per measurement (``--parts``):

* ``micro``: each ``--impls`` way of applying R4 (on [batch, seq, d_ff]) and R3
  (on Q [batch, seq, n_heads, head_dim] and K [.., n_kv_heads, ..]) in the
  model's compute dtype, jitted alone: forward, and its VJP alone (what the
  backward pass runs), in ms and in GB/s of the tensor read + written, next
  to ``x * 2`` on the same tensor (one read, one write: the bandwidth a
  transform of that tensor cannot beat). ``err_u``: rms error vs the float64
  product of the same inputs over 8 rows, in units of the dtype's unit
  roundoff u and of rms(x R) (one rounding: ~0.3; each extra rounding adds).
  ``fwd_ops`` / ``vjp_ops``: the kernels of the optimised program by op name
  (a ``copy`` or ``transpose`` there is a pass over memory XLA added).
* ``step``: the trainer's step (forward, backward, optimizer) on a synthetic
  batch in one process, without and with R3 + R4 (``--kind``: random_hadamard
  as QuaRot, or hadamard) for each impl and each ``--save`` (whether remat
  also keeps the rotated tensors, ``config.model.rotation.save``, so the
  backward does not run the transforms again): both times, the ratio,
  tokens/s, and XLA's temp bytes of each compiled step (``memory_analysis``:
  activations kept for the backward live there), so a saving variant's
  memory cost sits beside its time, and the rotation gemms per block the
  step's jaxpr holds (llama_1b under dots_no_batch: 9 without save, R4's
  row-batched gemm recomputed; 8 with it; `--fold`, config.model.rotation.fold_grad:
  R4's backward on down_proj's weight, 6). Target: R3 + R4 cost <= 5% of the
  llama_1b step on one H100.

Each rotation is x diag(s) H / sqrt(n), H = H_a (x) H_b (llama_1b: head_dim
64, one dense 64 x 64 gemm; d_ff 5632 = 44 x 128): ``fwht`` runs butterflies
over the 2^k factor plus an m x m matmul in float32; ``matmul`` a 128 gemm over
the minor axis and a 44 one batched over rows, in the activations' dtype with
float32 accumulation, the intermediate float32; ``matmul_bf16`` the same with
the intermediate in the activations' dtype.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import bench_qtrain, load_config
from qtrain.layers.rotation import (IMPLS, check_rotation, factor, hadamard_transform,
                                    random_signs, rotation_matrix, transform_gemms)


def timed_step(cfg, args) -> tuple[float, int, int]:
  """(seconds per step, XLA's temp bytes, rotation gemms per block in its
  jaxpr: forward, remat recomputation and VJP) of the trainer's compiled step
  for ``cfg`` (``train_step.bench_qtrain`` on its synthetic rows)."""
  r = bench_qtrain(cfg, args.batch, args.seq, 0, args.steps, probe=transform_gemms)
  gemms = r["probe"] if cfg.model.scan_layers else r["probe"] // cfg.model.n_layers
  return r["step_s"], round(r["temp_gib"] * 2**30), gemms


def timed_call(fn, args, steps: int) -> float:
  """Seconds per call of jitted ``fn(*args)``, calls queued back to back
  (the device's time, not the dispatch's, once the queue is full)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(steps):  # Each output freed when the next replaces it.
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def entry_ops(fn, *args) -> dict:
  """Op name -> count in the ENTRY computation of ``fn``'s optimised program
  (one line per kernel or library call: fusions, gemm custom-calls, copies,
  transposes), custom-call targets by name: what XLA made of a transform."""
  text = fn.lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  ops = collections.Counter()
  for line in entry.splitlines()[1:]:
    found = re.search(r"= \S+ ([\w-]+)\(", line)
    if found and found[1] not in ("parameter", "constant", "get-tuple-element", "tuple",
                                  "bitcast"):
      # A gemm library call names its target; a fusion its kind (kLoop, kInput
      # for reductions, kCustom with its backend kind, e.g. __triton_gemm).
      detail = (re.findall(r'custom_call_target="([^"]+)"', line) + re.findall(r"kind=(\w+)", line)
                + re.findall(r'"kind":"(\w+)"', line))
      ops[":".join([found[1]] + detail)] += 1
  return dict(ops)


def rms_error_u(x, y, signs) -> float:
  """rms(y - x R) / rms(x R) / u over x's first 8 rows, x R in float64."""
  n = x.shape[-1]
  x64 = np.asarray(x.reshape(-1, n)[:8], np.float64)
  ref = x64 @ rotation_matrix(n, signs)
  got = np.asarray(y.reshape(-1, n)[:8], np.float64)
  u = float(jnp.finfo(x.dtype).eps) / 2
  return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)) / u)


def micro(args, m) -> list[dict]:
  """The transforms alone on llama-shaped tensors (see the module docstring)."""
  dtype = jnp.dtype(m.dtype)
  b, t = args.batch, args.seq
  tensors = {"r4_mlp_hidden": (b, t, m.d_ff), "r3_query": (b, t, m.n_heads, m.head_dim),
             "r3_key": (b, t, m.n_kv_heads, m.head_dim)}
  rows = []
  for name, shape in tensors.items():
    n = shape[-1]
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    signs = random_signs(n, 0) if args.kind == "random_hadamard" else None
    gb = 2 * x.size * x.dtype.itemsize / 1e9  # One read + one write of x.
    t_copy = timed_call(jax.jit(lambda x: x * 2), (x,), args.micro_steps)
    for impl in args.impls.split(","):
      fwd = jax.jit(lambda x, impl=impl: hadamard_transform(x, signs, impl=impl))
      bwd = jax.jit(lambda x, g, fwd=fwd: jax.vjp(fwd, x)[1](g)[0])  # The forward is dead code.
      t_fwd = timed_call(fwd, (x,), args.micro_steps)
      t_bwd = timed_call(bwd, (x, x), args.micro_steps)
      row = {"part": "micro", "tensor": name, "shape": list(shape), "dtype": str(dtype),
             "split": factor(n), "impl": impl, "device": jax.devices()[0].device_kind,
             "copy_ms": t_copy * 1e3, "fwd_ms": t_fwd * 1e3, "vjp_ms": t_bwd * 1e3,
             "copy_gb_s": gb / t_copy, "fwd_gb_s": gb / t_fwd, "vjp_gb_s": gb / t_bwd,
             "fwd_over_copy": t_fwd / t_copy, "vjp_over_copy": t_bwd / t_copy,
             "err_u": rms_error_u(x, fwd(x), signs), "fwd_ops": entry_ops(fwd, x),
             "vjp_ops": entry_ops(bwd, x, x)}
      rows.append(row)
      print(f"  {name} {list(shape)} {dtype} {impl}: forward {t_fwd * 1e3:.3f} ms "
            f"({row['fwd_over_copy']:.2f}x a copy's {t_copy * 1e3:.3f} ms), VJP "
            f"{t_bwd * 1e3:.3f} ms ({row['vjp_over_copy']:.2f}x); rms error "
            f"{row['err_u']:.2f} u\n    forward program {row['fwd_ops']}\n    VJP program "
            f"{row['vjp_ops']}", flush=True)
  return rows


def _config(args, rotation=None):
  cfg = load_config(args.model)
  if args.remat:
    cfg.model.remat_policy = args.remat
  if rotation:
    cfg.model.rotation = rotation
    check_rotation(cfg.model)
  return cfg


def step(args) -> list[dict]:
  """The trainer's step without and with R3 + R4, per impl and ``--save``."""
  t_off, temp_off, _ = timed_step(_config(args), args)
  tokens = args.batch * args.seq
  rows = []
  for impl, save, fold in itertools.product(args.impls.split(","), args.save, args.fold):
    on = _config(args, dict(r3=args.kind, r4=args.kind, impl=impl, save=save, fold_grad=fold))
    t_on, temp_on, gemms = timed_step(on, args)
    m = on.model
    row = {"part": "step", "model": args.model, "batch": args.batch, "seq": args.seq,
           "kind": args.kind, "impl": impl, "save": save, "fold_grad": fold,
           "remat": m.remat_policy,
           "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
           "jax": jax.__version__, "dtype": m.dtype, "head_dim_split": factor(m.head_dim),
           "d_ff_split": factor(m.d_ff), "step_off_ms": t_off * 1e3,
           "step_r3r4_ms": t_on * 1e3, "ratio": t_on / t_off,
           "cost_fraction": t_on / t_off - 1, "tokens_per_s_off": tokens / t_off,
           "tokens_per_s_r3r4": tokens / t_on, "temp_off_gib": temp_off / 2**30,
           "temp_r3r4_gib": temp_on / 2**30, "temp_delta_gib": (temp_on - temp_off) / 2**30,
           "rotation_gemms_per_block": gemms}
    rows.append(row)
    print(f"{args.model} b{args.batch}x{args.seq} ({m.remat_policy}): online R3 + R4 "
          f"({args.kind}, {impl}, save={save}, fold_grad={fold}) cost "
          f"{row['cost_fraction']:+.2%} of the step ({t_off * 1e3:.1f} ms -> {t_on * 1e3:.1f} ms; "
          f"{row['tokens_per_s_off']:,.0f} -> "
          f"{row['tokens_per_s_r3r4']:,.0f} tokens/s); temp {row['temp_off_gib']:.2f} -> "
          f"{row['temp_r3r4_gib']:.2f} GiB ({row['temp_delta_gib']:+.2f}); {gemms} rotation "
          f"gemms per block", flush=True)
  return rows


def _bools(text: str) -> list[bool]:
  words = {"false": False, "true": True}
  if not text or set(text.lower().split(",")) - set(words):
    raise argparse.ArgumentTypeError(f"{text!r}: use false, true or false,true")
  return [words[w] for w in text.lower().split(",")]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--micro_steps", type=int, default=50, help="calls per micro timing")
  p.add_argument("--kind", default="random_hadamard", choices=["random_hadamard", "hadamard"])
  p.add_argument("--impls", default=",".join(IMPLS),
                 help="comma-separated config.model.rotation.impl values to time")
  p.add_argument("--parts", default="micro,step", help="micro and/or step")
  p.add_argument("--save", type=_bools, default=[False, True],
                 help="config.model.rotation.save values to time the step with (false,true)")
  p.add_argument("--fold", type=_bools, default=[True],
                 help="config.model.rotation.fold_grad values (R4's backward through the weight)")
  p.add_argument("--remat", default="", help="override the model's remat_policy (step part)")
  p.add_argument("--out", default=None, help="append the JSON lines here")
  args = p.parse_args()
  unknown = set(args.impls.split(",")) - set(IMPLS)
  if unknown:
    raise SystemExit(f"--impls: {sorted(unknown)} unknown; use some of {IMPLS}")
  parts = args.parts.split(",")
  cfg = load_config(args.model)
  rows = []
  if "micro" in parts:
    print(f"{args.model} b{args.batch}x{args.seq}: the transforms alone", flush=True)
    rows += micro(args, cfg.model)
  if "step" in parts:
    rows += step(args)
  for row in rows:
    print(json.dumps(row))
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
  main()
