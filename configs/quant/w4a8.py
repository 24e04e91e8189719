"""W4A8 on real int8 dots: int4 per-channel weight codes (in int8 containers) x
int8 per-token activations, int8 backward. LM head in high precision unless
``get_quant("lm_head")``.

  c.quant = configs.quant.w4a8.get_quant()
"""

from configs.quant import base


def get_quant(arg: str = ""):
  opts = base.parse(arg, "w4a8")
  return base.make("int8", opts, weight=base.int_spec(4, "channel"),
                   act=base.int_spec(8, "token"))
