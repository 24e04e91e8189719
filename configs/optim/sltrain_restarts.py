"""SLTrain (A B + 3% fixed-support sparse) with restarts every K updates.
One point of configs/optim/_base.py.

  python -m qtrain.train --config=configs/optim/sltrain_restarts.py --workdir=runs/optim/sltrain_restarts
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="sltrain_restarts")
