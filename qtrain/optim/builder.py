"""The optimizer from ``config.optim``: AdamW, warmup + cosine, clipping.

Weight decay is masked by param path (``config.optim.no_decay`` regexes), so a
norm gain or the embedding can be excluded without touching the model.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to lr, cosine decay to lr * min_lr_ratio at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=total_steps, end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params, no_decay_patterns) -> object:
  """True where weight decay applies: paths matching no pattern."""
  compiled = [re.compile(p) for p in no_decay_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.fullmatch(param_path(path)) for p in compiled), params)


def build_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  no_decay = tuple(optim_cfg.no_decay)
  adamw = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      mu_dtype=jnp.dtype(optim_cfg.mu_dtype),
                      weight_decay=optim_cfg.weight_decay,
                      mask=lambda params: decay_mask(params, no_decay))
  if optim_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
  return adamw
