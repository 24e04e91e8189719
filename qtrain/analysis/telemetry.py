"""In-training activation telemetry: a provider that sows OSP's outlier
statistics (``qtrain.analysis.kurtosis``) at the model's seams.

``TelemetryProvider`` measures, over real tokens only (``hooks.token_mask``):

* the named sites of ``sites`` (default the residual stream the OSP paper
  measures: ``embed_out``, the embedding output, and ``block_out``, every
  layer's output; ``mlp_hidden`` is the down_proj input before any rotation);
* the input (lhs) of every matmul whose path fullmatches ``matmuls``
  (q/k/v/o, gate/up/down, lm_head; the down_proj input is where outliers
  persist, per OSP's repository issue 5).

Each measured tensor gives two float32 scalars, excess kurtosis and max |x|,
sown into the ``telemetry`` collection; under ``nn.scan`` a scalar sown in
the block stacks into an [L] vector. Placed outermost among the providers
(``qtrain.train.build.providers``), it sees the raw activations, before any
rotation or quantizer below it. With ``channels`` (offline analysis) it also
sows the per-channel mean |x| and an |x| histogram at the named sites.

Nothing is computed unless the collection is mutable: the provider checks
``is_mutable_collection`` and traces no statistic otherwise (unused ones would
be dropped anyway: ``sow`` into an immutable collection is a no-op and JAX
removes the dead work), so the ordinary train step, evaluation and decoding
cost what they cost without it (tested on the lowered step's FLOPs). The measured step (``qtrain.train.step``) applies
the model with the collection mutable every ``config.telemetry.every`` steps.

``summarize`` turns the sown values (``qtrain.train.sown`` names them by
module path) into ``telemetry/<stat>/<site>`` metrics, restacks unscanned
layers into [L] vectors, and adds the paper's aggregate ``telemetry/kurtosis``:
the mean over the embedding output and every layer output (each already a
mean over the same tokens), and ``telemetry/max_abs``, their maximum.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from qtrain.analysis import kurtosis as kurt
from qtrain.layers.hooks import Provider

COLLECTION = "telemetry"
PREFIX = "telemetry"
SITES = ("embed_out", "query", "key", "value", "mlp_hidden", "block_out")  # hooks.py's names.
RESIDUAL = ("embed_out", "block_out")  # What OSP aggregates.
STATS = ("kurtosis", "max_abs")
DETAIL = ("channel_mean_abs", "abs_hist")  # With ``channels``: [D] and [bins] per site.
_ALL = STATS + DETAIL
_LAYER = re.compile(r"^decoder/layers_(\d+)$")


def _stats(x, mask, detail: bool) -> dict:
  """{stat: value} of x [..., D] over the tokens where mask [...] is true."""
  x = jax.lax.stop_gradient(x)  # Observed, never differentiated.
  out = {"kurtosis": kurt.excess_kurtosis(x, mask), "max_abs": kurt.max_abs(x, mask)}
  if detail:
    out.update(channel_mean_abs=kurt.channel_mean_abs(x, mask),
               abs_hist=kurt.abs_histogram(x, mask))
  return out


def _mask_for(x, token_mask):
  """The token mask [B, T] broadcast over x [B, T, ..., D]'s token dims."""
  if token_mask is None:
    return None
  extra = x.ndim - 1 - token_mask.ndim
  return jnp.broadcast_to(token_mask.reshape(token_mask.shape + (1,) * extra), x.shape[:-1])


@dataclasses.dataclass(frozen=True)
class TelemetryProvider(Provider):
  sites: frozenset = frozenset(RESIDUAL)  # Named sites measured.
  matmuls: str = ".*"  # Matmul paths (fullmatch) whose input is measured; "" for none.
  channels: bool = False  # Also per-channel mean |x| and |x| histograms at the sites.

  def activation(self, path, name, hooks, module, x):
    del path
    if name in self.sites and module.is_mutable_collection(COLLECTION):
      for stat, v in _stats(x, _mask_for(x, hooks.token_mask), self.channels).items():
        module.sow(COLLECTION, f"{name}_{stat}", v)
    return x

  def lhs_grad_passes(self, site, hooks) -> bool:
    return True  # Observes the activations; the dot below gets them unchanged.

  def dot(self, site, hooks, inner):
    if not (self.matmuls and re.fullmatch(self.matmuls, site.path)):
      return inner

    def observed(module, lhs, rhs, dims, precision=None, preferred_element_type=None):
      if module.is_mutable_collection(COLLECTION):
        (lc, _), _ = dims
        x = jnp.moveaxis(lhs, lc[0], -1)  # Statistics over the contraction dim.
        for stat, v in _stats(x, _mask_for(x, hooks.token_mask), False).items():
          module.sow(COLLECTION, stat, v)
      return inner(module, lhs, rhs, dims, precision, preferred_element_type)

    return observed


# --- config -------------------------------------------------------------------


def every(cfg) -> int:
  """``config.telemetry.every`` (0 for configs saved before the group existed)."""
  t = cfg.get("telemetry")
  return int(t.get("every", 0)) if t is not None else 0


def provider_from_config(cfg) -> TelemetryProvider | None:
  """The provider ``config.telemetry`` asks for; None when telemetry is off."""
  if not every(cfg):
    return None
  t = cfg.telemetry
  return TelemetryProvider(sites=frozenset(t.get("sites", RESIDUAL)),
                           matmuls=t.get("matmuls", ".*"))


def is_due(cfg, step: int) -> bool:
  """Whether the loop runs step ``step`` (1-based) as a measured step: every
  ``config.telemetry.every`` steps, and the first (the initial params; its
  compilation then lies before throughput is counted)."""
  n = every(cfg)
  return n > 0 and (step % n == 0 or step == 1)


def validate_telemetry(cfg) -> None:
  """Raises ConfigError naming the wrong ``config.telemetry`` field."""
  from qtrain.config.validate import ConfigError  # pylint: disable=g-import-not-at-top
  t = cfg.telemetry
  if not isinstance(t.every, int) or isinstance(t.every, bool) or t.every < 0:
    raise ConfigError(f"config.telemetry.every={t.every!r} must be an int >= 0 (steps between "
                      "measured steps; 0 = off)")
  sites = t.sites
  if isinstance(sites, str) or any(s not in SITES for s in sites):
    raise ConfigError(f"config.telemetry.sites={sites!r}: use a tuple of named sites from "
                      f"{SITES}, e.g. {RESIDUAL}")
  try:
    re.compile(t.matmuls)
  except (re.error, TypeError) as e:
    raise ConfigError(f"config.telemetry.matmuls={t.matmuls!r} is not a regex ({e}); use e.g. "
                      r"'.*' (every matmul), 'decoder/layers/mlp/down_proj' or '' (none)") from None
  if COLLECTION in cfg.train.collect:
    raise ConfigError(f"config.train.collect names {COLLECTION!r}: that collection belongs to "
                      "config.telemetry; set config.telemetry.every instead")


# --- metrics ------------------------------------------------------------------


def _parse(name: str):
  """(stat, site path, layer index or None) of a sown telemetry value's
  metric name, or None for names of other collections."""
  parts = name.split("/")
  if parts[0] != COLLECTION or len(parts) < 2:
    return None
  *path, last = parts[1:]
  if last in _ALL:  # A matmul input, sown in the matmul's module.
    stat = last
    if path and path[-1] == "dot_general":  # The dense form's module: name the layer.
      path = path[:-1]
  else:  # A named site, sown as "<site>_<stat>" in the site's module.
    stat = next((s for s in _ALL if last.endswith("_" + s)), None)
    if stat is None:
      return None
    path = path + [last[:-len(stat) - 1]]
  layer = None
  if len(path) >= 2 and _LAYER.match("/".join(path[:2])):
    layer = int(_LAYER.match("/".join(path[:2])).group(1))
    path = ["decoder", "layers"] + path[2:]
  site = "/".join(path)
  return stat, site, layer


def summarize(values: dict) -> dict:
  """Metrics of ``values`` (name -> array, as ``qtrain.train.sown`` names
  sown values) with each telemetry value renamed ``telemetry/<stat>/<site>``
  (unscanned layers stacked into one [L, ...] value) and the paper's
  aggregates ``telemetry/kurtosis`` and ``telemetry/max_abs`` added; other
  values pass through."""
  out, layered = {}, {}
  for name, v in values.items():
    parsed = _parse(name)
    if parsed is None:
      out[name] = v
      continue
    stat, site, layer = parsed
    key = f"{PREFIX}/{stat}/{site}"
    if layer is None:
      out[key] = v
    else:
      layered.setdefault(key, {})[layer] = v
  for key, by_layer in layered.items():
    out[key] = jnp.stack([by_layer[i] for i in sorted(by_layer)])
  residual = [out[f"{PREFIX}/{s}/{site}"] for site in ("embed_out", "decoder/layers/block_out")
              for s in ("kurtosis",) if f"{PREFIX}/{s}/{site}" in out]
  if residual:
    k = jnp.concatenate([jnp.ravel(r) for r in residual])
    out[f"{PREFIX}/kurtosis"] = jnp.mean(k)
    m = [out[f"{PREFIX}/max_abs/{site}"] for site in ("embed_out", "decoder/layers/block_out")
         if f"{PREFIX}/max_abs/{site}" in out]
    out[f"{PREFIX}/max_abs"] = jnp.max(jnp.concatenate([jnp.ravel(x) for x in m]))
  return out


def residual_layers(metrics: dict, stat: str = "kurtosis") -> np.ndarray | None:
  """[L + 1] ``stat`` of the residual stream as one per-layer series: the
  embedding output, then each layer's output (from metrics or a jsonl row)."""
  emb = metrics.get(f"{PREFIX}/{stat}/embed_out")
  blocks = metrics.get(f"{PREFIX}/{stat}/decoder/layers/block_out")
  if emb is None or blocks is None:
    return None
  return np.concatenate([np.ravel(np.asarray(emb, np.float64)),
                         np.ravel(np.asarray(blocks, np.float64))])
