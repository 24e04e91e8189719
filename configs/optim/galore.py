"""GaLore on the hidden matrices, AdamW elsewhere (configs/optim/_base.py).

  python -m qtrain.train --config=configs/optim/galore.py --workdir=runs/optim/galore
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="galore")
