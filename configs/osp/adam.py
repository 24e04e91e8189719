"""OSP ablation: the baseline, AdamW for every param (configs/osp/_base.py).

  python -m qtrain.train --config=configs/osp/adam.py --workdir=runs/osp/adam
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("osp._base").get_config(arg, muon=False)
