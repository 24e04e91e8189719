"""FP8 training dots: e4m3 per-channel weights x e4m3 per-token activations
forward, e5m2 gradients backward, float32 accumulation. LM head in high
precision unless ``get_quant("lm_head")``.

  c.quant = configs.quant.fp8.get_quant()
"""

from configs.quant import base


def get_quant(arg: str = ""):
  opts = base.parse(arg, "fp8")
  fp8 = lambda g: dict(bits=8, format="fp8_e4m3", granularity=g, calibration="absmax")
  return base.make("fp8", opts, weight=fp8("channel"), act=fp8("token"))
