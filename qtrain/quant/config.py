"""``config.quant``: its fields and defaults, validation, and the provider.

  config.quant.mode = "int8"              # none | fake | int8 | fp8
  config.quant.rules = dict(              # named rules
      first_layer=dict(pattern=r"decoder/layers/(attn|mlp)/.*_proj", layers="0",
                       weight=dict(bits=8), act=dict(bits=8, granularity="token")),
      linears=dict(pattern=r"decoder/layers/(attn|mlp)/.*_proj",
                   weight=dict(bits=4, granularity="channel"),
                   act=dict(bits=4, granularity="token"), kv=None),
  )
  config.quant.order = ("first_layer", "linears")   # the first full match wins

``rules`` maps names to rules and ``order`` says which is tried first
(ConfigDict sorts its keys, so the order is explicit); named rules let one
field of a preset's rule be overridden from the command line:
``--config.quant.rules.linears.weight.bits=8``. A tuple of rules (in order,
no ``order``) also works in config files. Each spec dict holds
``QuantSpec`` fields (missing ones take its defaults); ``None`` (or a missing
key) leaves that operand unquantized; ``layers`` names block indices (see
``qtrain.quant.rules``). Matmuls that no rule matches, the LM head included
unless a rule names ``lm_head``, stay in high precision. Presets live in
``configs/quant/``.

Errors are ``ValueError``s naming the field, e.g.
``config.quant.rules.linears.weight.bits=1: bits must be in 2..8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import ml_collections

from qtrain.layers.dot_general import HighPrecision
from qtrain.quant.dot_general import MODES, mode_problem
from qtrain.quant.provider import QuantProvider
from qtrain.quant.rules import QuantRule, parse_layers
from qtrain.quant.spec import QuantSpec

RULE_KEYS = ("pattern", "weight", "act", "kv", "layers")
SPEC_ROLES = ("weight", "act", "kv")
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))


def quant_config_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "none"  # none | fake (QAT numerics) | int8 (real int8 dots) | fp8 (e4m3/e5m2 dots)
  # Named rules {name: {pattern, weight, act, kv, layers}} (or a tuple of rules, in order);
  # see the module docstring. None: no rules.
  c.rules = None
  c.order = ()  # Rule names, first tried first; with named rules, every name exactly once.
  c.int8_backward = True  # int8/fp8 modes: dX and dW as low-precision dots too.
  c.grad_stochastic_rounding = False  # int8 backward: stochastic rounding of dY.
  return c


def _as_dict(d) -> dict:
  return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def _unknown(key, known, where) -> ValueError:
  close = difflib.get_close_matches(key, known, n=1)
  hint = f"did you mean {where}.{close[0]}?" if close else f"known: {list(known)}"
  return ValueError(f"{where}.{key} is not a field; {hint}")


def spec_from_dict(d, where: str) -> QuantSpec | None:
  if d is None:
    return None
  d = _as_dict(d)
  for key in d:
    if key not in SPEC_FIELDS:
      raise _unknown(key, SPEC_FIELDS, where)
  if "mse_grid" in d:
    d["mse_grid"] = tuple(d["mse_grid"])
  return QuantSpec(**d)


def named_rules(quant_cfg) -> list[tuple[str, dict]]:
  """[(where, rule dict)] in match order, from named rules + ``order`` or a sequence."""
  rules, order = quant_cfg.get("rules"), tuple(quant_cfg.get("order", ()) or ())
  if rules is None:
    return []
  if not hasattr(rules, "items"):
    if order:
      raise ValueError("config.quant.order applies to named rules; rules is a sequence, "
                       "already in order: set config.quant.order=()")
    return [(f"config.quant.rules[{i}]", _as_dict(r)) for i, r in enumerate(rules)]
  names = list(rules.keys())
  missing = [n for n in names if n not in order]
  unknown = [n for n in order if n not in names]
  if missing or unknown or len(set(order)) != len(order):
    raise ValueError(f"config.quant.order={order!r} must list every rule of config.quant.rules "
                     f"({sorted(names)}) exactly once"
                     + (f"; missing {missing}" if missing else "")
                     + (f"; unknown {unknown}" if unknown else ""))
  return [(f"config.quant.rules.{n}", _as_dict(rules[n])) for n in order]


def rules_from_config(quant_cfg) -> tuple[QuantRule, ...]:
  """QuantRules with every spec validated on its own (dims not yet known)."""
  rules = []
  for where, r in named_rules(quant_cfg):
    for key in r:
      if key not in RULE_KEYS:
        raise _unknown(key, RULE_KEYS, where)
    pattern = r.get("pattern")
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"{where}.pattern={pattern!r} is not a regex: {e}") from None
    specs = {role: spec_from_dict(r.get(role), f"{where}.{role}") for role in SPEC_ROLES}
    for role, spec in specs.items():
      if spec is not None:
        spec.validate(f"{where}.{role}", role=role)
    rules.append(QuantRule(pattern=pattern, layers=parse_layers(r.get("layers"),
                                                                f"{where}.layers"), **specs))
  return tuple(rules)


def _check_mode(rule: QuantRule, where: str, mode: str) -> None:
  if mode not in ("int8", "fp8") or (rule.weight is None and rule.act is None):
    return
  for role in ("weight", "act"):
    spec = getattr(rule, role)
    if spec is None:
      raise ValueError(f"{where}.{role}=None: config.quant.mode={mode!r} multiplies two "
                       "quantized operands; set both weight and act, or use mode='fake'")
    problem = mode_problem(spec, mode)
    if problem:
      field, msg = problem
      raise ValueError(f"{where}.{role}.{field}={getattr(spec, field)!r}: {msg}")


def _check_dims(quant_cfg, rules, model_cfg) -> None:
  """Group sizes against the contraction dim of every matmul a rule matches,
  and per-block learned rules under scan: on the matmuls of the traced model."""
  from qtrain.layers import ModelConfig, config_sites  # pylint: disable=g-import-not-at-top
  from qtrain.quant.rules import first_match  # pylint: disable=g-import-not-at-top
  mc = ModelConfig.of(model_cfg)
  sites = config_sites(mc)
  wheres = [w for w, _ in named_rules(quant_cfg)]
  for where, rule in zip(wheres, rules):
    if rule.layers and max(rule.layers) >= mc.n_layers:
      raise ValueError(f"{where}.layers names block {max(rule.layers)} but the model has "
                       f"{mc.n_layers} (0..{mc.n_layers - 1})")
  checks = [(s.path, s.in_features, ("weight", "act"), s.layered) for s in sites.matmuls]
  checks += [(p, mc.head_dim, ("kv",), True) for p in sites.kv_paths]
  for path, dim, roles, layered in checks:
    hits = {first_match(rules, path, l) for l in (range(mc.n_layers) if layered else (None,))}
    for i in sorted(h for h in hits if h is not None):
      for role in roles:
        spec = getattr(rules[i], role)
        try:
          spec and spec.validate(f"{wheres[i]}.{role}", role=role, dim=dim)
        except ValueError as e:
          raise ValueError(f"{e} (at {path})") from None
    learned = [i for i in hits if i is not None and any(
        getattr(rules[i], r) is not None and getattr(rules[i], r).learned for r in roles)]
    if mc.scan_layers and len(hits) > 1 and learned:
      raise ValueError(f"{wheres[learned[0]]}: a learned-step rule covers only some blocks of "
                       f"{path} in a scanned stack; name every block or set "
                       "config.model.scan_layers=False")


def validate_quant(quant_cfg, model_cfg=None) -> tuple[QuantRule, ...]:
  """Raises ValueError naming the first wrong ``config.quant`` field; returns
  the rules. With ``model_cfg`` (``config.model``), group sizes are checked
  against each matched matmul's contraction dim."""
  known = quant_config_defaults()
  for key in quant_cfg.keys():
    if key not in known:
      raise _unknown(key, list(known.keys()), "config.quant")
  if quant_cfg.mode not in MODES:
    raise ValueError(f"config.quant.mode={quant_cfg.mode!r}: use one of {MODES}")
  if quant_cfg.get("grad_stochastic_rounding", False) and quant_cfg.mode == "fp8":
    raise ValueError("config.quant.grad_stochastic_rounding=True: implemented for "
                     "mode='int8' only (fp8 gradients use e5m2 round-to-nearest)")
  rules = rules_from_config(quant_cfg)
  for (where, _), rule in zip(named_rules(quant_cfg), rules):
    _check_mode(rule, where, quant_cfg.mode)
  if model_cfg is not None:
    _check_dims(quant_cfg, rules, model_cfg)
  return rules


def provider_from_config(quant_cfg, model_cfg=None):
  """HighPrecision for mode 'none', else a QuantProvider over the rules."""
  rules = validate_quant(quant_cfg, model_cfg)
  if quant_cfg.mode == "none":
    return HighPrecision()  # The pass-through provider.
  return QuantProvider(rules=rules, mode=quant_cfg.mode,
                       int8_backward=bool(quant_cfg.get("int8_backward", True)),
                       grad_stochastic_rounding=bool(quant_cfg.get("grad_stochastic_rounding",
                                                                   False)))


def with_kv_bits(quant_cfg, bits: int) -> None:
  """Puts a KV rule for ``bits`` (0: no KV quantizer) ahead of ``quant_cfg``'s
  rules (``python -m qtrain.generate --kv_bits``): int, asymmetric, per token."""
  if bits and not 2 <= bits <= 8:
    raise ValueError(f"--kv_bits={bits}: use 2..8, or 0 for unquantized K/V")
  kv = None if bits == 0 else dict(bits=bits, format="int", granularity="token",
                                   symmetric=False, calibration="minmax")
  rule = dict(pattern=r"decoder/layers/attn", weight=None, act=None, kv=kv)
  # Its rules are inactive in mode "none": keep them so, add only KV.
  rules = [] if quant_cfg.mode == "none" else [r for _, r in named_rules(quant_cfg)]
  names = [f"rule{i}" for i in range(len(rules))]
  with quant_cfg.ignore_type():
    quant_cfg.mode = "fake" if quant_cfg.mode == "none" else quant_cfg.mode
    quant_cfg.rules = ml_collections.ConfigDict(dict(zip(["kv_bits", *names], [rule, *rules])))
    quant_cfg.order = ("kv_bits", *names)
