"""The reference, a plain all-reduce (pmean) written out by hand (configs/exchange/_base.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m qtrain.train --config=configs/exchange/dense.py --workdir=runs/exchange/dense
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("exchange._base").get_config(arg, method="dense")
