"""Optax transformations and the optimizer builder."""

from qtrain.optim.builder import build_optimizer, decay_mask, learning_rate_schedule
