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

``stage`` says when the rules apply: ``qat`` (training and evaluation) or
``ptq`` (training in high precision; ``python -m qtrain.finetune`` evaluates the
final params under the rules, i.e. round-to-nearest weights: SFT then RTN).
``rotation`` rotates the operands of the matmuls it names before they are
quantized, (X R)(R^T W) with R a randomized Hadamard per block
(``qtrain.quant.rotated``; RoSTE):

  config.quant.rotation.sites = LINEARS   # regex over canonical matmul paths
  config.quant.rotation.choose = "roste"  # all | table | roste

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
from qtrain.quant.rotated import RotationProvider
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
  # int8 mode's dots and per-tensor fp8's codes (cast in both layouts):
  # xla (lax.dot_general, XLA's cast) | auto (the Pallas kernels of
  # qtrain/kernels on GPU/TPU, XLA elsewhere) | interpret (the kernel in Pallas
  # interpret mode: tests). Same numbers; one device only for now.
  c.kernels = "xla"
  # Per-tensor fp8 (mode fp8, every quantized rule's weight and act tensor-wise):
  # 0 = current scaling (each tensor's own absmax, a pass before its cast);
  # H > 0 = delayed scaling: each site keeps its last H absmaxes of X, W and dY
  # as train state and casts with the scale of their largest, recording this
  # step's absmax in the cast's own pass (TransformerEngine's default recipe;
  # qtrain/quant/delayed.py). First-order steps; evaluation scales currently.
  c.amax_history = 0
  # qat: the rules quantize training and evaluation | ptq: training in high
  # precision, the rules (and rotation) evaluate the final params (RTN PTQ),
  # run by python -m qtrain.finetune (qtrain/quant/roste.py).
  c.stage = "qat"
  c.rotation = ml_collections.ConfigDict(dict(
      # Regex fullmatching canonical matmul paths whose operands are rotated,
      # (X R)(R^T W), R = diag(signs) H / sqrt(n) of the contraction dim n; "" = none.
      sites="",
      # all: every block of `sites` | table: per block from `table` | roste:
      # RoSTE's lower level fills `table` when python -m qtrain.finetune starts
      # (identity vs Hadamard, the lower quantization error E per block).
      choose="all",
      # {canonical path: "0110"}: one 0/1 per block ("1" outside the stack); None = unset.
      table=None,
      seed=0,  # Random signs per (seed, path, block).
      calib_batches=8,  # choose=roste: training batches E is measured on (RoSTE: 128 samples).
  ))
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
    if (mc.scan_layers and len(hits) > 1 and quant_cfg.get("amax_history", 0)
        and "weight" in roles):
      raise ValueError(f"config.quant.amax_history: the rules differ between the blocks of "
                       f"{path} in a scanned stack, whose amax histories are one stacked "
                       "variable; give every block the same rule or set "
                       "config.model.scan_layers=False")
    if mc.scan_layers and len(hits) > 1 and learned:
      raise ValueError(f"{wheres[learned[0]]}: a learned-step rule covers only some blocks of "
                       f"{path} in a scanned stack; name every block or set "
                       "config.model.scan_layers=False")


def _check_amax_history(quant_cfg, rules) -> None:
  """Delayed scaling: per-tensor fp8 with absmax calibration on every
  quantizing rule, low-precision backward dots, no rotation."""
  h = quant_cfg.get("amax_history", 0)
  if not isinstance(h, int) or isinstance(h, bool) or h < 0:
    raise ValueError(f"config.quant.amax_history={h!r}: use an int >= 0 (0 = current scaling)")
  if not h:
    return
  if quant_cfg.mode != "fp8":
    raise ValueError(f"config.quant.amax_history={h} (delayed scaling) runs per-tensor fp8; "
                     f"config.quant.mode={quant_cfg.mode!r}: set mode='fp8' or amax_history=0")
  if not quant_cfg.get("int8_backward", True):
    raise ValueError(f"config.quant.amax_history={h} scales dY's fp8 codes: it needs "
                     "config.quant.int8_backward=True (low-precision backward dots)")
  if (quant_cfg.get("rotation") or {}).get("sites"):
    raise ValueError(f"config.quant.amax_history={h} with config.quant.rotation.sites: "
                     "delayed scaling of rotated operands is not built; set amax_history=0")
  for (where, _), rule in zip(named_rules(quant_cfg), rules):
    for role in ("weight", "act"):
      spec = getattr(rule, role)
      if spec is None:
        continue
      if spec.granularity != "tensor":
        raise ValueError(f"{where}.{role}.granularity={spec.granularity!r}: "
                         f"config.quant.amax_history={h} (delayed scaling) keeps one absmax "
                         "per tensor; use granularity='tensor' or amax_history=0")
      if spec.calibration not in ("absmax", "minmax"):
        raise ValueError(f"{where}.{role}.calibration={spec.calibration!r}: delayed scaling "
                         "(config.quant.amax_history) scales from recorded absmaxes; use "
                         "calibration='absmax'")


ROTATION_KEYS = ("sites", "choose", "table", "seed", "calib_batches")
CHOICES = ("all", "table", "roste")
STAGES = ("qat", "ptq")


def rotation_table(rot) -> tuple[tuple[str, tuple[bool, ...]], ...] | None:
  """``config.quant.rotation.table`` as the provider's hashable table."""
  table = rot.get("table")
  if table is None:
    return None
  out = []
  for path, bits in _as_dict(table).items():
    if not isinstance(bits, str) or not bits or set(bits) - {"0", "1"}:
      raise ValueError(f"config.quant.rotation.table[{path!r}]={bits!r}: give one 0/1 per "
                       "block, e.g. '0110'")
    out.append((path, tuple(b == "1" for b in bits)))
  return tuple(out)


def _check_rotation(quant_cfg, model_cfg) -> None:
  """``config.quant.rotation``: fields, and with ``model_cfg`` every rotated
  contraction dim supported and the table covering exactly the matched paths."""
  rot = quant_cfg.get("rotation")
  if rot is None:
    return
  for key in rot.keys():
    if key not in ROTATION_KEYS:
      raise _unknown(key, ROTATION_KEYS, "config.quant.rotation")
  sites, choose = rot.sites, rot.choose
  try:
    re.compile(sites)
  except (re.error, TypeError) as e:
    raise ValueError(f"config.quant.rotation.sites={sites!r} is not a regex: {e}") from None
  if choose not in CHOICES:
    raise ValueError(f"config.quant.rotation.choose={choose!r}: use one of {CHOICES}")
  table = rotation_table(rot)
  if choose == "all" and table is not None:
    raise ValueError("config.quant.rotation.table is set but choose='all' ignores it; set "
                     "choose='table' or table=None")
  if choose == "table" and table is None:
    raise ValueError("config.quant.rotation.choose='table' needs config.quant.rotation.table "
                     "({path: '0110', ...})")
  if not isinstance(rot.calib_batches, int) or rot.calib_batches < 1:
    raise ValueError(f"config.quant.rotation.calib_batches={rot.calib_batches!r}: use an int >= 1")
  if model_cfg is None or not sites:
    return
  from qtrain.layers import ModelConfig, config_sites  # pylint: disable=g-import-not-at-top
  from qtrain.layers.rotation import nearest_supported, supported  # pylint: disable=g-import-not-at-top
  mc = ModelConfig.of(model_cfg)
  matched = {}
  for s in config_sites(mc).matmuls:
    if re.fullmatch(sites, s.path):
      if not supported(s.in_features):
        below, above = nearest_supported(s.in_features)
        raise ValueError(f"config.quant.rotation.sites={sites!r} matches {s.path}, whose "
                         f"contraction dim {s.in_features} has no Hadamard matrix here "
                         f"(nearest supported: {below}, {above}); narrow the regex")
      matched[s.path] = mc.n_layers if s.layered else 1
  if not matched:
    raise ValueError(f"config.quant.rotation.sites={sites!r} matches no matmul of the model; "
                     f"paths: {list(config_sites(mc).paths())}")
  if table is None:
    return
  given = dict(table)
  for path, blocks in matched.items():
    if path not in given:
      raise ValueError(f"config.quant.rotation.table has no entry for {path}, which "
                       "config.quant.rotation.sites matches")
    if len(given[path]) != blocks:
      raise ValueError(f"config.quant.rotation.table[{path!r}] has {len(given[path])} "
                       f"entries; the model has {blocks} there")
  extra = sorted(set(given) - set(matched))
  if extra:
    raise ValueError(f"config.quant.rotation.table names {extra}, which "
                     "config.quant.rotation.sites does not match")


def rotation_provider(quant_cfg):
  """The ``RotationProvider`` of ``config.quant.rotation``, or None when off."""
  rot = quant_cfg.get("rotation")
  if rot is None or not rot.sites:
    return None
  if rot.choose == "roste" and rot.get("table") is None:
    # A ConfigError (a ValueError): the trainer's CLI prints it as one line, not a traceback.
    from qtrain.config.validate import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError("config.quant.rotation.choose='roste': the table is chosen by RoSTE's "
                     "lower level when `python -m qtrain.finetune --init_from=RUN` starts; run "
                     "through it, or set choose='table' with a table")
  return RotationProvider(pattern=rot.sites, table=rotation_table(rot), seed=int(rot.seed))


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
  from qtrain.kernels.dispatch import KERNELS  # pylint: disable=g-import-not-at-top
  if quant_cfg.get("kernels", "xla") not in KERNELS:
    raise ValueError(f"config.quant.kernels={quant_cfg.kernels!r}: use one of {KERNELS}")
  if quant_cfg.get("kernels", "xla") != "xla" and quant_cfg.mode not in ("int8", "fp8"):
    raise ValueError(f"config.quant.kernels={quant_cfg.kernels!r} runs the int8 dots and the "
                     f"fp8 codes' cast: it needs config.quant.mode='int8' or 'fp8' (got "
                     f"{quant_cfg.mode!r}); or set kernels='xla'")
  if quant_cfg.get("stage", "qat") not in STAGES:
    raise ValueError(f"config.quant.stage={quant_cfg.stage!r}: use one of {STAGES}")
  _check_rotation(quant_cfg, model_cfg)
  if quant_cfg.get("grad_stochastic_rounding", False) and quant_cfg.mode == "fp8":
    raise ValueError("config.quant.grad_stochastic_rounding=True: implemented for "
                     "mode='int8' only (fp8 gradients use e5m2 round-to-nearest)")
  rules = rules_from_config(quant_cfg)
  for (where, _), rule in zip(named_rules(quant_cfg), rules):
    _check_mode(rule, where, quant_cfg.mode)
  _check_amax_history(quant_cfg, rules)
  if model_cfg is not None:
    _check_dims(quant_cfg, rules, model_cfg)
  return rules


def provider_from_config(quant_cfg, model_cfg=None, *, stage: str | None = None):
  """HighPrecision for mode 'none' (or while training a 'ptq' stage), else a
  QuantProvider over the rules, rotating first where ``rotation`` says.
  ``stage``: overrides ``config.quant.stage`` ('qat' builds the quantized
  model of a 'ptq' config, to evaluate it)."""
  rules = validate_quant(quant_cfg, model_cfg)
  stage = stage or quant_cfg.get("stage", "qat")
  if quant_cfg.mode == "none" or stage == "ptq":
    return HighPrecision()  # The pass-through provider.
  return QuantProvider(rules=rules, mode=quant_cfg.mode,
                       int8_backward=bool(quant_cfg.get("int8_backward", True)),
                       grad_stochastic_rounding=bool(quant_cfg.get("grad_stochastic_rounding",
                                                                   False)),
                       rotation=rotation_provider(quant_cfg),
                       kernels=quant_cfg.get("kernels", "xla"),
                       amax_history=int(quant_cfg.get("amax_history", 0)))


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
