"""OSP ablation: Muon + Single-Scale RMSNorm (configs/osp/_base.py).

  python -m qtrain.train --config=configs/osp/muon_ssnorm.py --workdir=runs/osp/muon_ssnorm
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("osp._base").get_config(arg, muon=True, norm="ssnorm")
