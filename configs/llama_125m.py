"""A 125M-class Llama: 12 layers x d 768 (ffn 2048, 12 heads), vocab 32000.

  python -m qtrain.train --config=configs/llama_125m.py --workdir=runs/125m
  python -m qtrain.train --config=configs/llama_125m.py:smoke --workdir=/tmp/smoke
"""

from qtrain.config import base_config
from qtrain.config.variants import apply_variants, split_variants


def get_config(arg: str = ""):
  c = base_config()
  c.model.update(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 head_dim=64, d_ff=2048, max_seq_len=2048, param_dtype="float32",
                 dtype="bfloat16", remat_policy="dots_no_batch")
  c.data.update(seq_len=2048, global_batch_size=16, eval_batch_size=16)
  c.optim.update(lr=6e-4, warmup_steps=2000, weight_decay=0.1)
  c.train.update(steps=100_000, log_every=50, eval_every=2000, checkpoint_every=2000)
  variants = split_variants(arg)
  if "smoke" in variants:  # Same architecture family, laptop size.
    c.model.update(vocab_size=8192, d_model=96, n_layers=2, n_heads=6, n_kv_heads=6,
                   head_dim=16, d_ff=256, dtype="float32")
    c.data.update(seq_len=64, global_batch_size=8, eval_batch_size=8, eval_batches=1)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4, sample_tokens=4)
  apply_variants(c, [v for v in variants if v != "smoke"], "configs/llama_125m.py")
  return c
