"""ZO-SGD-Cons (ZO-Bench): MeZO's step kept only where it lowers the loss (of
p, p + u, p - u the lowest; three more forwards a step).

  python -m qtrain.finetune --config=configs/zo/zo_sgd_cons.py --init_from=runs/default \
      --workdir=runs/zo/zo_sgd_cons
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("zo._base").get_config(arg, rule="sgd", lr=1e-4, eps=1e-3, cpu_lr=3e-3,
                                              conservative=True)
