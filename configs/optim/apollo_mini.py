"""APOLLO-Mini (tensor-wise, rank 1, scale sqrt(128)) on the hidden matrices.
One point of configs/optim/_base.py.

  python -m qtrain.train --config=configs/optim/apollo_mini.py --workdir=runs/optim/apollo_mini
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="apollo_mini")
