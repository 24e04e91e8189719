"""A 350M-class Llama: 24 layers x d 1024 (ffn 2816, 16 heads), vocab 32000.

  python -m qtrain.train --config=configs/llama_350m.py:corpus --workdir=runs/350m_corpus
  python -m qtrain.train --config=configs/llama_350m.py:smoke --workdir=/tmp/smoke

``corpus``: data/debian_en (``make corpus``), 64 x 1024 tokens a step.
"""

from qtrain.config import base_config
from qtrain.config.variants import apply_variants, config_module, split_variants

llama_125m = config_module("llama_125m")


def get_config(arg: str = ""):
  c = base_config()
  # scan_unroll=0: the blocks unrolled (params still [L, ...]): the loop copied every
  # saved activation into an [L, ...] stack (llama_1b, H100: +7.3% tok/s, +4.9 GiB).
  # fused_qkv/fused_mlp: q/k/v and gate/up one GEMM each, same params (llama_1b,
  # H100: +1.7% tok/s); they fall back to separate matmuls under quantizers.
  c.model.update(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                 head_dim=64, d_ff=2816, max_seq_len=2048, param_dtype="float32",
                 dtype="bfloat16", remat_policy="dots_no_batch_attn", scan_unroll=0,
                 fused_qkv=True, fused_mlp=True)
  c.data.update(seq_len=2048, global_batch_size=16, eval_batch_size=16)
  c.optim.update(lr=3e-4, warmup_steps=2000, weight_decay=0.1)
  c.train.update(steps=100_000, log_every=50, eval_every=2000, checkpoint_every=2000)
  variants = split_variants(arg)
  if "corpus" in variants:
    llama_125m.corpus(c)
    c.optim.update(lr=1e-3)
  if "smoke" in variants:
    c.model.update(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                   head_dim=16, d_ff=176, dtype="float32")
    c.data.update(dir="data/kjv", seq_len=64, global_batch_size=8, eval_batch_size=8,
                  eval_batches=1)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4, sample_tokens=4)
  apply_variants(c, [v for v in variants if v not in llama_125m.SIZES],
                 "configs/llama_350m.py")
  return c
