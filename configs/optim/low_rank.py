"""Low-rank hidden layers W = A B (rank d/4) trained from scratch with AdamW.
One point of configs/optim/_base.py.

  python -m qtrain.train --config=configs/optim/low_rank.py --workdir=runs/optim/low_rank
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="low_rank")
