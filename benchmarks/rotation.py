"""Step-time cost of the online rotations R3 (Q and K after RoPE) and R4 (the
down_proj input) of ``config.model.rotation`` (qtrain/layers/rotation.py).

  python benchmarks/rotation.py --model=llama_1b --batch=8 --seq=2048
  python benchmarks/rotation.py --model=llama_1b:smoke --batch=2 --seq=64 --steps=1   # CPU

Times the trainer's step (forward, backward, optimizer) on a synthetic batch
in one process, without and with R3 + R4 (``--kind``: random_hadamard as
QuaRot, or hadamard), for each ``--impls`` way of applying them, and prints
one JSON line per impl with both times, the ratio and tokens/s (target: R3 +
R4 cost <= 5% of the llama_1b step on one H100). Each rotation is
x diag(s) H / sqrt(n), H = H_m (x) H_{2^k} (llama_1b: head_dim 64 = 2^6;
d_ff 5632 = 44 * 2^7): ``fwht`` runs a butterfly over the 2^k factor plus an
m x m matmul, ``matmul`` one small matmul per Kronecker factor (blocks <= 128).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top

from benchmarks.train_step import load_config, synthetic_batch, time_steps, trainer_step
from qtrain.layers.rotation import check_rotation, factor


def timed_step(cfg, host: dict, steps: int) -> float:
  """Seconds per step of the trainer's step for ``cfg`` on ``host`` rows."""
  layout, _, state, batch, step = trainer_step(cfg, host)
  box = [state]

  def one():
    box[0], m = step(box[0], batch)
    jax.block_until_ready(m["loss"])
  with layout:
    return time_steps(one, steps, warmup=2)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--kind", default="random_hadamard", choices=["random_hadamard", "hadamard"])
  p.add_argument("--impls", default="fwht,matmul",
                 help="comma-separated config.model.rotation.impl values to time")
  p.add_argument("--out", default=None, help="append the JSON lines here")
  args = p.parse_args()
  off = load_config(args.model)
  host = synthetic_batch(args.batch, args.seq, off.model.vocab_size, 0)
  t_off = timed_step(off, host, args.steps)
  tokens = args.batch * args.seq
  for impl in args.impls.split(","):
    on = load_config(args.model)
    on.model.rotation = dict(r3=args.kind, r4=args.kind, impl=impl)
    check_rotation(on.model)
    t_on = timed_step(on, host, args.steps)
    m = on.model
    row = {"model": args.model, "batch": args.batch, "seq": args.seq, "kind": args.kind,
           "impl": impl, "device": jax.devices()[0].device_kind,
           "n_devices": jax.device_count(), "jax": jax.__version__, "dtype": m.dtype,
           "head_dim_split": factor(m.head_dim), "d_ff_split": factor(m.d_ff),
           "step_off_ms": t_off * 1e3, "step_r3r4_ms": t_on * 1e3,
           "ratio": t_on / t_off, "cost_fraction": t_on / t_off - 1,
           "tokens_per_s_off": tokens / t_off, "tokens_per_s_r3r4": tokens / t_on}
    print(json.dumps(row))
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.model} b{args.batch}x{args.seq}: online R3 + R4 ({args.kind}, {impl}) cost "
          f"{row['cost_fraction']:+.2%} of the step ({t_off * 1e3:.1f} ms -> "
          f"{t_on * 1e3:.1f} ms; {row['tokens_per_s_off']:,.0f} -> "
          f"{row['tokens_per_s_r3r4']:,.0f} tokens/s)", flush=True)


if __name__ == "__main__":
  main()
