"""ZO-SGD-MMT (ZO-Bench): MeZO's estimate with momentum 0.9 (one param-sized velocity).

  python -m qtrain.finetune --config=configs/zo/zo_sgd_momentum.py --init_from=runs/default \
      --workdir=runs/zo/zo_sgd_momentum
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  c = config_module("zo._base").get_config(arg, rule="sgd", lr=1e-5, eps=1e-3,
                                              cpu_lr=3e-4)
  c.optim.sgd.momentum = 0.9
  return c
