"""Low-rank layers with momentum reset and refactorization every K updates.
One point of configs/optim/_base.py.

  python -m qtrain.train --config=configs/optim/low_rank_restarts.py --workdir=runs/optim/low_rank_restarts
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="low_rank_restarts")
