"""The CPU model `make train` trains on the King James Bible in minutes.

  python -m qtrain.train --config=configs/default.py --workdir=runs/default
  python -m qtrain.train --config=configs/default.py:smoke --workdir=/tmp/smoke
  python -m qtrain.train --config=configs/default.py:w4a4kv4 --workdir=runs/w4a4kv4  # QAT
"""

from qtrain.config import base_config
from qtrain.config.variants import apply_variants, split_variants


def get_config(arg: str = ""):
  c = base_config()
  c.model.update(vocab_size=8192, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 head_dim=48, d_ff=512, max_seq_len=512)
  c.data.update(seq_len=128, global_batch_size=16, eval_batches=8)
  c.train.update(steps=300, log_every=10, eval_every=100, checkpoint_every=100)
  variants = split_variants(arg)
  if "smoke" in variants:  # Seconds on a laptop CPU; used by the tests.
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=160)
    c.data.update(seq_len=64, global_batch_size=8, eval_batch_size=8, eval_batches=2)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=12, log_every=1, eval_every=6, checkpoint_every=4, sample_tokens=8)
  apply_variants(c, [v for v in variants if v != "smoke"], "configs/default.py")
  return c
