"""First-order AdamW fine-tuning, the reference of configs/zo/ (_base.py): the
same forward passes (3 per step) as the zeroth-order runs.

  python -m qtrain.finetune --config=configs/zo/adamw.py --init_from=runs/default \
      --workdir=runs/zo/adamw
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("zo._base").get_config(arg, rule="first_order", lr=3e-4)
