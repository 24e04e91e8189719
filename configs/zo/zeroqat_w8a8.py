"""ZeroQAT W8A8: int8 per-channel weights and per-tensor activations, both with
LSQ steps (fake quant), the weights frozen, the steps tuned zeroth-order
(configs/zo/_zeroqat.py).

  python -m qtrain.finetune --config=configs/zo/zeroqat_w8a8.py --init_from=runs/default \
      --workdir=runs/zo/zeroqat_w8a8
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("zo._zeroqat").get_config(arg, "w8a8")
