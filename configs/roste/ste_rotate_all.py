"""Quantization-aware SFT at W4A4KV4 with every block matmul rotated by a
random Hadamard and the rotated STE, dL/dW = R dL/dQ(R^T W)
(configs/roste/_base.py).

  python -m qtrain.finetune --config=configs/roste/ste_rotate_all.py --init_from=runs/default \
      --workdir=runs/roste/ste_rotate_all
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("roste._base").get_config(arg, stage="qat", rotate="all")
