"""TinyLlama-1.1B shape: 22 layers, d 2048, ffn 5632, 32 heads, 4 kv heads,
vocab 32000, untied embeddings.

  python -m qtrain.train --config=configs/llama_1b.py --workdir=runs/1b
  python -m qtrain.train --config=configs/llama_1b.py:smoke --workdir=/tmp/smoke
"""

from qtrain.config import base_config
from qtrain.config.variants import apply_variants, split_variants


def get_config(arg: str = ""):
  c = base_config()
  # scan_unroll=0: the blocks unrolled (params still [L, ...]): the loop copied every
  # saved activation into an [L, ...] stack (llama_1b, H100: +7.3% tok/s, +4.9 GiB).
  # fused_qkv/fused_mlp: q/k/v and gate/up one GEMM each, same params (llama_1b,
  # H100: +1.7% tok/s); they fall back to separate matmuls under quantizers.
  c.model.update(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                 head_dim=64, d_ff=5632, max_seq_len=2048, rope_theta=10000.0,
                 tie_embeddings=False, param_dtype="float32", dtype="bfloat16",
                 remat_policy="dots_no_batch_attn", scan_unroll=0,
                 fused_qkv=True, fused_mlp=True)
  c.data.update(seq_len=2048, global_batch_size=8, eval_batch_size=8)
  c.optim.update(lr=4e-4, warmup_steps=2000, weight_decay=0.1)
  c.train.update(steps=100_000, log_every=50, eval_every=2000, checkpoint_every=2000)
  variants = split_variants(arg)
  if "smoke" in variants:  # Same GQA ratio (8:1), laptop size.
    c.model.update(vocab_size=8192, d_model=128, n_layers=2, n_heads=8, n_kv_heads=1,
                   head_dim=16, d_ff=352, dtype="float32")
    c.data.update(seq_len=64, global_batch_size=8, eval_batch_size=8, eval_batches=1)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4, sample_tokens=4)
  apply_variants(c, [v for v in variants if v != "smoke"], "configs/llama_1b.py")
  return c
