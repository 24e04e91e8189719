"""OSP ablation: Muon + EmbProj (configs/osp/_base.py).

  python -m qtrain.train --config=configs/osp/muon_embproj.py --workdir=runs/osp/muon_embproj
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("osp._base").get_config(arg, muon=True, embproj=True)
