"""FP8 training dots: e4m3 per-channel weights x e4m3 per-token activations
forward, e5m2 gradients backward, float32 accumulation. LM head in high
precision unless ``get_quant("lm_head")``.

``get_quant("tensor")`` (``fp8+tensor`` on the command line): one
power-of-two scale per tensor for activations, weights and gradients, each
dot one cuBLASLt fp8 GEMM with its scale fused: the faster step on an H100
(llama_1b 1.16x bf16; 1.24x as ``fp8+tensor+pallas``, whose cast+transpose
kernel writes the codes in both layouts; the per-token step measured 0.94x
in an earlier run) and the faster compile (70-100 s; the per-token llama_1b
step had not compiled after 300 s on jax 0.11.2): docs/benchmarks.md.

``fp8+tensor+delayed``: the same with delayed scaling
(``config.quant.amax_history``, qtrain/quant/delayed.py): each tensor is cast
with the scale of its absmax over the last 16 steps, this step's recorded
in the cast's own pass, so no pass reads a tensor for its scale alone
(llama_1b as ``fp8+tensor+pallas+delayed``: 1.28-1.29x the bf16 step).

  c.quant = configs.quant.fp8.get_quant()
"""

from configs.quant import base


def get_quant(arg: str = ""):
  opts = base.parse(arg, "fp8", extra=("tensor", "delayed"))
  if opts["delayed"] and not opts["tensor"]:
    raise ValueError("configs/quant/fp8.py: 'delayed' scales per tensor; use fp8+tensor+delayed")
  per_tensor = dict(granularity="tensor", scale_pow2=True) if opts["tensor"] else {}
  fp8 = lambda g: {**dict(bits=8, format="fp8_e4m3", granularity=g, calibration="absmax"),
                   **per_tensor}
  c = base.make("fp8", opts, weight=fp8("channel"), act=fp8("token"))
  if opts["delayed"]:
    c.amax_history = AMAX_HISTORY
  return c


# fp8+tensor+delayed's history length: TransformerEngine's recipe defaults to
# 1024 steps; torchao's delayed recipe used 16 (a shorter memory of a spike).
AMAX_HISTORY = 16
