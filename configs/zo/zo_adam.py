"""ZO-Adam (ZO-Bench): AdamW fed with the SPSA estimate g_hat z (two moments of state).

  python -m qtrain.finetune --config=configs/zo/zo_adam.py --init_from=runs/default \
      --workdir=runs/zo/zo_adam
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("zo._base").get_config(arg, rule="adamw", lr=1e-4, eps=1e-3,
                                              cpu_lr=3e-3)
