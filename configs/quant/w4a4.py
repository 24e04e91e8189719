"""W4A4 QAT (fake quant, STE) with RoSTE's quantizers: int4 symmetric
per-channel weights, int4 asymmetric (min/max) per-token activations. LM head
in high precision unless ``get_quant("lm_head")``.

  c.quant = configs.quant.w4a4.get_quant()
"""

from configs.quant import base


def get_quant(arg: str = ""):
  opts = base.parse(arg, "w4a4")
  return base.make("fake", opts, weight=base.int_spec(4, "channel"),
                   act=base.int_spec(4, "token", symmetric=False))
