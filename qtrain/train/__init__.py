"""Train state, pure steps, checkpoints, metrics and the training loop."""

from qtrain.train.state import TrainState, abstract_state, init_state, state_shardings
from qtrain.train.step import cross_entropy, eval_step, make_steps, train_step
