"""APOLLO (channel-wise scaling, rank d/4) on the hidden matrices.
One point of configs/optim/_base.py.

  python -m qtrain.train --config=configs/optim/apollo.py --workdir=runs/optim/apollo
"""

from qtrain.config.variants import config_module


def get_config(arg: str = ""):
  return config_module("optim._base").get_config(arg, recipe="apollo")
