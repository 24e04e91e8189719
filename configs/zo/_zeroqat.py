"""ZeroQAT's shared part: a fake-quantized model with learned (LSQ) weight steps
(and activation steps where the preset quantizes activations); the weights
stay frozen at their pre-trained values and only the quantizer steps (and,
with ``norms=True``, the norm gains) are tuned zeroth-order by ZO-Adam.
The steps are fitted to the loaded weights and a real batch at the start
(qtrain/train/warm_start.py), then tuned.
"""

from qtrain.config.variants import config_module

STEPS = r".*(weight|act)_(step|offset)"
NORMS = r".*norm/scale"


def learned(spec: dict) -> dict:
  """An int spec with an LSQ step (per channel for weights, per tensor otherwise)."""
  spec = dict(spec, calibration="lsq", estimator="lsq", symmetric=True)
  if spec["granularity"] not in ("tensor", "channel"):
    spec["granularity"] = "tensor"
  return spec


def get_config(arg: str, preset: str, *, norms: bool = False):
  variants = [v for v in arg.split(",") if v.strip()] + [preset]
  c = config_module("zo._base").get_config(",".join(variants), rule="adamw", lr=1e-4,
                                           eps=1e-4)  # Steps ~ 1e-2: eps a small share.
  c.quant.mode = "fake"  # Learned steps are a fake-quant feature (also for W8A8).
  rule = c.quant.rules.linears
  rule.weight = learned(rule.weight.to_dict())
  if rule.act is not None:
    rule.act = learned(rule.act.to_dict())
  moving = f"{STEPS}|{NORMS}" if norms else STEPS
  c.optim.groups = (dict(pattern=moving), dict(pattern=r".*", optimizer="frozen"))
  c.optim.weight_decay = 0.0  # A decayed step would shrink the grid, not regularise.
  return c
