"""MeZO (Malladi et al. 2023): SPSA with one direction, SGD with weight decay.

  python -m qtrain.finetune --config=configs/zo/mezo.py --init_from=runs/default \
      --workdir=runs/zo/mezo
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("zo._base").get_config(arg, rule="sgd", lr=1e-4, eps=1e-3,
                                              cpu_lr=3e-3)
