"""One context-parallel attention block, forward and backward, per block kernel.

  python benchmarks/cp_block.py --out=/tmp/cp_block.json             # GPU
  python benchmarks/cp_block.py --seq=128                            # CPU smoke (xla only)

Issue 14: a ring step of ``qtrain.parallel.context_parallel`` attends the
local queries to one K/V chunk (``blockwise.chunk_attention``) and, in the
backward, differentiates that block given the final lse and output
(``chunk_attention_bwd``). The ``xla`` block kernel materialises
[B, K, G, T, S] float32 logits; the ``cudnn`` one is a fused flash kernel.
This times one block's forward + backward, jitted together, at llama_1b's
head shape (N = 32 query heads, K = 8 kv heads, H = 64, bf16, batch 1) for
T = S in ``--seq``, for each block mask ``--masks``:

* ``causal``: the diagonal block of a ring (local queries against their own
  chunk, zig-zag order): cuDNN's causal mask.
* ``full``: queries all later than the keys: an off-diagonal block, all
  visible (cuDNN without mask).
* ``packed``: the diagonal block of rows packed with documents of
  ``--doc-len`` tokens: cuDNN with the [B, 1, T, S] bias.

Per row: ms per forward + backward, the compiled program's temporary bytes
(``memory_analysis().temp_size_in_bytes``), and both against ``xla`` in the
same process; a row that fails (out of memory at compile or run) reports its
error and the others go on. The cudnn kernel needs a GPU: off-GPU its rows
are skipped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from benchmarks.train_step import time_steps
from qtrain.parallel.blockwise import chunk_attention, chunk_attention_bwd, row_delta
from qtrain.parallel.zigzag import zigzag_order


def block_inputs(mask: str, B: int, T: int, doc_len: int):
  """(pos_q, seg_q, pos_k, seg_k) [B, T] of one block with ``mask``."""
  ones = np.ones((B, T), np.int32)
  if mask == "causal":  # Device 0's chunks 0 and 2n-1 of a 2-device ring.
    pos = np.broadcast_to(np.arange(2 * T, dtype=np.int32)[zigzag_order(2 * T, 2)][:T], (B, T))
    return pos, ones, pos, ones
  if mask == "full":
    ar = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return ar + T, ones, ar, ones
  if mask == "packed":
    idx = np.arange(T, dtype=np.int32)
    pos, seg = np.broadcast_to(idx % doc_len, (B, T)), np.broadcast_to(idx // doc_len, (B, T))
    return pos, seg, pos, seg
  raise ValueError(f"--masks: unknown mask {mask!r}; use causal, full or packed")


def block_step(kernel: str, scale: float):
  """Forward and backward of one block, as a ring step runs them."""

  def step(q, k, v, do, pos_q, seg_q, pos_k, seg_k):
    out, lse = chunk_attention(q, pos_q, seg_q, k, v, pos_k, seg_k, scale=scale, kernel=kernel)
    out = out.astype(q.dtype)
    delta = row_delta(out, do)
    grads = chunk_attention_bwd(q, pos_q, seg_q, k, v, pos_k, seg_k, lse_BTN=lse,
                                delta_BTN=delta, out_BTNH=out, do_BTNH=do, scale=scale,
                                kernel=kernel)
    return out, grads

  return jax.jit(step)


def bench_row(kernel: str, mask: str, T: int, args) -> dict:
  B, N, K, H = args.batch, args.heads, args.kv_heads, args.head_dim
  dtype = jnp.dtype(args.dtype)
  ks = jax.random.split(jax.random.key(0), 4)
  q, do = (jax.random.normal(r, (B, T, N, H), dtype) for r in (ks[0], ks[3]))
  k, v = (jax.random.normal(r, (B, T, K, H), dtype) for r in (ks[1], ks[2]))
  tokens = [jnp.asarray(x) for x in block_inputs(mask, B, T, args.doc_len)]
  row = dict(kernel=kernel, mask=mask, seq=T)
  try:
    compiled = block_step(kernel, H ** -0.5).lower(q, k, v, do, *tokens).compile()
    row["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    run = lambda: jax.block_until_ready(compiled(q, k, v, do, *tokens))
    row["ms"] = 1e3 * time_steps(run, args.steps, warmup=2)
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", default="4096,8192,16384", help="block lengths T = S")
  p.add_argument("--masks", default="causal,full,packed")
  p.add_argument("--kernels", default="xla,cudnn")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--doc-len", type=int, default=1024, help="packed mask: tokens per document")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  kernels = args.kernels.split(",")
  if jax.default_backend() != "gpu" and "cudnn" in kernels:
    print(f"# backend {jax.default_backend()}: the cudnn kernel needs a GPU; its rows skipped")
    kernels = [k for k in kernels if k != "cudnn"]
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, B={args.batch} "
        f"N={args.heads} K={args.kv_heads} H={args.head_dim} {args.dtype}")
  print(f"{'mask':>7} {'seq':>6} {'kernel':>6} {'ms':>9} {'temp GiB':>9} {'ms/xla':>7} "
        f"{'temp/xla':>8}")
  rows = []
  for mask in args.masks.split(","):
    for T in (int(s) for s in args.seq.split(",")):
      base = None
      for kernel in kernels:
        row = bench_row(kernel, mask, T, args)
        if kernel == "xla":
          base = row
        if base is not None and "ms" in row and "ms" in base:
          row["ms_vs_xla"] = row["ms"] / base["ms"]
          row["temp_vs_xla"] = row["temp_bytes"] / max(base["temp_bytes"], 1)
        rows.append(row)
        if "error" in row:
          print(f"{mask:>7} {T:>6} {kernel:>6}  {row['error']}")
        else:
          ratio = lambda key: f"{row[key]:.3f}" if key in row else "-"
          print(f"{mask:>7} {T:>6} {kernel:>6} {row['ms']:>9.2f} "
                f"{row['temp_bytes'] / 2 ** 30:>9.3f} {ratio('ms_vs_xla'):>7} "
                f"{ratio('temp_vs_xla'):>8}", flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, args=vars(args), rows=rows),
        indent=1))
  return rows


if __name__ == "__main__":
  main()
