"""ZO-SGD-Sign (ZO-Bench): the step lr * sign(g_hat z) per element.

  python -m qtrain.finetune --config=configs/zo/zo_sgd_sign.py --init_from=runs/default \
      --workdir=runs/zo/zo_sgd_sign
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  c = config_module("zo._base").get_config(arg, rule="sgd", lr=1e-5, eps=1e-3)
  c.optim.sgd.sign = True
  return c
