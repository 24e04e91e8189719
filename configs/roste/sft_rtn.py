"""SFT then RTN: fine-tuning in high precision, then W4A4KV4 with the
weights rounded to nearest (configs/roste/_base.py).

  python -m qtrain.finetune --config=configs/roste/sft_rtn.py --init_from=runs/default \
      --workdir=runs/roste/sft_rtn
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("roste._base").get_config(arg, stage="ptq", rotate="none")
