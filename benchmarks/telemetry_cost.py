"""Step-time cost of in-training kurtosis telemetry (``config.telemetry``).

  python benchmarks/telemetry_cost.py --model=llama_125m --batch=16 --seq=2048 --every=100

Times, on a synthetic batch, (a) the trainer's step without telemetry, (b) the
plain step of a model that holds the telemetry provider (it must cost the same:
nothing is traced unless the collection is mutable) and (c) the measured step
(statistics at every site and matmul input). The loop runs (c) once every
``--every`` steps and (b) otherwise, so the cost is

  ratio = ((every - 1) * t_b + t_c) / every / t_a

(target <= 1.02 on one H100 at every=100; composer's activation monitor
costs ~5%). Prints one JSON line with the absolute times and the ratios.
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
from qtrain.optim import build_optimizer
from qtrain.train.state import abstract_params, state_shardings
from qtrain.train.step import make_measured_step


def timed(step, state, batch, steps):
  """(seconds per step, final state) of ``step`` chained on ``state``."""
  box = [state]

  def one():
    box[0], m = step(box[0], batch)
    jax.block_until_ready(m["loss"])
  return time_steps(one, steps), box[0]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_125m")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--every", type=int, default=100)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", default=None, help="append the JSON line here")
  args = p.parse_args()
  base = load_config(args.model)
  host = synthetic_batch(args.batch, args.seq, base.model.vocab_size, 0)
  layout, _, state, batch, plain = trainer_step(base, host)
  with layout:
    t_off, state = timed(plain, state, batch, args.steps)
  del state
  on = load_config(args.model)
  on.telemetry.every = args.every
  layout, model, state, batch, plain_on = trainer_step(on, host)
  with layout:
    tx = build_optimizer(on, abstract_params(model, args.seq))
    sh = state_shardings(model, tx, layout.mesh, args.seq)
    measured = make_measured_step(on, model, tx, layout.mesh, sh, batch_keys=tuple(host))
    t_plain, state = timed(plain_on, state, batch, args.steps)
    t_measured, state = timed(measured, state, batch, args.steps)
  amortized = ((args.every - 1) * t_plain + t_measured) / args.every
  row = {"model": args.model, "batch": args.batch, "seq": args.seq, "every": args.every,
         "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "step_off_s": t_off, "step_plain_with_provider_s": t_plain,
         "step_measured_s": t_measured, "step_amortized_s": amortized,
         "ratio": amortized / t_off, "plain_ratio": t_plain / t_off,
         "measured_ratio": t_measured / t_off}
  print(json.dumps(row))
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
  print(f"{args.model} b{args.batch}x{args.seq}: telemetry every {args.every} costs "
        f"{row['ratio'] - 1:+.2%} ({t_off * 1e3:.1f} ms off, {t_plain * 1e3:.1f} ms plain, "
        f"{t_measured * 1e3:.1f} ms measured)")


if __name__ == "__main__":
  main()
