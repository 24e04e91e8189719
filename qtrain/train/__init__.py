"""Train state, the shared loss, step families, checkpoints, metrics and the
training loop."""

from qtrain.train.families import (STEP_FAMILIES, StepContext, apply_if_finite,
                                   register_step_family, step_metrics, validate_step)
from qtrain.train.loss import cross_entropy, loss_mask, make_loss
from qtrain.train.state import (TrainState, abstract_params, abstract_state, init_state,
                                param_shardings, params_target, state_shardings,
                                step_key)
from qtrain.train.step import (BATCH_KEYS, eval_step, make_measured_step, make_steps,
                               train_step)
