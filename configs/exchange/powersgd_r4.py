"""PowerSGD rank 4 (configs/exchange/_base.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m qtrain.train --config=configs/exchange/powersgd_r4.py --workdir=runs/exchange/powersgd_r4
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("exchange._base").get_config(arg, method="powersgd", rank=4)
