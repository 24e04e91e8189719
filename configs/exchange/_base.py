"""Compressed data-parallel gradients (issue 13): the base of the configs in
this folder, which differ only in ``config.exchange``.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m qtrain.sweep --configs='configs/exchange/*.py' --workdir=runs/exchange
  python -m qtrain.train --config=configs/exchange/dgc_999.py:smoke --workdir=/tmp/dgc
  # data x fsdp: each device compresses its fsdp shard of the gradient over data.
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m qtrain.train \\
      --config=configs/exchange/powersgd_r4.py --config.mesh.data=4 --config.mesh.fsdp=2 \\
      --workdir=runs/exchange_fsdp/powersgd_r4

The `make train` model (configs/default.py: d 192, 4 layers, data/kjv, 300
steps) on ``data=8`` (8 fake CPU devices): every run sees the same batches, so
held-out perplexity after equal steps compares the exchanges alone. DGC warms
its sparsity up over the first 60 steps (75% -> 99.6%, then the target), as
Lin et al. do over the first epochs; momentum stays in AdamW (dgc.momentum 0).
The bytes per step of each run are in its metrics.jsonl (exchange/bytes_sent,
exchange/bytes_dense, exchange/ratio; with fsdp > 1 also exchange/bytes_fsdp).
On data x fsdp, DGC's top-k is per fsdp shard (k scaled by the shard's share),
so its numbers are not those of data=8; PowerSGD's and dense's are, up to
float32 rounding (tests/test_exchange_fsdp.py).
"""

from qtrain.config.variants import config_module


def get_config(arg: str = "", *, method: str, sparsity: float = 0.999, rank: int = 4):
  c = config_module("default").get_config(arg)
  c.mesh.update(data=8)
  c.train.step = "compressed"
  c.exchange.update(method=method)
  c.exchange.dgc.update(sparsity=sparsity, warmup_steps=60)
  c.exchange.powersgd.update(rank=rank)
  return c
