"""OSP ablation: Muon for the hidden matrices, AdamW for the rest (configs/osp/_base.py).

  python -m qtrain.train --config=configs/osp/muon.py --workdir=runs/osp/muon
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("osp._base").get_config(arg, muon=True)
