"""Fira (GaLore + the norm-scaled residual) on the hidden matrices.
One point of configs/optim/_base.py.

  python -m qtrain.train --config=configs/optim/fira.py --workdir=runs/optim/fira
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="fira")
