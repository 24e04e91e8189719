"""W4A16 weight-only QAT: int4 symmetric per-channel (or per-group, "g128")
weights with STE, activations unquantized, fake-quant dots. LM head in high
precision unless ``get_quant("lm_head")``.

  c.quant = configs.quant.w4a16.get_quant("g64")
"""

from configs.quant import base


def get_quant(arg: str = ""):
  opts = base.parse(arg, "w4a16")
  return base.make("fake", opts, weight=base.int_spec(4, "channel"), act=None)
