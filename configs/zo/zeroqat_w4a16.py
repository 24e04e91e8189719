"""ZeroQAT W4A16: int4 per-channel weights with LSQ steps, the weights frozen,
the steps tuned zeroth-order (configs/zo/_zeroqat.py).

  python -m qtrain.finetune --config=configs/zo/zeroqat_w4a16.py --init_from=runs/default \
      --workdir=runs/zo/zeroqat_w4a16
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("zo._zeroqat").get_config(arg, "w4a16")
