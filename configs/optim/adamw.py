"""AdamW on every param, dense weights (the full-rank baseline) (configs/optim/_base.py).

  python -m qtrain.train --config=configs/optim/adamw.py --workdir=runs/optim/adamw
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="adamw")
