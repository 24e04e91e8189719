"""Low-rank layers with momentum reset only (no refactorization) every K updates:
the reset half of Glentis et al.'s ablation. One point of configs/optim/_base.py.

  python -m qtrain.train --config=configs/optim/low_rank_reset.py --workdir=runs/optim/low_rank_reset
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="low_rank_reset")
