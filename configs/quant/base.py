"""Shared pieces of the quantization presets in this folder.

A preset is ``get_quant(arg="") -> ConfigDict`` for ``config.quant``:

  from configs.quant import w4a4
  c.quant = w4a4.get_quant()            # in a config file's get_config()
  c.quant = w4a4.get_quant("lm_head")   # also quantize the LM head

``arg`` is a comma-separated list of switches:
  lm_head   also quantize the LM head (by default no rule names it, so it
            stays in high precision, the usual choice: it is one matmul and
            the most sensitive one).
  g<N>      weight scales per group of N along the contraction dim (fake-quant
            presets only; N must divide every matched contraction dim).
  sr        stochastic rounding of dY in the int8 backward.
  hp_bwd    int8/fp8 modes: float32 backward dots instead of int8/fp8 ones.
  pallas    ``config.quant.kernels='auto'`` (one device only): int8 mode's
            dots through qtrain/kernels' Pallas kernel where the device has
            one; per-tensor fp8's codes cast in both layouts by the
            cast+transpose kernel on a GPU. benchmarks/quant_step.py times
            ``w8a8+pallas`` beside ``w8a8``, ``fp8+tensor+pallas`` beside
            ``fp8+tensor``.
  tensor    fp8 preset: one power-of-two scale per tensor for activations,
            weights and gradients instead of per token / channel, so each
            dot is one cuBLASLt fp8 GEMM with the scale fused (torchtitan's
            and Transformer Engine's "tensorwise" recipe, with the current
            step's absmax).
"""

import ml_collections

from qtrain.quant.config import quant_config_defaults

# Canonical paths (no layer index) of the seven weight matmuls per block, and
# of both factors when a weight form splits them (low_rank: <path>/a, <path>/b).
LINEARS = r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)(/a|/b)?"
ATTENTION = r"decoder/layers/attn"  # Where the KV quantizer applies.
LM_HEAD = "lm_head"
SWITCHES = ("lm_head", "sr", "hp_bwd", "pallas")


def parse(arg: str, preset: str, extra: tuple[str, ...] = ()) -> dict:
  """Switches of ``arg``; ``extra``: the preset's own ones (e.g. fp8's tensor)."""
  opts = {"lm_head": False, "sr": False, "hp_bwd": False, "pallas": False, "group": None}
  opts.update({name: False for name in extra})
  for tok in filter(None, (t.strip() for t in arg.split(","))):
    if tok in SWITCHES + extra:
      opts[tok] = True
    elif tok[0] == "g" and tok[1:].isdigit():
      opts["group"] = int(tok[1:])
    else:
      raise ValueError(f"configs/quant/{preset}.py: unknown switch {tok!r}; "
                       f"use {SWITCHES + extra} or g<N> (e.g. g128)")
  return opts


def int_spec(bits: int, granularity: str, symmetric: bool = True, **kw) -> dict:
  return dict(bits=bits, format="int", granularity=granularity, symmetric=symmetric,
              calibration="absmax" if symmetric else "minmax", **kw)


def weight_spec(spec: dict, opts: dict) -> dict:
  if opts["group"]:
    spec = dict(spec, granularity="group", group_size=opts["group"])
  return spec


def make(mode: str, opts: dict, weight: dict, act: dict | None, kv: dict | None = None):
  """config.quant with a rule ``linears`` for the block matmuls (+ LM head) and
  ``kv`` for the KV cache; a field of either is overridable from the command
  line, e.g. ``--config.quant.rules.linears.act.bits=8``."""
  c = quant_config_defaults()
  c.mode = mode
  pattern = f"{LINEARS}|{LM_HEAD}" if opts["lm_head"] else LINEARS
  rules = {"linears": dict(pattern=pattern, weight=weight_spec(weight, opts), act=act, kv=None)}
  if kv is not None:
    rules["kv"] = dict(pattern=ATTENTION, weight=None, act=None, kv=kv)
  c.rules = ml_collections.ConfigDict(rules)
  c.order = tuple(rules)
  c.grad_stochastic_rounding = opts["sr"]
  c.int8_backward = not opts["hp_bwd"]
  if opts["pallas"]:
    c.kernels = "auto"
  return c
