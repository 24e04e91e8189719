"""Training-step throughput, MFU and peak memory of qtrain vs the HF peer.

  python benchmarks/train_step.py --model=llama_1b --batch=8 --seq=2048 [--peer]

Times qtrain's jitted train step (the one the trainer runs: AdamW, clipping,
float32 master params, bf16 compute, cuDNN attention) on synthetic batches, and
in the same process re-times the peer a user would otherwise pick: Hugging Face
transformers' LlamaForCausalLM (bf16, SDPA attention, torch.compile, fused
AdamW) on the same shape. MFU counts model FLOPs per token 6·N + 6·L·S·D (N:
matmul params of the layers and the LM head, not the input embedding) over the
device's dense bf16 peak (989 TFLOP/s on an H100).

Batches are synthetic; ``--packed=K`` splits every row into K documents
(segment ids), which exercises the packed cuDNN path the trainer uses.

``--loss_chunks=4,8`` also times the chunked LM head + cross-entropy
(``config.model.loss_chunks``, qtrain/train/loss.py) at each N, after the
config's own value (the baseline), in the same process; each row carries
``ratio_vs_baseline`` and ``temp_gib``, the compiled step's temporary memory
(per variant; ``peak_mem_gib`` is the process's peak so far).

``--variant=model.fused_qkv=True,model.fused_mlp=True`` (repeatable) also times
the config with those overrides, a row after the baseline's.

``--remat=dots_no_batch,dots_no_batch_attn`` times each remat policy in turn,
in the same process, the first one being the baseline of the ratios (issue 17:
``dots_no_batch_attn`` keeps cuDNN attention's residuals, so its forward does
not run twice; ``temp_gib`` shows what that costs in memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from qtrain.layers import ModelConfig
from qtrain.train.build import build_model
from qtrain.optim import build_optimizer
from qtrain.parallel import Layout, batch_sharding
from qtrain.train import metrics as metrics_lib
from qtrain.train.state import abstract_params, init_state, state_shardings
from qtrain.train.step import make_seed_step, make_steps


def load_config(name: str, overrides=()):
  """``configs/<name>.py``'s config; ``name`` may carry variants (``llama_1b:smoke``).
  ``overrides`` (``model.scan_unroll=0``, the benchmarks' ``--set``) are parsed as
  the trainer parses ``--config.model.scan_unroll=0`` (``qtrain.sweep.runs``):
  typed by the field, an unknown field a ConfigError naming it."""
  name, _, variant = name.partition(":")
  path = ROOT / "configs" / f"{name}.py"
  if overrides:
    from qtrain.sweep.runs import load_config as with_overrides  # pylint: disable=g-import-not-at-top
    return with_overrides(f"{path}:{variant}" if variant else str(path),
                          tuple(f"--config.{o}" for o in overrides))
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def synthetic_batch(batch: int, seq: int, vocab: int, packed: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  if packed:
    doc = seq // packed
    seg = np.minimum(np.arange(seq) // doc, packed - 1) + 1
    out["segment_ids"] = np.broadcast_to(seg, (batch, seq)).astype(np.int32)
    out["positions"] = np.broadcast_to(np.arange(seq) - (seg - 1) * doc,
                                       (batch, seq)).astype(np.int32)
  return out


def time_steps(fn, steps: int, warmup: int = 3) -> float:
  for _ in range(warmup):
    fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def trainer_step(cfg, host: dict, devices=None):
  """(layout, model, state, batch, train_step): the trainer's jitted step over
  ``devices`` (default all) with its sharded state, and the ``host`` rows
  placed with the mesh's batch sharding. Call the step inside ``with layout:``
  (its first call traces the model against the layout's rules)."""
  seq = host["inputs"].shape[1]
  model = build_model(cfg)
  layout = Layout.from_config(cfg, devices)
  with layout:
    tx = build_optimizer(cfg, abstract_params(model, seq))
    sh = state_shardings(model, tx, layout.mesh, seq)
    state = init_state(model, tx, layout.mesh, cfg.seed, seq)
    train_step, _ = make_steps(cfg, model, tx, layout.mesh, sh, batch_keys=tuple(host))
    batch = {k: jax.device_put(v, batch_sharding(layout.mesh)) for k, v in host.items()}
    # Delayed fp8 scaling: the histories of the timed steps, as a run's.
    seed = make_seed_step(cfg, model, tx, layout.mesh, sh, batch_keys=tuple(host))
    if seed is not None:
      state = seed(state, batch)
  return layout, model, state, batch, train_step


def bench_qtrain(cfg, batch: int, seq: int, packed: int, steps: int, probe=None) -> dict:
  """The trainer's compiled step on synthetic rows: time, MFU, memory.
  ``probe(jaxpr)``, if given, reads the step's jaxpr before it runs (its
  result is the row's ``probe``; e.g. ``rotation.transform_gemms``)."""
  host = synthetic_batch(batch, seq, cfg.model.vocab_size, packed)
  layout, model, state, data, train_step = trainer_step(cfg, host)
  model_cfg = model.cfg
  with layout:
    probed = probe(jax.make_jaxpr(train_step)(state, data)) if probe else None
    t0 = time.perf_counter()
    compiled = train_step.lower(state, data).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    box = [state]
    del state  # Donated by the first step.

    def step():
      box[0], m = compiled(box[0], data)
      jax.block_until_ready(m["loss"])
    step()
    compile_s = time.perf_counter() - t0
    dt = time_steps(step, steps)
    del box
  stats = jax.devices()[0].memory_stats() or {}
  tok_s = batch * seq / dt
  flops = metrics_lib.flops_per_token(model_cfg, seq)
  peak = metrics_lib.device_peak_flops() or float("nan")
  return {"impl": "qtrain", "step_s": dt, "tokens_per_s": tok_s,
          "mfu": tok_s * flops / peak, "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
          "temp_gib": temp / 2**30, "compile_s": compile_s,
          "params": metrics_lib.matmul_params(model_cfg),
          **({"probe": probed} if probe else {})}


def bench_hf(cfg, batch: int, seq: int, steps: int, grad_ckpt: bool) -> dict:
  """HF LlamaForCausalLM: bf16 weights, SDPA, torch.compile, fused AdamW."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  m = cfg.model
  hf_cfg = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
      num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim, max_position_embeddings=seq,
      rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
      attn_implementation="sdpa", torch_dtype=torch.bfloat16)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg).to("cuda", torch.bfloat16)
  if grad_ckpt:
    model.gradient_checkpointing_enable()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
  host = synthetic_batch(batch, seq, m.vocab_size, 0)
  inputs = torch.from_numpy(host["inputs"].astype(np.int64)).cuda()
  labels = torch.from_numpy(host["targets"].astype(np.int64)).cuda()

  def loss_fn(x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                             y.view(-1))
  compiled = torch.compile(loss_fn)

  def step():
    loss = compiled(inputs, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  torch.backends.cuda.matmul.allow_tf32 = True
  t0 = time.perf_counter()
  step()
  compile_s = time.perf_counter() - t0
  dt = time_steps(step, steps)
  tok_s = batch * seq / dt
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  flops = metrics_lib.flops_per_token(model_cfg, seq)
  peak = metrics_lib.peak_for_kind(torch.cuda.get_device_name()) or float("nan")
  out = {"impl": "hf", "step_s": dt, "tokens_per_s": tok_s, "mfu": tok_s * flops / peak,
         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "compile_s": compile_s,
         "grad_ckpt": grad_ckpt}
  del model, opt, compiled, inputs, labels
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  torch.cuda.empty_cache()
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--packed", type=int, default=0, help="documents per row; 0 = unpacked")
  p.add_argument("--remat", default=None,
                 help="override config.model.remat_policy; comma-separated: each timed in turn")
  p.add_argument("--max_segments", type=int, default=16,
                 help="config.model.attention_max_segments (0 = seq)")
  p.add_argument("--mu_dtype", default=None, help="override config.optim.adamw.mu_dtype")
  p.add_argument("--peer", action="store_true", help="also time HF transformers")
  p.add_argument("--peer_grad_ckpt", action="store_true")
  p.add_argument("--loss_chunks", default="",
                 help="comma-separated config.model.loss_chunks values timed after the baseline")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field, e.g. --set=model.scan_layers=False (repeatable)")
  p.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE[,...]",
                 help="also time the config with these overrides on top of --set "
                      "(repeatable; each a row after the baseline)")
  p.add_argument("--out", default=None, help="append JSON lines here")
  args = p.parse_args()
  cfg = load_config(args.model, args.set)
  policies = [r for r in (args.remat or "").split(",") if r] or [cfg.model.remat_policy]
  configs = [("", cfg)] + [(v, load_config(args.model, [*args.set, *v.split(",")]))
                           for v in args.variant]
  for _, c in configs:
    c.model.attention_max_segments = args.max_segments
    if args.mu_dtype:
      c.optim.adamw.mu_dtype = args.mu_dtype
  # The peer runs first and frees its memory, before anything initialises JAX's
  # backend (which pre-allocates 75% of the GPU).
  peer = bench_hf(cfg, args.batch, args.seq, args.steps, args.peer_grad_ckpt) if args.peer else None
  common = {"model": args.model, "batch": args.batch, "seq": args.seq,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if peer:
    print(json.dumps({**common, **peer}), flush=True)
  rows = []
  variants = [int(n) for n in args.loss_chunks.split(",") if n]
  configured_chunks = cfg.model.get("loss_chunks", 0)  # Read once: the loop sets it.
  runs = [(name, c, policy, chunks) for name, c in configs for policy in policies
          for chunks in [configured_chunks] + variants]
  for name, c, policy, chunks in runs:
    c.model.remat_policy, c.model.loss_chunks = policy, chunks
    row = {**common, "packed": args.packed, "remat": policy,
           "max_segments": args.max_segments, "mu_dtype": c.optim.adamw.mu_dtype,
           "loss_chunks": chunks, "variant": name}
    try:
      row.update(bench_qtrain(c, args.batch, args.seq, args.packed, args.steps))
    except jax.errors.JaxRuntimeError as e:  # A variant out of memory: say so, go on.
      if "RESOURCE_EXHAUSTED" not in str(e) or not rows:
        raise
      print(json.dumps({**row, "error": str(e).splitlines()[0][:300]}), flush=True)
      continue
    rows.append(row)
    rows[-1]["ratio_vs_baseline"] = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
  if peer:
    rows.insert(1, {**common, **peer})
    rows[0]["ratio_vs_peer"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
  for r in rows:
    if r["impl"] != "hf":
      print(json.dumps(r))
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(r) + "\n")
  q = rows[0]
  print(f"{args.model} b{args.batch}x{args.seq} qtrain ({q['remat']}): "
        f"{q['tokens_per_s']:,.0f} tok/s, "
        f"MFU {q['mfu']:.1%}, peak {q['peak_mem_gib']:.1f} GiB"
        + (f"; HF peer {rows[1]['tokens_per_s']:,.0f} tok/s (MFU {rows[1]['mfu']:.1%}); "
           f"ratio {q['ratio_vs_peer']:.2f}x" if args.peer else ""))
  for r in rows[1:]:
    if r["impl"] == "qtrain":
      print(f"  {r['variant'] or 'baseline'} remat={r['remat']} loss_chunks={r['loss_chunks']}: "
            f"{r['tokens_per_s']:,.0f} tok/s "
            f"({r['ratio_vs_baseline']:.3f}x), MFU {r['mfu']:.1%}, temp {r['temp_gib']:.2f} GiB "
            f"(baseline {q['temp_gib']:.2f} GiB)")


if __name__ == "__main__":
  main()
