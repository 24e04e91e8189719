"""The learning-rate schedule, a function of APPLIED updates.

Its argument is the optimizer's own update count, which advances only when an
update is applied: the step skips a non-finite update without calling the
optimizer, so a skipped batch does not move the schedule. The cosine horizon is
explicit (``config.optim.decay_steps``; 0 follows ``config.train.steps``) and
fixed for a run's life: ``check_resume`` refuses a resume that would rescale it.
"""

from __future__ import annotations

import optax


def decay_horizon(cfg) -> int:
  """Applied updates over which the cosine decays (after which it stays at
  lr * min_lr_ratio)."""
  decay_steps = cfg.optim.get("decay_steps", 0)
  return int(decay_steps) if decay_steps > 0 else int(cfg.train.steps)


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup 0 -> lr, cosine to lr * min_lr_ratio at ``decay_horizon``."""
  o = cfg.optim
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=decay_horizon(cfg), end_value=o.lr * o.min_lr_ratio)
