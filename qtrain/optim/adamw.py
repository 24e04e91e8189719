"""AdamW (Loshchilov & Hutter 2019: decoupled, masked weight decay) and
``frozen`` (no update), registered under those names."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from qtrain.optim.registry import register_optimizer

MU_DTYPES = ("float32", "bfloat16")


def build_adamw(c, *, learning_rate, weight_decay, decay_mask, params):
  del params  # Element-wise: shapes and names do not matter.
  return optax.adamw(learning_rate, b1=c.b1, b2=c.b2, eps=c.eps,
                     mu_dtype=jnp.dtype(c.mu_dtype), weight_decay=weight_decay,
                     mask=decay_mask)


def validate_adamw(c, where: str) -> None:
  for field in ("b1", "b2"):
    if not 0.0 <= c[field] < 1.0:
      raise ValueError(f"{where}.{field}={c[field]} must be in [0, 1)")
  if not c.eps > 0:
    raise ValueError(f"{where}.eps={c.eps} must be > 0")
  if c.mu_dtype not in MU_DTYPES:
    raise ValueError(f"{where}.mu_dtype={c.mu_dtype!r}; use one of {MU_DTYPES}")


def build_frozen(c, **_):
  """Params of a frozen group never move (e.g. the base weights under LoRA)."""
  del c
  return optax.set_to_zero()


register_optimizer("adamw", build_adamw, validate_adamw)
register_optimizer("frozen", build_frozen, has_group=False)
