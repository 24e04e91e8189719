"""DGC at 99% sparsity (configs/exchange/_base.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m qtrain.train --config=configs/exchange/dgc_99.py --workdir=runs/exchange/dgc_99
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("exchange._base").get_config(arg, method="dgc", sparsity=0.99)
