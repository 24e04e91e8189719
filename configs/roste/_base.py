"""RoSTE (Wei et al., ICML 2025) and its comparisons at W4A4KV4: the base of
the five files in this folder, which differ only in when the quantizers apply
(``config.quant.stage``) and which matmuls are rotated (``config.quant.rotation``).

  sft_rtn         SFT in high precision, then W4A4KV4 with RTN weights
  sft_quarot      SFT, then every matmul rotated (random Hadamard) + RTN: QuaRot-style
  ste             quantization-aware SFT (STE), no rotation
  ste_rotate_all  quantization-aware SFT with every matmul rotated (rotated STE)
  roste           quantization-aware SFT with RoSTE's per-(matmul, block) choice

  python -m qtrain.data.prepare --task=sft_en --out=data/sft_kjv --vocab_from=data/kjv
  python -m qtrain.train --config=configs/default.py --workdir=runs/default   # the base
  python -m qtrain.finetune --config=configs/roste/roste.py --init_from=runs/default \\
      --workdir=runs/roste/roste
  python -m qtrain.finetune --config=configs/roste/roste.py:125m \\
      --init_from=runs/125m_corpus --workdir=runs/roste_125m/roste
  python -m qtrain.finetune --config=configs/roste/roste.py:smoke,c90 ...   # tests

Every run ends with the W4A4KV4 held-out response loss and perplexity of its
final params under its own quantizers (``qtrain/quant/roste.py:quantized_eval``,
``<workdir>/quantized_eval.json``): the QAT model as it trained, or the SFT
model with its weights round-to-nearest, so the five numbers compare. The PTQ
evaluation is this, not ``qtrain.sweep``'s ``ptq:`` / ``python -m
qtrain.quantize``: those take recipes from configs/quant, which have neither
RoSTE's asymmetric clipped weights nor the rotation; the RTN numerics are the
same function (``qtrain.quant.quantize`` per output channel).

Quantizers (RoSTE sec. 5): int4 asymmetric everywhere; weights per output
channel, activations per token, K/V per token (per head); weights and
activations clipped to c times their [min, max] (``calibration="mse"`` over
the one ratio c), K/V not clipped. The clipping factor is a variant ``c<percent>``:
``c100`` (default), ``c95``, ``c90`` (the paper's grid), any other ``c85``...,
e.g. ``python -m qtrain.finetune --config=configs/roste/roste.py:c90 ...``.

Sizes (the variant): none = the ``make train`` model (configs/default.py) on
``data/sft_kjv``; ``125m`` = configs/llama_125m.py:sft (data/sft_en, from the
``corpus`` run); ``smoke`` = configs/default.py:smoke (data/kjv, seconds).
"""

import ml_collections

from qtrain.config.variants import config_module, split_variants
from qtrain.quant.config import quant_config_defaults

SIZES = ("125m", "smoke")
CLIPS = ("c100", "c95", "c90")  # The paper's grid; any c<percent> in (0, 100] works.
# The block matmuls (and low-rank factors); the LM head stays in high precision.
LINEARS = r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)(/a|/b)?"
ATTENTION = r"decoder/layers/attn"
# 164k tokens: a QAT step of 16 x 128 tokens took ~8 s on the shared 2-core CPU
# (load ~10), so the five runs take ~45 minutes.
CPU_STEPS = 80
CPU_EVAL_BATCHES = 16  # Of ~85 held-out batches, spread over all of them.
CALIB_SAMPLES = 128  # RoSTE's lower level: n = 128 samples.


def int4(granularity: str, clip: float) -> dict:
  """Asymmetric int4; ``clip`` < 1 shrinks [min, max] by that factor."""
  calibration = dict(calibration="minmax") if clip == 1.0 else dict(
      calibration="mse", mse_grid=(clip,))
  return dict(bits=4, format="int", symmetric=False, granularity=granularity, **calibration)


def quant(clip: float = 1.0, *, stage: str = "qat", rotate: str = "none"):
  """config.quant of a method: W4A4KV4 rules; ``rotate`` none | all | roste."""
  c = quant_config_defaults()
  c.mode, c.stage = "fake", stage
  rules = {"linears": dict(pattern=LINEARS, weight=int4("channel", clip),
                           act=int4("token", clip), kv=None),
           "kv": dict(pattern=ATTENTION, weight=None, act=None, kv=int4("token", 1.0))}
  c.rules = ml_collections.ConfigDict(rules)
  c.order = tuple(rules)
  if rotate != "none":
    c.rotation.update(sites=LINEARS, choose=rotate)
  return c


def get_config(arg: str = "", *, stage: str, rotate: str):
  variants = split_variants(arg)
  is_clip = lambda v: v[0] == "c" and v[1:].isdigit() and 0 < int(v[1:]) <= 100
  unknown = [v for v in variants if v not in SIZES and not is_clip(v)]
  if unknown:
    raise ValueError(f"configs/roste: unknown variant {unknown[0]!r}; use a size {SIZES} "
                     f"and/or a clipping factor c<percent>, e.g. {CLIPS}")
  size = next((v for v in variants if v in SIZES), "")
  clip = int(next((v for v in variants if is_clip(v)), "c100")[1:]) / 100
  if size == "125m":
    c = config_module("llama_125m").get_config("sft")
  else:
    c = config_module("default").get_config(size)
    if not size:
      c.data.update(dir="data/sft_kjv", eval_batches=CPU_EVAL_BATCHES)
      c.optim.update(lr=3e-4, warmup_steps=CPU_STEPS // 10, decay_steps=0)
      c.train.update(steps=CPU_STEPS, log_every=10, eval_every=CPU_STEPS // 2,
                     checkpoint_every=CPU_STEPS // 2)
  if size == "smoke":
    c.train.update(steps=2, eval_every=2, checkpoint_every=2, sample_tokens=0)
    c.optim.warmup_steps = 1
  c.quant = quant(clip, stage=stage, rotate=rotate)
  # RoSTE's n = 128 calibration samples (rows), one batch at smoke size.
  c.quant.rotation.calib_batches = 1 if size == "smoke" else max(
      CALIB_SAMPLES // c.data.global_batch_size, 1)
  return c
