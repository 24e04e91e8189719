"""GPU check of the ``dots_no_batch_attn`` remat policy against ``dots_no_batch``.

  python benchmarks/attention_remat_check.py --out=/tmp/attention_remat.json
  python benchmarks/attention_remat_check.py --model=llama_1b:smoke --seq=64 --impl=xla  # CPU

Issue 17: under ``dots_no_batch`` the backward runs cuDNN's attention forward
a second time (its output and softmax statistics are not saved), 8.6 ms of a
252 ms llama_1b step on an H100. ``dots_no_batch_attn`` keeps both
(qtrain/layers/attention.py). On a llama_1b-shaped model cut to
``--layers`` blocks (default 2; batch 8 x 2048, bf16 compute, cuDNN), for
both policies this reports:

* the cuDNN forward / backward custom calls (``__cudnn$fmha...``) in the
  optimized HLO and in the gradient's jaxpr (expected: half the forwards,
  the same backwards);
* loss and gradients of the new policy against the default: relative
  L2 norm of the difference, per param leaf, the worst one. The default is
  also run twice, as a noise floor: cuDNN's flash backward may accumulate
  dQ in a nondeterministic order;
* ms per value-and-grad step and the compiled program's temporary memory.

``ok`` in the JSON: cuDNN ran and the forward count halves, the backward count stays,
the loss agrees to 1e-3 relative (the same forward ops; expected equal) and
every gradient leaf to 1e-2 relative in norm (the backward reads the
forward's own output and statistics instead of recomputed ones, which are
equal unless XLA recomputes q/k/v differently: at most bf16 roundings,
2^-8 per element, far below 1e-2 in norm). Runs in well under 90 s on one
H100 (two compiles of a 2-block model).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp

from benchmarks.train_step import load_config, synthetic_batch, time_steps
from qtrain.analysis import jaxprs
from qtrain.layers import ModelConfig, Transformer
from qtrain.train.loss import cross_entropy

_CUDNN_CALL = re.compile(r'custom_call_target="(__cudnn\$fmha\w*)"')
POLICIES = ("dots_no_batch", "dots_no_batch_attn")


def loss_fn(cfg: ModelConfig, batch: dict):
  def loss(params):
    logits_BTV = Transformer(cfg).apply({"params": params}, batch["inputs"],
                                        batch.get("positions"), batch.get("segment_ids"))
    return cross_entropy(logits_BTV, batch["targets"], jnp.ones_like(batch["targets"]))[0]
  return loss


def run_policy(cfg, params, batch, steps: int) -> dict:
  loss = loss_fn(cfg, batch)
  grad_fn = jax.jit(jax.value_and_grad(loss))
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  t0 = time.perf_counter()
  compiled = grad_fn.lower(params).compile()
  compile_s = time.perf_counter() - t0
  calls = collections.Counter(_CUDNN_CALL.findall(compiled.as_text()))
  first = compiled(params)
  second = compiled(params)  # Same program again: the noise floor.
  ms = time_steps(lambda: jax.block_until_ready(compiled(params)), steps, warmup=0) * 1e3
  return {
      "hlo_cudnn_calls": dict(calls),
      "hlo_fwd": sum(v for k, v in calls.items() if "Backward" not in k),
      "hlo_bwd": sum(v for k, v in calls.items() if "Backward" in k),
      "jaxpr_fwd": jaxprs.count(jaxpr, "dot_product_attention_fwd_wrapper"),
      "jaxpr_bwd": jaxprs.count(jaxpr, "dot_product_attention_bwd_wrapper"),
      "ms_per_step": ms,
      "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
      "compile_s": compile_s,
      "_results": (first, second),
  }


def rel_diff(a, b) -> dict:
  """Worst per-leaf relative L2 norm of the gradient difference, and the loss's."""
  (la, ga), (lb, gb) = a, b
  rels = [float(jnp.linalg.norm((x - y).astype(jnp.float32))
                / max(float(jnp.linalg.norm(y.astype(jnp.float32))), 1e-30))
          for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb))]
  return {"loss_rel": abs(float(la) - float(lb)) / abs(float(lb)), "grad_rel_max": max(rels),
          "grad_max_abs": max(float(jnp.max(jnp.abs(x - y)))
                              for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--packed", type=int, default=0, help="documents per row; 0 = unpacked")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--impl", default="cudnn",
                 help="config.model.attention_impl (xla: a CPU smoke run of this script)")
  p.add_argument("--out", default=None, help="write the JSON report here")
  args = p.parse_args()
  m = load_config(args.model).model
  cfg = dataclasses.replace(ModelConfig.from_dict(m.to_dict()), n_layers=args.layers,
                            attention_impl=args.impl)
  batch = {k: jnp.asarray(v) for k, v in
           synthetic_batch(args.batch, args.seq, cfg.vocab_size, args.packed).items()}
  init = jax.jit(Transformer(cfg).init)
  params = nn.meta.unbox(init(jax.random.key(0), batch["inputs"][:1]))["params"]
  rows = {pol: run_policy(dataclasses.replace(cfg, remat_policy=pol), params, batch, args.steps)
          for pol in POLICIES}
  old, new = (rows[pol].pop("_results") for pol in POLICIES)
  noise, diff = rel_diff(old[1], old[0]), rel_diff(new[0], old[0])
  o, n = rows[POLICIES[0]], rows[POLICIES[1]]
  report = {
      "model": args.model, "layers": args.layers, "batch": args.batch, "seq": args.seq,
      "packed": args.packed, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "policies": rows, "default_vs_itself": noise, "new_vs_default": diff,
      "ms_saved_per_layer": (o["ms_per_step"] - n["ms_per_step"]) / args.layers,
      "ok": bool(o["hlo_fwd"] > 0 and n["hlo_fwd"] * 2 == o["hlo_fwd"]
                 and n["hlo_bwd"] == o["hlo_bwd"]
                 and n["jaxpr_fwd"] * 2 == o["jaxpr_fwd"]
                 and diff["loss_rel"] <= 1e-3 and diff["grad_rel_max"] <= 1e-2),
  }
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
  main()
