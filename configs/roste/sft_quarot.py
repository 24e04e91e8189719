"""SFT then rotate all + RTN (QuaRot-style): fine-tuning in high precision, then
every block matmul rotated by a random Hadamard, (X R)(R^T W), before W4A4KV4
RTN (configs/roste/_base.py).

  python -m qtrain.finetune --config=configs/roste/sft_quarot.py --init_from=runs/default \
      --workdir=runs/roste/sft_quarot
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("roste._base").get_config(arg, stage="ptq", rotate="all")
