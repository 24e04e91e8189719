"""RoSTE (Wei et al., ICML 2025): quantization-aware SFT at W4A4KV4 with the
rotated STE, each (matmul, block) rotated or not by the lower quantization
error E on calibration batches of the task (qtrain/quant/roste.py), chosen once
from the pretrained weights when the run starts (configs/roste/_base.py).

  python -m qtrain.finetune --config=configs/roste/roste.py --init_from=runs/default \
      --workdir=runs/roste/roste
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("roste._base").get_config(arg, stage="qat", rotate="roste")
