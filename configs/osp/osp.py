"""OSP: Muon + Single-Scale RMSNorm + EmbProj, the paper's full recipe
(configs/osp/_base.py).

  python -m qtrain.train --config=configs/osp/osp.py --workdir=runs/osp/osp
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("osp._base").get_config(arg, muon=True, norm="ssnorm", embproj=True)
