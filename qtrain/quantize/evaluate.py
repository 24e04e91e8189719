"""The trained run, rebuilt and evaluated: its config, its params, held-out
perplexity of the unquantized model and of the PTQ model.

The PTQ model runs the dequantized PTQ weights with the recipe's activation
and KV quantizers fake-quantized at eval: a ``QuantProvider`` in mode
``fake`` over the recipe's rules with ``weight=None`` (weights are already on
their grid; quantizing them again would round twice).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import ml_collections

from qtrain.config.variants import apply_variants
from qtrain.layers import Transformer
from qtrain.parallel import batch_sharding, replicated
from qtrain.quant import QuantProvider, validate_quant
from qtrain.train.build import build_model
from qtrain.train import checkpoint
from qtrain.train.evaluate import evaluate
from qtrain.train.state import param_shardings, params_target
from qtrain.train.step import eval_step


def load_recipe(recipe: str) -> ml_collections.ConfigDict:
  """``config.quant`` of a preset in configs/quant (``w4a4kv4``, ``w4a4+lm_head``)."""
  c = ml_collections.ConfigDict()
  apply_variants(c, [recipe], "--recipe")
  return c.quant


def restore_params(workdir: str, cfg, mesh, step: int | None = None) -> tuple[dict, int]:
  """(params, step) of the run's latest (or given) checkpoint.

  Only the ``params`` subtree of the saved train state is read (orbax partial
  restore), into the shapes and shardings of the model config.json describes:
  the optimizer's state is neither rebuilt nor loaded, so a checkpoint stays
  readable when the optimizer's code or config schema moves on.
  """
  target = params_target(build_model(cfg), mesh, cfg.data.seq_len)
  return checkpoint.restore_params(workdir, target, step)


def eval_provider(recipe_quant, model_cfg=None) -> QuantProvider:
  """Fake-quant of the recipe's activations and KV only (weights: None)."""
  rules = validate_quant(recipe_quant, model_cfg)
  return QuantProvider(rules=tuple(dataclasses.replace(r, weight=None) for r in rules),
                       mode="fake")


def perplexity(model: Transformer, params, batches, mesh, seq_len: int) -> tuple[float, float]:
  """(mean token NLL, perplexity) of ``model`` over ``batches`` (host rows)."""
  param_sh = param_shardings(model, mesh, seq_len)
  batch_sh = {k: batch_sharding(mesh) for k in batches[0]}
  step = jax.jit(functools.partial(eval_step, model=model), in_shardings=(param_sh, batch_sh),
                 out_shardings=replicated(mesh))
  nll = evaluate(step, jax.device_put(params, param_sh), batches, mesh, model.cfg)
  return nll, math.exp(nll)
