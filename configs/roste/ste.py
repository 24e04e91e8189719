"""Quantization-aware SFT with the STE at W4A4KV4, no rotation
(configs/roste/_base.py).

  python -m qtrain.finetune --config=configs/roste/ste.py --init_from=runs/default \
      --workdir=runs/roste/ste
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("roste._base").get_config(arg, stage="qat", rotate="none")
