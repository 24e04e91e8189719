"""W4A4KV4 QAT: the w4a4 preset plus int4 asymmetric per-token (per head)
keys and values, the OSP / RoSTE evaluation setting. The KV rule targets the
attention module path; the quant provider applies it at the attention's ``key``/``value`` sites.
LM head in high precision unless ``get_quant("lm_head")``.

  c.quant = configs.quant.w4a4kv4.get_quant()
"""

from configs.quant import base


def get_quant(arg: str = ""):
  opts = base.parse(arg, "w4a4kv4")
  return base.make("fake", opts, weight=base.int_spec(4, "channel"),
                   act=base.int_spec(4, "token", symmetric=False),
                   kv=base.int_spec(4, "token", symmetric=False))
