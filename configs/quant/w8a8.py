"""W8A8 on real int8 dots: int8 per-channel weights x int8 per-token activations,
int32 accumulation, int8 backward dots. LM head in high precision unless
``get_quant("lm_head")``.

  c.quant = configs.quant.w8a8.get_quant()
"""

from configs.quant import base


def get_quant(arg: str = ""):
  opts = base.parse(arg, "w8a8")
  return base.make("int8", opts, weight=base.int_spec(8, "channel"),
                   act=base.int_spec(8, "token"))
