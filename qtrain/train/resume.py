"""May this config resume the run in ``workdir``? Checked before anything is
written, so a rejected config never replaces the run's ``config.json``.

A checkpoint can only be restored into a state of the same shapes and dtypes.
Rather than keeping a hand list of the fields that change them, both configs'
params are traced (``jax.eval_shape``, nothing is allocated) and compared; a
mismatch names the differing fields. The optimizer's side (its layout, the LR
horizon) is ``qtrain.optim.check_resume``'s.
"""

from __future__ import annotations

import jax
import ml_collections

from qtrain.config import ConfigError


def flat_fields(cfg, prefix: str = "") -> dict:
  """{"model.d_model": 192, ...}: every leaf field of a config (dict)."""
  out = {}
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flat_fields(v, name + "."))
    else:
      out[name] = tuple(map(_freeze, v)) if isinstance(v, (list, tuple)) else v
  return out


def _freeze(v):
  if isinstance(v, (dict, ml_collections.ConfigDict)):
    return tuple(sorted(flat_fields(v).items()))
  return tuple(map(_freeze, v)) if isinstance(v, (list, tuple)) else v


def differing_fields(saved, cfg) -> list[str]:
  """Fields whose values differ. A field the saved config lacks (the run
  predates it) counts as its default: new fields default to the old
  behaviour, so a run is not "another config" because the schema grew."""
  from qtrain.config.base import base_config  # pylint: disable=g-import-not-at-top
  a, b, default = flat_fields(saved), flat_fields(cfg), flat_fields(base_config())
  return sorted(k for k in a.keys() | b.keys()
                if a.get(k, default.get(k, "<unset>")) != b.get(k, "<unset>"))


def _param_signature(cfg):
  """The params as a tree of (shape, dtype): what a restore needs to fit."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
  from qtrain.train.state import abstract_params  # pylint: disable=g-import-not-at-top
  boxed = abstract_params(build_model(cfg), cfg.data.seq_len)
  is_box = lambda x: isinstance(x, nn.Partitioned)  # Unboxed by hand: no sharding constraint.
  return jax.tree.map(lambda a: (tuple((a.value if is_box(a) else a).shape),
                                 str((a.value if is_box(a) else a).dtype)), boxed,
                      is_leaf=is_box)


def check_resume(saved, cfg, workdir: str) -> list[str]:
  """Raises ConfigError when ``cfg`` cannot resume the checkpoints that
  ``saved`` (the workdir's config.json) wrote: different param shapes or
  dtypes (model, quantizer params), or what ``qtrain.optim.check_resume``
  rejects (optimizer layout, LR horizon). Returns the fields that differ
  harmlessly (logging, evaluation, ...)."""
  from qtrain.optim import check_resume as check_optim  # pylint: disable=g-import-not-at-top
  diff = differing_fields(saved, cfg)
  if not diff:
    return []
  try:
    old = _param_signature(saved)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{workdir}/config.json no longer builds a model ({type(e).__name__}: "
                      f"{e}); restore the file, or train in a new workdir") from None
  if old != _param_signature(cfg):
    fields = [f for f in diff if f.startswith(("model.", "quant."))] or diff
    raise ConfigError(
        f"{workdir} holds checkpoints of a different model (differing: "
        f"{', '.join(f'config.{f}' for f in fields)}); use a new --workdir, or start a new "
        f"run from this one's params with --config.train.init_from={workdir}")
  was, now = (int(c.quant.get("amax_history", 0)) for c in (saved, cfg))
  if was != now:
    raise ConfigError(
        f"{workdir}: config.quant.amax_history={now}, but its checkpoints hold "
        + (f"amax histories of {was} steps" if was else "no amax histories (current scaling)")
        + f"; set config.quant.amax_history={was}, or start a new run from this one's params "
        f"with --config.train.init_from={workdir}")
  try:
    check_optim(saved, cfg)
  except ConfigError as e:
    raise ConfigError(f"{workdir}: {e}") from None
  return diff
