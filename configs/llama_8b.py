"""Llama-3-8B shape: 32 layers, d 4096, ffn 14336, 32 heads, 8 kv heads
(head 128), vocab 128256, RoPE theta 500000, untied embeddings: 8,030,261,248
params. Float32 master params with AdamW take 16 B/param (128 GB): more than
one GPU holds, so the default mesh is FSDP over every device.

  # One host, 2 GPUs (one 8192-token row per GPU):
  python -m qtrain.train --config=configs/llama_8b.py --workdir=runs/8b \\
      --config.data.global_batch_size=2 --config.data.eval_batch_size=2
  # SLURM, one task per host (start-up reads the SLURM variables), 8 GPUs each:
  srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \\
      python -m qtrain.train --config=configs/llama_8b.py --workdir=/shared/runs/8b \\
      --config.data.global_batch_size=32 --config.data.eval_batch_size=32
  # Throughput and memory on 2 GPUs (and why one GPU is not enough):
  python benchmarks/scaling.py
  # Laptop / tests: 8 CPU devices, FSDP over all of them.
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m qtrain.train --config=configs/llama_8b.py:smoke --workdir=/tmp/smoke8b
"""

from qtrain.config import base_config
from qtrain.config.variants import apply_variants, split_variants


def get_config(arg: str = ""):
  c = base_config()
  # rope_scaling stays off (factor 1): the base 8B is trained at 8192 tokens;
  # Llama-3.1's scaling stretches it to 128k afterwards.
  c.model.update(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 head_dim=128, d_ff=14336, max_seq_len=8192, rope_theta=500000.0,
                 tie_embeddings=False, param_dtype="float32", dtype="bfloat16",
                 # Keeps the weight matmuls' outputs (~0.7 GB per layer for one
                 # 8192-token row, 22 GB for 32 layers) and recomputes the rest:
                 # with FSDP's 64 GB of state per H200 on 2 GPUs (16 GB on 8) it
                 # fits; `full` keeps only the residual stream (2 GB) at ~1/3
                 # more compute, for longer rows or smaller GPUs.
                 remat_policy="dots_no_batch", fused_qkv=True, fused_mlp=True)
  # FSDP over every device (-1): params, grads and AdamW state are split, so
  # the 16 B/param state costs 128 GB / devices, and each scanned layer's
  # weights are gathered only while it runs (the all-gather overlaps the
  # previous layer's compute on NVLink). Tensor parallelism pays collectives
  # on the critical path of every layer; it earns its keep only past the
  # batch FSDP can split (one row per device), i.e. beyond one host here.
  c.mesh.update(data=1, fsdp=-1, pipeline=1, sequence=1, tensor=1)
  # One 8192-token row per device on 8 devices; set the batch to a multiple of
  # the device count for other machines (see the commands above).
  c.data.update(seq_len=8192, global_batch_size=8, eval_batch_size=8)
  c.optim.update(lr=3e-4, warmup_steps=2000, weight_decay=0.1)  # Llama-3's peak lr.
  c.train.update(steps=100_000, log_every=10, eval_every=2000, checkpoint_every=1000)
  variants = split_variants(arg)
  if "smoke" in variants:  # Same GQA ratio (4:1), laptop size; d_model splits over fsdp=8.
    c.model.update(vocab_size=8192, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2,
                   head_dim=16, d_ff=448, max_seq_len=128, dtype="float32")
    c.data.update(seq_len=64, global_batch_size=8, eval_batch_size=8, eval_batches=1)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4, sample_tokens=4)
  apply_variants(c, [v for v in variants if v != "smoke"], "configs/llama_8b.py")
  return c
