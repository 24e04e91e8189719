"""The pipeline bubble, measured, beside the formula (p - 1) / (v m + p - 1).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 nice -n 10 \\
      python benchmarks/pipeline_bubble.py                  # CPU, ~3 min
  python benchmarks/pipeline_bubble.py --p=2 --m=2,4,8,16 --model=llama_1b \
      --layers_per_stage=4 --rows=1 --seq=2048              # 2 GPUs, llama_1b's blocks

Times the tick program of ``qtrain/parallel/pipeline.py`` alone: the
``--model`` config's decoder blocks (K layers per stage, no embedding or head, so nothing
outside the pipeline dilutes the fraction), forward and backward, on a
``pipeline`` mesh of p devices.

* gpipe / circular: the same program twice, with all v m + p - 1 ticks and
  with only v m (the fill and drain ticks cut: every device busy on every
  tick; the numbers it computes are wrong, its time is the busy time).
  Measured bubble = 1 - T(v m ticks) / T(all ticks). A masked slot computes
  on zeros, so an idle tick costs a busy one's time, as on a GPU where the
  device would wait instead.
* 1f1b / interleaved_1f1b: idle slots are skipped (``lax.cond``), so a tick
  lasts as long as its busiest device. On CPU the fake devices share the
  cores, so an idle device lends its core to the others and the program's
  time does not show the bubble; the script times one stage's forward f and
  backward b alone (K layers: interleaved runs v such stages per device) and
  prices the tick plan (``pipeline.step_time`` over ``pipeline.tick_tables``:
  each tick as long as its busiest device's measured slots): bubble =
  1 - v m (f + b) / step_time, which checks the tick plan (it equals the
  formula whenever the plan keeps every device busy outside the fill and
  drain) but measures nothing else. The ``stash`` column is the plan's stage
  inputs held per device (the tables' slots, (v + 1) p - 1 at most). On
  GPUs the number to read is the program's own time against v m (f + b),
  printed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import load_config
from qtrain.layers import ModelConfig
from qtrain.layers.decoder import Decoder
from qtrain.layers.hooks import as_hooks
from qtrain.parallel import make_mesh
from qtrain.parallel import pipeline as pp
from qtrain.train import pipeline as family


@dataclasses.dataclass(frozen=True)
class _Busy(pp.Schedule):
  """The schedule's program without its fill and drain ticks."""

  @property
  def ticks(self) -> int:
    return self.v * self.m


def _timed(*fns, args_, reps: int) -> list[float]:
  """The fastest of ``reps`` timings of each ``fn(*args_)``, after two
  warm-up calls; the functions take turns, so a change in the machine's load
  (other jobs) reaches them alike, and the minimum is the least disturbed."""
  for fn in fns:
    for _ in range(2):
      jax.block_until_ready(fn(*args_))
  times = [[] for _ in fns]
  for _ in range(reps):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args_))
      ts.append(time.perf_counter() - t0)
  return [float(np.min(ts)) for ts in times]


def _stack(n_layers: int, args):
  """(stage_fn, params [L, ...], x [m, b, T, D], positions) of the model's decoder."""
  cfg = load_config(args.model)
  cfg.model.n_layers = n_layers
  model_cfg = ModelConfig.of(cfg.model)
  hooks = as_hooks(None).with_context(forms=model_cfg.weight_forms, n_layers=n_layers)
  decoder = Decoder(model_cfg, hooks)
  x = jax.random.normal(jax.random.key(0), (args.m_max, args.rows, args.seq, model_cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(args.seq), x.shape[:3])
  params = nn.unbox(decoder.init(jax.random.key(1), x[0], pos[0], None))["params"]["layers"]
  return family.stage_fn(decoder, None), params, x.astype(model_cfg.compute_dtype), pos


def _forward_grad(stage, sched, mesh):
  def loss(params, x, pos):
    out = pp.forward(stage, params, x, pos, None, sched, mesh)
    return jnp.sum(jnp.square(out.astype(jnp.float32)))
  return jax.jit(jax.grad(loss))


def _one_f_one_b(stage, sched, mesh):
  def head(hp, y, micro, i):
    del micro, i
    value = hp * jnp.sum(jnp.square(y.astype(jnp.float32)))
    return value, {"value": value}

  def grads(params, x, pos):
    return pp.one_f_one_b(stage, head, params, jnp.ones((), jnp.float32), x, pos, None,
                          {"i": jnp.arange(sched.m)}, jnp.ones((), jnp.float32), sched, mesh)
  return jax.jit(grads)


def _stage_times(stage, params, x, pos, K: int, reps: int):
  """(f, b): one stage's forward, and its backward as 1F1B runs it (the
  stage recomputed from its input, then transposed), on one device."""
  params_K = jax.tree.map(lambda a: a[:K], params)
  ids = jnp.arange(K, dtype=jnp.int32)
  fwd = jax.jit(lambda p, x0, q: stage(p, x0, q, None, ids))

  def bwd(p, x0, q):
    y, vjp = jax.vjp(lambda pp_, xx: stage(pp_, xx, q, None, ids), p, x0)
    return vjp(y)
  return tuple(_timed(fwd, jax.jit(bwd), args_=(params_K, x[0], pos[0]), reps=reps))


def measure(name: str, p: int, m: int, v: int, args) -> dict:
  sched = pp.Schedule(name, p, m, v)
  K = args.layers_per_stage
  stage, params, x, pos = _stack(p * v * K, args)
  x, pos = x[:m], pos[:m]
  mesh = make_mesh({"pipeline": p}, jax.devices()[:p])
  row = {"schedule": name, "p": p, "m": m, "v": v, "ticks": sched.ticks,
         "formula": sched.bubble}
  if name in pp.ONE_F_ONE_B:
    row["full_s"], = _timed(_one_f_one_b(stage, sched, mesh), args_=(params, x, pos),
                            reps=args.reps)
    f, b = _stage_times(stage, params, x, pos, K, args.reps)
    plan, busy = pp.step_time(sched, f, b), v * m * (f + b)
    row.update(f_s=f, b_s=b, busy_s=busy, plan_s=plan, measured=1 - busy / plan,
               program=1 - busy / row["full_s"], stash=pp.tick_tables(sched).slots)
  else:
    full, busy = _timed(_forward_grad(stage, sched, mesh),
                        _forward_grad(stage, _Busy(name, p, m, v), mesh),
                        args_=(params, x, pos), reps=args.reps)
    row.update(full_s=full, busy_s=busy, measured=1 - busy / full)
  return row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="default:smoke", help="configs/<name>[:variant]")
  ap.add_argument("--p", default="2,4", help="pipeline sizes")
  ap.add_argument("--m", default="1x,2x,4x", help="microbatches: numbers, or Nx = N times p")
  ap.add_argument("--schedules", default="gpipe,circular,1f1b,interleaved_1f1b")
  ap.add_argument("--repeats", type=int, default=2,
                  help="v of the circular and interleaved_1f1b schedules")
  ap.add_argument("--layers_per_stage", type=int, default=1)
  ap.add_argument("--rows", type=int, default=8, help="rows per microbatch")
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--reps", type=int, default=10)
  args = ap.parse_args()
  ps = [int(p) for p in args.p.split(",")]
  ms = lambda p: [int(s[:-1]) * p if s.endswith("x") else int(s) for s in args.m.split(",")]
  args.m_max = max(max(ms(p)) for p in ps)
  print(f"{jax.devices()[0].device_kind} x {len(jax.devices())}; {args.model} blocks, "
        f"{args.layers_per_stage} layer(s) per stage, {args.rows} x {args.seq} tokens per "
        "microbatch")
  print(f"{'schedule':<16} {'p':>2} {'m':>3} {'v':>2} {'ticks':>5} {'stash':>5} "
        f"{'step ms':>9} {'busy ms':>9} {'measured':>9} {'formula':>8}")
  for name in args.schedules.split(","):
    for p in ps:
      for m in ms(p):
        v = args.repeats if name in ("circular", "interleaved_1f1b") else 1
        if p > len(jax.devices()) or (v > 1 and m % p):
          continue
        r = measure(name, p, m, v, args)
        step = r.get("plan_s", r["full_s"])
        print(f"{name:<16} {p:>2} {m:>3} {v:>2} {r['ticks']:>5} {r.get('stash', '-'):>5} "
              f"{1e3 * step:>9.2f} {1e3 * r['busy_s']:>9.2f} {r['measured']:>9.3f} "
              f"{r['formula']:>8.3f}"
              + (f"   (f {1e3 * r['f_s']:.2f}, b {1e3 * r['b_s']:.2f} ms; the program "
                 f"{1e3 * r['full_s']:.2f} ms: 1 - vm(f+b)/it = {r['program']:.3f})"
                 if name in pp.ONE_F_ONE_B else ""), flush=True)


if __name__ == "__main__":
  main()
