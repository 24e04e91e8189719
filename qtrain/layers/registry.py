"""The model's matmuls and named sites, found by tracing it: one source of truth.

``trace_sites(model)`` runs ``model.init`` under ``jax.eval_shape`` (shapes
only, nothing computed or allocated) with a recording provider outermost, and
returns every ``MatmulSite`` the weight forms issued and every named
activation site. The start-up report, config validation (group sizes vs.
contraction dims), PTQ, calibration and export all read this list, so a new
matmul (EmbProj, low-rank factors) cannot silently stay unquantized or be
skipped by PTQ: it is in the list the moment the model calls the hook.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtrain.layers.config import ModelConfig
from qtrain.layers.hooks import MatmulSite, Provider, as_hooks


@dataclasses.dataclass
class _Recorder(Provider):
  matmuls: dict = dataclasses.field(default_factory=dict)
  activations: dict = dataclasses.field(default_factory=dict)

  def lhs_grad_passes(self, site, hooks) -> bool:
    return True  # Records the site; the dot is the one below.

  def dot(self, site, hooks, inner):
    self.matmuls.setdefault(site.param, site)  # One per layer when unscanned.
    return inner

  def activation(self, path, name, hooks, module, x):
    self.activations.setdefault((path, name), tuple(x.shape))
    return x


@dataclasses.dataclass(frozen=True)
class ModelSites:
  matmuls: tuple[MatmulSite, ...]  # In call order; an unscanned stack has one per layer.
  activations: tuple[tuple[str, str], ...]  # (module path, site name), in call order.

  def paths(self) -> tuple[str, ...]:
    """Canonical matmul paths, each once."""
    return tuple(dict.fromkeys(s.path for s in self.matmuls))

  @property
  def kv_paths(self) -> tuple[str, ...]:
    """Attention modules (where ``key``/``value`` sites and the KV cache live)."""
    return tuple(p for p, n in self.activations if n == "key")


def trace_sites(model: nn.Module, seq_len: int = 8) -> ModelSites:
  """Every matmul and named site of ``model`` (a ``Transformer``)."""
  rec = _Recorder()
  hooks = as_hooks(model.provider)
  traced = model.clone(provider=dataclasses.replace(hooks, providers=(rec, *hooks.providers)))
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  jax.eval_shape(lambda r: traced.init(r, tokens), jax.random.key(0))
  return ModelSites(matmuls=tuple(rec.matmuls.values()), activations=tuple(rec.activations))


@functools.lru_cache(maxsize=16)
def config_sites(cfg: ModelConfig) -> ModelSites:
  """``trace_sites`` of the provider-less model of ``cfg``, traced once per
  config: validation, PTQ sites and the FLOP count all ask for it at start-up."""
  from qtrain.layers.model import Transformer  # pylint: disable=g-import-not-at-top
  return trace_sites(Transformer(cfg))
