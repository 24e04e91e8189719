"""Checks of ``config.zo`` (the zeroth-order step family,
``qtrain/train/zeroth_order.py``) before anything is compiled; called from
``qtrain.train.families.validate_step``. Errors name the field and the fix."""

from __future__ import annotations

from qtrain.config.validate import ConfigError

ESTIMATORS = ("spsa", "forward")
RNGS = ("rbg", "threefry")


def _require(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def validate_zo(cfg) -> None:
  """Raises ConfigError naming the first wrong ``config.zo`` field, or a field
  elsewhere that cannot work with ``config.train.step='zeroth_order'``."""
  z = cfg.zo
  _require(z.estimator in ESTIMATORS,
           f"config.zo.estimator={z.estimator!r}; use one of {ESTIMATORS}")
  _require(isinstance(z.eps, float) and z.eps > 0, f"config.zo.eps={z.eps!r} must be a float > 0")
  _require(isinstance(z.queries, int) and z.queries >= 1,
           f"config.zo.queries={z.queries!r} must be an integer >= 1")
  _require(z.rng in RNGS, f"config.zo.rng={z.rng!r}; use one of {RNGS}")
  for field in ("conservative", "blockwise"):
    _require(isinstance(z[field], bool), f"config.zo.{field}={z[field]!r}: use True or False")
  if cfg.train.step != "zeroth_order":
    return
  _require(cfg.optim.grad_clip == 0,
           f"config.optim.grad_clip={cfg.optim.grad_clip}: the zeroth-order estimate g_hat * z has "
           "norm |g_hat| * ||z|| ~ |g_hat| * sqrt(params), so a global-norm clip shrinks every "
           "update to ~clip / sqrt(params); set config.optim.grad_clip=0 (MeZO does not clip)")
  if z.estimator == "forward":
    _require(cfg.quant.mode == "none",
             f"config.zo.estimator='forward' with config.quant.mode={cfg.quant.mode!r}: the "
             "quantizers' gradient estimators (STE, LSQ) are custom VJPs, which jax.jvp cannot "
             "differentiate; use config.zo.estimator='spsa' for a quantized model")
    m = cfg.model
    cudnn = m.attention_impl == "cudnn" or (m.attention_impl == "auto" and m.dtype != "float32")
    _require(not cudnn,
             f"config.zo.estimator='forward' with config.model.attention_impl="
             f"{m.attention_impl!r} (dtype {m.dtype}): the cuDNN attention (auto picks it on GPU "
             "for bf16/fp16) has a custom VJP, which jax.jvp cannot differentiate; set "
             "config.model.attention_impl='xla'")
