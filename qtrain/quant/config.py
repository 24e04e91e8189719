"""``config.quant``: its fields and defaults, validation, and the provider.

  config.quant.mode = "int8"              # none | fake | int8 | fp8
  config.quant.rules = (                  # ordered; the first full match wins
      dict(pattern=r"decoder/layers/(attn|mlp)/.*_proj",
           weight=dict(bits=8, granularity="channel"),
           act=dict(bits=8, granularity="token"),
           kv=None),
  )

Each spec dict holds ``QuantSpec`` fields (missing ones take its defaults);
``None`` (or a missing key) leaves that operand unquantized. Matmuls that no
rule matches, the LM head included unless a rule names ``lm_head``, stay in
high precision. Presets live in ``configs/quant/``.

Errors are ``ValueError``s naming the field, e.g.
``config.quant.rules[2].weight.bits=1: bits must be in 2..8``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import ml_collections

from qtrain.layers.dot_general import DotGeneralProvider, HighPrecision
from qtrain.quant.dot_general import MODES, QuantProvider, mode_problem
from qtrain.quant.rules import QuantRule, first_match
from qtrain.quant.spec import QuantSpec

RULE_KEYS = ("pattern", "weight", "act", "kv")
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))


def quant_config_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "none"  # none | fake (QAT numerics) | int8 (real int8 dots) | fp8 (e4m3/e5m2 dots)
  # Ordered rules, dicts {pattern, weight, act, kv}; see the module docstring.
  c.rules = ()
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


def rules_from_config(quant_cfg) -> tuple[QuantRule, ...]:
  """QuantRules with every spec validated on its own (dims not yet known)."""
  rules = []
  for i, r in enumerate(quant_cfg.rules):
    where = f"config.quant.rules[{i}]"
    r = _as_dict(r)
    for key in r:
      if key not in RULE_KEYS:
        raise _unknown(key, RULE_KEYS, where)
    pattern = r.get("pattern")
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"{where}.pattern={pattern!r} is not a regex: {e}") from None
    specs = {role: spec_from_dict(r.get(role), f"{where}.{role}") for role in RULE_KEYS[1:]}
    for role, spec in specs.items():
      if spec is not None:
        spec.validate(f"{where}.{role}", role=role)
    rules.append(QuantRule(pattern=pattern, **specs))
  return tuple(rules)


def _check_mode(rule: QuantRule, i: int, mode: str) -> None:
  where = f"config.quant.rules[{i}]"
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


def weight_matmuls(m) -> list[tuple[str, int]]:
  """(module path, contraction dim) of every weight matmul of the Transformer.

  Mirrors qtrain.layers (tests check it against the paths the model asks for).
  """
  prefixes = (["decoder/layers"] if m.scan_layers
              else [f"decoder/layers_{i}" for i in range(m.n_layers)])
  d, hn, f = m.d_model, m.n_heads * m.head_dim, m.d_ff
  per_layer = [("attn/q_proj", d), ("attn/k_proj", d), ("attn/v_proj", d),
               ("attn/o_proj", hn), ("mlp/gate_proj", d), ("mlp/up_proj", d),
               ("mlp/down_proj", f)]
  return [(f"{p}/{name}", k) for p in prefixes for name, k in per_layer] + [("lm_head", d)]


def _check_dims(rules, model_cfg) -> None:
  attn = {p.rsplit("/", 1)[0] for p, _ in weight_matmuls(model_cfg) if "/attn/" in p}
  sites = [(p, k, ("weight", "act")) for p, k in weight_matmuls(model_cfg)]
  sites += [(p, model_cfg.head_dim, ("kv",)) for p in sorted(attn)]
  for path, dim, roles in sites:
    i = first_match(rules, path)
    if i is None:
      continue
    for role in roles:
      spec = getattr(rules[i], role)
      try:
        spec and spec.validate(f"config.quant.rules[{i}].{role}", role=role, dim=dim)
      except ValueError as e:
        raise ValueError(f"{e} (at {path})") from None


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
  for i, rule in enumerate(rules):
    _check_mode(rule, i, quant_cfg.mode)
  if model_cfg is not None:
    _check_dims(rules, model_cfg)
  return rules


def provider_from_config(quant_cfg, model_cfg=None) -> DotGeneralProvider:
  """HighPrecision for mode 'none', else a QuantProvider over the rules."""
  rules = validate_quant(quant_cfg, model_cfg)
  if quant_cfg.mode == "none":
    return HighPrecision()
  return QuantProvider(rules=rules, mode=quant_cfg.mode,
                       int8_backward=bool(quant_cfg.get("int8_backward", True)),
                       grad_stochastic_rounding=bool(quant_cfg.get("grad_stochastic_rounding",
                                                                   False)))
