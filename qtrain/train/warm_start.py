"""A fresh run's first params: from ``config.train.init_from`` when set, with
learned quantizer steps fitted to real data and to the weights in use.

``model.init`` traces the model with placeholder tokens, so the learned steps
it creates (LSQ, LSQ+) fit no real activation. Here they are created again
from the first training batch (a separate iterator with the run's seed: the
run's own data order is untouched):

* fresh run: every learned step from that batch and the initial weights;
* ``init_from``: the params the source run has are restored (its model is
  rebuilt from its own config.json, so an unquantized source into a quantized
  config restores the weights and has no step keys to miss); steps the source
  did not learn are created from that batch and the loaded weights; steps it
  did learn are kept.
"""

from __future__ import annotations

import flax
import jax

from qtrain.config import ConfigError, base_config
from qtrain.data import loader
from qtrain.data.global_batch import to_global
from qtrain.quant import calibrate_learned_steps, learned_step_paths
from qtrain.parallel import data_shard
from qtrain.train import checkpoint
from qtrain.train.build import build_model
from qtrain.train.state import abstract_params


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


def _calibration_batch(cfg, mesh, model_cfg):
  d, (shard, shards) = cfg.data, data_shard(mesh)
  it = loader.make_train_iterator(d.dir, seq_len=d.seq_len, global_batch_size=d.global_batch_size,
                                  seed=cfg.seed, process_index=shard, process_count=shards,
                                  shards=d.get("shards", 0))
  return to_global(next(it), mesh, model_cfg)


# Fields that fix a param's shape: a source run must agree on them.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "tie_embeddings", "qkv_bias")
# Fields that change the function without changing a shape (an imported
# Llama-3 or Qwen2 has its own RoPE base and norm epsilon): a fine-tune under
# other values would start from a different model, silently.
FUNCTION_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")


def _model_field(model, field: str):
  """``model.<field>``, the base default for configs written before it existed."""
  value = model.get(field, base_config().model.get(field))
  return value.to_dict() if hasattr(value, "to_dict") else value


def check_source(cfg) -> dict:
  """Whether ``config.train.init_from`` can start this run, before anything
  compiles: a training run's workdir, a model of the same shape, and data
  tokenized with the same vocabulary (a fine-tuning set prepared with another
  vocabulary trains on ids that mean other words, silently). Returns the
  source's config; raises ConfigError naming the field and the fix.
  """
  source = checkpoint.load_config(cfg.train.init_from)  # FileNotFoundError says what.
  differ = [f for f in SHAPE_FIELDS + FUNCTION_FIELDS
            if _model_field(source.model, f) != _model_field(cfg.model, f)]
  if differ:
    shown = ", ".join(f"{f}={_model_field(cfg.model, f)!r} "
                      f"(source {_model_field(source.model, f)!r})" for f in differ)
    raise ConfigError(f"config.train.init_from={cfg.train.init_from}: the model differs in "
                      f"config.model.{shown}; fine-tune with the source's model config")
  try:
    theirs = loader.read_meta(source.data.dir)["vocab_fingerprint"]
  except (FileNotFoundError, ValueError):
    theirs = None  # The source's data is not on this machine: nothing to compare.
  ours = loader.read_meta(cfg.data.dir)["vocab_fingerprint"]
  if theirs is not None and theirs != ours:
    raise ConfigError(
        f"config.data.dir={cfg.data.dir} was tokenized with vocabulary {ours}, and the "
        f"source run {cfg.train.init_from} trained on {source.data.dir} with {theirs}; "
        f"prepare the fine-tuning data with --vocab_from={source.data.dir}")
  return source


def _restore_source(cfg, abstract):
  """(params restored from init_from for the keys its model has, its step)."""
  source = build_model(checkpoint.load_config(cfg.train.init_from))
  have = set(_flat(abstract_params(source, cfg.data.seq_len)))  # Boxed leaves.
  wanted = {k: v for k, v in _flat(abstract).items() if k in have}
  restored, step = checkpoint.restore_params(cfg.train.init_from,
                                             flax.traverse_util.unflatten_dict(wanted))
  return restored, step


def initial_params(cfg, model, mesh, params, abstract):
  """``params`` of a freshly initialised state, made ready to train.

  ``abstract``: the params' ShapeDtypeStructs with shardings (the restore target).
  """
  if cfg.train.init_from:
    check_source(cfg)
    restored, step = _restore_source(cfg, abstract)
    print(f"initialised params from {cfg.train.init_from} (step {step})", flush=True)
    params = flax.traverse_util.unflatten_dict({**_flat(params), **_flat(restored)})
  learned = set(learned_step_paths(params))
  keep = learned & set(_flat(restored)) if cfg.train.init_from else set()
  if keep == learned:  # Nothing to fit (no learned steps, or all from the source).
    return params
  batch = _calibration_batch(cfg, mesh, model.cfg)
  kept = {k: v for k, v in _flat(params).items() if k in keep}
  fitted = calibrate_learned_steps(model, params, batch, jax.random.key(cfg.seed))
  out = flax.traverse_util.unflatten_dict({**_flat(fitted), **kept})
  return jax.device_put(out, jax.tree.map(lambda a: a.sharding, abstract))
