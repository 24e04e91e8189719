"""Resident memory of a 4-bit PTQ model: bf16 kernels, 4-bit codes stored one
per byte (int8, PTQ exports up to format 2), and packed two per byte (the
``int4_packed`` weight form, format 3), from the actual arrays.

  python benchmarks/int4_memory.py                       # GPU: llama_1b, + decode-step peaks
  python benchmarks/int4_memory.py --smoke               # CPU: llama_1b's smoke shape

For ``--model`` (a file in configs/, default llama_1b) with bf16 params and
compute, RTN-quantizes the weights the ``--recipe`` quantizes (default
w4a16: int4 symmetric per channel; ``w4a16+g128`` per group) on the host CPU,
then reports for each form ``sum(x.nbytes)`` over the params (all, and the
quantized matmuls' share alone) and the ratio to bf16:

* ``bf16``: the PTQ weights dequantized to bf16 kernels (what generation
  held before packing: ``load_quantized`` dequantizes int8-stored codes, so
  its step runs on these);
* ``int8_codes``: int8 codes + float32 scales (the format-2 export's arrays;
  not a runnable form: bytes only);
* ``packed``: int8 [in/2, out] codes + float32 scales (``load_packed``).

For the two runnable forms it then runs one greedy decode step (prefill of
``--prompt_len`` tokens, then one token, KV cache of ``--cache_len`` slots,
batch 1: ``qtrain.train.sample``'s jitted step) and reports XLA's compiled
memory analysis of the step (arguments + temporaries; every backend) and,
where the device reports it, ``memory_stats()["peak_bytes_in_use"]``. Peaks
are process-wide maxima, so the packed form runs first and the bf16 one
second (its params freed in between): the bf16 peak then holds unless it is
below the packed one, which the output says. Only the measured variant's
params are ever put on the device (quantization runs on the host).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from qtrain.layers import Transformer  # pylint: disable=g-import-not-at-top
from qtrain.layers.kv_cache import init_cache  # pylint: disable=g-import-not-at-top
from qtrain.layers.param_tree import get as get_param  # pylint: disable=g-import-not-at-top
from qtrain.quant import validate_quant  # pylint: disable=g-import-not-at-top
from qtrain.quantize import (dequantized_params, quantize_params,  # pylint: disable=g-import-not-at-top
                             weight_sites)
from qtrain.quantize import evaluate as ev  # pylint: disable=g-import-not-at-top
from qtrain.quantize.export import entries, packed_params  # pylint: disable=g-import-not-at-top
from qtrain.layers.param_tree import without  # pylint: disable=g-import-not-at-top
from qtrain.train.build import model_config  # pylint: disable=g-import-not-at-top
# The jitted step generate() runs, lowered here for its compiled memory analysis.
from qtrain.train.sample import _next_token  # pylint: disable=g-import-not-at-top,protected-access


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def host_params(cfg):
  """(model config in bf16, params, sites, {path: QuantizedWeight}) on the CPU."""
  cfg.model.update(param_dtype="bfloat16", dtype="bfloat16")
  mcfg = model_config(cfg)
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.jit(Transformer(mcfg).init)(jax.random.key(0), tokens)["params"])
    return mcfg, params


def forms(mcfg, params, recipe: str):
  """{name: (params, model config or None)} for bf16, int8_codes and packed."""
  sites, _ = weight_sites(mcfg, validate_quant(ev.load_recipe(recipe), None))
  with jax.default_device(jax.devices("cpu")[0]):
    qw = quantize_params("rtn", params, sites)
    bf16 = dequantized_params(params, qw, sites)
    rest = without(params, [s.param for s in sites])
    int8 = {"float": rest, "codes": {s.path: (qw[s.path].qt.q, qw[s.path].qt.scale)
                                      for s in sites}}
    packed, rules = packed_params(rest, qw, entries(sites, params))
  kernels = {"bf16": [get_param(bf16, s.param) for s in sites],
             "int8_codes": list(int8["codes"].values())}
  kernels["packed"] = [(get_param(packed, (*s.param[:-1], "codes")),
                        get_param(packed, (*s.param[:-1], "scales"))) for s in sites]
  cfg_packed = dataclasses.replace(mcfg, weight_forms=rules + mcfg.weight_forms)
  return ({"bf16": (bf16, mcfg), "int8_codes": (int8, None), "packed": (packed, cfg_packed)},
          kernels, len(sites))


def decode_step(mcfg, params_host, prompt_len: int, cache_len: int) -> dict:
  """Prefill + one decode step on the default device; memory of the step."""
  dev = jax.devices()[0]
  params = jax.device_put(params_host, dev)
  model = Transformer(mcfg)
  cache = init_cache(model, 1, cache_len)
  tokens = jnp.ones((1, prompt_len), jnp.int32)
  pos = jnp.arange(prompt_len, dtype=jnp.int32)[None]
  rng, temp = jax.random.key(0), jnp.float32(0.0)
  tok, cache = _next_token(model, params, cache, tokens, pos, rng, temp)
  one, at = tok[:, None].astype(jnp.int32), jnp.full((1, 1), prompt_len, jnp.int32)
  compiled = _next_token.lower(model, params, cache, one, at, rng, temp).compile()
  tok, cache = _next_token(model, params, cache, one, at, rng, temp)
  jax.block_until_ready((tok, cache))
  out = {"params_on_device": nbytes(params), "cache_bytes": nbytes(cache)}
  ma = compiled.memory_analysis()
  if ma is not None:
    out["step_args_bytes"] = int(ma.argument_size_in_bytes)
    out["step_temp_bytes"] = int(ma.temp_size_in_bytes)
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  del params, cache
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="llama_1b", help="configs/<model>.py")
  p.add_argument("--recipe", default="w4a16", help="quant preset (configs/quant), e.g. w4a16+g128")
  p.add_argument("--smoke", action="store_true", help="the config's smoke variant (CPU)")
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--cache_len", type=int, default=256)
  p.add_argument("--out", default=None, help="append the JSON row here")
  args = p.parse_args()
  cfg = importlib.import_module(f"configs.{args.model}").get_config("smoke" if args.smoke else "")
  mcfg, params = host_params(cfg)
  variants, kernels, n_sites = forms(mcfg, params, args.recipe)
  del params
  row = {"model": args.model + (":smoke" if args.smoke else ""), "recipe": args.recipe,
         "quantized_matmuls": n_sites, "device": str(jax.devices()[0].device_kind)}
  for name, (tree, _) in variants.items():
    row[f"{name}_param_bytes"] = nbytes(tree)
    row[f"{name}_matmul_bytes"] = nbytes(kernels[name])
  for name in ("packed", "bf16"):  # Ascending expected peak: see the module doc.
    tree, mc = variants[name]
    for k, v in decode_step(mc, tree, args.prompt_len, args.cache_len).items():
      row[f"{name}_{k}"] = v
  print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
  gib = lambda b: f"{b / 2**20:10.2f} MiB"
  print(f"\n{row['model']} {args.recipe}: {n_sites} quantized matmuls, device {row['device']}")
  print(f"{'form':11s} {'all params':>14s} {'ratio':>6s} {'matmul weights':>14s} {'ratio':>6s}")
  for name in variants:
    a, m = row[f"{name}_param_bytes"], row[f"{name}_matmul_bytes"]
    print(f"{name:11s} {gib(a)} {a / row['bf16_param_bytes']:6.3f} {gib(m)} "
          f"{m / row['bf16_matmul_bytes']:6.3f}")
  print("decode step (prefill then one token):")
  for name in ("bf16", "packed"):
    cells = [f"{k} {gib(row[f'{name}_{k}'])}" for k in
             ("params_on_device", "step_args_bytes", "step_temp_bytes", "peak_bytes_in_use")
             if f"{name}_{k}" in row]
    print(f"  {name:7s} " + "; ".join(cells))
  if "packed_peak_bytes_in_use" in row:
    ratio = row["packed_peak_bytes_in_use"] / row["bf16_peak_bytes_in_use"]
    note = (" (bf16 ran second and did not raise the peak: its own peak is at most this)"
            if row["bf16_peak_bytes_in_use"] == row["packed_peak_bytes_in_use"] else "")
    print(f"  peak packed / bf16: {ratio:.3f}{note}")


if __name__ == "__main__":
  main()
