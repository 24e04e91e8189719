"""Block-wise ZO (ZO-Bench): MeZO perturbing one decoder layer per step, round
robin, then the embedding / final norm / head as one more block.

  python -m qtrain.finetune --config=configs/zo/blockwise.py --init_from=runs/default \
      --workdir=runs/zo/blockwise
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("zo._base").get_config(arg, rule="sgd", lr=1e-4, eps=1e-3, cpu_lr=3e-3,
                                              blockwise=True)
