"""Step time and gradient bytes per step of the compressed exchange (issue 13):
``dense`` (the hand-written all-reduce), ``first_order`` (XLA's implicit
all-reduce), DGC and PowerSGD on ``data=N`` GPUs of one host, or on
``data x fsdp`` (``--fsdp``: the exchange runs per fsdp shard).

  python benchmarks/grad_exchange.py --out=grad_exchange.json        # 2xH200, llama_1b
  # data=2 x fsdp=2 (4 GPUs): each device exchanges its fsdp shard over data.
  python benchmarks/grad_exchange.py --gpus=4 --fsdp=2 --out=grad_exchange_fsdp.json
  # A check on CPU before spending GPU time:
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/grad_exchange.py \\
      --model=llama_1b:smoke --batch=2 --seq=64 --steps=2

On 2 GPUs only ``data=2`` compares exchanges: ``--fsdp=2`` there leaves
``data=1``, where no method sends anything.

Bytes are the step's own ``exchange/bytes_sent`` (per device, from the arrays
its collectives move, ring algorithms) and ``exchange/bytes_dense``. NVLink
moves them in little time, so compression may cost more than it saves here.
The projection to hosts linked at 25 and 100 Gb/s adds the bytes' transfer
time to the measured step with no overlap (an upper bound):
``step + bytes_sent / link``, beside the same for the dense exchange. With
``--fsdp`` > 1 the bytes are per device of its fsdp shard over ``data``; the
gradient's reduce-scatter over ``fsdp`` (XLA's, the same for every variant)
is not in them, and ``bytes_fsdp`` is PowerSGD's own traffic over ``fsdp``
(which stays inside the host in the projection).
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

from benchmarks.train_step import load_config, synthetic_batch, time_steps
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout, batch_sharding
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params, init_state, state_shardings
from qtrain.train.step import make_steps

LINKS_GBIT = (25, 100)
VARIANTS = {  # name -> (config.train.step, config.exchange overrides)
    "first_order": ("first_order", {}),
    "dense": ("compressed", {"method": "dense"}),
    "dgc_999": ("compressed", {"method": "dgc", "dgc": {"sparsity": 0.999}}),
    "powersgd_r4": ("compressed", {"method": "powersgd", "powersgd": {"rank": 4}}),
}


def _step(cfg, host):
  """(layout, state, batch, jitted step) with the compressor state sharded."""
  seq = host["inputs"].shape[1]
  model = build_model(cfg)
  layout = Layout.from_config(cfg)
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, seq))  # + the compressor state.
    sh = state_shardings(model, tx, layout.mesh, seq)
    state = jax.device_put(init_state(model, tx, layout.mesh, cfg.seed, seq), sh)
    step, _ = make_steps(cfg, model, tx, layout.mesh, sh, batch_keys=tuple(host))
    batch = {k: jax.device_put(v, batch_sharding(layout.mesh)) for k, v in host.items()}
  return layout, state, batch, step


def bench(model: str, name: str, gpus: int, batch: int, seq: int, steps: int,
          fsdp: int = 1) -> dict:
  cfg = load_config(model)
  step_kind, overrides = VARIANTS[name]
  if gpus % fsdp:
    raise ValueError(f"--fsdp={fsdp} must divide --gpus={gpus}")
  cfg.mesh.update(data=gpus // fsdp, fsdp=fsdp, tensor=1, sequence=1, pipeline=1)
  cfg.data.update(seq_len=seq, global_batch_size=batch * gpus)
  cfg.train.step = step_kind
  for k, v in overrides.items():
    cfg.exchange[k].update(v) if isinstance(v, dict) else cfg.exchange.update({k: v})
  host = synthetic_batch(batch * gpus, seq, cfg.model.vocab_size, packed=0)
  layout, state, data, step = _step(cfg, host)
  box, last = [state], {}
  with layout:
    def run():
      box[0], m = step(box[0], data)
      jax.block_until_ready(m["loss"])
      last.update(m)
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    dt = time_steps(run, steps)
  m = {k: float(v) for k, v in jax.device_get(last).items()}
  row = {"variant": name, "gpus": gpus, "data": gpus // fsdp, "fsdp": fsdp, "step_s": dt,
         "compile_s": compile_s, "bytes_sent": m.get("exchange/bytes_sent"),
         "bytes_dense": m.get("exchange/bytes_dense"), "ratio": m.get("exchange/ratio"),
         "bytes_fsdp": m.get("exchange/bytes_fsdp")}
  if row["bytes_sent"] is not None:
    for g in LINKS_GBIT:
      row[f"step_s_at_{g}gbit"] = dt + row["bytes_sent"] * 8 / (g * 1e9)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--gpus", type=int, default=2)
  p.add_argument("--fsdp", type=int, default=1, help="fsdp axis; data = gpus / fsdp")
  p.add_argument("--batch", type=int, default=8, help="rows per GPU")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--out", default=None)
  a = p.parse_args()
  rows = []
  for name in a.variants.split(","):
    try:
      rows.append(bench(a.model, name, a.gpus, a.batch, a.seq, a.steps, a.fsdp))
    except Exception as e:  # pylint: disable=broad-except  (report and go on)
      rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print(json.dumps(rows[-1]), flush=True)
  dense = next((r for r in rows if r["variant"] == "dense" and "step_s" in r), None)
  if dense:
    for r in rows:
      if "step_s" in r:
        r["vs_dense"] = r["step_s"] / dense["step_s"]
  if a.out:
    pathlib.Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
