"""Checkpoint conversion between qtrain params and other libraries' formats."""

from qtrain.convert.hf import (config_from_hf, config_to_hf, load_hf_checkpoint,
                               params_from_hf_model, params_from_hf_state_dict,
                               params_to_hf_state_dict, plain_params, save_hf_checkpoint)
from qtrain.convert.osp import merge_osp
from qtrain.convert.ptq_hf import export_ptq_hf
from qtrain.convert.rotate import drop_online, fuse_rotations, rotated_config
