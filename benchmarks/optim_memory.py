"""Memory and step time of the memory-efficient optimizers and forms (issue 11).

  python benchmarks/optim_memory.py --out=optim_memory.json            # 1 GPU, llama_1b
  python benchmarks/optim_memory.py --model=llama_1b:smoke --batch=2 --seq=64 \\
      --steps=1 --warmup=1                                               # CPU self-check

One model and batch, each variant of ``configs/optim/_base.py:RECIPES`` applied
to it (adamw, galore, fira, apollo, apollo_mini, low_rank, low_rank_restarts,
sltrain_restarts): the optimizer on the hidden matrices, their weight form,
restarts. Per variant:

  state        bytes of params and optimizer state from the state's shapes and
               dtypes (no device needed), the optimizer state's ratio to
               AdamW's, and the same over the hidden matrices only (the part
               GaLore's "-65%" refers to; embedding and LM head keep AdamW in
               every variant, as in the papers)
  peak_gib     ``device.memory_stats()["peak_bytes_in_use"]`` after compiling
               and timing the trainer's step (None where the backend has no
               stats, e.g. CPU), and its ratio to AdamW's
  step_ms      mean wall time of a step (after ``--warmup`` steps)

The issue's target: GaLore's optimizer state <= 0.35x AdamW's.
Peak memory cannot be reset inside a process, so each variant runs in a
fresh child (``--variant=NAME``, same flags) that prints one JSON row; the
driver keeps going past a child that fails (out of memory is reported as
such). Restart steps (reset, refactorization, GaLore's SVD refresh) fall every
200 updates, outside the timed steps: the step time is an ordinary step's.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax

from benchmarks import children
from benchmarks.train_step import load_config, synthetic_batch, time_steps
from qtrain.config import validate
from qtrain.config.variants import config_module
from qtrain.optim import build_optimizer, param_path
from qtrain.optim.wrappers import WrapperState, wrap
from qtrain.parallel import Layout, batch_sharding
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params, init_state, state_shardings
from qtrain.train.step import make_steps

RECIPES = config_module("optim._base").RECIPES
HIDDEN = config_module("optim._base").HIDDEN
GALORE_TARGET = 0.35


def variant_config(args, name: str):
  cfg = load_config(args.model)
  config_module("optim._base").apply_recipe(cfg, **RECIPES[name])
  cfg.mesh.update(data=1, fsdp=1, pipeline=1, sequence=1, tensor=1)
  seq = args.seq or cfg.data.seq_len
  cfg.data.update(seq_len=seq, global_batch_size=args.batch, eval_batch_size=args.batch)
  if args.remat:
    cfg.model.remat_policy = args.remat
  validate(cfg, n_devices=1)
  return cfg


def _values(boxed):
  """The ShapeDtypeStructs inside the boxes (``nn.unbox`` would constrain them)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def optimizer(cfg, boxed):
  """The run's transform, with config.optim.restarts/refactor applied here
  unless the builder already does."""
  tx = build_optimizer(cfg, boxed)
  state = jax.eval_shape(tx.init, _values(boxed))
  if any(isinstance(x, WrapperState) for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, WrapperState))):
    return tx
  flat = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return wrap(tx, cfg.optim, {param_path(p): leaf for p, leaf in flat})


def state_bytes(params, opt_state) -> dict:
  """Bytes of params and optimizer state, overall and of the hidden matrices
  (a state leaf belongs to the param whose path ends its own path)."""
  import re  # pylint: disable=g-import-not-at-top
  nbytes = lambda x: x.size * x.dtype.itemsize
  hidden = re.compile(HIDDEN)
  param_paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  opt_hidden = 0
  for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    path = param_path(p)
    owner = next((q for q in param_paths if path.endswith(q)), None)
    opt_hidden += nbytes(x) if owner and hidden.fullmatch(owner) else 0
  return {"params": int(sum(x.size for x in jax.tree.leaves(params))),
          "params_bytes": int(sum(nbytes(x) for x in jax.tree.leaves(params))),
          "optimizer_bytes": int(sum(nbytes(x) for x in jax.tree.leaves(opt_state))),
          "optimizer_hidden_bytes": int(opt_hidden)}


def child(args) -> None:
  """One variant in this process; prints its JSON row."""
  cfg = variant_config(args, args.variant)
  devices = jax.devices()[:1]
  seq, rows = cfg.data.seq_len, cfg.data.global_batch_size
  host = synthetic_batch(rows, seq, cfg.model.vocab_size, 0)
  model = build_model(cfg)
  layout = Layout.from_config(cfg, devices)
  with layout:
    boxed = abstract_params(model, seq)
    tx = optimizer(cfg, boxed)
    abstract_opt = jax.eval_shape(tx.init, _values(boxed))
    row = {"variant": args.variant, "model": args.model, "batch": rows, "seq": seq,
           "device": devices[0].device_kind, "jax": jax.__version__,
           **state_bytes(_values(boxed), abstract_opt)}
    sh = state_shardings(model, tx, layout.mesh, seq)
    state = init_state(model, tx, layout.mesh, cfg.seed, seq)
    train, _ = make_steps(cfg, model, tx, layout.mesh, sh, batch_keys=tuple(host))
    batch = {k: jax.device_put(v, batch_sharding(layout.mesh)) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = train.lower(state, batch).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    box, losses = [state], []

    def step():
      box[0], m = compiled(box[0], batch)
      losses.append(float(m["loss"]))  # Host sync on the metrics.
    row["step_ms"] = 1e3 * time_steps(step, args.steps, args.warmup)
  children.finish_row(row, devices[0], losses)


def report(rows: list[dict]) -> str:
  """One line per variant: bytes and time, each as a ratio to AdamW's."""
  base = next((r for r in rows if r["variant"] == "adamw" and "error" not in r), {})
  gib = lambda n: "-" if n is None else f"{n / 2**30:.2f}"
  ratio = lambda x: "-" if x is None else f"{x:.3f}"
  lines = [f"{'variant':<18} {'params':>12} {'opt GiB':>8} {'x AdamW':>8} {'hidden x':>8} "
           f"{'peak GiB':>9} {'x AdamW':>8} {'ms/step':>9} {'x AdamW':>8}"]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['variant']:<18} {'OOM' if r['oom'] else 'FAILED'}: {r['error']}")
      continue
    lines.append(
        f"{r['variant']:<18} {r['params']:>12,} {gib(r['optimizer_bytes']):>8} "
        f"{ratio(children.ratio(r['optimizer_bytes'], base.get('optimizer_bytes'))):>8} "
        f"{ratio(children.ratio(r['optimizer_hidden_bytes'], base.get('optimizer_hidden_bytes'))):>8} "
        f"{gib(r['peak_bytes']):>9} {ratio(children.ratio(r['peak_bytes'], base.get('peak_bytes'))):>8} "
        f"{r['step_ms']:>9.1f} {ratio(children.ratio(r['step_ms'], base.get('step_ms'))):>8}")
  galore = next((r for r in rows if r["variant"] == "galore" and "error" not in r), None)
  if galore and base:
    x = galore["optimizer_bytes"] / base["optimizer_bytes"]
    lines.append(f"GaLore optimizer state: {x:.3f}x AdamW's (target <= {GALORE_TARGET}); "
                 f"whole-step peak: {ratio(children.ratio(galore['peak_bytes'], base['peak_bytes']))}x")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b", help="configs/<name>[:variant]")
  p.add_argument("--batch", type=int, default=8, help="rows per step (llama_1b's 8)")
  p.add_argument("--seq", type=int, default=2048, help="tokens per row; 0 = the config's")
  p.add_argument("--remat", default="", help="override the model's remat_policy")
  p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
  p.add_argument("--only", default="", help="comma-separated variants (default: all)")
  p.add_argument("--child_timeout_s", type=float, default=600)
  p.add_argument("--mem_fraction", type=float, default=0.92,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION of the children (unless set)")
  p.add_argument("--out", default="", help="write the rows and the report (JSON) here")
  p.add_argument("--variant", default="", help=argparse.SUPPRESS)  # Set by the driver.
  args = p.parse_args()
  if args.variant:
    child(args)
    return
  names = [n for n in RECIPES if not args.only or n in args.only.split(",")]
  children.run_all(__file__, names, args, report)

if __name__ == "__main__":
  main()
