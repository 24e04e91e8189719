"""Optimizers: a registry of optax transforms, path-rule groups, the schedule,
optimizer-state shardings and the config checks."""

from qtrain.optim.adamw import build_adamw
from qtrain.optim.apollo import build_apollo, scale_by_apollo
from qtrain.optim.builder import build_optimizer
from qtrain.optim.fira import build_fira, scale_by_fira
from qtrain.optim.galore import build_galore, per_matrix
from qtrain.optim.groups import Group, assign_groups, decay_mask, param_path, parse_groups
from qtrain.optim.muon import build_muon, newton_schulz, osp_groups
from qtrain.optim.registry import OPTIMIZERS, OptimizerDef, get_optimizer, register_optimizer
from qtrain.optim.schedule import decay_horizon, learning_rate_schedule
from qtrain.optim.sharding import opt_state_shardings
from qtrain.optim.wrappers import (WrapperState, balanced_factors, momentum_reset, refactorize,
                                   wrap)
from qtrain.optim.validate import check_resume, validate_optim
from qtrain.optim.zo_sgd import build_sgd
